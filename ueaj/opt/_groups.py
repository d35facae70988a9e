"""Grouping: resolve assignments into labelled groups, one optimizer state each."""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Callable, Hashable, Iterator

import optax
from flax import nnx

from ueaj.opt import _config, _keys, _match
from ueaj.opt._errors import RuleError, UnassignedVariablesError, UnmatchedPatternError
from ueaj.opt._graph import ModelGraph, ParamInfo, Stack, format_path, param_info
from ueaj.opt._keys import Element, Path

#: A function rule: called with the graph nodes on a Variable's path and a
#: description of the Variable; returns a transform or None (frozen).
Rule = Callable[[tuple[Any, ...], ParamInfo], "optax.GradientTransformation | None"]
Value = "optax.GradientTransformation | Rule | None"
#: A Variable's label: one string, or one per layer for a stacked Variable.
Label = str | tuple[str, ...]

# How many Variable paths an error lists before it summarizes the rest.
_LISTED_PATHS = 20


@dataclasses.dataclass(frozen=True)
class Assignment:
  """One `mgr[key] = value` statement, parsed.

  Attributes:
    pattern: The parsed key.
    value: A transform, a function rule, or None to freeze.
    required: Whether building fails when the pattern selects no Variable.
  """

  pattern: tuple[Element, ...]
  value: Any
  required: bool

  @property
  def rule_name(self) -> str | None:
    """The function rule's name, or None when the value is not a rule."""
    if self.value is None or isinstance(self.value, optax.GradientTransformation):
      return None
    return getattr(self.value, "__name__", type(self.value).__name__)

  @property
  def kind(self) -> str:
    """`transform`, `rule <name>` or `frozen`."""
    if self.value is None:
      return "frozen"
    if self.rule_name is None:
      return "transform"
    return f"rule {self.rule_name}"

  def __repr__(self) -> str:
    return f"{_keys.format_pattern(self.pattern)} = {self.kind}"


@dataclasses.dataclass(frozen=True, eq=False)
class Group:
  """Variables that share one optimizer state.

  Attributes:
    label: The group's label, also stored in each Variable's metadata under
      `"opt_group"`.
    assignment: Position of the winning assignment in the manager.
    source: The assignment as written, for example `mgr['layers', :] = rule decay`.
    transform: The group's transform, or None for frozen Variables.
    members: `(path, layer)` of every member in NNX traversal order; `layer`
      is the layer of a stacked Variable's slice, or None for a whole
      Variable.
    num_elements: Total number of parameter elements in the group.
    param_bytes: Total bytes of the group's parameters.
  """

  label: str
  assignment: int
  source: str
  transform: optax.GradientTransformation | None
  members: tuple[tuple[Path, int | None], ...]
  num_elements: int
  param_bytes: int

  @property
  def paths(self) -> tuple[Path, ...]:
    """Paths of the group's Variables, each once, in NNX traversal order."""
    return tuple(dict.fromkeys(path for path, _ in self.members))

  @property
  def frozen(self) -> bool:
    """Whether the group's Variables receive zero updates and hold no state."""
    return self.transform is None

  def __repr__(self) -> str:
    return (
      f"Group({self.label!r}, source={self.source!r},"
      f" variables={len(self.paths)}, elements={self.num_elements})"
    )


