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
from ueaj.opt._graph import GraphNode, ModelGraph, Stack, format_path
from ueaj.opt._keys import Element, Path

# How many nodes to remember per pattern for the nearest-path hint.
_HINT_NODES = 64


@dataclasses.dataclass(frozen=True, slots=True)
class Match:
  """The assignment that selects a Variable and the label parts it produced."""

  assignment: int
  parts: tuple[str, ...]


#: The result for one Variable: one Match, or for a Variable of a declared
#: stack one entry per layer (None where no assignment selects the layer).
Result = Match | tuple[Match | None, ...]


@dataclasses.dataclass(frozen=True)
class OutOfRange:
  """An integer index that fell outside a sequence or stack while matching."""

  position: int
  index: int
  container: Path
  length: int
  anchored: bool


@dataclasses.dataclass
class PatternReport:
  """The record of one pattern's walk, for errors and hints."""

  # Nodes at which the pattern was fully consumed.
  completed: list[GraphNode] = dataclasses.field(default_factory=list)
  out_of_range: list[OutOfRange] = dataclasses.field(default_factory=list)
  # The furthest pattern position that was reached, and where.
  best_position: int = -1
  best_nodes: list[GraphNode] = dataclasses.field(default_factory=list)

  @property
  def matched(self) -> bool:
    return bool(self.completed)


# A state of a pattern's automaton: (position, label parts, layers). Inside a
# stack, `layers` maps each selected layer to its label part, which replaces
# the `_LAYER` placeholder in the parts; elsewhere it is None.
_LAYER = None
_State = tuple[int, tuple, tuple[tuple[int, str], ...] | None]


@dataclasses.dataclass(frozen=True, slots=True)
class _Winner:
  """The best match so far on the current path, per layer inside a stack."""

  base: Match | None = None
  layers: tuple[tuple[int, Match], ...] = ()

  def floor(self) -> int:
    """Return the lowest assignment that still wins somewhere (-1 if unknown)."""
    if self.base is None:
      return -1
    return min([self.base.assignment, *(match.assignment for _, match in self.layers)])

  def merge(self, number: int, parts: tuple, layers) -> _Winner:
    """Apply a completion of assignment `number`; later assignments win."""
    if layers is None:
      match = Match(number, parts)
      base = match if self.base is None or self.base.assignment < number else self.base
      kept = tuple((i, m) for i, m in self.layers if m.assignment > number)
      return _Winner(base, kept)
    current = dict(self.layers)
    for layer, text in layers:
      effective = current.get(layer, self.base)
      if effective is None or effective.assignment < number:
        filled = tuple(text if part is _LAYER else part for part in parts)
        current[layer] = Match(number, filled)
    return _Winner(self.base, tuple(sorted(current.items())))

  def result(self, stack: Stack | None) -> Result | None:
    if stack is None:
      return self.base
    per_layer = dict(self.layers)
    return tuple(per_layer.get(layer, self.base) for layer in range(stack.length))


