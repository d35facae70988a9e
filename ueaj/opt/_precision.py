"""Mixed precision per group: state dtype, compute dtype and float32 master weights.

`precision(inner, ...)` wraps an optax transform so that one group can keep
its Adam moments in bfloat16 while another keeps them in float32, and so
that a bfloat16 model can train on float32 master weights. The wrapper is an
ordinary `optax.GradientTransformationExtraArgs`: assign it with
`mgr[key] = ...`, return it from a function rule, or use it without a
manager.

`check_dtype_stability` traces a transform's `init` and `update` with
`jax.eval_shape` and raises when an optimizer-state array changes dtype in
`update`, which would retrace a jitted step and can break `nnx.scan` and
checkpoint restoring.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

# Optax states whose `hyperparams` contain the learning rate and other
# scalars injected by `optax.inject_hyperparams`. Those stay float32.
_INJECT_STATES = (optax.InjectStatefulHyperparamsState, optax.InjectHyperparamsState)


class PrecisionState(NamedTuple):
  """State of a `precision` transform.

  Attributes:
    inner_state: The wrapped transform's state, its floating arrays in the
      policy's state dtype.
    master: Float32 copies of the low-precision floating parameters, with
      the structure of the parameters and None for every other leaf (None
      everywhere without master weights).
  """

  inner_state: optax.OptState
  master: Any


def precision(
  inner: optax.GradientTransformation,
  *,
  state_dtype: Any = None,
  compute_dtype: Any = jnp.float32,
  master_weights: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Wrap `inner` with a precision policy for the group it is assigned to.

  Each `update`:

  1. casts the floating gradients, the parameters (or the master weights)
     and the floating optimizer state to `compute_dtype`;
  2. runs `inner.update` in that dtype;
  3. casts every floating state array back to the dtype it is stored in,
     so the state never changes dtype;
  4. returns the update in the parameter's dtype or, with master weights,
     in float32 (see below).

  Integer state arrays (step counts) are never cast. Hyperparameters that
  `optax.inject_hyperparams` stores are kept in float32 whatever the
  parameter, state and compute dtypes.

  With `master_weights=True`, every floating parameter narrower than 32
  bits gets a float32 copy in the state. The inner transform receives the
  copy as its parameter (for weight decay), and the inner update is added
  to the copy in float32. The returned update is the float32 difference
  `new_master.astype(param.dtype) - param`, so that
  `optax.apply_updates(param, update)`, which computes
  `(param + update).astype(param.dtype)`, gives
  `new_master.astype(param.dtype)` bit for bit (see `_update_from_master`
  for the one exception). Small updates then accumulate in the copy instead
  of being rounded away in the bfloat16 parameter.

  Args:
    inner: The transform to run, for example `optax.adamw(1e-3)`.
    state_dtype: The dtype of every floating array of the inner state (all
      moments, not only the first). None keeps the dtypes that `inner.init`
      gives for parameters in `compute_dtype`.
    compute_dtype: The dtype the inner transform computes in. None runs it
      in the dtypes of the incoming gradients and parameters.
    master_weights: Whether to keep float32 master copies of low-precision
      parameters in the state. Then `update` requires `params`.

  Returns:
    A transform whose state is a `PrecisionState`.

  Raises:
    TypeError: `inner` is not an optax transform.
    ValueError: `state_dtype` or `compute_dtype` is not a floating dtype.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from ueaj import opt
    >>> params = {'w': jnp.ones(3, jnp.bfloat16)}
    >>> tx = opt.precision(optax.adam(1e-3), state_dtype=jnp.bfloat16)
    >>> state = tx.init(params)
    >>> state.inner_state[0].mu['w'].dtype, state.inner_state[0].nu['w'].dtype
    (dtype(bfloat16), dtype(bfloat16))
    >>> tx = opt.precision(optax.sgd(1e-4), master_weights=True)
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.ones(3, jnp.bfloat16)}
    >>> updates, state = tx.update(grads, state, params)
    >>> optax.apply_updates(params, updates)['w']  # 1 - 1e-4 rounds to 1 in bfloat16
    Array([1, 1, 1], dtype=bfloat16)
    >>> state.master['w']
    Array([0.9999, 0.9999, 0.9999], dtype=float32)
  """
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(
      f"opt.precision expects an optax GradientTransformation, got"
      f" {type(inner).__name__} {inner!r:.60}. Call the optax factory first,"
      " for example opt.precision(optax.adamw(1e-3), ...)."
    )
  state_dtype = _floating_dtype(state_dtype, "state_dtype")
  compute_dtype = _floating_dtype(compute_dtype, "compute_dtype")
  master_weights = bool(master_weights)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    compute_params = _cast_floating(params, compute_dtype)
    # Build the state from float32 parameters, so that injected
    # hyperparameters are not rounded to a narrow compute dtype first, and
    # cast it afterwards to the dtypes a compute-dtype init would give.
    specs = _map_state(
      jax.eval_shape(inner.init, compute_params),
      lambda spec: spec,
      lambda spec: jax.ShapeDtypeStruct(spec.shape, jnp.float32),
    )
    wide_state = inner.init(_cast_floating(params, jnp.float32, only_narrower=True))
    inner_state = jax.tree.map(
      lambda value, spec: jnp.asarray(value).astype(spec.dtype), wide_state, specs
    )
    inner_state = _map_state(
      inner_state,
      lambda value: _cast_array(value, state_dtype),
      lambda value: _cast_array(value, jnp.float32),
    )
    master = None
    if master_weights:
      master = jax.tree.map(_master_copy, params)
      if not jax.tree.leaves(master) and jax.tree.leaves(params):
        warnings.warn(
          "opt.precision(master_weights=True) got no floating parameters"
          " narrower than 32 bits, so it keeps no master copies and does"
          " nothing. Drop master_weights=True for float32 parameters.",
          UserWarning,
          stacklevel=2,
        )
    return PrecisionState(inner_state, master)

  def update_fn(updates, state, params=None, **extra_args):
    if master_weights and params is None:
      raise ValueError(
        "opt.precision(master_weights=True) needs the parameters in update,"
        " to return an update that lands on the master weights. Call"
        " tx.update(grads, state, params); nnx.Optimizer.update passes them."
      )
    compute_updates = _cast_floating(updates, compute_dtype)
    if master_weights:
      # The master copy is the parameter; parameters without one are used as they are.
      inner_params = jax.tree.map(
        lambda master, param: param if master is None else master,
        state.master,
        params,
        is_leaf=lambda leaf: leaf is None,
      )
    else:
      inner_params = params
    if inner_params is not None:
      inner_params = _cast_floating(inner_params, compute_dtype)
    compute_state = _map_state(
      state.inner_state, lambda value: _cast_array(value, compute_dtype), lambda value: value
    )

    new_updates, new_state = inner.update(
      compute_updates, compute_state, inner_params, **extra_args
    )
    # Store every state array in the dtype it had before, so the state is
    # dtype-stable whatever dtypes the inner update computed in.
    new_state = jax.tree.map(
      lambda new, old: jnp.asarray(new).astype(old.dtype), new_state, state.inner_state
    )

    reference = updates if params is None else params
    if not master_weights:
      new_updates = jax.tree.map(_cast_like, new_updates, reference)
      return new_updates, PrecisionState(new_state, None)

    new_master = jax.tree.map(
      lambda master, update: None
      if master is None
      else master + jnp.asarray(update).astype(jnp.float32),
      state.master,
      new_updates,
      is_leaf=lambda leaf: leaf is None,
    )
    out = jax.tree.map(
      _update_from_master,
      new_master,
      new_updates,
      params,
      is_leaf=lambda leaf: leaf is None,
    )
    return out, PrecisionState(new_state, new_master)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _floating_dtype(dtype: Any, name: str) -> jnp.dtype | None:
  if dtype is None:
    return None
  try:
    resolved = jnp.dtype(dtype)
  except TypeError:
    resolved = None
  if resolved is None or not jnp.issubdtype(resolved, jnp.floating):
    raise ValueError(
      f"opt.precision {name}={dtype!r} is not a floating dtype. Pass one such"
      f" as jnp.float32 or jnp.bfloat16, or None."
    )
  return resolved


