"""The manager: collects `mgr[key] = value` assignments and builds transforms."""

from __future__ import annotations

import inspect
from typing import Any

import optax
from flax import nnx
from flax.nnx import filterlib

from ueaj.opt import _keys, _transform
from ueaj.opt._graph import ModelGraph
from ueaj.opt._groups import Assignment, Groups, check_patterns, resolve
from ueaj.opt._match import match_all

_VALUE_HELP = (
  "Assign an optax GradientTransformation (optax.adamw(1e-3)), a function"
  " rule fn(modules, param) that returns one, or None to freeze."
)


class OptimizerManager:
  """Assigns optax transforms to parts of an NNX model with NumPy-style keys.

  A key is matched against the path of each Variable in the NNX graph and
  selects every Variable whose path starts with something the key matches:

  - `'name'` matches that attribute or dict key; `...` matches zero or more
    keys anywhere (`mgr[..., 'bias']` selects every bias).
  - An int selects one sequence index, and negative ints count from the
    end. A slice selects indices as NumPy does. A list `[0, 2]` or
    `['q', 'k']` selects any of its entries.
  - An `nnx.Module` (or `nnx.Variable`) subclass matches a key whose node is
    an instance of it: `mgr[..., nnx.LayerNorm]`.
  - `mgr.batch[s]` (the same as `opt.batch[s]`) matches what `s` matches.

  One group is one optimizer state. A slice or a list gives every matched
  key its own group; `batch[...]` keeps all matched keys in one group; names,
  ints, types and `...` do not split groups. Later assignments override
  earlier ones Variable by Variable, and `None` freezes (zero updates, no
  state).

  A value may also be a function rule `fn(modules, param)`, called once for
  every Variable the assignment wins, with the tuple of graph nodes from the
  root model to the Variable's owner and a `ParamInfo`. It returns a
  transform or None. Variables of one group whose rule results have the same
  configuration (equal code and hyperparameters, see `ueaj.opt._config`)
  share one state; different configurations become separate groups labelled
  `<label>#1`, `<label>#2`, ...

  Labels join the matched keys with `/`: `mgr['layers', :, 'attn']` labels
  the attention of layer 0 `layers/0/attn`, and `mgr[...]` labels its
  Variables `...`.

  Examples:
    >>> import optax
    >>> from flax import nnx
    >>> from ueaj import opt
    >>> class Model(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.layers = nnx.List([nnx.Linear(2, 2, rngs=rngs) for _ in range(3)])
    ...     self.head = nnx.Linear(2, 1, rngs=rngs)
    >>> model = Model(nnx.Rngs(0))
    >>> mgr = opt.OptimizerManager()
    >>> mgr[...] = optax.adam(1e-3)
    >>> mgr['layers', :] = optax.sgd(1e-2)
    >>> mgr['layers', mgr.batch[1:], 'bias'] = None
    >>> tx = mgr.build(model)
    >>> model.layers[0].kernel.get_metadata()['opt_group']
    'layers/0'
    >>> model.layers[2].bias.get_metadata()['opt_group']
    'layers/1:/bias'
    >>> model.head.kernel.get_metadata()['opt_group']
    '...'
  """

  def __init__(self, *, require_match: bool = True):
    """Create an empty manager.

    Args:
      require_match: Default for `assign(..., required=...)`: whether a
        pattern that selects no Variable raises at build. Set it to False
        for a configuration shared by models that lack some parts.
    """
    self._assignments: list[Assignment] = []
    self._stacks: list[tuple[tuple[_keys.Element, ...], int, bool]] = []
    self._require_match = require_match

  @property
  def batch(self) -> _keys.BatchIndexer:
    """Builds elements that keep all matched keys in one group: `mgr.batch[0:4]`."""
    return _keys.batch

  @property
  def assignments(self) -> tuple[Assignment, ...]:
    """The assignments in order; later ones override earlier ones."""
    return tuple(self._assignments)

  def __setitem__(self, key: Any, value: Any) -> None:
    self.assign(key, value)

  def assign(self, key: Any, value: Any, *, required: bool | None = None) -> None:
    """Assign `value` to the Variables that `key` selects.

    Args:
      key: A key as written inside `mgr[...]`: one element or a tuple.
      value: An optax transform, a function rule, or None to freeze.
      required: Whether building raises when `key` selects no Variable or
        indexes past the end of a sequence. Defaults to the manager's
        `require_match`.

    Raises:
      TypeError: The key has an element of an unsupported type, or `value`
        is not a transform, a rule or None. The manager is left unchanged.
    """
    pattern = _keys.parse_key(key)
    _check_value(value, pattern)
    if required is None:
      required = self._require_match
    self._assignments.append(Assignment(pattern, value, required))

  def declare_stack(self, key: Any, *, axis: int = 0, required: bool | None = None) -> None:
    """Declare that the modules `key` selects hold layers stacked along `axis`.

    `nnx.vmap` and `nnx.scan` build a stack of layers as one module whose
    Variables all carry a layer axis. After this declaration an int, a
    slice, a list or `batch[...]` placed right after such a module selects
    layers along that axis, exactly as they select entries of an
    `nnx.List`: `mgr['layers', :, 'attn']` gives every layer its own state
    for both.

    Args:
      key: A key selecting the stacked module(s), as in `mgr[key]`.
      axis: The layer axis of the module's Variables (`out_axes` of the
        `nnx.vmap` that created them).
      required: Whether building raises when `key` selects nothing; defaults
        to the manager's `require_match`.

    Raises:
      TypeError: The key has an element of an unsupported type.
      ValueError: `axis` is not an int.
    """
    pattern = _keys.parse_key(key)
    if not isinstance(axis, int) or isinstance(axis, bool):
      raise ValueError(f"declare_stack axis must be an int, got {axis!r}.")
    if required is None:
      required = self._require_match
    self._stacks.append((pattern, axis, required))

  def label(self, model: Any, *, wrt: filterlib.Filter = nnx.Param) -> Groups:
    """Resolve every assignment on `model` and store each Variable's label.

    The label of each Variable selected by `wrt` is written to its metadata
    under `"opt_group"`. Nothing is written when resolution fails.

    Args:
      model: The NNX model.
      wrt: Filter of the Variables to optimize, as for `nnx.Optimizer`.

    Returns:
      The groups with their labels, transforms and sizes.

    Raises:
      UnmatchedPatternError: A required pattern selects no Variable.
      IndexError: An index is out of range for its sequence.
      UnassignedVariablesError: Variables are left without a group.
      RuleError: A function rule failed for a Variable.
    """
    return self._label(model, wrt)[1]

  def _label(self, model: Any, wrt: filterlib.Filter) -> tuple[ModelGraph, Groups]:
    """Label `model` as `label` does and also return the graph snapshot."""
    graph = graph_for(self, model, wrt)
    groups = resolve(graph, self._assignments)

    previous = []
    try:
      for path, variable in graph.variables:
        previous.append((variable, variable.get_metadata(_transform.LABEL_KEY, None)))
        variable.set_metadata(_transform.LABEL_KEY, groups.label_of(path))
    except Exception:
      # Leave no Variable half-labelled.
      for variable, label in previous:
        if label is None:
          if variable.has_metadata(_transform.LABEL_KEY):
            variable.del_metadata(_transform.LABEL_KEY)
        else:
          variable.set_metadata(_transform.LABEL_KEY, label)
      raise
    return graph, groups

  def _declare_stacks(self, graph: ModelGraph) -> None:
    if not self._stacks:
      return
    patterns = [pattern for pattern, _, _ in self._stacks]
    _, reports = match_all(graph, patterns)
    check_patterns(patterns, [required for _, _, required in self._stacks], reports)
    for (_, axis, _), report in zip(self._stacks, reports):
      for node in report.completed:
        graph.declare_stack(node, axis)

  def build(
    self, model: Any, *, wrt: filterlib.Filter = nnx.Param
  ) -> optax.GradientTransformationExtraArgs:
    """Label `model` and return the transform over `nnx.state(model, wrt)`.

    Building twice with the same assignments gives the same labels and the
    same optimizer-state structure.

    Args:
      model: The NNX model.
      wrt: Filter of the Variables to optimize.

    Returns:
      An optax transform built on `optax.partition`, whose `init` takes
      `nnx.state(model, wrt)` and whose `update` takes gradients of the same
      structure (from `nnx.grad`).

    Raises:
      The errors of `label`.
    """
    graph, groups = self._label(model, wrt)
    return transform_for(graph, groups)

  def __repr__(self) -> str:
    lines = [
      f"  declare_stack({_keys.format_pattern(pattern)[4:-1]}, axis={axis})"
      for pattern, axis, _ in self._stacks
    ]
    lines += [f"  {assignment!r}" for assignment in self._assignments]
    return "OptimizerManager(\n" + "\n".join(lines) + "\n)" if lines else "OptimizerManager()"


