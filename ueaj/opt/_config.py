"""Configuration identity: when two transforms count as "the same configuration".

A function rule often builds a new transform per call (`optax.adamw(lr)`
returns fresh closures every time), yet Variables of one group that receive
equal settings must share one optimizer state. Optax transforms are plain
functions closing over their hyperparameters, so two transforms have the same
configuration when their functions have equal code and their closed-over
values are recursively equal:

- numbers, strings, `None`, dtypes and types compare by value;
- arrays compare by dtype, shape and contents;
- tuples, lists, dicts, named tuples and `functools.partial` compare element
  by element;
- functions compare by code object, default arguments and closure contents
  (so `optax.adamw(1e-3)` equals another `optax.adamw(1e-3)`, but not
  `optax.adamw(2e-3)`);
- objects without an `__eq__` of their own (optax's schedule wrappers)
  compare by type and attributes, except NNX modules and Variables;
- any other object is equal only to itself, unless it is hashable with a
  value-based `__eq__`.

Values that cannot be inspected (tracers, objects without value equality)
fall back to identity, so the comparison may split groups that could have
shared a state, but it never merges two different configurations.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import types
from typing import Any, Hashable

import jax
import numpy as np
from flax import nnx

# Deeply nested closures are rare; past this depth compare by identity.
_MAX_DEPTH = 64


def fingerprint(value: Any) -> Hashable:
  """Return a hashable value that is equal for equal transform configurations.

  Args:
    value: A transform, a function, or any value reachable from one.

  Returns:
    A nested tuple. Two values with equal fingerprints behave the same when
    used as an optax transform.

  Examples:
    >>> import optax
    >>> from ueaj.opt._config import fingerprint
    >>> fingerprint(optax.adamw(1e-3)) == fingerprint(optax.adamw(1e-3))
    True
    >>> fingerprint(optax.adamw(1e-3)) == fingerprint(optax.adamw(2e-3))
    False
  """
  return _fingerprint(value, 0, {})


def _fingerprint(value: Any, depth: int, active: dict[int, int]) -> Hashable:
  if id(value) in active:
    # A reference back into the value being fingerprinted (a recursive
    # closure): record how far up it points, which is the same for equal
    # configurations.
    return ("cycle", depth - active[id(value)])
  if depth > _MAX_DEPTH:
    return ("identity", id(value))

  if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
    return (type(value).__name__, value)
  if isinstance(value, enum.Enum):
    return ("enum", type(value).__qualname__, value.name)
  if isinstance(value, np.dtype):
    return ("dtype", str(value))
  if isinstance(value, type):
    return ("type", value.__module__, value.__qualname__)
  if isinstance(value, jax.core.Tracer):
    return ("identity", id(value))
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    return _array_fingerprint(value)

  active[id(value)] = depth
  try:
    return _container_fingerprint(value, depth + 1, active)
  finally:
    del active[id(value)]


def _array_fingerprint(value: Any) -> Hashable:
  try:
    array = np.asarray(value)
  except Exception:  # noqa: BLE001 - deleted or non-addressable arrays.
    return ("identity", id(value))
  digest = hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
  return ("array", str(array.dtype), array.shape, digest)


def _container_fingerprint(value: Any, depth: int, active: dict[int, int]) -> Hashable:
  def recurse(item: Any) -> Hashable:
    return _fingerprint(item, depth, active)

  if isinstance(value, tuple):
    # Named tuples (GradientTransformation among them) keep their type.
    return ("tuple", type(value).__qualname__, tuple(map(recurse, value)))
  if isinstance(value, list):
    return ("list", tuple(map(recurse, value)))
  if isinstance(value, dict):
    return (
      "dict",
      type(value).__qualname__,
      tuple((recurse(key), recurse(item)) for key, item in value.items()),
    )
  if isinstance(value, functools.partial):
    return (
      "partial",
      recurse(value.func),
      recurse(value.args),
      recurse(value.keywords),
    )
  if isinstance(value, types.FunctionType):
    return _function_fingerprint(value, recurse)
  if isinstance(value, types.MethodType):
    return ("method", recurse(value.__func__), recurse(value.__self__))
  if isinstance(value, types.BuiltinFunctionType):
    return ("builtin", getattr(value, "__module__", None), value.__qualname__)
  if _is_plain_object(value):
    return ("object", type(value).__module__, type(value).__qualname__, recurse(vars(value)))
  return _object_fingerprint(value)


def _is_plain_object(value: Any) -> bool:
  """Return whether `value` is a configuration holder without an `__eq__` of its own.

  optax wraps schedules in such objects (`inject_hyperparams` keeps a
  `WrappedSchedule` per scheduled hyperparameter), so they compare by their
  attributes. NNX modules and Variables hold trained state, not
  configuration, and keep comparing by identity.
  """
  if isinstance(value, (nnx.Pytree, nnx.Variable, types.ModuleType)):
    return False
  cls = type(value)
  return cls.__eq__ is object.__eq__ and hasattr(value, "__dict__")


def _function_fingerprint(function: types.FunctionType, recurse) -> Hashable:
  cells = []
  for cell in function.__closure__ or ():
    try:
      contents = cell.cell_contents
    except ValueError:  # An empty cell: the variable is not yet assigned.
      cells.append(("empty",))
    else:
      cells.append(recurse(contents))
  return (
    "function",
    function.__code__,
    recurse(function.__defaults__),
    recurse(function.__kwdefaults__),
    tuple(cells),
  )


def _object_fingerprint(value: Any) -> Hashable:
  # Objects with a value-based __eq__ and __hash__ (shardings, frozen
  # dataclasses) compare by value; everything else only to itself.
  if type(value).__hash__ is object.__hash__ or type(value).__eq__ is object.__eq__:
    return ("identity", id(value))
  try:
    hash(value)
  except TypeError:
    return ("identity", id(value))
  return ("value", type(value).__module__, type(value).__qualname__, value)
