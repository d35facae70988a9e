"""Matching: which assignment wins each Variable, and with which label parts.

All patterns are matched in one walk over the graph snapshot. Each pattern is
run as a small nondeterministic automaton whose states are `(position in the
pattern, label parts so far)`. A pattern selects a Variable when it is fully
consumed at the Variable or at one of its ancestors (patterns match path
prefixes). If a pattern can be consumed at several depths, the shallowest
one wins, so the label parts are always the same for the same path.
"""

from __future__ import annotations

import dataclasses
import difflib

from ueaj.opt import _keys
from ueaj.opt._graph import GraphNode, ModelGraph, format_path
from ueaj.opt._keys import Element, Path

# How many nodes to remember per pattern for the nearest-path hint.
_HINT_NODES = 64


@dataclasses.dataclass(frozen=True)
class Match:
  """The assignment that selects a Variable and the label parts it produced."""

  assignment: int
  parts: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class OutOfRange:
  """An integer index that fell outside a sequence while matching."""

  position: int
  index: int
  container: Path
  length: int
  anchored: bool


@dataclasses.dataclass
class PatternReport:
  """What one pattern did during the walk, for errors and hints."""

  matched: int = 0
  out_of_range: list[OutOfRange] = dataclasses.field(default_factory=list)
  # The furthest pattern position that was reached, and where.
  best_position: int = -1
  best_nodes: list[GraphNode] = dataclasses.field(default_factory=list)


_State = tuple[int, tuple[str, ...]]


class _Matcher:
  def __init__(self, graph: ModelGraph, patterns: list[tuple[Element, ...]]):
    self.graph = graph
    self.patterns = patterns
    self.reports = [PatternReport() for _ in patterns]
    self.anchored_until = [_anchored_length(pattern) for pattern in patterns]
    self.winners: dict[Path, Match] = {}
    self._reported_ranges: set[tuple[int, int, Path]] = set()

  def run(self) -> None:
    states = {
      number: self._closure(number, [(0, ())], self.graph.root)
      for number in range(len(self.patterns))
    }
    self._visit(self.graph.root, states, None)

  def _visit(
    self,
    node: GraphNode,
    states: dict[int, list[_State]],
    winner: Match | None,
  ) -> None:
    # Step 1: patterns consumed at this node select everything below it.
    for number, active in states.items():
      for position, parts in active:
        if position == len(self.patterns[number]):
          report = self.reports[number]
          report.matched += 1
          if winner is None or number > winner.assignment:
            winner = Match(number, parts)
          break

    if node.is_variable:
      if winner is not None:
        self.winners[node.path] = winner
      return

    # Step 2: keep only the patterns that can still change the result. A
    # pattern that already matched elsewhere and cannot beat the current
    # winner is dropped, which keeps the walk linear in practice.
    floor = -1 if winner is None else winner.assignment
    live = {
      number: active
      for number, active in states.items()
      if active
      and all(position < len(self.patterns[number]) for position, _ in active)
      and (number > floor or not self.reports[number].matched)
    }

    # Step 3: advance every live pattern by one key into each child.
    for key, child in node.children.items():
      child_states = {}
      for number, active in live.items():
        advanced = []
        for position, parts in active:
          element = self.patterns[number][position]
          if isinstance(element, _keys.AnyDepth):
            advanced.append((position, parts))
            continue
          part = self._step(number, position, element, node, key, child)
          if part is not None:
            advanced.append((position + 1, (*parts, part)))
        if advanced:
          child_states[number] = self._closure(number, advanced, child)
      self._visit(child, child_states, winner)

  def _closure(
    self, number: int, states: list[_State], node: GraphNode
  ) -> list[_State]:
    """Add the states reached by letting `...` match no key, then record progress."""
    pattern = self.patterns[number]
    result: list[_State] = []
    seen: set[_State] = set()
    queue = list(states)
    while queue:
      state = queue.pop(0)
      if state in seen:
        continue
      seen.add(state)
      result.append(state)
      position, parts = state
      if position < len(pattern) and isinstance(pattern[position], _keys.AnyDepth):
        queue.append((position + 1, (*parts, "...")))

    report = self.reports[number]
    furthest = max(position for position, _ in result)
    if furthest > report.best_position:
      report.best_position = furthest
      report.best_nodes = [node]
    elif furthest == report.best_position and len(report.best_nodes) < _HINT_NODES:
      report.best_nodes.append(node)
    return result

  def _step(
    self,
    number: int,
    position: int,
    element: Element,
    node: GraphNode,
    key: object,
    child: GraphNode,
  ) -> str | None:
    """Return the label part if `element` matches `key`, else None."""
    if isinstance(element, _keys.Batch):
      if self._step(number, position, element.inner, node, key, child) is None:
        return None
      return batch_label(element)
    if isinstance(element, _keys.Name):
      return element.key if key == element.key and isinstance(key, str) else None
    if isinstance(element, _keys.Index):
      return self._step_index(number, position, element.index, node, key)
    if isinstance(element, _keys.Slice):
      length = node.sequence_length
      if length is None or not isinstance(key, int):
        return None
      return str(key) if key in element.indices(length) else None
    if isinstance(element, _keys.AnyOf):
      for option in element.options:
        part = self._step(number, position, option, node, key, child)
        if part is not None:
          return part
      return None
    if isinstance(element, _keys.InstanceOf):
      return element.cls.__name__ if isinstance(child.obj, element.cls) else None
    raise AssertionError(f"unhandled key element {element!r}")

  def _step_index(
    self, number: int, position: int, index: int, node: GraphNode, key: object
  ) -> str | None:
    length = node.sequence_length
    if length is None:
      # Mappings may have int keys; those match exactly, without wrapping.
      return str(key) if key == index and isinstance(key, int) else None
    normalized = index + length if index < 0 else index
    if not 0 <= normalized < length:
      marker = (number, index, node.path)
      if marker not in self._reported_ranges:
        self._reported_ranges.add(marker)
        self.reports[number].out_of_range.append(
          OutOfRange(
            position,
            index,
            node.path,
            length,
            anchored=position < self.anchored_until[number],
          )
        )
      return None
    return str(key) if key == normalized else None


