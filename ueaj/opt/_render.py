"""Treescope rendering of a model that shows each Variable's optimizer group."""

from __future__ import annotations

import collections
import collections.abc
import dataclasses
import html
import re
import warnings
from typing import Any

import treescope
from flax import nnx
from treescope import formatting_util
from treescope import rendering_parts as parts

from ueaj.opt._graph import format_path
from ueaj.opt._groups import Groups
from ueaj.opt._keys import Path
from ueaj.opt._transform import LABEL_KEY

# Badge CSS. The custom property marks badges so that pages and tests can find
# them inside treescope's shadow DOM.
_BADGE_CSS = (
  "--ueaj-opt-badge: 1; border-radius: 0.6em; padding: 0 0.45em;"
  " margin-right: 0.4ch; font-weight: 600; color: #1f1f1f;"
)
_FROZEN_PATTERN = (
  "repeating-linear-gradient(135deg, transparent 0 5px, rgb(0 0 0 / 0.13) 5px 8px)"
)
_FROZEN_COLOR = "oklch(0.9 0 0)"
_UNLABELLED_CSS = "border: 1px dashed #8a8a8a; background: white; color: #5f5f5f;"
# Hidden in HTML, so that only the text form shows badges as `[label]`.
_TEXT_ONLY_CSS = "display: none;"
# HTML renderings expand nodes until about this many lines; the rest stay
# folded (one line each) until clicked.
_HTML_MAX_HEIGHT = 60
# Module annotations list at most this many groups, then "+N more".
_LISTED_GROUPS = 3
_NUMBER = re.compile(r"\d+")


class RenderWarning(UserWarning):
  """A Variable could not be annotated and is shown as treescope renders it."""


@dataclasses.dataclass
class _Leaf:
  """One Variable: its labels (None when unlabelled) and per-label size."""

  path: Path
  labels: tuple[str, ...] | None
  elements_per_label: int
  problem: str | None = None


@dataclasses.dataclass
class _Container:
  """A Module or container, its children and the labels of the Variables below."""

  path: Path
  children: list[tuple[Any, Any]]
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)


@dataclasses.dataclass
class _GroupStats:
  variables: int = 0
  elements: int = 0


class _View:
  """The model walked once: every node, its labels and the group statistics."""

  def __init__(self, model: Any, groups: Groups | None):
    self.model = model
    self.groups = groups
    self.nodes: dict[int, _Leaf | _Container] = {}
    self.problems: list[str] = []
    self.stats: dict[str | None, _GroupStats] = {}
    if groups is not None:
      for group in groups:
        self.stats[group.label] = _GroupStats()
    self.stacks = groups.stacks if groups is not None else {}
    self._walk(model, ())
    self.frozen = {group.label for group in groups or () if group.frozen}
    labels = [label for label in self.stats if label is not None]
    self.colors = {label: _hue(position) for position, label in enumerate(labels)}

  def _walk(self, obj: Any, path: Path) -> None:
    if id(obj) in self.nodes:
      return  # A shared node; the rendering refers to its first path.
    if isinstance(obj, nnx.Variable):
      stack = self.stacks.get(path)
      leaf = _read_leaf(obj, path, None if stack is None else stack.axis)
      self.nodes[id(obj)] = leaf
      if leaf.problem is not None:
        self.problems.append(f"{format_path(path)}: {leaf.problem}")
        return
      for label in leaf.labels or (None,):
        self.stats.setdefault(label, _GroupStats())
      for label in _unique(leaf.labels or (None,)):
        self.stats[label].variables += 1
      for label in leaf.labels or ():
        self.stats[label].elements += leaf.elements_per_label
      if leaf.labels is None:
        self.stats[None].elements += _size(obj)
      return

    node = _Container(path, list(nnx.iter_children(obj)))
    self.nodes[id(obj)] = node
    for key, child in node.children:
      self._walk(child, (*path, key))
      child_node = self.nodes[id(child)]
      if child_node.path != (*path, key):
        continue
      if isinstance(child_node, _Container):
        node.counts.update(child_node.counts)
      elif child_node.problem is None:
        node.counts.update(_unique(child_node.labels or (None,)))


