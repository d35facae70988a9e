"""Summaries of a configuration: a table per group, and why a Variable got its group."""

from __future__ import annotations

import dataclasses
import difflib
import types
from typing import Any, Callable

import jax
import optax
from flax import nnx
from flax.nnx import filterlib

from ueaj.opt import _match
from ueaj.opt._graph import ModelGraph, flatten_paths, format_path
from ueaj.opt._groups import Group, Groups, resolve
from ueaj.opt._keys import Path
from ueaj.opt._manager import OptimizerManager, graph_for
from ueaj.opt._optimizer import Optimizer

# Transforms nested deeper than this are described by their name alone.
_MAX_DEPTH = 12
# How many nearest paths a failed lookup lists.
_NEAREST = 5
_COLUMNS = (
  ("label", "group", "<"),
  ("source", "assignment", "<"),
  ("transform", "transform", "<"),
  ("variables", "variables", ">"),
  ("elements", "elements", ">"),
  ("param_bytes", "param bytes", ">"),
  ("state_bytes", "state bytes", ">"),
)


def describe_transform(transform: optax.GradientTransformation | None) -> str:
  """Describe an optax transform by the names of the optax functions that built it.

  The description follows the closures of the transform's `update`
  function: `optax.chain` lists its parts, wrappers such as
  `optax.inject_hyperparams` and `optax.masked` name what they wrap, and every
  other transform is named after the function that made it. A learning rate
  given as a number appears as `scale`, because that is what optax builds.

  Args:
    transform: An optax transform, or None for a frozen group.

  Returns:
    A one-line description, `frozen` for None.

  Examples:
    >>> import optax
    >>> from ueaj.opt import describe_transform
    >>> describe_transform(optax.adamw(1e-3))
    'chain(scale_by_adam, add_decayed_weights, scale)'
    >>> describe_transform(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1))
    'inject_hyperparams(sgd)'
    >>> describe_transform(None)
    'frozen'
  """
  if transform is None:
    return "frozen"
  return _describe_function(transform.update, 0)


def _describe_function(function: Callable, depth: int) -> str:
  name = _short_name(function)
  cells = _closure(function)
  if depth >= _MAX_DEPTH:
    return name

  inner = cells.get("tx")
  if name == "with_extra_args_support" and isinstance(inner, optax.GradientTransformation):
    return _describe_function(inner.update, depth + 1)
  if "inner_factory" in cells:
    return f"{name}({_short_name(cells['inner_factory'])})"

  children = []
  for cell_name, value in cells.items():
    if isinstance(value, optax.GradientTransformation):
      children.append(_describe_function(value.update, depth + 1))
    elif cell_name == "update_fns" and isinstance(value, (tuple, list)):
      children.extend(_describe_function(item, depth + 1) for item in value if callable(item))
    elif isinstance(value, dict):
      children.extend(
        f"{key}={_describe_function(item.update, depth + 1)}"
        for key, item in value.items()
        if isinstance(item, optax.GradientTransformation)
      )
    elif isinstance(value, (tuple, list)):
      for item in value:
        if isinstance(item, optax.GradientTransformation):
          children.append(_describe_function(item.update, depth + 1))
        elif (
          isinstance(item, tuple)
          and len(item) == 2
          and isinstance(item[1], optax.GradientTransformation)
        ):
          # optax.named_chain contains (name, transform) pairs.
          children.append(f"{item[0]}={_describe_function(item[1].update, depth + 1)}")
  return f"{name}({', '.join(children)})" if children else name


def _short_name(function: Any) -> str:
  if isinstance(function, types.MethodType):
    return type(function.__self__).__name__
  qualname = getattr(function, "__qualname__", None) or type(function).__name__
  return qualname.split(".<locals>")[0]


def _closure(function: Any) -> dict[str, Any]:
  code = getattr(function, "__code__", None)
  closure = getattr(function, "__closure__", None) or ()
  if code is None:
    return {}
  cells = {}
  for name, cell in zip(code.co_freevars, closure):
    try:
      cells[name] = cell.cell_contents
    except ValueError:  # An empty cell: the variable is not assigned yet.
      continue
  return cells