class _Matcher:
  def __init__(self, graph: ModelGraph, patterns: list[tuple[Element, ...]]):
    self.graph = graph
    self.patterns = patterns
    self.reports = [PatternReport() for _ in patterns]
    self.anchored_until = [_anchored_length(pattern) for pattern in patterns]
    # Patterns with an index at a fixed depth are never dropped early. They
    # must visit every sequence at that depth, so that an out-of-range index
    # raises whatever the order of the other assignments.
    self.keep = [
      any(_has_index(element) for element in pattern[:anchored])
      for pattern, anchored in zip(patterns, self.anchored_until)
    ]
    self.lengths = [len(pattern) for pattern in patterns]
    self._closures: dict[tuple, list[_State]] = {}
    self.winners: dict[Path, Result] = {}
    self._reported_ranges: set[tuple[int, int, Path]] = set()

  def run(self) -> None:
    states = {
      number: self._closure(number, [(0, (), None)], self.graph.root)
      for number in range(len(self.patterns))
    }
    self._visit(self.graph.root, states, _Winner(), None)

  def _visit(
    self,
    node: GraphNode,
    states: dict[int, list[_State]],
    winner: _Winner,
    stack: Stack | None,
  ) -> None:
    # Step 1: patterns consumed at this node select everything below it.
    for number, active in states.items():
      for position, parts, layers in active:
        if position == len(self.patterns[number]):
          self.reports[number].completed.append(node)
          winner = winner.merge(number, parts, layers)
          break

    if node.is_variable:
      result = winner.result(stack)
      if result is not None:
        self.winners[node.path] = result
      return

    # Step 2: keep only the patterns that can still change the result. A
    # pattern that already matched elsewhere and cannot beat the current
    # winner is dropped, which keeps the walk linear in practice.
    floor = winner.floor()
    lengths = self.lengths
    live = {
      number: active
      for number, active in states.items()
      if active
      and all(position < lengths[number] for position, _, _ in active)
      and (number > floor or not self.reports[number].matched or self.keep[number])
    }

    # Step 3: advance every live pattern by one key. Each element looks up
    # the children it matches (a name one child, a slice its indices), so
    # the work grows with the matches, not with children times patterns.
    advanced: dict[object, dict[int, list[_State]]] = {}
    for number, active in live.items():
      for position, parts, layers in active:
        element = self.patterns[number][position]
        if isinstance(element, _keys.AnyDepth):
          matched = [(key, None) for key in node.children]
        else:
          matched = self._children(number, position, element, node)
        for key, part in matched:
          state = (position, parts, layers) if part is None else (position + 1, (*parts, part), layers)
          advanced.setdefault(key, {}).setdefault(number, []).append(state)

    for key, child in node.children.items():
      child_states = {
        number: self._closure(number, states, child)
        for number, states in advanced.get(key, {}).items()
      }
      self._visit(child, child_states, winner, child.stack or stack)

  def _closure(
    self, number: int, states: list[_State], node: GraphNode
  ) -> list[_State]:
    """Add the states reached without consuming a key, then record progress.

    Those are `...` matching no key, and at a declared stack, an index,
    slice or list selecting layers along the stack's axis.
    """
    pattern = self.patterns[number]
    if node.stack is None:
      # Outside stacks the closure depends only on the states, and the same
      # few state sets recur at every node that a `...` walks through.
      key = (number, *states)
      result = self._closures.get(key)
      if result is None:
        result = self._closures[key] = self._search(number, states, node)
      self._record_progress(number, result, node)
      return result
    result = self._search(number, states, node)
    self._record_progress(number, result, node)
    return result

  def _search(self, number: int, states: list[_State], node: GraphNode) -> list[_State]:
    """Return `states` and every state reachable from them without a key, in order."""
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
      position, parts, layers = state
      if position >= len(pattern):
        continue
      element = pattern[position]
      if isinstance(element, _keys.AnyDepth):
        queue.append((position + 1, (*parts, "..."), layers))
      elif node.stack is not None and layers is None:
        selected = self._select_layers(number, position, element, node)
        if selected:
          queue.append((position + 1, (*parts, _LAYER), selected))
    return result

  def _record_progress(self, number: int, states: list[_State], node: GraphNode) -> None:
    """Remember the nodes where the pattern got furthest, for the nearest-path hint."""
    report = self.reports[number]
    furthest = max(position for position, _, _ in states)
    if furthest > report.best_position:
      report.best_position = furthest
      report.best_nodes = [node]
    elif furthest == report.best_position and len(report.best_nodes) < _HINT_NODES:
      report.best_nodes.append(node)

  def _select_layers(
    self, number: int, position: int, element: Element, node: GraphNode
  ) -> tuple[tuple[int, str], ...]:
    """Return the layers of a stack that `element` selects, with their label parts."""
    length = node.stack.length
    if isinstance(element, _keys.Batch):
      text = batch_label(element)
      inner = self._select_layers(number, position, element.inner, node)
      return tuple((layer, text) for layer, _ in inner)
    if isinstance(element, _keys.Index):
      layer = self._normalize(number, position, element.index, node, length)
      return () if layer is None else ((layer, str(layer)),)
    if isinstance(element, _keys.Slice):
      return tuple((layer, str(layer)) for layer in element.indices(length))
    if isinstance(element, _keys.AnyOf):
      selected = {}
      for option in element.options:
        for layer, text in self._select_layers(number, position, option, node):
          selected.setdefault(layer, text)
      return tuple(selected.items())
    return ()

  def _normalize(
    self, number: int, position: int, index: int, node: GraphNode, length: int
  ) -> int | None:
    """Wrap a negative index; record and reject one outside `length`."""
    normalized = index + length if index < 0 else index
    if 0 <= normalized < length:
      return normalized
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

  def _children(
    self, number: int, position: int, element: Element, node: GraphNode
  ) -> list[tuple[object, str]]:
    """Return the children of `node` that `element` matches, with their label parts."""
    children = node.children
    if isinstance(element, _keys.Batch):
      text = batch_label(element)
      inner = self._children(number, position, element.inner, node)
      return [(key, text) for key, _ in inner]
    if isinstance(element, _keys.Name):
      return [(element.key, element.key)] if element.key in children else []
    if isinstance(element, _keys.Index):
      length = node.sequence_length
      if length is None:
        # Mappings may have int keys; those match exactly, without wrapping.
        index = element.index
      else:
        index = self._normalize(number, position, element.index, node, length)
      return [(index, str(index))] if index is not None and index in children else []
    if isinstance(element, _keys.Slice):
      length = node.sequence_length
      if length is None:
        return []
      return [(key, str(key)) for key in element.indices(length) if key in children]
    if isinstance(element, _keys.AnyOf):
      found: dict[object, str] = {}
      for option in element.options:
        for key, part in self._children(number, position, option, node):
          found.setdefault(key, part)
      return list(found.items())
    if isinstance(element, _keys.InstanceOf):
      name = element.cls.__name__
      return [(key, name) for key, child in children.items() if isinstance(child.obj, element.cls)]
    raise AssertionError(f"unhandled key element {element!r}")


