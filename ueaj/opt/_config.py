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

A rule may run once per Variable, so fingerprinting is part of labelling
every model. The walk dispatches on the exact type through a table, and
floats, strings and `None` are their own fingerprints.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import types
from typing import Any, Callable, Hashable

import jax
import numpy as np
from flax import nnx

# Deeply nested closures are rare; past this depth compare by identity.
_MAX_DEPTH = 64

# Tags of fingerprint tuples. The tag is the first entry, so fingerprints of
# different kinds never compare equal.
_TUPLE, _LIST, _DICT, _PARTIAL = "tuple", "list", "dict", "partial"
_METHOD, _BUILTIN, _OBJECT, _VALUE = "method", "builtin", "object", "value"
_IDENTITY, _CYCLE = "identity", "cycle"
# A 1-tuple, unlike any other fingerprint, so no cell contents can equal it.
_EMPTY_CELL = ("empty cell",)


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


# Handlers take (value, depth, active) and return the fingerprint.
_Handler = Callable[[Any, int, dict], Hashable]


def _fingerprint(value: Any, depth: int, active: dict[int, int]) -> Hashable:
  cls = type(value)
  # Floats and strings are the common closure contents (hyperparameters,
  # names). They are their own fingerprints, because no other fingerprint is
  # a bare float or string. Ints and bools are tagged, so `1` and `1.0` differ.
  if cls is float or cls is str or value is None:
    return value
  handler = _HANDLERS.get(cls)
  if handler is None:
    handler = _HANDLERS[cls] = _handler_for(cls)
  return handler(value, depth, active)


def _atom(value: Any, depth: int, active: dict) -> Hashable:
  return (type(value), value)


def _float_subclass(value: Any, depth: int, active: dict) -> Hashable:
  # `np.float64` subclasses float, so it equals the same Python float.
  return float(value)


def _enum(value: Any, depth: int, active: dict) -> Hashable:
  return ("enum", type(value).__qualname__, value.name)


def _dtype(value: Any, depth: int, active: dict) -> Hashable:
  return ("dtype", str(value))


def _type(value: Any, depth: int, active: dict) -> Hashable:
  return ("type", value.__module__, value.__qualname__)


def _identity(value: Any, depth: int, active: dict) -> Hashable:
  return (_IDENTITY, id(value))


def _array(value: Any, depth: int, active: dict) -> Hashable:
  if isinstance(value, jax.core.Tracer):
    return (_IDENTITY, id(value))
  try:
    array = np.asarray(value)
  except Exception:  # noqa: BLE001 - deleted or non-addressable arrays.
    return (_IDENTITY, id(value))
  digest = hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
  return ("array", str(array.dtype), array.shape, digest)


def _container(fingerprint_items: _Handler) -> _Handler:
  """Wrap a handler of a value with children in cycle and depth checks."""

  def handler(value: Any, depth: int, active: dict[int, int]) -> Hashable:
    key = id(value)
    if key in active:
      # A reference back into the value being fingerprinted (a recursive
      # closure): record how far up it points, which is the same for equal
      # configurations.
      return (_CYCLE, depth - active[key])
    if depth > _MAX_DEPTH:
      return (_IDENTITY, key)
    active[key] = depth
    try:
      return fingerprint_items(value, depth + 1, active)
    finally:
      del active[key]

  return handler


def _tuple(value: tuple, depth: int, active: dict) -> Hashable:
  # A tuple cannot contain itself except through a mutable value, which
  # the cycle check of that value catches, so tuples skip the check.
  if depth > _MAX_DEPTH:
    return (_IDENTITY, id(value))
  depth += 1
  # Named tuples (GradientTransformation among them) keep their type.
  return (_TUPLE, type(value), *[_fingerprint(item, depth, active) for item in value])


def _list_items(value: list, depth: int, active: dict) -> Hashable:
  return (_LIST, *[_fingerprint(item, depth, active) for item in value])


def _dict_items(value: dict, depth: int, active: dict) -> Hashable:
  return (
    _DICT,
    type(value),
    *[
      (_fingerprint(key, depth, active), _fingerprint(item, depth, active))
      for key, item in value.items()
    ],
  )


def _partial_items(value: functools.partial, depth: int, active: dict) -> Hashable:
  return (
    _PARTIAL,
    _fingerprint(value.func, depth, active),
    _fingerprint(value.args, depth, active),
    _fingerprint(value.keywords, depth, active),
  )


