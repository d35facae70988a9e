"""Optax assembly: one `optax.partition` over the labels stored in metadata."""

from __future__ import annotations

import math
from typing import Any

import jax
import optax
from flax import nnx

from ueaj.opt._errors import MissingLabelError, StructureMismatchError
from ueaj.opt._graph import flatten_paths, format_path, path_of
from ueaj.opt._groups import Groups
from ueaj.opt._keys import Path

#: The Variable metadata key that holds a Variable's group label.
LABEL_KEY = "opt_group"


def labels_from_metadata(state: Any) -> dict[Path, str]:
  """Read the group label of every Variable in `state` from its metadata.

  Args:
    state: An `nnx.State` of Variables, as returned by `nnx.state(model, wrt)`.

  Returns:
    The label of each Variable path, in the state's order.

  Raises:
    MissingLabelError: A Variable carries no label.
  """
  labels = {}
  unlabelled = []
  for path, leaf in flatten_paths(state):
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


def partition(groups: Groups, labels: dict[Path, str], shapes: dict[Path, tuple[int, ...]]):
  """Build the transform that applies each group's transform to its Variables.

  The parameters are regrouped into `{label: (leaf, ...)}` before they reach
  `optax.partition`, so each group's transform sees only its own leaves plus
  one empty `optax.MaskedNode` per other group. Masking the full parameter
  tree once per group instead would make tracing grow with groups times
  Variables. The numbers are the same: every group's transform receives its
  own leaves in path order.

  Args:
    groups: The resolved groups; frozen groups get `optax.set_to_zero()`,
      which holds no state.
    labels: The label of every parameter path, in the parameters' order.
    shapes: The shape of every parameter path, to check inputs against.

  Returns:
    An `optax.GradientTransformationExtraArgs` over states with exactly the
    paths of `labels`. Inputs with other paths or shapes raise
    `StructureMismatchError` before optax sees them. Its state is an
    `optax.PartitionState` keyed by group label.
  """
  transforms = {
    group.label: optax.set_to_zero() if group.frozen else group.transform
    for group in groups
  }
  unknown = sorted(set(labels.values()) - transforms.keys())
  if unknown:
    raise MissingLabelError(
      f"Labels {unknown} in the Variables' metadata belong to no group of this"
      f" configuration (groups: {list(transforms)}). The model was labelled by"
      " another configuration; build the optimizer from the manager that"
      " labelled it."
    )

  # Where each leaf goes: its group's label and its position in that group.
  members: dict[str, list[int]] = {label: [] for label in transforms}
  for position, label in enumerate(labels.values()):
    members[label].append(position)
  members = {label: positions for label, positions in members.items() if positions}
  inner = optax.partition(
    {label: transforms[label] for label in members},
    lambda regrouped: {label: label for label in regrouped},
  )

  def regroup(tree: Any, what: str) -> tuple[dict[str, tuple], Any]:
    leaves, treedef = check_structure(tree, what, labels, shapes)
    grouped = {
      label: tuple(leaves[position] for position in positions)
      for label, positions in members.items()
    }
    return grouped, treedef

  def init_fn(params):
    grouped, _ = regroup(params, "parameters")
    return inner.init(grouped)

  def update_fn(updates, state, params=None, **extra_args):
    grouped_updates, treedef = regroup(updates, "gradients")
    grouped_params = None if params is None else regroup(params, "parameters")[0]
    new_updates, state = inner.update(
      grouped_updates, state, grouped_params, **extra_args
    )
    leaves = [None] * len(labels)
    for label, positions in members.items():
      for position, leaf in zip(positions, new_updates[label]):
        leaves[position] = leaf
    return jax.tree_util.tree_unflatten(treedef, leaves), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def check_structure(
  tree: Any, what: str, labels: dict[Path, str], shapes: dict[Path, tuple[int, ...]]
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
