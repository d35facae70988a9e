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
from ueaj.opt._graph import ModelGraph, ParamInfo, format_path, param_info
from ueaj.opt._keys import Element, Path

#: A function rule: called with the graph nodes on a Variable's path and a
#: description of the Variable; returns a transform or None (frozen).
Rule = Callable[[tuple[Any, ...], ParamInfo], "optax.GradientTransformation | None"]
Value = "optax.GradientTransformation | Rule | None"

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
    paths: Paths of the group's Variables in NNX traversal order.
    num_elements: Total number of parameter elements in the group.
    param_bytes: Total bytes of the group's parameters.
  """

  label: str
  assignment: int
  source: str
  transform: optax.GradientTransformation | None
  paths: tuple[Path, ...]
  num_elements: int
  param_bytes: int

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

  def __init__(self, groups: list[Group], labels: dict[Path, str]):
    self._groups = tuple(groups)
    self._by_label = {group.label: group for group in groups}
    self._labels = labels

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

  def label_of(self, path: Path) -> str:
    """Return the label of the Variable at `path`."""
    return self._labels[path]

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
  """Decide the group of every Variable of `graph`.

  Args:
    graph: The snapshot of the model, restricted to the Variables to label.
    assignments: The manager's assignments in order.

  Returns:
    The groups, with the label of every Variable.

  Raises:
    UnmatchedPatternError: A required pattern selects no Variable.
    IndexError: An integer index is out of range for its sequence.
    UnassignedVariablesError: Some Variables have no group.
    RuleError: A function rule raised or returned an invalid value.
  """
  winners, reports = _match.match_all(graph, [a.pattern for a in assignments])
  _check_patterns(assignments, reports)
  _check_all_assigned(graph, winners)

  # Call the rules and bucket Variables by (assignment, label parts,
  # configuration); each bucket becomes one group.
  buckets: dict[tuple[int, tuple[str, ...], Hashable], list[tuple[Path, nnx.Variable]]] = {}
  transforms: dict[tuple[int, tuple[str, ...], Hashable], Any] = {}
  for path, variable in graph.variables:
    match = winners[path]
    transform = _value_for(assignments[match.assignment], graph, path, variable)
    bucket = (match.assignment, match.parts, _config.fingerprint(transform))
    buckets.setdefault(bucket, []).append((path, variable))
    transforms.setdefault(bucket, transform)

  labels = _label_buckets(list(buckets))
  groups = []
  path_labels: dict[Path, str] = {}
  for bucket in sorted(buckets, key=lambda bucket: bucket[0]):
    members = buckets[bucket]
    assignment = assignments[bucket[0]]
    sizes = [_size_and_bytes(variable) for _, variable in members]
    groups.append(
      Group(
        label=labels[bucket],
        assignment=bucket[0],
        source=repr(assignment),
        transform=transforms[bucket],
        paths=tuple(path for path, _ in members),
        num_elements=sum(size for size, _ in sizes),
        param_bytes=sum(nbytes for _, nbytes in sizes),
      )
    )
    for path, _ in members:
      path_labels[path] = labels[bucket]
  return Groups(groups, path_labels)


def _check_patterns(
  assignments: list[Assignment], reports: list[_match.PatternReport]
) -> None:
  for assignment, report in zip(assignments, reports):
    if not assignment.required:
      continue
    text = _keys.format_pattern(assignment.pattern)
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
      reason, nearest = _match.nearest_paths(assignment.pattern, report)
      hint = "\n".join(f"  {path}" for path in nearest) or "  (none)"
      raise UnmatchedPatternError(
        f"{text} selects no Variable: {reason}.\nNearest existing paths:\n{hint}\n"
        "Fix the key, or use mgr.assign(key, value, required=False) if the"
        " configuration is shared with models that lack this part."
      )


def _check_all_assigned(graph: ModelGraph, winners: dict[Path, _match.Match]) -> None:
  missing = [path for path, _ in graph.variables if path not in winners]
  if not missing:
    return
  listed = "\n".join(f"  {format_path(path)}" for path in missing[:_LISTED_PATHS])
  more = len(missing) - _LISTED_PATHS
  if more > 0:
    listed += f"\n  ... and {more} more"
  raise UnassignedVariablesError(
    f"{len(missing)} Variable(s) have no optimizer:\n{listed}\n"
    "Add a default with mgr[...] = optax.adamw(...) before the other"
    " assignments, or freeze them with mgr[key] = None."
  )


def _value_for(
  assignment: Assignment, graph: ModelGraph, path: Path, variable: nnx.Variable
) -> optax.GradientTransformation | None:
  value = assignment.value
  if value is None or isinstance(value, optax.GradientTransformation):
    return value

  where = f"{_keys.format_pattern(assignment.pattern)} rule {assignment.rule_name!r}"
  info = param_info(path, variable)
  try:
    result = value(graph.modules_on(path), info)
  except Exception as error:
    raise RuleError(
      f"{where} raised {type(error).__name__} for the Variable at"
      f" {format_path(path)!r} (shape {info.shape}, dtype {info.dtype}): {error}"
    ) from error
  if result is not None and not isinstance(result, optax.GradientTransformation):
    raise RuleError(
      f"{where} returned {type(result).__name__} {result!r:.80} for the Variable"
      f" at {format_path(path)!r}; a rule must return an optax"
      " GradientTransformation or None (to freeze the Variable)."
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


def _size_and_bytes(variable: nnx.Variable) -> tuple[int, int]:
  value = variable.get_value()
  size = math.prod(getattr(value, "shape", ()))
  dtype = getattr(value, "dtype", None)
  itemsize = getattr(dtype, "itemsize", 0) if dtype is not None else 0
  return size, size * itemsize