def graph_for(manager: OptimizerManager, model: Any, wrt: filterlib.Filter) -> ModelGraph:
  """Snapshot `model` with the manager's stacks declared, as `label` uses it."""
  graph = ModelGraph(model, wrt)
  manager._declare_stacks(graph)
  return graph


def transform_for(graph: ModelGraph, groups: Groups) -> optax.GradientTransformationExtraArgs:
  """Build the transform of a labelled model from its Variables' metadata.

  The Variables come from the snapshot that labelling walked, so the model
  is traversed once. Sorted by path, they are in the order of the leaves of
  `nnx.state(model, wrt)`, because a State flattens each level in sorted
  key order.
  """
  try:
    variables = sorted(graph.variables, key=lambda item: item[0])
  except TypeError:
    # Keys of mixed types at one level cannot be sorted. Flattening an
    # `nnx.State` with them fails the same way, so keep the traversal order
    # and leave that error to Flax.
    variables = graph.variables
  labels = _transform.labels_from_metadata(variables)
  values = graph.values
  shapes = {path: tuple(getattr(values[path], "shape", ())) for path, _ in variables}
  dtypes = {path: getattr(values[path], "dtype", None) for path, _ in variables}
  return _transform.partition(groups, labels, shapes, dtypes)


def _check_value(value: Any, pattern: tuple[_keys.Element, ...]) -> None:
  where = _keys.format_pattern(pattern)
  if value is None or isinstance(value, optax.GradientTransformation):
    return
  if not callable(value):
    raise TypeError(
      f"{where} = {type(value).__name__} {value!r:.60}: invalid value. {_VALUE_HELP}"
    )
  module = getattr(value, "__module__", "") or ""
  if module.split(".")[0] == "optax":
    name = getattr(value, "__name__", "transform")
    raise TypeError(
      f"{where} = optax.{name}: this is the optax factory, not a transform."
      f" Call it, for example optax.{name}(1e-3)."
    )
  try:
    inspect.signature(value).bind(None, None)
  except TypeError as error:
    raise TypeError(
      f"{where} = {getattr(value, '__name__', value)!r}: a function rule must"
      f" accept two positional arguments (modules, param): {error}"
    ) from None
  except ValueError:
    # Some builtins have no signature; accept them and let calls fail loudly.
    pass
