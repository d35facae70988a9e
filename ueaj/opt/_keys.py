"""Key grammar: turn the elements of `mgr[...]` into frozen, hashable patterns.

A pattern is a tuple of elements, each of which consumes path keys of the NNX
graph (see `_match.py` for the matcher). Parsing happens at assignment time so
that a malformed key raises there, before the manager changes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeAlias

from flax import nnx

#: A key of the NNX graph: attribute names are `str`, sequence indices `int`,
#: dict keys as they are.
PathKey: TypeAlias = Any
Path: TypeAlias = tuple[PathKey, ...]

_SUPPORTED = (
  "a str (attribute or dict key), an int (sequence index), a slice, a list of"
  " str/int, `...`, an nnx.Module or nnx.Variable subclass, or batch[...]"
)


@dataclasses.dataclass(frozen=True)
class Name:
  """Matches one path key equal to `key` (an attribute name or dict key)."""

  key: str

  def __repr__(self) -> str:
    return repr(self.key)


@dataclasses.dataclass(frozen=True)
class Index:
  """Matches one index of a sequence; negative indices count from the end."""

  index: int

  def __repr__(self) -> str:
    return str(self.index)


@dataclasses.dataclass(frozen=True)
class Slice:
  """Matches the sequence indices that `range(len)[start:stop:step]` selects."""

  start: int | None
  stop: int | None
  step: int | None

  def indices(self, length: int) -> range:
    return range(length)[slice(self.start, self.stop, self.step)]

  def __repr__(self) -> str:
    text = f"{_bound(self.start)}:{_bound(self.stop)}"
    if self.step is not None:
      text += f":{self.step}"
    return text


@dataclasses.dataclass(frozen=True)
class AnyOf:
  """Matches any of several names or indices (written as a list)."""

  options: tuple[Name | Index, ...]

  def __repr__(self) -> str:
    return "[" + ", ".join(map(repr, self.options)) + "]"


@dataclasses.dataclass(frozen=True)
class AnyDepth:
  """Matches zero or more path keys (written as `...`)."""

  def __repr__(self) -> str:
    return "..."


@dataclasses.dataclass(frozen=True)
class InstanceOf:
  """Matches one path key whose node is an instance of `cls`."""

  cls: type

  def __repr__(self) -> str:
    module = self.cls.__module__
    if module.startswith("flax.nnx"):
      return f"nnx.{self.cls.__qualname__}"
    return self.cls.__qualname__


@dataclasses.dataclass(frozen=True)
class Batch:
  """Matches what `inner` matches, but keeps all matched keys in one group."""

  inner: Name | Index | Slice | AnyOf | AnyDepth | InstanceOf

  def __repr__(self) -> str:
    inner = repr(self.inner)
    if isinstance(self.inner, AnyOf):
      inner = inner[1:-1]
    return f"batch[{inner}]"


Element: TypeAlias = Name | Index | Slice | AnyOf | AnyDepth | InstanceOf | Batch


def _bound(value: int | None) -> str:
  return "" if value is None else str(value)


def _is_int(value: Any) -> bool:
  # bool is an int subclass, but `mgr['layers', True]` is always a mistake.
  return isinstance(value, int) and not isinstance(value, bool)


def _parse_slice(raw: slice, where: str) -> Slice:
  for name in ("start", "stop", "step"):
    bound = getattr(raw, name)
    if bound is not None and not _is_int(bound):
      raise TypeError(
        f"{where}: slice {name} must be an int or None, got"
        f" {type(bound).__name__} {bound!r}."
      )
  if raw.step == 0:
    raise ValueError(f"{where}: slice step cannot be zero.")
  return Slice(raw.start, raw.stop, raw.step)


def _parse_option(raw: Any, where: str) -> Name | Index:
  if isinstance(raw, str):
    return Name(raw)
  if _is_int(raw):
    return Index(raw)
  raise TypeError(
    f"{where}: a list may contain only str and int keys, got"
    f" {type(raw).__name__} {raw!r}."
  )


def _parse_list(raw: list | tuple, where: str) -> AnyOf:
  if not raw:
    raise ValueError(f"{where}: an empty list matches nothing.")
  options = tuple(_parse_option(item, where) for item in raw)
  return AnyOf(options)


def parse_element(raw: Any, where: str) -> Element:
  """Parse one element of a key.

  Args:
    raw: The element as the user wrote it.
    where: Describes the element's position, for error messages.

  Returns:
    The frozen element.

  Raises:
    TypeError: If the element is of an unsupported type.
    ValueError: If it has the right type but can never match (an empty list,
      a zero slice step).
  """
  if isinstance(raw, (Batch, AnyDepth)):
    return raw
  if isinstance(raw, str):
    return Name(raw)
  if _is_int(raw):
    return Index(raw)
  if isinstance(raw, slice):
    return _parse_slice(raw, where)
  if isinstance(raw, list):
    return _parse_list(raw, where)
  if raw is Ellipsis:
    return AnyDepth()
  if isinstance(raw, type) and issubclass(raw, (nnx.Pytree, nnx.Variable)):
    return InstanceOf(raw)
  hint = ""
  if isinstance(raw, tuple):
    hint = " To match any of several keys, write them as a list: mgr['a', [0, 2]]."
  elif isinstance(raw, type):
    hint = " Types must be subclasses of nnx.Module or nnx.Variable."
  raise TypeError(
    f"{where}: unsupported key element {raw!r} of type {type(raw).__name__}."
    f" Expected {_SUPPORTED}.{hint}"
  )


def parse_key(raw: Any) -> tuple[Element, ...]:
  """Parse the key of `mgr[key]` into a pattern.

  Args:
    raw: A single element or a tuple of elements.

  Returns:
    The pattern as a tuple of frozen elements.

  Raises:
    TypeError: If an element is of an unsupported type.
    ValueError: If the key is empty or an element can never match.
  """
  items = raw if isinstance(raw, tuple) else (raw,)
  if not items:
    raise ValueError(
      "Empty key mgr[()]: use mgr[...] to select every Variable."
    )
  return tuple(
    parse_element(item, f"key element {position} ({item!r})")
    for position, item in enumerate(items)
  )


def format_pattern(pattern: tuple[Element, ...]) -> str:
  """Format a pattern the way it is written, for example `mgr['layers', :]`."""
  return "mgr[" + ", ".join(map(repr, pattern)) + "]"


class BatchIndexer:
  """Builds `batch[...]` elements: the matched keys share one group.

  `opt.batch[0:4]` and `mgr.batch[0:4]` are the same element.

  Examples:
    >>> from ueaj import opt
    >>> opt.batch[0:4]
    batch[0:4]
    >>> opt.batch[0, 2]
    batch[0, 2]
  """

  def __getitem__(self, raw: Any) -> Batch:
    where = f"batch[{raw!r}]"
    if isinstance(raw, Batch):
      raise TypeError(f"{where}: batch elements cannot be nested.")
    if isinstance(raw, tuple):
      # batch[0, 2] reads better than batch[[0, 2]]; both mean the same.
      return Batch(_parse_list(raw, where))
    inner = parse_element(raw, where)
    if isinstance(inner, AnyDepth):
      # `...` never splits groups, so batch[...] is the same element.
      return inner
    return Batch(inner)

  def __repr__(self) -> str:
    return "batch"


batch = BatchIndexer()