class Summary:
  """One row per group: assignment, transform, sizes and optimizer-state bytes.

  `str(summary)` is a text table with a total line. `summary.rows` (or
  `summary.to_dicts()` for copies) contains the same data as dicts with the
  keys `label`, `source`, `transform`, `variables`, `elements`,
  `param_bytes` and `state_bytes`. Sizes are ints, and bytes are exact.
  """

  def __init__(self, rows: list[dict[str, Any]]):
    self.rows = rows

  def to_dicts(self) -> list[dict[str, Any]]:
    """Return copies of the rows, for logging."""
    return [dict(row) for row in self.rows]

  @property
  def total_state_bytes(self) -> int:
    """Bytes of optimizer state over all groups (the step counter not included)."""
    return sum(row["state_bytes"] for row in self.rows)

  def table(self) -> str:
    """Format the rows and their totals as a text table."""
    header = [title for _, title, _ in _COLUMNS]
    body = [[_cell(row, key) for key, _, _ in _COLUMNS] for row in self.rows]
    totals = {
      key: sum(row[key] for row in self.rows)
      for key in ("variables", "elements", "param_bytes", "state_bytes")
    }
    total = [_cell({"label": "total", "source": "", "transform": "", **totals}, key) for key, _, _ in _COLUMNS]
    widths = [
      max(len(line[column]) for line in [header, *body, total])
      for column in range(len(_COLUMNS))
    ]

    def line(cells: list[str]) -> str:
      padded = [
        f"{cell:{align}{width}}"
        for cell, width, (_, _, align) in zip(cells, widths, _COLUMNS)
      ]
      return "  ".join(padded).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(header), rule, *map(line, body), rule, line(total)])

  def __str__(self) -> str:
    return self.table()

  def __repr__(self) -> str:
    return self.table()


def _cell(row: dict[str, Any], key: str) -> str:
  value = row[key]
  if key.endswith("_bytes"):
    return format_bytes(value)
  if isinstance(value, int):
    return f"{value:,}"
  return str(value)


def format_bytes(size: int) -> str:
  """Format a byte count with binary units: `132 B`, `1.5 KiB`, `2.0 MiB`."""
  if size < 1024:
    return f"{size} B"
  value = float(size)
  for unit in ("KiB", "MiB", "GiB", "TiB"):
    value /= 1024
    if value < 1024 or unit == "TiB":
      return f"{value:.1f} {unit}"
  raise AssertionError("unreachable")


def summary(
  target: Any, groups: Groups | OptimizerManager | None = None, *, wrt: filterlib.Filter = nnx.Param
) -> Summary:
  """Summarize each group: assignment, transform, sizes and optimizer-state bytes.

  With an `opt.Optimizer`, the state bytes are those of its real optimizer
  state. With a model, they come from `jax.eval_shape` of each group's
  `transform.init` on the shapes and dtypes of the group's parameters, so no
  state is allocated. Frozen groups hold no state. The optimizer's step
  counter, outside every group, is not counted.

  Args:
    target: An `opt.Optimizer`, or a labelled NNX model.
    groups: For a model: its `Groups` (from `mgr.label` or
      `optimizer.groups`), or an `OptimizerManager`, which labels the model
      as `mgr.label(model, wrt=wrt)` does. Ignored for an optimizer.
    wrt: For a model: the filter of the optimized Variables.

  Returns:
    The `Summary`: `str()` is a table, `.rows` the data.

  Raises:
    TypeError: `target` is a model and `groups` is missing or of another type.
    KeyError: A group's Variable path is not in `nnx.state(model, wrt)`
      (the groups belong to another model or filter).

  Examples:
    >>> import optax
    >>> from flax import nnx
    >>> from ueaj import opt
    >>> model = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    >>> mgr = opt.OptimizerManager()
    >>> mgr[...] = optax.adam(1e-3)
    >>> mgr['bias'] = None
    >>> print(opt.summary(model, mgr))
    group  assignment            transform                    variables  elements  param bytes  state bytes
    -----  --------------------  ---------------------------  ---------  --------  -----------  -----------
    ...    mgr[...] = transform  chain(scale_by_adam, scale)          1        12         48 B        100 B
    bias   mgr['bias'] = frozen  frozen                               1         4         16 B          0 B
    -----  --------------------  ---------------------------  ---------  --------  -----------  -----------
    total                                                             2        16         64 B        100 B
  """
  if isinstance(target, Optimizer):
    groups = target.groups
    state_bytes = {group.label: _state_bytes_of(target, group) for group in groups}
  else:
    groups = _groups_for(target, groups, wrt)
    variables = dict(flatten_paths(nnx.state(target, wrt)))
    state_bytes = {
      group.label: _state_bytes_from_shapes(group, variables, groups.stacks)
      for group in groups
    }

  rows = [
    {
      "label": group.label,
      "source": group.source,
      "transform": describe_transform(group.transform),
      "variables": len(group.paths),
      "elements": group.num_elements,
      "param_bytes": group.param_bytes,
      "state_bytes": state_bytes[group.label],
    }
    for group in groups
  ]
  return Summary(rows)


