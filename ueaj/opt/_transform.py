"""Optax assembly: one `optax.partition` over the labels stored in metadata."""

from __future__ import annotations

import math
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ueaj.opt import _precision
from ueaj.opt._errors import MissingLabelError, StructureMismatchError
from ueaj.opt._graph import format_path, path_of
from ueaj.opt._groups import Groups, Label
from ueaj.opt._keys import Path
from ueaj.opt._plan import Piece, Unit, plan_units
from ueaj.opt._sharding import constrain_state, leaf_shardings

#: The Variable metadata key under which a Variable's group label is stored.
LABEL_KEY = "opt_group"


def labels_from_metadata(variables: Iterable[tuple[Path, Any]]) -> dict[Path, Label]:
  """Read the group label of every Variable from its metadata.

  Args:
    variables: `(path, Variable)` pairs in the order of the parameters, for
      example `flatten_paths(nnx.state(model, wrt))`.

  Returns:
    The label of each Variable path, in the given order: a string, or a
    tuple of per-layer labels for a stacked Variable.

  Raises:
    MissingLabelError: A Variable carries no label.
  """
  labels = {}
  unlabelled = []
  for path, leaf in variables:
    label = leaf.get_metadata(LABEL_KEY, None) if isinstance(leaf, nnx.Variable) else None
    if label is None:
      unlabelled.append(path)
    else:
      labels[path] = label
  if unlabelled:
    listed = ", ".join(repr(format_path(path)) for path in unlabelled[:10])
    raise MissingLabelError(
      f"{len(unlabelled)} Variable(s) carry no {LABEL_KEY!r} metadata, for"
      f" example {listed}. Label the model with mgr.label(model, wrt=...) using"
      " the same `wrt` filter as the optimizer."
    )
  return labels


def partition(
  groups: Groups,
  labels: dict[Path, Label],
  shapes: dict[Path, tuple[int, ...]],
  dtypes: dict[Path, Any],
) -> optax.GradientTransformationExtraArgs:
  """Build the transform that applies each group's transform to its Variables.

  The parameters are regrouped into `{unit key: (piece, ...)}` before they
  reach `optax.partition` (see `_plan` for units and pieces), so each
  transform receives only its own leaves plus one empty `optax.MaskedNode` per
  other unit. Masking the full parameter tree once per group instead would
  make tracing grow with groups times Variables. The numbers are those of
  running every group's transform on its own leaves in path order.

  Args:
    groups: The resolved groups; frozen groups get `optax.set_to_zero()`,
      which holds no state.
    labels: The label of every parameter path (per layer for a stacked
      Variable), in the parameters' order.
    shapes: The shape of every parameter path, to check inputs against.
    dtypes: The dtype of every parameter path.

  Returns:
    An `optax.GradientTransformationExtraArgs` over states with exactly the
    paths of `labels`. Inputs with other paths or shapes raise
    `StructureMismatchError` before optax sees them. Its state is an
    `optax.PartitionState` keyed by unit; `groups.unit_of(label)` locates a
    group in it.
  """
  known = set(groups.labels)
  used = {
    layer_label
    for label in labels.values()
    for layer_label in (label if isinstance(label, tuple) else (label,))
  }
  unknown = sorted(used - known)
  if unknown:
    raise MissingLabelError(
      f"Labels {unknown} in the Variables' metadata belong to no group of this"
      f" configuration (groups: {list(known)}). The model was labelled by"
      " another configuration; build the optimizer from the manager that"
      " labelled it."
    )

  units = [unit for unit in plan_units(groups, labels, shapes, dtypes) if unit.pieces]
  # optax keeps float32 state float32, so only units with parameters of
  # another dtype can change state dtypes in `update`. Checking just those
  # keeps float32 models free of one trace per group at build time.
  paths = list(labels)
  _precision.check_units_dtype_stability(
    [
      unit
      for unit in units
      if any(dtypes[paths[piece.position]] != jnp.float32 for piece in unit.pieces)
    ],
    labels,
    shapes,
    dtypes,
  )
  groups.set_units(
    {label: (unit.key, index if unit.vectorized else None)
     for unit in units for index, label in enumerate(unit.labels)}
  )
  stack_axes = {
    position: groups.stacks[path].axis
    for position, path in enumerate(labels)
    if path in groups.stacks
  }
  inner = optax.partition(
    {unit.key: unit.transform for unit in units},
    lambda regrouped: {key: key for key in regrouped},
  )

  def regroup(tree: Any, what: str) -> tuple[dict[str, tuple], list[Any], Any]:
    leaves, treedef = check_structure(tree, what, labels, shapes)
    values = [leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf for leaf in leaves]
    grouped = {
      unit.key: tuple(piece.take(values[piece.position]) for piece in unit.pieces)
      for unit in units
    }
    return grouped, leaves, treedef

  # The parameters' shardings seen by the last `init`, for updates that
  # receive plain arrays (`nnx.Optimizer.update` passes no Variables).
  seen_shardings: list[Any] = []

  def constrain(state, grouped, leaves):
    shardings = leaf_shardings(leaves)
    if shardings is not None:
      seen_shardings[:] = [shardings]
    elif seen_shardings:
      shardings = seen_shardings[0]
    else:
      return state
    return constrain_state(state, units, grouped, shardings, stack_axes)

  def init_fn(params):
    grouped, leaves, _ = regroup(params, "parameters")
    # Under jit with Auto mesh axes, state made from constants would
    # otherwise be replicated, and updates could move it elsewhere.
    return constrain(inner.init(grouped), grouped, leaves)

  def update_fn(updates, state, params=None, **extra_args):
    grouped_updates, leaves, treedef = regroup(updates, "gradients")
    grouped_params = None if params is None else regroup(params, "parameters")[0]
    new_updates, state = inner.update(
      grouped_updates, state, grouped_params, **extra_args
    )
    state = constrain(state, grouped_updates, leaves)
    values = _reassemble(units, new_updates, len(leaves))
    # Gradients given as Variables get their updates back as Variables.
    out = [
      type(leaf).from_metadata(value, leaf.get_metadata())
      if isinstance(leaf, nnx.Variable)
      else value
      for leaf, value in zip(leaves, values)
    ]
    return jax.tree_util.tree_unflatten(treedef, out), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _reassemble(units: list[Unit], grouped: dict[str, tuple], count: int) -> list[Any]:
  """Put the units' update pieces back together, one array per leaf."""
  parts: list[list[tuple[Piece, Any]]] = [[] for _ in range(count)]
  for unit in units:
    for piece, value in zip(unit.pieces, grouped[unit.key]):
      parts[piece.position].append((piece, value))

  values = []
  for pieces in parts:
    if len(pieces) == 1 and pieces[0][0].layers is None:
      values.append(pieces[0][1])
      continue
    # Layers of one stacked leaf updated by several units: concatenate the
    # pieces along the layer axis, then restore the layer order.
    pieces.sort(key=lambda item: item[0].layers[0])
    axis = pieces[0][0].axis
    order = [layer for piece, _ in pieces for layer in piece.layers]
    joined = jnp.concatenate([value for _, value in pieces], axis=axis)
    if order != sorted(order):
      joined = jnp.take(joined, np.argsort(np.asarray(order)), axis=axis)
    values.append(joined)
  return values