def _read_leaf(variable: nnx.Variable, path: Path, axis: int | None) -> _Leaf:
  """Read a Variable's labels; `axis` is its stack's layer axis when known."""
  raw = variable.get_metadata(LABEL_KEY, None)
  size = _size(variable)
  if raw is None:
    return _Leaf(path, None, size)
  if isinstance(raw, str):
    return _Leaf(path, (raw,), size)
  if isinstance(raw, (tuple, list)) and raw and all(isinstance(x, str) for x in raw):
    # A stacked Variable: one label per entry of its layer axis. Without the
    # groups the axis is unknown, and any axis of the right length will do.
    shape = tuple(getattr(variable.get_value(), "shape", ()))
    axes = range(len(shape)) if axis is None else [axis]
    if not any(-len(shape) <= a < len(shape) and shape[a] == len(raw) for a in axes):
      where = "any axis" if axis is None else f"its layer axis {axis}"
      problem = (
        f"{len(raw)} per-layer {LABEL_KEY!r} labels, but the value has shape"
        f" {shape}; a stacked Variable needs one label per entry of {where}"
      )
      return _Leaf(path, None, 0, problem)
    return _Leaf(path, tuple(raw), size // len(raw))
  problem = (
    f"{LABEL_KEY!r} metadata is {type(raw).__name__} {raw!r:.60}; expected a label"
    " string or a tuple of per-layer label strings"
  )
  return _Leaf(path, None, 0, problem)


def _size(variable: nnx.Variable) -> int:
  size = 1
  for dim in getattr(variable.get_value(), "shape", ()):
    size *= dim
  return size


def _unique(labels: tuple) -> list:
  return list(dict.fromkeys(labels))


def _hue(position: int) -> float:
  # Successive golden-angle steps keep neighbouring groups' hues far apart.
  return round((position * 137.508 + 25.0) % 360, 1)


def compact_labels(labels: tuple[str, ...] | list[str]) -> str:
  """Write per-layer labels in run-length form.

  Equal neighbours become `label ×n`; three or more labels that differ only in
  one number counting up by one become `first … last`.

  Examples:
    >>> from ueaj.opt._render import compact_labels
    >>> compact_labels([f'layers/{i}/attn' for i in range(48)])
    'layers/0/attn … layers/47/attn'
    >>> compact_labels(['a', 'a', 'b', 'l/1', 'l/2'])
    'a ×2, b, l/1, l/2'
  """
  runs: list[list] = []  # [first, last, length, kind, number position]
  for label in labels:
    if runs:
      run = runs[-1]
      if label == run[1] and run[3] in (None, "same"):
        run[1:4] = [label, run[2] + 1, "same"]
        continue
      position = _next_number_position(run[1], label)
      if position is not None and run[3] in (None, "step") and run[4] in (None, position):
        run[1:5] = [label, run[2] + 1, "step", position]
        continue
    runs.append([label, label, 1, None, None])

  pieces = []
  for first, last, length, kind, _ in runs:
    if length == 1:
      pieces.append(first)
    elif kind == "same":
      pieces.append(f"{first} ×{length}")
    elif length == 2:
      pieces.append(f"{first}, {last}")
    else:
      pieces.append(f"{first} … {last}")
  return ", ".join(pieces)


def _next_number_position(previous: str, label: str) -> int | None:
  """Return where `label` counts one up from `previous`, if that is all that differs."""
  if _NUMBER.split(previous) != _NUMBER.split(label):
    return None
  before = [int(n) for n in _NUMBER.findall(previous)]
  after = [int(n) for n in _NUMBER.findall(label)]
  changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
  if len(changed) == 1 and after[changed[0]] == before[changed[0]] + 1:
    return changed[0]
  return None


class _Annotator:
  """Treescope handler for the nodes of one `_View`; NotImplemented for others."""

  def __init__(self, view: _View, root: Any):
    self.view = view
    self.root = root

  def __call__(self, node: Any, path: str | None, subtree_renderer: Any):
    if node is self.root:
      return self._render_root(path, subtree_renderer)
    info = self.view.nodes.get(id(node))
    if info is None:
      return NotImplemented
    try:
      if isinstance(info, _Container):
        return self._render_container(node, info, path, subtree_renderer)
      if info.problem is not None:
        return NotImplemented
      return self._render_variable(node, info, path)
    except Exception as error:  # noqa: BLE001 - never break display; warn instead.
      self.view.problems.append(
        f"{format_path(info.path)}: {type(error).__name__}: {error}"
      )
      return NotImplemented

  # Badges and colours.

  def badge_text(self, labels: tuple[str, ...] | None) -> str:
    if labels is None:
      return "unlabelled"
    frozen = sum(label in self.view.frozen for label in labels)
    text = compact_labels(labels)
    if frozen == len(labels):
      return f"{text}: frozen"
    if frozen:
      return f"{text}: {frozen}/{len(labels)} frozen"
    return text

  def badge(self, labels: tuple[str, ...] | None, width: int = 0) -> parts.RenderableTreePart:
    text = self.badge_text(labels)
    if labels is None:
      css = _BADGE_CSS + _UNLABELLED_CSS
    else:
      css = _BADGE_CSS + f"background: {self._badge_background(labels)};"
    return parts.siblings(
      _text_only("["),
      parts.custom_style(parts.text(text), css),
      _text_only("]"),
      " " * max(1, width - len(text) + 1),
    )

  def _badge_background(self, labels: tuple[str, ...]) -> str:
    colors = [self._color(label, badge=True) for label in _unique(labels)]
    frozen = [label in self.view.frozen for label in _unique(labels)]
    if len(colors) == 1:
      return f"{_FROZEN_PATTERN}, {colors[0]}" if frozen[0] else colors[0]
    return f"linear-gradient(90deg, {', '.join(colors[:12])})"

  def _color(self, label: str, badge: bool = False) -> str:
    if label in self.view.frozen:
      return _FROZEN_COLOR
    hue = self.view.colors.get(label, 0.0)
    if badge:
      return formatting_util.oklch_color(0.82, 0.11, hue)
    return formatting_util.oklch_color(0.93, 0.05, hue)

  def _block_style(self, labels: set) -> tuple[str | None, str | None]:
    """Return the background of a node whose Variables all have one group."""
    if len(labels) != 1 or None in labels:
      return None, None
    (label,) = labels
    pattern = _FROZEN_PATTERN if label in self.view.frozen else None
    return self._color(label), pattern

  # Nodes.

  def _render_variable(self, variable: nnx.Variable, leaf: _Leaf, path: str | None):
    value = variable.get_value()
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is not None and dtype is not None:
      description = f"{dtype}{tuple(shape)}"
    else:
      description = type(value).__name__
    line = parts.siblings(
      self.badge(leaf.labels),
      parts.maybe_qualified_type_name(type(variable)),
      f"({description})",
    )
    color, _ = self._block_style(set(leaf.labels or (None,)))
    # NOTE: treescope 0.1.10 raises KeyError('expand_right') when it lowers a
    # one-line node with a background pattern to HTML, so frozen Variables
    # get the plain grey and only their badge is hatched.
    return parts.build_one_line_tree_node(line, path, color)

  def _render_container(self, obj: Any, info: _Container, path: str | None, renderer: Any):
    keyed = isinstance(obj, (collections.abc.Mapping, collections.abc.Sequence))
    children = []
    for key, child in info.children:
      child_info = self.view.nodes[id(child)]
      if child_info.path != (*info.path, key):
        rendered = parts.comment_color(
          parts.text(f"<same object as {format_path(child_info.path)}>")
        )
      else:
        child_path = None
        if path is not None:
          child_path = f"{path}[{key!r}]" if keyed else f"{path}.{key}"
        rendered = renderer(child, path=child_path)
      children.append(parts.siblings_with_annotations(f"{key}=", rendered))

    color, pattern = self._block_style(set(info.counts))
    return parts.build_foldable_tree_node_from_children(
      prefix=parts.siblings(parts.maybe_qualified_type_name(type(obj)), "("),
      children=children,
      suffix=")",
      comma_separated=True,
      path=path,
      background_color=color,
      background_pattern=pattern,
      first_line_annotation=self._counts_annotation(info.counts),
    )

  def _counts_annotation(self, counts: collections.Counter) -> parts.RenderableTreePart | None:
    if not counts:
      return None
    order = {label: position for position, label in enumerate(self.view.stats)}
    listed = sorted(counts, key=lambda label: order.get(label, len(order)))
    pieces: list[Any] = [parts.comment_color(parts.text("  # "))]
    for position, label in enumerate(listed[:_LISTED_GROUPS]):
      if position:
        pieces.append(parts.comment_color(parts.text(", ")))
      labels = None if label is None else (label,)
      pieces.append(self.badge(labels, width=0))
      pieces.append(parts.comment_color(parts.text(f"×{counts[label]}")))
    if len(listed) > _LISTED_GROUPS:
      more = len(listed) - _LISTED_GROUPS
      noun = "group" if more == 1 else "groups"
      pieces.append(parts.comment_color(parts.text(f", +{more} more {noun}")))
    return parts.siblings(*pieces)

  def _render_root(self, path: str | None, renderer: Any):
    model = renderer(self.view.model, path=path)
    return parts.on_separate_lines(
      [*self._legend(), parts.vertical_space("0.75em"), model]
    )

  def _legend(self) -> list[parts.RenderableTreePart]:
    stats = self.view.stats
    labelled = [label for label in stats if label is not None]
    variables = sum(1 for node in self.view.nodes.values() if isinstance(node, _Leaf))
    elements = sum(entry.elements for entry in stats.values())
    skipped = sum(
      1 for node in self.view.nodes.values() if isinstance(node, _Leaf) and node.problem
    )
    skipped_note = f" ({skipped} not annotated)" if skipped else ""
    title = (
      f"Optimizer groups: {len(labelled)} ({len(self.view.frozen)} frozen),"
      f" {variables:,} Variables{skipped_note}, {elements:,} elements"
    )
    lines: list[parts.RenderableTreePart] = [
      parts.custom_style(parts.text(title), "font-weight: 600;")
    ]
    rows = [(label, (None if label is None else (label,))) for label in stats]
    width = max(len(self.badge_text(labels)) for _, labels in rows) if rows else 0
    count_width = max((len(f"{entry.variables:,}") for entry in stats.values()), default=1)
    element_width = max((len(f"{entry.elements:,}") for entry in stats.values()), default=1)
    for label, labels in rows:
      entry = stats[label]
      noun = "Variable " if entry.variables == 1 else "Variables"
      counts = (
        f"{entry.variables:>{count_width},} {noun}  {entry.elements:>{element_width},} elements"
      )
      lines.append(
        parts.siblings("  ", self.badge(labels, width), counts, self._source(label))
      )
    return lines

  def _source(self, label: str | None) -> parts.RenderableTreePart:
    if label is None:
      note = "no 'opt_group' metadata: not updated by an opt.Optimizer"
    elif self.view.groups is None:
      return parts.empty_part()
    elif label in self.view.groups.labels:
      note = self.view.groups[label].source
    else:
      note = "not a group of the given groups"
    return parts.comment_color(parts.text(f"  {note}"))


def _text_only(text: str) -> parts.RenderableTreePart:
  return parts.custom_style(parts.text(text), _TEXT_ONLY_CSS)


class _Root:
  """The object treescope renders: the legend above the model."""

  __slots__ = ()


class Rendering:
  """A model rendered with its optimizer groups.

  Notebooks display it as an interactive treescope tree (it has
  `_repr_html_`); `str()` and `repr()` give the text form. The model's
  structure and labels are read when the object is made; later changes to
  them do not show.
  """

  # A `stacklevel` argument below is the one warnings.warn would need in that
  # method to point at the user's code.

  def __init__(self, model: Any, groups: Any = None, *, _stacklevel: int = 2):
    self._view = _View(model, _as_groups(groups))
    self._warned: set[str] = set()
    self._warn(_stacklevel + 1)

  @property
  def labels(self) -> tuple[str, ...]:
    """Labels in legend order: the groups' order, then labels found only in the model."""
    return tuple(label for label in self._view.stats if label is not None)

  def to_text(self) -> str:
    """Render the plain-text form: every node expanded, badges written `[label]`."""
    return self._text(stacklevel=3)

  def to_html(self, title: str | None = None) -> str:
    """Render a standalone HTML document (UTF-8) with the interactive tree."""
    return self._document(title, stacklevel=3)

  def _repr_html_(self) -> str:
    return self._html(stacklevel=3)

  def _html(self, stacklevel: int) -> str:
    with treescope.using_expansion_strategy(max_height=_HTML_MAX_HEIGHT, target_width=90):
      return self._render(
        lambda root: treescope.render_to_html(root, ignore_exceptions=True),
        stacklevel + 1,
      )

  def _text(self, stacklevel: int) -> str:
    with treescope.using_expansion_strategy(max_height=None, target_width=0):
      return self._render(
        lambda root: treescope.render_to_text(root, ignore_exceptions=True),
        stacklevel + 1,
      )

  def _document(self, title: str | None, stacklevel: int) -> str:
    fragment = self._html(stacklevel + 1)
    if title is None:
      title = f"Optimizer groups of {type(self._view.model).__name__}"
    title = html.escape(title)
    return (
      "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
      "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
      f"<title>{title}</title>\n</head>\n"
      "<body style=\"margin: 1.5em; font-family: sans-serif;\">\n"
      f"<h1 style=\"font-size: 1.25em;\">{title}</h1>\n{fragment}\n</body>\n</html>\n"
    )

  def _render(self, render: Any, stacklevel: int) -> str:
    root = _Root()
    annotator = _Annotator(self._view, root)
    renderer = treescope.active_renderer.get().extended_with(handlers=[annotator])
    with treescope.active_renderer.set_scoped(renderer):
      result = render(root)
    self._warn(stacklevel + 1)
    return result

  def _warn(self, stacklevel: int) -> None:
    for problem in self._view.problems:
      if problem in self._warned:
        continue
      self._warned.add(problem)
      warnings.warn(
        f"opt.render could not annotate the Variable at {problem}; it is shown"
        " as treescope renders it.",
        category=RenderWarning,
        stacklevel=stacklevel,
      )

  def __str__(self) -> str:
    return self._text(stacklevel=3)

  def __repr__(self) -> str:
    return self._text(stacklevel=3)


def _as_groups(groups: Any) -> Groups | None:
  if groups is None or isinstance(groups, Groups):
    return groups
  inner = getattr(groups, "groups", None)
  if isinstance(inner, Groups):
    return inner  # An opt.Optimizer.
  raise TypeError(
    f"groups must be an opt.Groups (from mgr.label or optimizer.groups), an"
    f" opt.Optimizer or None, got {type(groups).__name__}."
  )


def render(model: Any, groups: Groups | Any | None = None) -> Rendering:
  """Render `model` with every Variable's optimizer group, for notebooks.

  Each Variable with `"opt_group"` metadata gets a badge with its label and
  the colour of its group. A Module whose Variables all belong to one group
  takes that colour, and its first line counts its Variables per group. A
  legend above the tree lists every group with its numbers of Variables and
  elements. Frozen groups are grey and hatched, and Variables without a label
  get a dashed `unlabelled` badge. The tree shows Modules, containers and
  Variables (as dtype and shape). It leaves out static fields.

  A stacked Variable whose metadata is a tuple of per-layer labels shows
  them in run-length form, for example `layers/0/attn … layers/47/attn`.

  Only the rendered nodes of this model change how they look: the renderer
  is extended for the duration of one rendering, and every other object
  keeps treescope's default rendering.

  Args:
    model: The labelled NNX model (see `OptimizerManager.label`).
    groups: The `Groups` from `mgr.label(model)` or `optimizer.groups`, or
      an `opt.Optimizer`. They add which groups are frozen, the assignment
      of each group, and groups that own no Variable of this model. Without
      them, the groups are the labels found in the metadata, none marked
      frozen.

  Returns:
    A `Rendering`: notebooks display it, `str()` is the text form.

  Raises:
    TypeError: `groups` is of another type.

  Warns:
    RenderWarning: A Variable's `"opt_group"` metadata is neither a label
      nor a tuple of labels matching its leading axis. That Variable keeps
      treescope's default rendering.

  Examples:
    >>> import optax
    >>> from flax import nnx
    >>> from ueaj import opt
    >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    >>> mgr = opt.OptimizerManager()
    >>> mgr[...] = optax.adam(1e-3)
    >>> mgr['bias'] = None
    >>> print(opt.render(model, mgr.label(model)))
    Optimizer groups: 2 (1 frozen), 2 Variables, 9 elements
      [...]           1 Variable   6 elements  mgr[...] = transform
      [bias: frozen]  1 Variable   3 elements  mgr['bias'] = frozen
    Linear(  # [...] ×1, [bias: frozen] ×1
      bias=[bias: frozen] Param(float32(3,)),
      kernel=[...] Param(float32(2, 3)),
    )
  """
  return Rendering(model, groups, _stacklevel=3)


def render_html(model: Any, groups: Groups | Any | None = None, *, title: str | None = None) -> str:
  """Render `model` with its optimizer groups as a standalone HTML document.

  The document declares UTF-8 and contains the interactive tree of `render`.
  Browsers need JavaScript to show it.

  Args:
    model: The labelled NNX model.
    groups: As for `render`.
    title: The page title; defaults to `Optimizer groups of <model class>`.

  Returns:
    The HTML document.

  Raises:
    TypeError: `groups` is of another type.

  Examples:
    >>> import optax
    >>> from flax import nnx
    >>> from ueaj import opt
    >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    >>> mgr = opt.OptimizerManager()
    >>> mgr[...] = optax.adam(1e-3)
    >>> page = opt.render_html(model, mgr.label(model))
    >>> page.startswith('<!DOCTYPE html>'), '<meta charset="utf-8">' in page
    (True, True)
  """
  return Rendering(model, groups, _stacklevel=3)._document(title, stacklevel=3)


def render_text(model: Any, groups: Groups | Any | None = None) -> str:
  """Render `model` with its optimizer groups as plain text, for terminals and logs.

  Every node is expanded, so each Variable has a line of its own, and badges
  are written `[label]`. See `render` for what is shown.

  Args:
    model: The labelled NNX model.
    groups: As for `render`.

  Returns:
    The text, one node per line.

  Raises:
    TypeError: `groups` is of another type.

  Examples:
    >>> import optax
    >>> from flax import nnx
    >>> from ueaj import opt
    >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    >>> mgr = opt.OptimizerManager()
    >>> mgr[...] = optax.adam(1e-3)
    >>> _ = mgr.label(model)
    >>> print(opt.render_text(model))
    Optimizer groups: 1 (0 frozen), 2 Variables, 9 elements
      [...] 2 Variables  9 elements
    Linear(  # [...] ×2
      bias=[...] Param(float32(3,)),
      kernel=[...] Param(float32(2, 3)),
    )
  """
  return Rendering(model, groups, _stacklevel=3)._text(stacklevel=3)