def _has_index(element: Element) -> bool:
  if isinstance(element, _keys.Batch):
    return _has_index(element.inner)
  if isinstance(element, _keys.AnyOf):
    return any(isinstance(option, _keys.Index) for option in element.options)
  return isinstance(element, _keys.Index)


def _anchored_length(pattern: tuple[Element, ...]) -> int:
  """Return how many leading elements have a fixed depth (no `...` before them)."""
  for position, element in enumerate(pattern):
    if isinstance(element, _keys.AnyDepth):
      return position
  return len(pattern)


def batch_label(element: _keys.Batch) -> str:
  """Return the label part of a batch element, for example `0:4` or `0,2`."""
  inner = element.inner
  if isinstance(inner, _keys.AnyOf):
    return ",".join(str(option) for option in map(repr, inner.options)).replace("'", "")
  if isinstance(inner, _keys.Name):
    return inner.key
  if isinstance(inner, _keys.InstanceOf):
    return inner.cls.__name__
  return repr(inner)


def match_all(
  graph: ModelGraph, patterns: list[tuple[Element, ...]]
) -> tuple[dict[Path, Result], list[PatternReport]]:
  """Match every pattern against the graph in one walk.

  Args:
    graph: The snapshot of the model.
    patterns: The patterns in assignment order; later ones override earlier
      ones Variable by Variable.

  Returns:
    The winning match per Variable path, per layer for Variables of a
    declared stack (Variables that no pattern selects are absent), and one
    report per pattern.
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
        f"; {type(nodes[0].obj).__name__} is neither a sequence nor a declared"
        " stack, so integer indices and slices do not apply there. If its"
        " Variables are stacked along a layer axis by nnx.vmap or nnx.scan,"
        f" declare it first: mgr.declare_stack({_key_text(nodes[0].path)}, axis=0)"
      )
  return reason, [format_path(child.path) for child in scored[:limit]]


def _key_text(path: Path) -> str:
  return ", ".join(repr(key) for key in path) or "..."


def _descendants(node: GraphNode) -> list[GraphNode]:
  found = []
  stack = list(node.children.values())
  while stack:
    current = stack.pop()
    found.append(current)
    stack.extend(current.children.values())
  return found