class Groups:
  """The groups of a built configuration, in assignment order.

  `str(groups)` is a text table; indexing by int or by label returns a Group.
  Equality and hashing are by identity, so that a `Groups` object can be a
  static attribute of an NNX module at no cost per `nnx.jit` call.
  """

  def __init__(
    self,
    groups: list[Group],
    labels: dict[Path, Label],
    stacks: dict[Path, Stack] | None = None,
  ):
    self._groups = tuple(groups)
    #: The stack of every stacked Variable path.
    self.stacks: dict[Path, Stack] = dict(stacks or {})
    self._by_label = {group.label: group for group in groups}
    self._labels = labels
    self._units: dict[str, tuple[str, int | None]] = {}

  def __len__(self) -> int:
    return len(self._groups)

  def __iter__(self) -> Iterator[Group]:
    return iter(self._groups)

  def __getitem__(self, key: int | str) -> Group:
    if isinstance(key, str):
      try:
        return self._by_label[key]
      except KeyError:
        raise KeyError(
          f"No group is labelled {key!r}; labels are {list(self._by_label)}."
        ) from None
    return self._groups[key]

  @property
  def labels(self) -> tuple[str, ...]:
    """Group labels in table order."""
    return tuple(self._by_label)

  def label_of(self, path: Path) -> Label:
    """Return the label of the Variable at `path` (per layer for a stack)."""
    return self._labels[path]

  def unit_of(self, label: str) -> tuple[str, int | None]:
    """Locate a group's state inside the optimizer state.

    Returns:
      `(key, index)`: the group's state is
      `opt_state.inner_states[key].inner_state`, and when `index` is not
      None, the group's part of it is entry `index` along the leading axis of
      every array (groups whose updates run as one vectorized update).
    """
    self[label]
    return self._units.get(label, (label, None))

  def set_units(self, units: dict[str, tuple[str, int | None]]) -> None:
    """Record where the transform placed each group (see `unit_of`)."""
    self._units = dict(units)

  def table(self) -> str:
    """Format the groups as a text table."""
    header = ("group", "assignment", "variables", "elements")
    rows = [
      (group.label, group.source, f"{len(group.paths):,}", f"{group.num_elements:,}")
      for group in self._groups
    ]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(4)]

    def line(row: tuple[str, ...]) -> str:
      return (
        f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}"
        f"  {row[2]:>{widths[2]}}  {row[3]:>{widths[3]}}"
      ).rstrip()

    separator = "  ".join("-" * width for width in widths)
    return "\n".join([line(header), separator, *map(line, rows)])

  def __str__(self) -> str:
    return self.table()

  def __repr__(self) -> str:
    return f"Groups({list(self._by_label)})"


def resolve(graph: ModelGraph, assignments: list[Assignment]) -> Groups:
  """Decide the group of every Variable of `graph`, per layer inside stacks.

  Args:
    graph: The snapshot of the model, restricted to the Variables to label,
      with its stacks declared.
    assignments: The manager's assignments in order.

  Returns:
    The groups, with the label of every Variable.

  Raises:
    UnmatchedPatternError: A required pattern selects no Variable.
    IndexError: An integer index is out of range for its sequence or stack.
    UnassignedVariablesError: Some Variables have no group.
    RuleError: A function rule raised or returned an invalid value.
  """
  winners, reports = _match.match_all(graph, [a.pattern for a in assignments])
  check_patterns([a.pattern for a in assignments], [a.required for a in assignments], reports)
  _check_all_assigned(graph, winners)

  # Call the rules and bucket members by (assignment, label parts,
  # configuration); each bucket becomes one group. A member is a whole
  # Variable or one layer of a stacked Variable.
  Bucket = tuple[int, tuple[str, ...], int]
  buckets: dict[Bucket, list[tuple[Path, int | None]]] = {}
  transforms: dict[Bucket, Any] = {}
  # The bucket of each Variable, or one bucket per layer for a stacked one.
  member_buckets: dict[Path, Bucket | list[Bucket]] = {}
  stacks = {path: graph.stack_above(path) for path, _ in graph.variables}
  configs = _ConfigNumbers(assignments)

  for path, variable in graph.variables:
    stack = stacks[path]
    result = winners[path]
    if stack is None:
      units = [(None, result)]
    else:
      units = list(enumerate(result))
      member_buckets[path] = []
    for layer, match in units:
      assignment = assignments[match.assignment]
      transform = _value_for(assignment, graph, path, variable, stack, layer)
      bucket = (match.assignment, match.parts, configs.number(match.assignment, transform))
      members = buckets.get(bucket)
      if members is None:
        members = buckets[bucket] = []
        transforms[bucket] = transform
      members.append((path, layer))
      if stack is None:
        member_buckets[path] = bucket
      else:
        member_buckets[path].append(bucket)

  labels = _label_buckets(list(buckets))
  groups = []
  for bucket in sorted(buckets, key=lambda bucket: bucket[0]):
    members = buckets[bucket]
    sizes = [
      _size_and_bytes(graph.values[path], stacks[path] if layer is not None else None)
      for path, layer in members
    ]
    groups.append(
      Group(
        label=labels[bucket],
        assignment=bucket[0],
        source=repr(assignments[bucket[0]]),
        transform=transforms[bucket],
        members=tuple(members),
        num_elements=sum(size for size, _ in sizes),
        param_bytes=sum(nbytes for _, nbytes in sizes),
      )
    )

  path_labels: dict[Path, Label] = {}
  for path, bucket in member_buckets.items():
    if stacks[path] is None:
      path_labels[path] = labels[bucket]
    else:
      path_labels[path] = tuple(labels[layer_bucket] for layer_bucket in bucket)
  stacked = {path: stack for path, stack in stacks.items() if stack is not None}
  return Groups(groups, path_labels, stacked)