def _anchored_length(pattern: tuple[Element, ...]) -> int:
  """Return how many leading elements have a fixed depth (no `...` before them)."""
  for position, element in enumerate(pattern):
    if isinstance(element, _keys.AnyDepth) or (
      isinstance(element, _keys.Batch) and isinstance(element.inner, _keys.AnyDepth)
    ):
      return position
  return len(pattern)


def batch_label(element: _keys.Batch) -> str:
  """Return the label part of a batch element, for example `0:4` or `0,2`."""
  inner = element.inner
  if isinstance(inner, _keys.AnyOf):
    return ",".join(str(option) for option in map(repr, inner.options)).replace("'", "")
  if isinstance(inner, _keys.Name):
    return inner.key
  return repr(inner)


def match_all(
  graph: ModelGraph, patterns: list[tuple[Element, ...]]
) -> tuple[dict[Path, Match], list[PatternReport]]:
  """Match every pattern against the graph in one walk.

  Args:
    graph: The snapshot of the model.
    patterns: The patterns in assignment order; later ones override earlier
      ones Variable by Variable.

  Returns:
    The winning match per Variable path (Variables that no pattern selects
    are absent) and one report per pattern.
  """
  matcher = _Matcher(graph, patterns)
  matcher.run()
  return matcher.winners, matcher.reports


def nearest_paths(
  pattern: tuple[Element, ...], report: PatternReport, *, limit: int = 5
) -> tuple[str, list[str]]:
  """Explain where a pattern stopped matching and list the closest existing paths.

  Returns:
    A sentence that names the element that failed, and up to `limit`
    formatted paths that exist at that point of the graph.
  """
  position = report.best_position
  nodes = report.best_nodes
  element = pattern[position] if 0 <= position < len(pattern) else None

  # Candidates are the keys that exist right where the pattern stopped; after
  # a `...` that can be anywhere below the reached nodes.
  if position > 0 and isinstance(pattern[position - 1], _keys.AnyDepth):
    # The failing element may stand at any depth below the reached nodes.
    candidates = [descendant for node in nodes for descendant in _descendants(node)]
  else:
    candidates = [child for node in nodes for child in node.children.values()]
  unique = {child.path: child for child in candidates if child.path}
  candidates = list(unique.values())

  if isinstance(element, _keys.Name):
    scored = sorted(
      candidates,
      key=lambda child: -difflib.SequenceMatcher(
        None, str(child.path[-1]), element.key
      ).ratio(),
    )
  else:
    scored = candidates
  after_any_depth = position > 0 and isinstance(pattern[position - 1], _keys.AnyDepth)
  if after_any_depth:
    reason = f"element {position} ({element!r}) matched no key at any depth"
  else:
    where = "the model root" if not nodes[0].path else repr(format_path(nodes[0].path))
    if len(nodes) > 1:
      where += f" (and {len(nodes) - 1} other places)"
    reason = f"element {position} ({element!r}) matched no key below {where}"
    length = nodes[0].sequence_length
    if isinstance(element, (_keys.Index, _keys.Slice)) and length is None:
      reason += (
        f"; {type(nodes[0].obj).__name__} is not a sequence, so integer"
        " indices and slices do not apply there"
      )
  return reason, [format_path(child.path) for child in scored[:limit]]


def _descendants(node: GraphNode) -> list[GraphNode]:
  found = []
  stack = list(node.children.values())
  while stack:
    current = stack.pop()
    found.append(current)
    stack.extend(current.children.values())
  return found
