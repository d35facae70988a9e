"""Vectorized groups: run the per-layer groups of a stack as one `jax.vmap`.

Per-layer groups of a stacked Variable (`mgr['layers', :] = ...` after
`mgr.declare_stack('layers')`) would otherwise need one slice, one update and
one scatter per layer: copies of parameters, gradients and updates, and a
traced graph that grows with depth. When the layers' transforms have the same
structure, this module runs them as one update mapped over the layer axis,
so the stacked arrays are used in place and the state gets a leading layer
axis.

Transforms that differ only in float hyperparameters (a rule returning
`optax.adamw(lr_i)` per layer) are vectorized too: their closures are rebuilt
with the floats replaced by the entries of one stacked array, so each layer
still computes with its own values.
"""

from __future__ import annotations

import functools
import types
from typing import Any, Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ueaj.opt import _config

# The same depth bound as configuration fingerprints.
_MAX_DEPTH = 64


class _NotTemplatable(Exception):
  """Raised when a transform cannot be rebuilt with replaced hyperparameters."""


def skeleton(transform: Any) -> Hashable:
  """Return the configuration of `transform` with every float replaced by a marker.

  Transforms with equal skeletons differ at most in float hyperparameters.
  """
  try:
    return _config.fingerprint(_mask_floats(transform, 0, set()))
  except _NotTemplatable:
    return _config.fingerprint(transform)


def _mask_floats(value: Any, depth: int, active: set[int]) -> Any:
  """Copy the containers of `value`, replacing floats with one shared marker."""
  if isinstance(value, float):
    return _FLOAT
  return _map_structure(value, lambda item: _mask_floats(item, depth + 1, active), depth, active)


_FLOAT = ("float-hyperparameter",)


def _map_structure(
  value: Any, transform: Callable[[Any], Any], depth: int, active: set[int]
) -> Any:
  """Rebuild `value` with `transform` applied to its children.

  Children are the items of tuples, lists and dicts, the function, arguments
  and keywords of a `functools.partial`, and the defaults and closure
  contents of a Python function. Other values are returned as they are.

  Raises:
    _NotTemplatable: The structure is cyclic or deeper than `_MAX_DEPTH`.
  """
  if depth > _MAX_DEPTH or id(value) in active:
    raise _NotTemplatable(f"cyclic or too deep at {type(value).__name__}")
  if not isinstance(
    value, (tuple, list, dict, functools.partial, types.FunctionType, types.MethodType)
  ):
    return value

  active.add(id(value))
  try:
    if isinstance(value, tuple):
      items = [transform(item) for item in value]
      return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
      return [transform(item) for item in value]
    if isinstance(value, dict):
      return type(value)((key, transform(item)) for key, item in value.items())
    if isinstance(value, functools.partial):
      return functools.partial(
        transform(value.func),
        *[transform(arg) for arg in value.args],
        **{key: transform(arg) for key, arg in value.keywords.items()},
      )
    if isinstance(value, types.MethodType):
      return types.MethodType(transform(value.__func__), transform(value.__self__))
    return _rebuild_function(value, transform)
  finally:
    active.discard(id(value))


def _rebuild_function(function: types.FunctionType, transform: Callable[[Any], Any]):
  cells = []
  for cell in function.__closure__ or ():
    try:
      contents = cell.cell_contents
    except ValueError:  # An unassigned cell stays unassigned.
      cells.append(types.CellType())
    else:
      cells.append(types.CellType(transform(contents)))
  defaults = function.__defaults__
  rebuilt = types.FunctionType(
    function.__code__,
    function.__globals__,
    function.__name__,
    None if defaults is None else tuple(transform(item) for item in defaults),
    tuple(cells) if function.__closure__ is not None else None,
  )
  if function.__kwdefaults__ is not None:
    rebuilt.__kwdefaults__ = {
      key: transform(item) for key, item in function.__kwdefaults__.items()
    }
  rebuilt.__qualname__ = function.__qualname__
  rebuilt.__dict__.update(function.__dict__)
  return rebuilt


def float_leaves(transform: Any) -> list[float]:
  """Return the float hyperparameters of `transform` in a fixed traversal order."""
  found: list[float] = []

  def visit(value: Any, depth: int, active: set[int]) -> Any:
    if isinstance(value, float):
      found.append(value)
      return value
    return _map_structure(value, lambda item: visit(item, depth + 1, active), depth, active)

  visit(transform, 0, set())
  return found


def with_floats(transform: Any, values: Sequence[Any]) -> Any:
  """Rebuild `transform` with its float hyperparameters replaced by `values`."""
  remaining = iter(values)

  def visit(value: Any, depth: int, active: set[int]) -> Any:
    if isinstance(value, float):
      return next(remaining)
    return _map_structure(value, lambda item: visit(item, depth + 1, active), depth, active)

  return visit(transform, 0, set())


def vectorized(
  transforms: Sequence[optax.GradientTransformation], axes: Sequence[int]
) -> optax.GradientTransformationExtraArgs | None:
  """Combine per-layer transforms of equal structure into one mapped transform.

  Args:
    transforms: One transform per layer, in layer order.
    axes: The layer axis of each leaf the combined transform will receive,
      in the order of its leaves.

  Returns:
    A transform over the stacked leaves whose state has a leading layer
    axis on every array, or None when the transforms cannot be combined
    (different structures, or floats used where a traced value fails).
  """
  if len({_config.fingerprint(transform) for transform in transforms}) == 1:
    leaves = [[] for _ in transforms]
  else:
    try:
      leaves = [float_leaves(transform) for transform in transforms]
    except _NotTemplatable:
      return None
  if len({len(values) for values in leaves}) != 1:
    return None
  template = transforms[0]
  varying = [
    slot
    for slot in range(len(leaves[0]))
    if len({values[slot] for values in leaves}) > 1
  ]
  # Each varying float becomes one float32 array with an entry per layer.
  table = tuple(
    jnp.asarray(np.array([values[slot] for values in leaves], dtype=np.float32))
    for slot in varying
  )

  def layer_transform(row: tuple) -> optax.GradientTransformationExtraArgs:
    if not varying:
      return optax.with_extra_args_support(template)
    values = list(leaves[0])
    for slot, value in zip(varying, row):
      values[slot] = value
    return optax.with_extra_args_support(with_floats(template, values))

  axes = tuple(axes)

  def init_fn(params):
    flat, _ = jax.tree.flatten(params)
    return jax.vmap(
      lambda row, *layer: layer_transform(row).init(tuple(layer)),
      in_axes=(0, *axes),
    )(table, *flat)

  def update_fn(updates, state, params=None, **extra_args):
    flat_updates, treedef = jax.tree.flatten(updates)
    flat_params = None if params is None else tuple(jax.tree.leaves(params))

    def one_layer(row, layer_state, layer_updates, layer_params):
      return layer_transform(row).update(
        layer_updates, layer_state, layer_params, **extra_args
      )

    new_updates, new_state = jax.vmap(
      one_layer,
      in_axes=(0, 0, axes, None if flat_params is None else axes),
      out_axes=(axes, 0),
    )(table, state, tuple(flat_updates), flat_params)
    return jax.tree.unflatten(treedef, list(new_updates)), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