class _ConfigNumbers:
  """Configuration numbers of transforms: equal configurations get equal numbers.

  An assignment's own transform is one object shared by all the Variables it
  selects, so it is fingerprinted once. A rule usually returns a new object
  per call, so each result is fingerprinted (see `_config`). Only the number
  is kept, so the results of all but the first call of each configuration
  are freed at once.

  Fingerprints contain the ids of values that compare by identity. Every
  fingerprint in `_numbers` comes from a transform that stays alive while
  labelling runs (an assignment's value, or the first transform of a group,
  which `resolve` keeps), so none of those ids can be reused by a new object.
  """

  # A rule may also return one of a few prebuilt transforms, so the last
  # results are remembered by id. The stored references keep those ids from
  # being reused by new objects.
  _RECENT = 16

  def __init__(self, assignments: list[Assignment]):
    self._numbers: dict[Hashable, int] = {}
    self._assigned = [
      None if assignment.rule_name is not None else self._number_of(assignment.value)
      for assignment in assignments
    ]
    self._recent: dict[int, tuple[Any, int]] = {}

  def number(self, assignment: int, transform: Any) -> int:
    """Return the configuration number of `transform`, chosen by `assignment`."""
    number = self._assigned[assignment]
    if number is not None:
      return number
    entry = self._recent.get(id(transform))
    if entry is not None and entry[0] is transform:
      return entry[1]
    number = self._number_of(transform)
    if len(self._recent) >= self._RECENT:
      self._recent.clear()
    self._recent[id(transform)] = (transform, number)
    return number

  def _number_of(self, transform: Any) -> int:
    return self._numbers.setdefault(_config.fingerprint(transform), len(self._numbers))


def check_patterns(
  patterns: list[tuple[Element, ...]],
  required: list[bool],
  reports: list[_match.PatternReport],
) -> None:
  """Raise for the first required pattern that matched nothing or indexed out of range."""
  for pattern, is_required, report in zip(patterns, required, reports):
    if not is_required:
      continue
    text = _keys.format_pattern(pattern)
    anchored = [event for event in report.out_of_range if event.anchored]
    if anchored or (not report.matched and report.out_of_range):
      event = (anchored or report.out_of_range)[0]
      raise IndexError(
        f"{text}: index {event.index} is out of range for the sequence at"
        f" {format_path(event.container)!r} of length {event.length} (valid"
        f" indices are {-event.length} to {event.length - 1}). Use a slice to"
        " select what exists, or mgr.assign(key, value, required=False) for a"
        " configuration shared by models of different depth."
      )
    if not report.matched:
      reason, nearest = _match.nearest_paths(pattern, report)
      hint = "\n".join(f"  {path}" for path in nearest) or "  (none)"
      raise UnmatchedPatternError(
        f"{text} selects no Variable: {reason}.\nNearest existing paths:\n{hint}\n"
        "Fix the key, or use mgr.assign(key, value, required=False) if the"
        " configuration is shared with models that lack this part."
      )