def _function_items(function: types.FunctionType, depth: int, active: dict) -> Hashable:
  # The code object is the tag, because equal code and equal closed-over
  # values make equal functions.
  cells = []
  for cell in function.__closure__ or ():
    try:
      contents = cell.cell_contents
    except ValueError:  # An empty cell: the variable is not yet assigned.
      cells.append(_EMPTY_CELL)
      continue
    # Common atoms are handled inline, which saves a call per hyperparameter.
    cls = type(contents)
    if cls is float or cls is str or contents is None:
      cells.append(contents)
    else:
      cells.append(_fingerprint(contents, depth, active))
  defaults = function.__defaults__
  kwdefaults = function.__kwdefaults__
  return (
    function.__code__,
    None if defaults is None else _fingerprint(defaults, depth, active),
    None if kwdefaults is None else _fingerprint(kwdefaults, depth, active),
    *cells,
  )


def _method_items(value: types.MethodType, depth: int, active: dict) -> Hashable:
  return (
    _METHOD,
    _fingerprint(value.__func__, depth, active),
    _fingerprint(value.__self__, depth, active),
  )


def _builtin(value: Any, depth: int, active: dict) -> Hashable:
  return (_BUILTIN, getattr(value, "__module__", None), value.__qualname__)


def _object_items(value: Any, depth: int, active: dict) -> Hashable:
  cls = type(value)
  return (_OBJECT, cls.__module__, cls.__qualname__, _fingerprint(vars(value), depth, active))


def _hashable_value(value: Any, depth: int, active: dict) -> Hashable:
  # Objects with a value-based __eq__ and __hash__ (shardings, frozen
  # dataclasses) compare by value; unhashable ones only to themselves.
  try:
    hash(value)
  except TypeError:
    return (_IDENTITY, id(value))
  cls = type(value)
  return (_VALUE, cls.__module__, cls.__qualname__, value)


def _handler_for(cls: type) -> _Handler:
  """Pick the handler of a type, in the order of the rules in the module docstring."""
  if issubclass(cls, float):
    return _float_subclass
  if issubclass(cls, (bool, int, complex, bytes)):
    return _atom
  if issubclass(cls, enum.Enum):
    return _enum
  if issubclass(cls, np.dtype):
    return _dtype
  if issubclass(cls, type):
    return _type
  if issubclass(cls, jax.core.Tracer):
    return _identity
  if issubclass(cls, (np.ndarray, np.generic, jax.Array)):
    return _array

  if issubclass(cls, tuple):
    return _tuple
  if issubclass(cls, list):
    return _container(_list_items)
  if issubclass(cls, dict):
    return _container(_dict_items)
  if issubclass(cls, functools.partial):
    return _container(_partial_items)
  if issubclass(cls, types.FunctionType):
    return _container(_function_items)
  if issubclass(cls, types.MethodType):
    return _container(_method_items)
  if issubclass(cls, types.BuiltinFunctionType):
    return _builtin

  if _is_plain_object(cls):
    return _container(_object_items)
  if cls.__hash__ is object.__hash__ or cls.__eq__ is object.__eq__:
    return _identity
  return _hashable_value


def _is_plain_object(cls: type) -> bool:
  """Return whether instances of `cls` are configuration holders without an `__eq__` of their own.

  optax wraps schedules in such objects (`inject_hyperparams` keeps a
  `WrappedSchedule` per scheduled hyperparameter), so they compare by their
  attributes. NNX modules and Variables hold trained state, not
  configuration, and keep comparing by identity.
  """
  if issubclass(cls, (nnx.Pytree, nnx.Variable, types.ModuleType)):
    return False
  return cls.__eq__ is object.__eq__ and _has_instance_dict(cls)


def _has_instance_dict(cls: type) -> bool:
  # Classes with `__slots__` only have no `__dict__` to compare.
  return any("__dict__" in vars(base) for base in cls.__mro__ if base is not object)


# Handlers by exact type, filled on first sight of each type. Types stay
# referenced for the life of the process. That is a small set: adamw, lion,
# inject_hyperparams, chain and masked of optax 0.2.8 reach 6 types in all.
_HANDLERS: dict[type, _Handler] = {}
