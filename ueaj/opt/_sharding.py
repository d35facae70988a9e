"""Sharding of optimizer state: each state array follows its parameter's sharding."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ueaj.opt._plan import Unit


def sharding_of(leaf: Any) -> NamedSharding | PartitionSpec | None:
  """Return the sharding a parameter leaf requests, or None when it has none.

  - A Variable with `out_sharding` metadata (set by `nnx.with_partitioning`)
    gives its PartitionSpec, on the Variable's `mesh` metadata or else on
    the mesh of the current `jax.set_mesh` context.
  - A concrete array gives its own NamedSharding.
  - A traced value whose type carries Explicit mesh axes gives None: JAX
    keeps the sharding of values derived from it.
  - Any other Variable under a mesh context is replicated, as
    `nnx.get_partition_spec` reads Variables without `out_sharding`.
  """
  value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
  context_mesh = jax.sharding.get_abstract_mesh()
  if isinstance(leaf, nnx.Variable) and leaf.get_metadata("out_sharding", None):
    spec = nnx.spmd.get_var_pspec(leaf)
    mesh = leaf.get_metadata("mesh", None)
    if mesh is not None:
      return NamedSharding(mesh, spec)
    return None if context_mesh.empty else spec
  if isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer):
    sharding = value.sharding
    return sharding if isinstance(sharding, NamedSharding) else None
  if not isinstance(leaf, nnx.Variable) or context_mesh.empty:
    return None
  typed = getattr(jax.typeof(value), "sharding", None)
  axis_types = getattr(getattr(typed, "mesh", None), "axis_types", ())
  if any(axis_type == jax.sharding.AxisType.Explicit for axis_type in axis_types):
    return None
  return PartitionSpec()


def _move_to_front(sharding: Any, axis: int) -> Any:
  """Move entry `axis` of a sharding's spec to position 0."""
  spec = sharding.spec if isinstance(sharding, NamedSharding) else sharding
  entries = list(spec)
  entry = entries.pop(axis) if axis < len(entries) else None
  moved = PartitionSpec(entry, *entries)
  return NamedSharding(sharding.mesh, moved) if isinstance(sharding, NamedSharding) else moved


def leaf_shardings(leaves: list[Any]) -> list[Any] | None:
  """Return `sharding_of` for every leaf, or None when no leaf has a sharding."""
  shardings = [sharding_of(leaf) for leaf in leaves]
  return None if all(sharding is None for sharding in shardings) else shardings


def _usable(sharding: Any) -> bool:
  """Return whether `with_sharding_constraint` can apply `sharding` here."""
  if sharding is None:
    return False
  return isinstance(sharding, NamedSharding) or not jax.sharding.get_abstract_mesh().empty


def _place(value: Any, target: Any) -> Any:
  """Shard `value` as `target`: `reshard` for Explicit mesh axes, else a constraint."""
  # A constant's type may carry an empty mesh, so read the context mesh too.
  mesh = getattr(getattr(jax.typeof(value), "sharding", None), "mesh", None)
  axis_types = (*getattr(mesh, "axis_types", ()), *jax.sharding.get_abstract_mesh().axis_types)
  if any(axis_type == jax.sharding.AxisType.Explicit for axis_type in axis_types):
    # with_sharding_constraint only asserts the sharding on Explicit axes.
    return jax.sharding.reshard(value, target)
  return jax.lax.with_sharding_constraint(value, target)


def constrain_state(
  state: optax.PartitionState,
  units: Sequence[Unit],
  grouped: dict[str, tuple],
  shardings: list[Any],
  stack_axes: dict[int, int],
) -> optax.PartitionState:
  """Give every parameter-shaped array in each unit's state its parameter's sharding.

  A unit's transform receives `grouped` with every other unit masked, so
  state that mirrors parameters (Adam's `mu` and `nu`, momentum traces)
  has that masked structure. A vectorized unit's state mirrors the tuple of
  its pieces with the layer axis moved to the front. Such subtrees are
  found by structure and shape, and each array is given its parameter's
  sharding. `stack_axes` maps the position of every stacked leaf to its
  layer axis.

  Under a `jax.set_mesh` context, scalars (step counts, hyperparameters)
  and other vectors are replicated, except that the per-layer vectors of a
  vectorized unit are sharded as its layer axis. Arrays of two or more
  axes that mirror no parameter are left to JAX.
  """
  replicated = PartitionSpec() if not jax.sharding.get_abstract_mesh().empty else None
  inner_states = dict(state.inner_states)
  for unit in units:
    targets = [shardings[piece.position] for piece in unit.pieces]
    pieces = grouped[unit.key]
    shapes = [tuple(np.shape(piece)) for piece in pieces]
    if unit.vectorized:
      # The state has the layer axis of each piece in front.
      axes = [stack_axes[piece.position] for piece in unit.pieces]
      targets = [
        None if target is None else _move_to_front(target, axis)
        for target, axis in zip(targets, axes)
      ]
      shapes = [
        (shape[axis], *shape[:axis], *shape[axis + 1 :]) for shape, axis in zip(shapes, axes)
      ]
      mirror = jax.tree.structure(tuple(range(len(pieces))))
      # Per-layer arrays that mirror no parameter (counts, hyperparameters)
      # follow the layer axis, because vmap needs its mapped axes sharded alike.
      first = targets[0]
      if _usable(first):
        spec = first.spec if isinstance(first, NamedSharding) else first
        layer_spec = PartitionSpec(spec[0] if len(spec) else None)
        small = NamedSharding(first.mesh, layer_spec) if isinstance(first, NamedSharding) else layer_spec
      else:
        small = None
    else:
      small = replicated
      masked = {key: optax.MaskedNode() for key in grouped}
      masked[unit.key] = tuple(range(len(pieces)))
      mirror = jax.tree.structure(masked)

    def mirrors_params(node: Any) -> bool:
      if jax.tree.structure(node) != mirror:
        return False
      return [tuple(np.shape(x)) for x in jax.tree.leaves(node)] == shapes

    def constrain(node: Any) -> Any:
      if not mirrors_params(node):
        # NOTE: arrays of two or more axes that mirror no parameter (from a
        # transform that reshapes its state) are left to JAX, not replicated.
        if small is None or np.ndim(node) > 1:
          return node
        if np.ndim(node) == 0:
          return node if replicated is None else _place(node, replicated)
        return _place(node, small)
      flat, treedef = jax.tree.flatten(node)
      flat = [
        _place(x, target) if _usable(target) else x
        for x, target in zip(flat, targets)
      ]
      return jax.tree.unflatten(treedef, flat)

    masked_state = inner_states[unit.key]
    inner_states[unit.key] = masked_state._replace(
      inner_state=jax.tree.map(constrain, masked_state.inner_state, is_leaf=mirrors_params)
    )
  return state._replace(inner_states=inner_states)