def _check_all_assigned(graph: ModelGraph, winners: dict[Path, _match.Result]) -> None:
  missing = []
  for path, _ in graph.variables:
    result = winners.get(path)
    if result is None:
      missing.append(format_path(path))
    elif isinstance(result, tuple):
      layers = [layer for layer, match in enumerate(result) if match is None]
      if layers:
        missing.append(f"{format_path(path)} (layers {_ranges(layers)})")
  if not missing:
    return
  listed = "\n".join(f"  {path}" for path in missing[:_LISTED_PATHS])
  more = len(missing) - _LISTED_PATHS
  if more > 0:
    listed += f"\n  ... and {more} more"
  raise UnassignedVariablesError(
    f"{len(missing)} Variable(s) have no optimizer:\n{listed}\n"
    "Add a default with mgr[...] = optax.adamw(...) before the other"
    " assignments, or freeze them with mgr[key] = None."
  )


def _value_for(
  assignment: Assignment,
  graph: ModelGraph,
  path: Path,
  variable: nnx.Variable,
  stack: Stack | None,
  layer: int | None,
) -> optax.GradientTransformation | None:
  value = assignment.value
  if value is None or isinstance(value, optax.GradientTransformation):
    return value

  where = f"{_keys.format_pattern(assignment.pattern)} rule {assignment.rule_name!r}"
  info = param_info(path, variable, stack, layer, graph.values[path])
  target = f"the Variable at {format_path(path)!r}"
  if layer is not None:
    target += f" (layer {layer})"
  try:
    result = value(graph.modules_on(path), info)
  except Exception as error:
    raise RuleError(
      f"{where} raised {type(error).__name__} for {target} (shape {info.shape},"
      f" dtype {info.dtype}): {error}"
    ) from error
  if result is not None and not isinstance(result, optax.GradientTransformation):
    raise RuleError(
      f"{where} returned {type(result).__name__} {result!r:.80} for {target}; a"
      " rule must return an optax GradientTransformation or None (to freeze the"
      " Variable)."
    )
  return result


def _label_buckets(
  buckets: list[tuple[int, tuple[str, ...], Hashable]],
) -> dict[tuple[int, tuple[str, ...], Hashable], str]:
  """Turn buckets into readable, unique labels.

  The label joins the label parts with `/`. A rule that gives one pattern
  group several configurations adds `#1`, `#2`, ... in order of first use,
  and two assignments that produce the same text add `@<assignment>`.
  """
  variants: dict[tuple[int, tuple[str, ...]], list[Hashable]] = collections.defaultdict(list)
  for assignment, parts, config in buckets:
    variants[(assignment, parts)].append(config)

  labels = {}
  for assignment, parts, config in buckets:
    label = "/".join(parts)
    configs = variants[(assignment, parts)]
    if len(configs) > 1:
      label += f"#{configs.index(config) + 1}"
    labels[(assignment, parts, config)] = label

  owners: dict[str, set[int]] = collections.defaultdict(set)
  for (assignment, _, _), label in labels.items():
    owners[label].add(assignment)
  for bucket, label in labels.items():
    if len(owners[label]) > 1:
      labels[bucket] = f"{label}@{bucket[0]}"
  return labels


def _size_and_bytes(value: Any, stack: Stack | None) -> tuple[int, int]:
  """Return the element count and bytes of a Variable's value, or of one layer of it."""
  size = math.prod(getattr(value, "shape", ()))
  if stack is not None:
    size //= stack.length
  dtype = getattr(value, "dtype", None)
  itemsize = getattr(dtype, "itemsize", 0) if dtype is not None else 0
  return size, size * itemsize


def _ranges(numbers: list[int]) -> str:
  """Format sorted ints compactly: [0, 1, 2, 5] -> '0-2, 5'."""
  spans = []
  for number in numbers:
    if spans and number == spans[-1][1] + 1:
      spans[-1][1] = number
    else:
      spans.append([number, number])
  return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
