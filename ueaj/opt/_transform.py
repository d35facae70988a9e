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

  Args:
    groups: The resolved groups; frozen groups get `optax.set_to_zero()`,
      which holds no state.
    labels: The label of every parameter path.
    shapes: The shape of every parameter path, to check inputs against.

  Returns:
    An `optax.GradientTransformationExtraArgs` over states with exactly the
    paths of `labels`. Inputs with other paths or shapes raise
    `StructureMismatchError` before optax sees them.
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

  def label_tree(tree: Any) -> Any:
    return jax.tree_util.tree_map_with_path(
      lambda keypath, _: labels[path_of(keypath)],
      tree,
      is_leaf=lambda x: isinstance(x, nnx.Variable),
    )

  inner = optax.partition(transforms, label_tree)

  def init_fn(params):
    check_structure(params, "parameters", labels, shapes)
    return inner.init(params)

  def update_fn(updates, state, params=None, **extra_args):
    check_structure(updates, "gradients", labels, shapes)
    if params is not None:
      check_structure(params, "parameters", labels, shapes)
    return inner.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def check_structure(
  tree: Any, what: str, labels: dict[Path, str], shapes: dict[Path, tuple[int, ...]]
) -> None:
  """Raise a readable error if `tree` does not have the built paths and shapes.

  This runs in Python while tracing, so under `jax.jit` it costs nothing per
  step.

  Raises:
    StructureMismatchError: Naming the first missing or unexpected path, or
      the first path whose shape differs.
  """
  leaves = flatten_paths(tree)
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


def _shape_of(leaf: Any) -> tuple[int, ...] | None:
  if isinstance(leaf, nnx.Variable):
    leaf = leaf.get_value()
  shape = getattr(leaf, "shape", None)
  return None if shape is None else tuple(shape)