def check_structure(
  tree: Any, what: str, labels: dict[Path, Label], shapes: dict[Path, tuple[int, ...]]
) -> tuple[list[Any], Any]:
  """Flatten `tree`, raising a readable error unless it has the built paths and shapes.

  This runs in Python while tracing, so under `jax.jit` it costs nothing per
  step.

  Returns:
    The leaves (Variables count as leaves) in path order and the treedef.

  Raises:
    StructureMismatchError: Naming the first missing or unexpected path, or
      the first path whose shape differs.
  """
  keyed, treedef = jax.tree_util.tree_flatten_with_path(
    tree, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )
  leaves = [(path_of(keypath), leaf) for keypath, leaf in keyed]
  paths = [path for path, _ in leaves]
  if paths != list(labels):
    present = set(paths)
    missing = [path for path in labels if path not in present]
    unexpected = [path for path in paths if path not in labels]
    details = []
    if missing:
      details.append(
        f"{len(missing)} path(s) missing, first {format_path(missing[0])!r}"
      )
    if unexpected:
      details.append(
        f"{len(unexpected)} unexpected path(s), first {format_path(unexpected[0])!r}"
      )
    if not details:
      details.append("the same paths in a different order")
    raise StructureMismatchError(
      f"The {what} do not match the {len(labels)} parameters the optimizer was"
      f" built for: {'; '.join(details)}. Pass a state filtered like the"
      " optimizer's `wrt`, for example nnx.state(model, nnx.Param), and"
      " gradients from nnx.grad with the same filter."
    )
  for path, leaf in leaves:
    shape = _shape_of(leaf)
    if shape is not None and shape != shapes[path]:
      raise StructureMismatchError(
        f"The {what} at {format_path(path)!r} have shape {shape}, but the"
        f" parameter has shape {shapes[path]} (size"
        f" {math.prod(shapes[path])})."
      )
  return [leaf for _, leaf in leaves], treedef


def _shape_of(leaf: Any) -> tuple[int, ...] | None:
  if isinstance(leaf, nnx.Variable):
    leaf = leaf.get_value()
  shape = getattr(leaf, "shape", None)
  return None if shape is None else tuple(shape)