def _is_floating(value: Any) -> bool:
  dtype = getattr(value, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def _cast_array(value: Any, dtype: Any) -> Any:
  if dtype is None or not _is_floating(value):
    return value
  return jnp.asarray(value).astype(dtype)


def _cast_floating(tree: Any, dtype: Any, *, only_narrower: bool = False) -> Any:
  """Cast the floating leaves of `tree` to `dtype` (when narrower, with `only_narrower`)."""
  if dtype is None:
    return tree

  def cast(value):
    if not _is_floating(value):
      return value
    if only_narrower and jnp.dtype(value.dtype).itemsize >= jnp.dtype(dtype).itemsize:
      return value
    return jnp.asarray(value).astype(dtype)

  return jax.tree.map(cast, tree)


def _map_state(state: Any, array_fn: Any, hyperparameter_fn: Any) -> Any:
  """Apply `array_fn` to the state's arrays and `hyperparameter_fn` to injected hyperparameters."""

  def visit(node):
    if isinstance(node, _INJECT_STATES):
      replaced = {
        "hyperparams": jax.tree.map(hyperparameter_fn, node.hyperparams),
        "inner_state": _map_state(node.inner_state, array_fn, hyperparameter_fn),
      }
      if hasattr(node, "hyperparams_states"):
        replaced["hyperparams_states"] = _map_state(
          node.hyperparams_states, array_fn, hyperparameter_fn
        )
      return node._replace(**replaced)
    return array_fn(node)

  return jax.tree.map(visit, state, is_leaf=lambda node: isinstance(node, _INJECT_STATES))


def _needs_master(param: Any) -> bool:
  return _is_floating(param) and jnp.dtype(param.dtype).itemsize < 4


def _master_copy(param: Any) -> jax.Array | None:
  return jnp.asarray(param).astype(jnp.float32) if _needs_master(param) else None


def _cast_like(update: Any, reference: Any) -> Any:
  if not (_is_floating(update) and _is_floating(reference)):
    return update
  return jnp.asarray(update).astype(reference.dtype)


def _update_from_master(master: Any, update: Any, param: Any) -> Any:
  """Return the float32 update that moves `param` to `master.astype(param.dtype)`.

  The target `t = master.astype(param.dtype)` and `param` are both values of
  the narrow dtype, so `t - param` is exact in float32 when their exponents
  differ by at most 16 (bfloat16 keeps 8 significant bits, float32 24) or
  either is zero. Then `param + (t - param)` is exactly `t`, and
  `optax.apply_updates` lands on it bit for bit.
  """
  if master is None:
    return _cast_like(update, param)
  target = master.astype(param.dtype).astype(jnp.float32)
  # NOTE: a step that changes a parameter by more than a factor 2**16 (say
  # from 1e4 to 1e-2) can make `target - param` inexact. The parameter then
  # lands within half a float32 spacing at the old value, not on `target`.
  return target - jnp.asarray(param).astype(jnp.float32)


def state_dtype_changes(
  transform: optax.GradientTransformation,
  params_specs: Any,
  grads_specs: Any = None,
) -> list[tuple[str, Any, Any]]:
  """Trace `init` and one `update` of `transform` and list the state arrays that change dtype.

  Args:
    transform: Any optax transform.
    params_specs: Parameters, as arrays or `jax.ShapeDtypeStruct`s.
    grads_specs: Gradients; defaults to `params_specs` (`nnx.grad` returns
      gradients in the parameters' dtypes).

  Returns:
    `(state path, dtype after init, dtype after update)` for every state
    array whose dtype differs, in state order. Paths join the state's keys
    with `/`.
  """
  return [
    (_format_key_path(path), old, new)
    for path, old, new in _dtype_changes(transform, params_specs, grads_specs)
  ]


def _dtype_changes(
  transform: optax.GradientTransformation, params_specs: Any, grads_specs: Any
) -> list[tuple[tuple[Any, ...], Any, Any]]:
  """Return `(key path, old dtype, new dtype)` of the state arrays that change dtype."""
  if grads_specs is None:
    grads_specs = params_specs
  state = jax.eval_shape(transform.init, params_specs)
  _, new_state = jax.eval_shape(transform.update, grads_specs, state, params_specs)
  before = jax.tree_util.tree_flatten_with_path(state)[0]
  after = jax.tree_util.tree_flatten_with_path(new_state)[0]
  if [path for path, _ in before] != [path for path, _ in after]:
    raise ValueError(
      "The optimizer state has a different structure after update than after"
      f" init ({len(before)} arrays before, {len(after)} after), so its dtypes"
      " cannot be compared. Make the transform's update return a state of the"
      " structure its init returns."
    )
  changes = []
  for (path, old), (_, new) in zip(before, after):
    old_dtype, new_dtype = getattr(old, "dtype", None), getattr(new, "dtype", None)
    if old_dtype != new_dtype:
      changes.append((tuple(path), old_dtype, new_dtype))
  return changes


def check_dtype_stability(
  transform: optax.GradientTransformation,
  params_specs: Any,
  *,
  label: str | None = None,
  grads_specs: Any = None,
) -> None:
  """Raise unless every optimizer-state array keeps its dtype through `update`.

  A state that changes dtype retraces a jitted training step on the second
  call, cannot be carried by `jax.lax.scan` or `nnx.scan`, and no longer
  matches a checkpoint saved after `init`. This check costs no computation
  (it uses `jax.eval_shape`).

  Args:
    transform: Any optax transform: one group's transform, or the whole
      transform of `mgr.build(model)`, whose `optax.partition` state names
      each group.
    params_specs: Parameters, as arrays or `jax.ShapeDtypeStruct`s.
    label: The group's label, for the message. When None and the state is
      an `optax.partition` state, the label is taken from its
      `inner_states` key.
    grads_specs: Gradients; defaults to `params_specs`.

  Raises:
    ValueError: Naming the group, the state path and both dtypes of the
      first arrays that change, and how to fix it.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from ueaj import opt
    >>> params = {'w': jax.ShapeDtypeStruct((4,), jnp.bfloat16)}
    >>> grads = {'w': jax.ShapeDtypeStruct((4,), jnp.float32)}
    >>> opt.check_dtype_stability(optax.adam(1e-3), params, label='layers/0')
    >>> opt.check_dtype_stability(
    ...     optax.adam(1e-3), params, label='layers/0', grads_specs=grads)
    Traceback (most recent call last):
      ...
    ValueError: group 'layers/0': optimizer state '0/mu/w' changes dtype from bfloat16 to float32 in update. ...
  """
  changes = _dtype_changes(transform, params_specs, grads_specs)
  if not changes:
    return
  described = []
  for path, old, new in changes[:5]:
    group, state_path = label, path
    if group is None:
      group, state_path = _split_partition_path(path)
    state_path = _format_key_path(state_path)
    prefix = f"group {group!r}: " if group is not None else ""
    described.append(
      f"{prefix}optimizer state {state_path!r} changes dtype from {old} to {new} in update"
    )
  more = f" (and {len(changes) - 5} more)" if len(changes) > 5 else ""
  raise ValueError(
    "; ".join(described) + f"{more}. A state that changes dtype retraces"
    " jitted steps and breaks scans and checkpoints. Give the gradients the"
    " parameters' dtype, or wrap the group's transform in"
    " opt.precision(..., state_dtype=...) to fix the state dtypes."
  )


def check_units_dtype_stability(
  units: Sequence[Any],
  labels: dict[Any, Any],
  shapes: dict[Any, tuple[int, ...]],
  dtypes: dict[Any, Any],
) -> None:
  """Run `check_dtype_stability` on every unit planned by `ueaj.opt._plan.plan_units`.

  Each unit is traced on `jax.ShapeDtypeStruct`s of its pieces, with
  gradients in the parameters' dtypes, and named by its key: the group
  label, or `<first label>~<last label>` for the per-layer groups of a stack
  that run as one vectorized update.

  Raises:
    ValueError: From `check_dtype_stability`, for the first unstable unit.
  """
  paths = list(labels)
  for unit in units:
    specs = []
    for piece in unit.pieces:
      shape = list(shapes[paths[piece.position]])
      if piece.layers is not None:
        shape[piece.axis] = len(piece.layers)
      specs.append(jax.ShapeDtypeStruct(tuple(shape), dtypes[paths[piece.position]]))
    check_dtype_stability(unit.transform, tuple(specs), label=unit.key)


def _split_partition_path(path: tuple[Any, ...]) -> tuple[str | None, tuple[Any, ...]]:
  """Split `inner_states/<key>/inner_state/...` of an `optax.partition` state into key and rest."""
  names = [getattr(key, "name", getattr(key, "key", None)) for key in path[:3]]
  if len(path) < 2 or names[0] != "inner_states" or not isinstance(names[1], str):
    return None, path
  rest = path[3:] if names[2:3] == ["inner_state"] else path[2:]
  return names[1], rest


def _format_key_path(path: Sequence[Any]) -> str:
  parts = []
  for key in path:
    for attribute in ("name", "key", "idx"):
      if hasattr(key, attribute):
        parts.append(str(getattr(key, attribute)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)