def _groups_for(model: Any, groups: Any, wrt: filterlib.Filter) -> Groups:
  if isinstance(groups, Groups):
    return groups
  if isinstance(groups, Optimizer):
    return groups.groups
  if isinstance(groups, OptimizerManager):
    return groups.label(model, wrt=wrt)
  raise TypeError(
    f"opt.summary(model, groups) needs the model's groups: an opt.Groups (from"
    f" mgr.label(model) or optimizer.groups) or an opt.OptimizerManager, got"
    f" {type(groups).__name__}. Or pass the opt.Optimizer itself."
  )


def _state_bytes_from_shapes(
  group: Group, variables: dict[Path, Any], stacks: dict[Path, Any]
) -> int:
  if group.frozen:
    return 0
  layers: dict[Path, list[int | None]] = {}
  for path, layer in group.members:
    layers.setdefault(path, []).append(layer)

  params = []
  for path, selected in layers.items():
    if path not in variables:
      raise KeyError(
        f"Group {group.label!r} has a Variable at {format_path(path)!r}, which"
        " nnx.state(model, wrt) does not contain. Pass the groups of this model,"
        " built with the same `wrt` filter."
      )
    value = variables[path].get_value()
    shape = list(value.shape)
    if selected != [None]:
      # The group's layers of a stacked Variable, with the layer axis kept.
      shape[stacks[path].axis] = len(selected)
    params.append(jax.ShapeDtypeStruct(tuple(shape), value.dtype))
  # The transform receives the group's parameters as one tuple, as in the optimizer.
  state = jax.eval_shape(group.transform.init, tuple(params))
  return sum(_nbytes(leaf) for leaf in jax.tree.leaves(state))


def _state_bytes_of(optimizer: Optimizer, group: Group) -> int:
  key, index = optimizer.groups.unit_of(group.label)
  state = optimizer.opt_state.inner_states[key].inner_state
  total = 0
  for leaf in jax.tree.leaves(state):
    nbytes = _nbytes(leaf)
    if index is not None:
      # Vectorized groups stack their states along the leading axis.
      nbytes //= leaf.shape[0]
    total += nbytes
  return total


def _nbytes(leaf: Any) -> int:
  size = 1
  for dim in leaf.shape:
    size *= dim
  return size * leaf.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class Explanation:
  """The assignments that select one Variable, the winner, and the resulting group.

  `str(explanation)` is a readable report.

  Attributes:
    path: The Variable's path, written `a/b/c`.
    variable: The Variable's type, dtype and shape, as `Param float32(8, 8)`,
      and the layer for a Variable of a declared stack.
    matches: One dict per assignment that selects the Variable, in
      assignment order: `assignment` (position in the manager), `source`
      (the assignment as written) and `label` (the label parts it gives).
    winner: Position of the assignment that wins (the last match), or None.
    group: The label of the Variable's group, or None when the
      configuration does not resolve (see `error`).
    transform: The group's transform, as `describe_transform` writes it.
    error: Why the configuration does not resolve on this model, or None.
  """

  path: str
  variable: str
  matches: tuple[dict[str, Any], ...]
  winner: int | None
  group: str | None
  transform: str | None
  error: str | None

  def __str__(self) -> str:
    lines = [f"{self.path}: {self.variable}"]
    if not self.matches:
      lines.append(
        "  no assignment selects it; add a default mgr[...] = ... before the"
        " other assignments, or freeze it with mgr[key] = None"
      )
    else:
      lines.append(f"  selected by {len(self.matches)} assignment(s); the last one wins:")
      width = max(len(match["source"]) for match in self.matches)
      for match in self.matches:
        mark = "  <- wins" if match["assignment"] == self.winner else ""
        lines.append(
          f"    #{match['assignment']}  {match['source']:<{width}}"
          f"  label {match['label']!r}{mark}"
        )
    if self.group is not None:
      lines.append(f"  group {self.group!r}: {self.transform}")
    if self.error is not None:
      lines.append(f"  the configuration does not resolve on this model: {self.error}")
    return "\n".join(lines)


