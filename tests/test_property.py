"""Property tests: random module trees and keys against a reference matcher.

The reference matcher below implements the key rules in the docstring of
`OptimizerManager` directly, by backtracking over each Param's path, and
shares no code with `ueaj.opt._match`. Every property builds a random model,
assigns random keys and checks that `mgr.label` gives each Param the group
the reference predicts.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from hypothesis import event, given, settings
from hypothesis import strategies as st

from ueaj import opt

LABEL = "opt_group"

# Small alphabets, so that random keys often name something that exists.
# "Leaf", "Norm" and "0" are also class names and label text of int keys,
# which lets two different keys produce the same label text.
PARAM_NAMES = ("w", "b", "scale")
STAT_NAMES = ("mean", "var")
ATTRIBUTE_NAMES = ("layers", "Leaf", "w", "Norm")
DICT_KEYS = ("0", "1", "Leaf", "w")
MISSING_NAME = "missing"
ALL_NAMES = PARAM_NAMES + STAT_NAMES + ATTRIBUTE_NAMES + DICT_KEYS + (MISSING_NAME,)
SHAPES = ((), (2,), (1, 3))
SLICE_STEPS = (None, 1, 2, 3, -1, -2)

# One array per shape, shared by all Variables: JAX arrays are immutable, and
# creating arrays one by one is slow under the debug checks of conftest.py.
ZEROS = {shape: jnp.zeros(shape) for shape in SHAPES}


# Models


class Leaf(nnx.Module):
  """A module that owns Variables and no submodules."""

  def __init__(self, params, stats):
    for name, shape in params:
      setattr(self, name, nnx.Param(ZEROS[shape]))
    for name, shape in stats:
      setattr(self, name, nnx.BatchStat(ZEROS[shape]))


class Norm(Leaf):
  """A Leaf subclass, so that type keys must match by isinstance."""


class Block(nnx.Module):
  """A module whose attributes are submodules, `nnx.List`s or `nnx.Dict`s."""

  def __init__(self, children):
    for name, child in children:
      setattr(self, name, child)


@dataclasses.dataclass(frozen=True)
class LeafSpec:
  cls: type
  params: tuple[tuple[str, tuple[int, ...]], ...]
  stats: tuple[tuple[str, tuple[int, ...]], ...]


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  children: tuple[tuple[str, Any], ...]


@dataclasses.dataclass(frozen=True)
class ListSpec:
  items: tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class DictSpec:
  items: tuple[tuple[str, Any], ...]


def named(values, names, min_size, max_size):
  """Draw `(name, value)` pairs with distinct names."""
  return st.dictionaries(
    st.sampled_from(names), values, min_size=min_size, max_size=max_size
  ).map(lambda mapping: tuple(mapping.items()))


leaf_specs = st.builds(
  LeafSpec,
  cls=st.sampled_from([Leaf, Norm]),
  params=named(st.sampled_from(SHAPES), PARAM_NAMES, 1, 3),
  stats=named(st.sampled_from(SHAPES), STAT_NAMES, 0, 1),
)


def containers(children):
  # Sequences are listed twice to draw them more often, which gives int keys,
  # slices and out-of-range indices more examples.
  sequences = st.builds(ListSpec, st.lists(children, min_size=1, max_size=4).map(tuple))
  return st.one_of(
    st.builds(BlockSpec, named(children, ATTRIBUTE_NAMES, 1, 3)),
    sequences,
    st.builds(DictSpec, named(children, DICT_KEYS, 1, 3)),
    sequences,
  )


# Every container is non-empty and every Leaf has a Param, so every node of a
# tree lies on the path of some Param.
subtrees = st.recursive(leaf_specs, containers, max_leaves=5)
trees = st.builds(BlockSpec, named(subtrees, ATTRIBUTE_NAMES, 1, 2))

# Trees with a list index 0 and dict keys "0" and "Leaf", which other keys
# (0, "0", the class Leaf) match with the same label text.
small_subtrees = st.recursive(leaf_specs, containers, max_leaves=2)
twin_trees = st.builds(
  lambda items, zero, leaf: BlockSpec((
    ("layers", ListSpec(items)),
    ("w", DictSpec((("0", zero), ("Leaf", leaf)))),
  )),
  st.lists(small_subtrees, min_size=1, max_size=2).map(tuple),
  small_subtrees,
  small_subtrees,
)


def instantiate(spec):
  if isinstance(spec, LeafSpec):
    return spec.cls(spec.params, spec.stats)
  if isinstance(spec, BlockSpec):
    return Block([(name, instantiate(child)) for name, child in spec.children])
  if isinstance(spec, ListSpec):
    return nnx.List([instantiate(item) for item in spec.items])
  return nnx.Dict({key: instantiate(item) for key, item in spec.items})


@dataclasses.dataclass(frozen=True)
class Site:
  """A Variable of the model and the objects on its path.

  `nodes[d]` is the object that `path[:d]` leads to: `nodes[0]` is the model
  and `nodes[-1]` the Variable.
  """

  path: tuple[Any, ...]
  nodes: tuple[Any, ...]

  @property
  def variable(self):
    return self.nodes[-1]


def collect_sites(spec, obj, path=(), nodes=()):
  """Return the Param sites and BatchStat sites of a model built from `spec`.

  Children are reached with plain attribute and item access, not through NNX
  graph traversal, so the paths come from the spec alone.
  """
  nodes = (*nodes, obj)
  params, stats = [], []
  if isinstance(spec, LeafSpec):
    for name, _ in spec.params:
      params.append(Site((*path, name), (*nodes, getattr(obj, name))))
    for name, _ in spec.stats:
      stats.append(Site((*path, name), (*nodes, getattr(obj, name))))
    return params, stats

  if isinstance(spec, BlockSpec):
    children = [(name, child, getattr(obj, name)) for name, child in spec.children]
  elif isinstance(spec, ListSpec):
    children = [(index, child, obj[index]) for index, child in enumerate(spec.items)]
  else:
    children = [(key, child, obj[key]) for key, child in spec.items]
  for key, child_spec, child in children:
    child_params, child_stats = collect_sites(child_spec, child, (*path, key), nodes)
    params += child_params
    stats += child_stats
  return params, stats


def build_model(spec):
  model = instantiate(spec)
  params, stats = collect_sites(spec, model)
  return model, params, stats


# Keys


@dataclasses.dataclass(frozen=True)
class Batched:
  """The key element `opt.batch[inner]`.

  With `spread`, a list is written `batch[0, 2]` instead of `batch[[0, 2]]`.
  """

  inner: Any
  spread: bool = False

  def to_key(self):
    if isinstance(self.inner, list) and self.spread:
      return opt.batch[tuple(self.inner)]
    return opt.batch[self.inner]


def to_key(pattern):
  return tuple(
    element.to_key() if isinstance(element, Batched) else element for element in pattern
  )


def is_any_depth(element):
  return element is Ellipsis or (isinstance(element, Batched) and element.inner is Ellipsis)


def slice_text(bounds: slice) -> str:
  start = "" if bounds.start is None else str(bounds.start)
  stop = "" if bounds.stop is None else str(bounds.stop)
  text = f"{start}:{stop}"
  if bounds.step is not None:
    text += f":{bounds.step}"
  return text


def batch_text(inner) -> str:
  """Return the label part of `batch[inner]`: the key as written."""
  if inner is Ellipsis:
    return "..."
  if isinstance(inner, slice):
    return slice_text(inner)
  if isinstance(inner, list):
    return ",".join(str(option) for option in inner)
  if isinstance(inner, type):
    return inner.__name__
  return str(inner)


# Reference matcher


def normalized_index(index: int, container) -> int | None:
  """Return the non-negative index into `container`, or None when out of range or not a sequence."""
  if not isinstance(container, nnx.List):
    return None
  length = len(container)
  position = index + length if index < 0 else index
  return position if 0 <= position < length else None


def element_part(element, key, parent, child) -> str | None:
  """Return the label part when `element` matches the path key `key`, else None.

  `parent` is the node that contains `key` and `child` the node `key` leads to.
  """
  if isinstance(element, Batched):
    if element_part(element.inner, key, parent, child) is None:
      return None
    return batch_text(element.inner)
  if isinstance(element, str):
    return key if isinstance(key, str) and key == element else None
  if isinstance(element, int):
    position = normalized_index(element, parent)
    return str(key) if position is not None and key == position else None
  if isinstance(element, slice):
    if not isinstance(parent, nnx.List) or not isinstance(key, int):
      return None
    return str(key) if key in range(len(parent))[element] else None
  if isinstance(element, list):
    for option in element:
      part = element_part(option, key, parent, child)
      if part is not None:
        return part
    return None
  if isinstance(element, type):
    return element.__name__ if isinstance(child, element) else None
  raise AssertionError(f"the reference has no rule for key element {element!r}")


def completions(pattern, site: Site) -> list[tuple[int, tuple[str, ...]]]:
  """Return every `(depth, label parts)` with which `pattern` consumes a prefix of the path."""
  found = []

  def walk(position: int, depth: int, parts: tuple[str, ...]) -> None:
    if position == len(pattern):
      found.append((depth, parts))
      return
    element = pattern[position]
    if is_any_depth(element):
      part = batch_text(Ellipsis)
      for end in range(depth, len(site.path) + 1):
        walk(position + 1, end, (*parts, part))
      return
    if depth == len(site.path):
      return
    part = element_part(element, site.path[depth], site.nodes[depth], site.nodes[depth + 1])
    if part is not None:
      walk(position + 1, depth + 1, (*parts, part))

  walk(0, 0, ())
  return found


def shallowest_parts(pattern, site: Site) -> set[tuple[str, ...]]:
  """Return the label parts of the shallowest prefixes `pattern` matches, or an empty set.

  More than one result means that the key rules leave the label open,
  because the pattern matches one prefix in several ways, as
  `(..., :, ..., 'w')` does on `layers/1/sub/0/w`.
  """
  found = completions(pattern, site)
  if not found:
    return set()
  depth = min(depth for depth, _ in found)
  return {parts for end, parts in found if end == depth}


@dataclasses.dataclass(frozen=True)
class Expected:
  """The assignment that wins a Param (None if none) and its possible label parts."""

  winner: int | None
  candidates: frozenset[tuple[str, ...]]


def reference(patterns, sites: list[Site]) -> list[Expected]:
  expected = []
  for site in sites:
    winner, candidates = None, frozenset()
    for number, pattern in enumerate(patterns):
      parts = shallowest_parts(pattern, site)
      if parts:
        winner, candidates = number, frozenset(parts)
    expected.append(Expected(winner, candidates))
  return expected


@dataclasses.dataclass(frozen=True)
class OutOfRange:
  """An int key that fell outside a sequence on some Param's path.

  `anchored` means no `...` comes before it, so it sits at a fixed depth.
  `in_list` means the int is an option of a list key. `container_depth` is
  the depth of the sequence on the path.
  """

  anchored: bool
  in_list: bool
  container_depth: int


def out_of_range(pattern, site: Site) -> list[OutOfRange]:
  """Return every int key of `pattern` tried against a sequence too short for it."""
  found = []

  def ints_of(element):
    inner = element.inner if isinstance(element, Batched) else element
    if isinstance(inner, int):
      return [inner], False
    if isinstance(inner, list):
      return [option for option in inner if isinstance(option, int)], True
    return [], False

  def walk(position: int, depth: int) -> None:
    if position == len(pattern):
      return
    element = pattern[position]
    if is_any_depth(element):
      for end in range(depth, len(site.path) + 1):
        walk(position + 1, end)
      return
    if depth == len(site.path):
      return
    parent = site.nodes[depth]
    indices, in_list = ints_of(element)
    if isinstance(parent, nnx.List):
      anchored = not any(map(is_any_depth, pattern[:position]))
      for index in indices:
        if normalized_index(index, parent) is None:
          found.append(OutOfRange(anchored, in_list, depth))
    key = site.path[depth]
    if element_part(element, key, parent, site.nodes[depth + 1]) is not None:
      walk(position + 1, depth + 1)

  walk(0, 0)
  return found


def allowed_outcomes(patterns, sites: list[Site]) -> set:
  """Return the outcomes of labelling with every assignment `required=True`.

  An outcome is an exception type or "ok". The key rules fix some cases and
  leave others open, so the result may contain several outcomes.
  """
  allowed = set()
  for number, pattern in enumerate(patterns):
    matched = any(shallowest_parts(pattern, site) for site in sites)
    events = [found for site in sites for found in out_of_range(pattern, site)]

    # An int at a fixed depth that falls outside its sequence raises, also
    # as a list option and also where a later assignment wins that sequence.
    if any(found.anchored for found in events):
      allowed.add(IndexError)
      return allowed
    if not matched:
      # An out-of-range int after `...` may be reported as either error
      # when the pattern selects nothing.
      allowed.add(opt.UnmatchedPatternError)
      if events:
        allowed.add(IndexError)
      return allowed

  if any(expected.winner is None for expected in reference(patterns, sites)):
    allowed.add(opt.UnassignedVariablesError)
  else:
    allowed.add("ok")
  return allowed


# Key strategies

names = st.sampled_from(ALL_NAMES)
ints = st.integers(-5, 5)
bounds = st.none() | st.integers(-6, 6)
slices = st.builds(slice, bounds, bounds, st.sampled_from(SLICE_STEPS))
lists = st.lists(names | ints, min_size=1, max_size=3)
types = st.sampled_from([Leaf, Norm, Block, nnx.Module, nnx.List, nnx.Dict, nnx.Param, nnx.BatchStat])
# The label of batch[type] is not documented, and for an nnx class the library
# writes `nnx.<name>`, so only this file's classes go inside batch.
batch_inners = names | ints | slices | lists | st.sampled_from([Leaf, Norm, Block])
batched = st.builds(Batched, batch_inners, st.booleans())
elements = st.one_of(names, ints, slices, lists, st.just(Ellipsis), types, batched)
random_patterns = st.lists(elements, min_size=1, max_size=4).map(tuple)


def draw_slice(data, length: int) -> slice:
  bound = st.none() | st.integers(-length - 1, length + 1)
  return slice(data.draw(bound), data.draw(bound), data.draw(st.sampled_from(SLICE_STEPS)))


def draw_element_for(data, site: Site, depth: int):
  """Draw a key element that usually matches `site.path[depth]`."""
  key, parent, child = site.path[depth], site.nodes[depth], site.nodes[depth + 1]
  kinds = ["key", "list", "type"]
  if isinstance(key, int):
    kinds += ["negative", "slice", "outside"]
  kind = data.draw(st.sampled_from(kinds))

  if kind == "key":
    element = key
  elif kind == "negative":
    element = key - len(parent)
  elif kind == "outside":
    # Out of range here, but maybe not in a longer sibling sequence.
    length = len(parent)
    element = data.draw(st.sampled_from([length, length + 1, -length - 1]))
  elif kind == "slice":
    element = draw_slice(data, len(parent))
  elif kind == "list":
    if isinstance(key, str):
      others = data.draw(st.lists(names, max_size=2))
      option = key
    else:
      length = len(parent)
      others = data.draw(st.lists(st.integers(-length - 1, length), max_size=2))
      option = data.draw(st.sampled_from([key, key - length]))
    element = [*others, option]
  else:
    candidates = [Leaf, Norm, Block, nnx.Module, nnx.List, nnx.Dict, nnx.Param]
    element = data.draw(st.sampled_from([cls for cls in candidates if isinstance(child, cls)]))

  batchable = not isinstance(element, type) or element in (Leaf, Norm, Block)
  if batchable and data.draw(st.integers(0, 3)) == 0:
    element = Batched(element, data.draw(st.booleans()))
  if data.draw(st.integers(0, 5)) == 0:
    element = data.draw(elements)
  return element


def twin_element(element):
  """Return a different element with the same label text when both match, or None."""
  if isinstance(element, Batched):
    inner = element.inner
    if isinstance(inner, str) or (isinstance(inner, int) and inner >= 0):
      return inner
    return None
  if isinstance(element, str):
    if element.isdigit():
      return int(element)
    if element in ("Leaf", "Norm", "Block"):
      return globals()[element]
    return Batched(element)
  if isinstance(element, int) and element >= 0:
    return str(element)
  if isinstance(element, type):
    return element.__name__
  return None


def draw_twin(data, pattern):
  """Draw `pattern` with one element swapped for another of the same label text.

  The two patterns usually select different Params, as (..., "0") and
  (..., 0) or (..., Leaf) and (..., "Leaf") do, so they test the
  `@<assignment>` suffix.
  """
  swaps = [position for position, element in enumerate(pattern) if twin_element(element) is not None]
  if not swaps:
    return pattern
  position = data.draw(st.sampled_from(swaps))
  twin = list(pattern)
  twin[position] = twin_element(pattern[position])
  return tuple(twin)


PATTERN_MODES = ("prefix", "tail", "random", "twin")


def draw_pattern(data, sites: list[Site], earlier=(), modes=PATTERN_MODES):
  """Draw a random pattern, usually one built from the path of an existing Param.

  `earlier` contains the patterns drawn before, which a twin pattern copies.
  """
  if not earlier:
    modes = [mode for mode in modes if mode != "twin"]
  mode = data.draw(st.sampled_from(modes))
  if mode == "random":
    return data.draw(random_patterns)
  if mode == "twin":
    return draw_twin(data, data.draw(st.sampled_from(earlier)))

  site = data.draw(st.sampled_from(sites))
  depth = data.draw(st.integers(1, len(site.path)))
  if mode == "tail":
    # Short keys after `...` give different Params the same label text
    # most often, as (..., "0") and (..., 0) do.
    pattern = (Ellipsis, draw_element_for(data, site, depth - 1))
    if data.draw(st.booleans()):
      pattern += (Ellipsis,)
    return pattern
  pattern = [draw_element_for(data, site, position) for position in range(depth)]
  if data.draw(st.booleans()):
    # Replace a run of elements (possibly empty) with `...`.
    start = data.draw(st.integers(0, len(pattern)))
    stop = data.draw(st.integers(start, len(pattern)))
    pattern[start:stop] = [Ellipsis]
  return tuple(pattern)


# Keys that give the same label text to different Variables of a twin tree.
TWIN_CORES = (0, "0", [0], Batched(0), Leaf, "Leaf", Batched(Leaf), Batched("Leaf"))
TWIN_ENDS = ((), (Ellipsis,), ("w",), (Ellipsis, "w"), (nnx.Module,))


def draw_value(data, number: int):
  """Draw the value of assignment `number`: a transform of its own, or None."""
  frozen = data.draw(st.integers(0, 4)) == 0
  return None if frozen else optax.sgd(0.01 * (number + 1))


def draw_assignments(data, sites: list[Site], count_range=(1, 5), modes=PATTERN_MODES):
  """Draw `(pattern, value)` pairs, whose values are distinct transforms or None."""
  count = data.draw(st.integers(*count_range))
  assignments = []
  for number in range(count):
    earlier = [pattern for pattern, _ in assignments]
    pattern = draw_pattern(data, sites, earlier, modes)
    assignments.append((pattern, draw_value(data, number)))
  return assignments


# Checks


def labels_of(sites: list[Site]) -> dict[tuple, str | None]:
  return {site.path: site.variable.get_metadata().get(LABEL) for site in sites}


def check_labels(groups, patterns, values, params: list[Site], stats: list[Site]) -> set[str]:
  """Assert that the labels and groups agree with the reference on every Param.

  Returns:
    The rare cases the example contained, for `hypothesis.event`.
  """
  expected = reference(patterns, params)
  cases = set()

  # Pick, for each Param, the candidate the library chose. There is more
  # than one only where the key rules leave the label open.
  chosen = {}
  for site, want in zip(params, expected):
    label = site.variable.get_metadata()[LABEL]
    text = label.split("@")[0]
    texts = sorted("/".join(parts) for parts in want.candidates)
    assert text in texts, f"{site.path}: label {label!r}, expected one of {texts}"
    if len(texts) > 1:
      cases.add("several label parts at the shallowest depth")
    chosen[site.path] = (want.winner, text)

  owners = collections.defaultdict(set)
  for winner, text in chosen.values():
    owners[text].add(winner)
  want_labels = {}
  for path, (winner, text) in chosen.items():
    want_labels[path] = text if len(owners[text]) == 1 else f"{text}@{winner}"
    if len(owners[text]) > 1:
      cases.add("label text shared by two assignments")

  for site in params:
    assert site.variable.get_metadata()[LABEL] == want_labels[site.path], site.path
    assert groups.label_of(site.path) == want_labels[site.path], site.path
  for site in stats:
    assert LABEL not in site.variable.get_metadata(), site.path

  members = collections.defaultdict(set)
  for path, label in want_labels.items():
    members[label].add(path)
  assert set(groups.labels) == set(members)
  assert len(groups) == len(members)
  for group in groups:
    winner = chosen[next(iter(members[group.label]))][0]
    assert set(group.paths) == members[group.label], group.label
    sizes = [site.variable.get_value().size for site in params if site.path in members[group.label]]
    assert group.num_elements == sum(sizes), group.label
    assert group.assignment == winner, group.label
    assert group.transform is values[winner], group.label
    assert group.frozen == (values[winner] is None), group.label
  return cases


def make_manager(patterns, values, required):
  mgr = opt.OptimizerManager()
  for pattern, value, needed in zip(patterns, values, required):
    mgr.assign(to_key(pattern), value, required=needed)
  return mgr


# Properties


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_labels_match_reference(data):
  model, params, stats = build_model(data.draw(trees, label="tree"))
  assignments = draw_assignments(data, params)
  with_default = data.draw(st.integers(0, 4), label="without default if 0") > 0
  if with_default:
    assignments.insert(0, ((Ellipsis,), optax.sgd(1.0)))
  patterns = [pattern for pattern, _ in assignments]
  values = [value for _, value in assignments]
  # Only the default must match: the random keys may select nothing.
  required = [with_default and number == 0 for number in range(len(patterns))]
  mgr = make_manager(patterns, values, required)

  if any(want.winner is None for want in reference(patterns, params)):
    event("unassigned Params")
    with pytest.raises(opt.UnassignedVariablesError):
      mgr.label(model)
    assert set(labels_of(params).values()) == {None}
    return

  groups = mgr.label(model)
  for case in check_labels(groups, patterns, values, params, stats):
    event(case)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_same_label_text_matches_reference(data):
  model, params, stats = build_model(data.draw(twin_trees, label="tree"))
  end = data.draw(st.sampled_from(TWIN_ENDS), label="end of twin keys")
  assignments = [((Ellipsis,), optax.sgd(1.0))]
  for number in range(1, data.draw(st.integers(3, 5)) + 1):
    if data.draw(st.booleans()):
      pattern = (Ellipsis, data.draw(st.sampled_from(TWIN_CORES)), *end)
    else:
      earlier = [pattern for pattern, _ in assignments]
      pattern = draw_pattern(data, params, earlier, ("tail", "twin"))
    assignments.append((pattern, draw_value(data, number)))
  patterns = [pattern for pattern, _ in assignments]
  values = [value for _, value in assignments]
  mgr = make_manager(patterns, values, [True] + [False] * (len(patterns) - 1))
  groups = mgr.label(model)
  for case in check_labels(groups, patterns, values, params, stats):
    event(case)


def check_required(model, params, stats, assignments):
  """Label with every assignment required and compare with `allowed_outcomes`."""
  patterns = [pattern for pattern, _ in assignments]
  values = [value for _, value in assignments]
  mgr = make_manager(patterns, values, [True] * len(patterns))
  allowed = allowed_outcomes(patterns, params)

  try:
    groups = mgr.label(model)
  except (IndexError, opt.UnmatchedPatternError, opt.UnassignedVariablesError) as error:
    event(f"raised {type(error).__name__}")
    assert type(error) in allowed, f"raised {type(error).__name__}: {error}"
    if isinstance(error, IndexError):
      assert "is out of range for the sequence" in str(error)
    assert set(labels_of(params).values()) == {None}
    return
  event("labelled")
  assert "ok" in allowed, f"labelled, but expected one of {allowed}"
  for case in check_labels(groups, patterns, values, params, stats):
    event(case)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_required_keys_raise_or_match_reference(data):
  model, params, stats = build_model(data.draw(trees, label="tree"))
  # Mostly keys built from existing paths: random keys rarely all match.
  assignments = draw_assignments(
    data, params, count_range=(1, 3), modes=("prefix", "prefix", "twin", "tail", "random")
  )
  if data.draw(st.booleans(), label="with default"):
    assignments.insert(0, ((Ellipsis,), optax.sgd(1.0)))
  check_required(model, params, stats, assignments)


# Blocks whose `layers` sequences differ in length, so that one int key can
# be in range for one sequence and out of range for its sibling.
ragged_trees = st.lists(
  st.lists(leaf_specs, min_size=1, max_size=4).map(tuple), min_size=2, max_size=3
).map(
  lambda rows: BlockSpec((
    ("layers", ListSpec(tuple(BlockSpec((("layers", ListSpec(row)),)) for row in rows))),
  ))
)
ragged_outer = st.sampled_from(
  [slice(None), slice(None, None, -1), nnx.Module, Block, [0, 1], Batched(slice(1, None)), 1, -1]
)
ragged_inner = st.integers(-5, 4) | st.builds(Batched, st.integers(-5, 4)) | st.lists(
  st.integers(-5, 4), min_size=1, max_size=2
)
ragged_patterns = st.builds(
  lambda outer, inner, end: ("layers", outer, "layers", inner, *end),
  ragged_outer,
  ragged_inner,
  st.sampled_from([(), ("w",), (Ellipsis,)]),
) | st.builds(lambda inner: (Ellipsis, "layers", inner), ragged_inner)


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_ragged_index_keys_match_reference(data):
  model, params, stats = build_model(data.draw(ragged_trees, label="tree"))
  assignments = [((Ellipsis,), optax.sgd(1.0))]
  for number in range(1, data.draw(st.integers(1, 3)) + 1):
    if data.draw(st.booleans()):
      pattern = data.draw(ragged_patterns)
    else:
      pattern = draw_pattern(data, params, modes=("prefix",))
    assignments.append((pattern, draw_value(data, number)))
  check_required(model, params, stats, assignments)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_build_twice_same_labels(data):
  spec = data.draw(trees, label="tree")
  model, params, _ = build_model(spec)
  assignments = [((Ellipsis,), optax.sgd(1.0)), *draw_assignments(data, params)]
  patterns = [pattern for pattern, _ in assignments]
  values = [value for _, value in assignments]
  mgr = make_manager(patterns, values, [True] + [False] * (len(patterns) - 1))

  first_tx = mgr.build(model)
  first_labels = labels_of(params)
  second_tx = mgr.build(model)
  assert labels_of(params) == first_labels

  # An equal model built afresh gets the same labels.
  copy, copy_params, _ = build_model(spec)
  mgr.build(copy)
  assert labels_of(copy_params) == first_labels

  state = nnx.state(model, nnx.Param)
  first_state = jax.tree.structure(first_tx.init(state))
  assert jax.tree.structure(second_tx.init(state)) == first_state


# Examples of the trickier rules


def leaves(count, cls=Leaf):
  return nnx.List([cls([("w", (2,))], []) for _ in range(count)])


def label_of(variable) -> str:
  return variable.get_metadata()[LABEL]


def test_negative_slice_steps():
  model = Block([("layers", leaves(5))])
  mgr = opt.OptimizerManager()
  mgr[...] = optax.sgd(1.0)
  mgr["layers", ::-2] = optax.sgd(0.1)
  mgr["layers", -1:0:-3] = optax.sgd(0.2)
  mgr.label(model)

  # ::-2 selects 4, 2, 0 and -1:0:-3 selects 4, 1.
  labels = [label_of(leaf.w) for leaf in model.layers]
  assert labels == ["layers/0", "layers/1", "layers/2", "...", "layers/4"]

  # -2:-6:-2 selects 3, 1.
  mgr["layers", -2:-6:-2] = None
  groups = mgr.label(model)
  labels = [label_of(leaf.w) for leaf in model.layers]
  assert labels == ["layers/0", "layers/1", "layers/2", "layers/3", "layers/4"]
  assert groups["layers/1"].frozen
  assert groups["layers/3"].frozen
  assert groups["layers/0"].transform is mgr.assignments[1].value
  assert groups["layers/4"].transform is mgr.assignments[2].value
  assert "..." not in groups.labels


def test_ellipsis_in_middle_shallowest():
  def inner():
    return Block([("w", Leaf([("w", (2,)), ("b", (2,))], []))])

  model = Block([("attn", inner()), ("layers", nnx.List([inner(), Leaf([("w", ())], [])]))])
  mgr = opt.OptimizerManager()
  mgr[...] = optax.sgd(1.0)
  mgr["layers", ..., "w"] = optax.sgd(0.1)
  groups = mgr.label(model)

  # In layers/0 the attribute `w` matches before the Param `w` below it, so
  # its Params `w` and `b` share the group.
  assert label_of(model.layers[0].w.w) == "layers/.../w"
  assert label_of(model.layers[0].w.b) == "layers/.../w"
  assert label_of(model.layers[1].w) == "layers/.../w"
  assert label_of(model.attn.w.w) == "..."
  assert groups.labels == ("...", "layers/.../w")
  assert len(groups["layers/.../w"].paths) == 3

  mgr[..., "layers", ..., "b"] = None
  groups = mgr.label(model)
  assert label_of(model.layers[0].w.b) == ".../layers/.../b"
  assert label_of(model.layers[0].w.w) == "layers/.../w"
  assert groups[".../layers/.../b"].frozen


def test_type_elements_by_isinstance():
  model = Block([("layers", nnx.List([Leaf([("w", ())], []), Norm([("w", ())], [])]))])
  mgr = opt.OptimizerManager()
  mgr[...] = optax.sgd(1.0)
  mgr[..., Leaf] = optax.sgd(0.1)
  mgr.label(model)
  # Norm is a subclass of Leaf. The label names the class in the key.
  assert label_of(model.layers[0].w) == ".../Leaf"
  assert label_of(model.layers[1].w) == ".../Leaf"

  mgr[..., Norm, nnx.Param] = optax.sgd(0.2)
  mgr.label(model)
  assert label_of(model.layers[0].w) == ".../Leaf"
  assert label_of(model.layers[1].w) == ".../Norm/Param"

  # In flax 0.12 nnx.List is an nnx.Module too, so `nnx.Module` could match
  # `layers` itself. At position 1 it can only match the items.
  mgr["layers", nnx.Module, "w"] = None
  groups = mgr.label(model)
  assert label_of(model.layers[0].w) == "layers/Module/w"
  assert label_of(model.layers[1].w) == "layers/Module/w"
  assert groups.labels == ("layers/Module/w",)
  assert groups["layers/Module/w"].frozen


def test_batch_list_spellings():
  model = Block([("layers", leaves(3))])
  for element in (opt.batch[0, -1], opt.batch[[0, -1]]):
    mgr = opt.OptimizerManager()
    mgr[...] = optax.sgd(1.0)
    mgr["layers", element] = optax.sgd(0.1)
    groups = mgr.label(model)
    assert [label_of(leaf.w) for leaf in model.layers] == ["layers/0,-1", "...", "layers/0,-1"]
    assert groups["layers/0,-1"].paths == (("layers", 0, "w"), ("layers", 2, "w"))

  mgr = opt.OptimizerManager()
  mgr[...] = optax.sgd(1.0)
  mgr["layers", [0, -1]] = optax.sgd(0.1)
  mgr.label(model)
  assert [label_of(leaf.w) for leaf in model.layers] == ["layers/0", "...", "layers/2"]


def test_same_text_gets_assignment_suffix():
  model = Block([
    ("layers", leaves(2)),
    ("attn", nnx.Dict({"0": Leaf([("w", ())], []), "Leaf": Norm([("w", ())], [])})),
  ])
  mgr = opt.OptimizerManager()
  mgr[...] = optax.sgd(1.0)
  mgr[..., "0"] = optax.sgd(0.1)
  mgr[..., 0] = optax.sgd(0.2)
  mgr["attn", Leaf] = optax.sgd(0.3)
  mgr["attn", "Leaf"] = None
  groups = mgr.label(model)

  assert label_of(model.attn["0"].w) == "attn/Leaf@3"
  assert label_of(model.attn["Leaf"].w) == "attn/Leaf@4"
  assert label_of(model.layers[0].w) == ".../0"
  assert label_of(model.layers[1].w) == "..."
  assert set(groups.labels) == {"...", ".../0", "attn/Leaf@3", "attn/Leaf@4"}

  # Now assignment 7 wins attn/0 with the text `.../0` of assignment 2, and
  # assignment 3 wins nothing, so `attn/Leaf` needs no suffix any more.
  mgr["attn", "0"] = optax.sgd(0.4)
  mgr["attn", "0", ...] = None
  mgr[..., "0"] = optax.sgd(0.5)
  groups = mgr.label(model)
  assert label_of(model.attn["0"].w) == ".../0@7"
  assert label_of(model.layers[0].w) == ".../0@2"
  assert label_of(model.attn["Leaf"].w) == "attn/Leaf"
  assert set(groups.labels) == {"...", ".../0@2", ".../0@7", "attn/Leaf"}


def test_ambiguous_match_label_is_a_candidate():
  leaf = LeafSpec(Leaf, (("w", ()),), ())
  inner = BlockSpec((("layers", ListSpec((leaf, leaf))),))
  model, params, stats = build_model(BlockSpec((("layers", ListSpec((inner, leaf))),)))
  patterns = [(Ellipsis,), (Ellipsis, slice(None), Ellipsis, "w")]
  values = [optax.sgd(1.0), optax.sgd(0.1)]
  groups = make_manager(patterns, values, [True, True]).label(model)

  # On layers/0/layers/1/w, `:` can match the outer 0 or the inner 1 at the
  # same depth, and the key rules do not say which label wins.
  expected = dict(zip([site.path for site in params], reference(patterns, params)))
  assert expected["layers", 0, "layers", 1, "w"].candidates == {
    ("...", "0", "...", "w"),
    ("...", "1", "...", "w"),
  }
  assert expected["layers", 1, "w"].candidates == {("...", "1", "...", "w")}
  check_labels(groups, patterns, values, params, stats)


def test_batch_any_depth_matches_like_ellipsis():
  model = Block([("layers", leaves(2)), ("attn", Leaf([("w", ()), ("b", ())], []))])
  mgr = opt.OptimizerManager()
  mgr[...] = optax.sgd(1.0)
  mgr[opt.batch[...], "w"] = optax.sgd(0.1)
  groups = mgr.label(model)
  assert label_of(model.layers[1].w) == ".../w"
  assert label_of(model.attn.w) == ".../w"
  assert label_of(model.attn.b) == "..."
  assert groups.labels == ("...", ".../w")


def test_index_error_survives_later_override():
  model = Block([("layers", leaves(5)), ("w", leaves(2))])
  mgr = opt.OptimizerManager()
  mgr[...] = optax.sgd(1.0)
  mgr[["layers", "w"], -3] = optax.sgd(0.1)
  with pytest.raises(IndexError, match=r"index -3 is out of range for the sequence at 'w'"):
    mgr.label(model)

  # A later assignment that wins `w` must not change that.
  mgr["w"] = optax.sgd(0.2)
  with pytest.raises(IndexError, match=r"index -3 is out of range for the sequence at 'w'"):
    mgr.label(model)