def explain(
  manager: OptimizerManager, model: Any, path: str | Path, *, wrt: filterlib.Filter = nnx.Param
) -> Explanation:
  """Explain which assignments select a Variable, which one wins, and its group.

  Nothing is written to the model: the assignments are resolved again
  without storing labels, and function rules are called as in a build.

  Args:
    manager: The configuration.
    model: The NNX model.
    path: The Variable's path, as a tuple of keys (`('layers', 0, 'attn',
      'kernel')`) or a string `'layers/0/attn/kernel'`. For a Variable of a
      declared stack, the layer follows the stack's path, as in keys:
      `'layers/3/attn/kernel'` is layer 3 of `layers/attn/kernel`.
    wrt: Filter of the optimized Variables, as for the optimizer.

  Returns:
    The `Explanation`; `print` it for a report.

  Raises:
    LookupError: No Variable selected by `wrt` has this path (the message
      lists the nearest existing paths), or the path names a stacked
      Variable without a layer.

  Examples:
    >>> import optax
    >>> from flax import nnx
    >>> from ueaj import opt
    >>> model = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    >>> mgr = opt.OptimizerManager()
    >>> mgr[...] = optax.adamw(1e-3)
    >>> mgr['bias'] = optax.adam(1e-3)
    >>> print(opt.explain(mgr, model, 'bias'))
    bias: Param float32(4,)
      selected by 2 assignment(s); the last one wins:
        #0  mgr[...] = transform     label '...'
        #1  mgr['bias'] = transform  label 'bias'  <- wins
      group 'bias': chain(scale_by_adam, scale)
  """
  graph = graph_for(manager, model, wrt)
  found, layer = _find_variable(graph, path)
  assignments = list(manager.assignments)
  winners, _ = _match.match_all(graph, [assignment.pattern for assignment in assignments])

  matches = []
  for number, assignment in enumerate(assignments):
    selected, _ = _match.match_all(graph, [assignment.pattern])
    match = _layer_of(selected.get(found), layer)
    if match is not None:
      label = "/".join(match.parts)
      matches.append({"assignment": number, "source": repr(assignment), "label": label})
  winning = _layer_of(winners.get(found), layer)
  winner = None if winning is None else winning.assignment

  group = transform = error = None
  try:
    groups = resolve(graph, assignments)
  except (ValueError, IndexError) as failure:
    error = f"{type(failure).__name__}: {failure}"
  else:
    label = groups.label_of(found)
    group = label if layer is None else label[layer]
    transform = describe_transform(groups[group].transform)

  variable = dict(graph.variables)[found]
  value = graph.values[found]
  description = f"{type(variable).__name__} {value.dtype}{tuple(value.shape)}"
  where = format_path(found)
  if layer is not None:
    description += f", layer {layer} of its stack"
  return Explanation(where, description, tuple(matches), winner, group, transform, error)


def _layer_of(result: Any, layer: int | None) -> _match.Match | None:
  if isinstance(result, tuple):
    return result[layer]
  return result


def _find_variable(graph: ModelGraph, path: str | Path) -> tuple[Path, int | None]:
  """Return the Variable path and, inside a declared stack, the layer that `path` names."""
  keys = path.split("/") if isinstance(path, str) else list(path)
  text = "/".join(str(key) for key in keys)
  by_text = {format_path(found): found for found, _ in graph.variables}

  # Inside a stack, the layer index follows the stack's path, as in keys.
  for node in graph.nodes():
    depth = len(node.path)
    if node.stack is None or len(keys) <= depth:
      continue
    if [str(key) for key in keys[:depth]] != [str(key) for key in node.path]:
      continue
    try:
      layer = int(keys[depth])
    except ValueError:
      continue
    rest = "/".join(str(key) for key in (*node.path, *keys[depth + 1 :]))
    if rest in by_text and -node.stack.length <= layer < node.stack.length:
      return by_text[rest], layer % node.stack.length
  if text in by_text:
    found = by_text[text]
    stack = graph.stack_above(found)
    if stack is None:
      return found, None
    raise LookupError(
      f"{text!r} is a stacked Variable with {stack.length} layers; name one"
      f" layer after the stack's path, as in mgr[...] keys."
    )

  below = [name for name in by_text if name.startswith(text.rstrip("/") + "/")]
  nearest = below[:_NEAREST] or difflib.get_close_matches(text, list(by_text), _NEAREST, 0.0)
  listed = "\n".join(f"  {name}" for name in nearest) or "  (the model has none)"
  reason = "is not a Variable but contains these" if below else "does not exist; nearest paths"
  raise LookupError(
    f"No Variable selected by `wrt` is at {text!r}: the path {reason}:\n{listed}"
  )
