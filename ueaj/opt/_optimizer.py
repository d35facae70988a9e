"""`nnx.Optimizer` replacement that takes an `OptimizerManager`."""

from __future__ import annotations

from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.nnx import filterlib

from ueaj.opt._groups import Groups
from ueaj.opt._manager import OptimizerManager, transform_for

M = TypeVar("M")


class Optimizer(nnx.Optimizer[M]):
  """An `nnx.Optimizer` whose transform is assembled from an `OptimizerManager`.

  The manager labels the model's Variables (metadata key `"opt_group"`);
  the optimizer then reads those labels back from the Variables and builds
  one `optax.partition` over them. Everything else is `nnx.Optimizer`: it
  works inside `nnx.jit`, `update(model, grads)` applies one step, and
  `nnx.state(optimizer)` contains the step count and every group's state.

  When the optimizer is created inside `nnx.jit`, the labels are written to
  the traced Variables, and NNX does not carry metadata changes back out of
  the transform: the optimizer works, but the model outside has no labels.
  Call `manager.label(model)` outside `nnx.jit` to see them on the model.

  Attributes:
    groups: The resolved groups (label, assignment, Variables, sizes);
      `print(optimizer.groups)` shows them as a table.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> from ueaj import opt
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> mgr = opt.OptimizerManager()
    >>> mgr[...] = optax.sgd(0.1)
    >>> mgr['bias'] = None
    >>> optimizer = opt.Optimizer(model, mgr, wrt=nnx.Param)
    >>> loss = lambda model: (model(jnp.ones((1, 2))) ** 2).sum()
    >>> _ = optimizer.update(model, nnx.grad(loss)(model))
    >>> model.bias[...]
    Array([0.], dtype=float32)
    >>> print(optimizer.groups)
    group  assignment            variables  elements
    -----  --------------------  ---------  --------
    ...    mgr[...] = transform          1         2
    bias   mgr['bias'] = frozen          1         1
  """

  def __init__(
    self,
    model: M,
    manager: OptimizerManager | optax.GradientTransformation,
    *,
    wrt: filterlib.Filter,
    graph: bool | None = None,
  ):
    """Label `model`, build the transform and initialize its state.

    Args:
      model: The NNX model.
      manager: The configuration. A plain optax transform is accepted too
        and applies to every Variable, as with `nnx.Optimizer`.
      wrt: Filter of the Variables to optimize; use the same filter for
        `nnx.grad`.
      graph: Passed to `nnx.Optimizer`: graph mode (True) or tree mode.

    Raises:
      TypeError: `manager` is neither an `OptimizerManager` nor a transform.
      The errors of `OptimizerManager.label`.
    """
    if isinstance(manager, optax.GradientTransformation):
      transform = manager
      manager = OptimizerManager()
      manager[...] = transform
    elif not isinstance(manager, OptimizerManager):
      raise TypeError(
        f"opt.Optimizer expects an opt.OptimizerManager or an optax"
        f" transform, got {type(manager).__name__}."
      )
    labelled, groups = manager._label(model, wrt)
    super().__init__(model, transform_for(labelled, groups), wrt=wrt, graph=graph)
    self.groups: Groups = groups

  def update(self, model: M, grads: Any, /, **kwargs: Any) -> optax.Updates:
    """Apply one optimizer step to `model` with `grads` from `nnx.grad`.

    Args:
      model: The model the optimizer was built for.
      grads: Gradients with the structure of `nnx.state(model, wrt)`.
      **kwargs: Extra arguments for transforms that take them.

    Returns:
      The updates that were applied, with the structure of the parameters.

    Raises:
      StructureMismatchError: `grads` do not have the parameters' paths and
        shapes.
    """
    return super().update(model, grads, **kwargs)

  @property
  def hyperparams(self) -> dict[str, dict[str, jax.Array]]:
    """Current hyperparameters of the groups made with `optax.inject_hyperparams`.

    A mapping from group label to `{name: value}`, with one scalar array per
    hyperparameter (traced inside `nnx.jit`). Groups without injected
    hyperparameters, frozen groups among them, are absent. The mapping is a
    copy: change values with `set_hyperparam`.

    A scheduled hyperparameter (`learning_rate=optax.cosine_decay_schedule(...)`)
    shows the value the schedule gave at the last step, or at step 0 before
    the first update.

    Examples:
      >>> import optax
      >>> from flax import nnx
      >>> from ueaj import opt
      >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
      >>> mgr = opt.OptimizerManager()
      >>> mgr[...] = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
      >>> mgr['bias'] = None
      >>> optimizer = opt.Optimizer(model, mgr, wrt=nnx.Param)
      >>> optimizer.hyperparams
      {'...': {'learning_rate': Array(0.1, dtype=float32)}}
      >>> optimizer.set_hyperparam('...', 'learning_rate', 0.05)
      >>> float(optimizer.hyperparams['...']['learning_rate'])
      0.05000000074505806
    """
    result = {}
    for label in self.groups.labels:
      found = self._injected_state(label)
      if found is not None:
        state, index = found
        result[label] = {
          name: _entry(variable, index) for name, variable in state.hyperparams.items()
        }
    return result

  def set_hyperparam(self, label: str, name: str, value: Any) -> None:
    """Set hyperparameter `name` of group `label`, for the next updates.

    Works inside and outside `nnx.jit`. The value is converted to the
    hyperparameter's dtype (float32 unless `inject_hyperparams` was given
    another `hyperparam_dtype`).

    Args:
      label: The group's label, as in `optimizer.groups.labels`.
      name: The hyperparameter, as in `optimizer.hyperparams[label]`.
      value: A scalar: a Python number or a 0-d array (traced inside `nnx.jit`).

    Raises:
      KeyError: No group has this label, or the group has no hyperparameter
        `name`.
      ValueError: The group's transform was not made with
        `optax.inject_hyperparams`; a schedule computes this hyperparameter
        at every step; or `value` is not a scalar.
    """
    if label not in self.groups.labels:
      raise KeyError(
        f"No group is labelled {label!r}. Groups with injected hyperparameters:"
        f" {self._injected_labels()}."
      )
    found = self._injected_state(label)
    if found is None:
      raise ValueError(
        f"Group {label!r} has no injected hyperparameters. Make its transform"
        " with optax.inject_hyperparams, for example"
        " optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3). Groups with"
        f" injected hyperparameters: {self._injected_labels()}."
      )
    state, index = found
    if name not in state.hyperparams:
      raise KeyError(
        f"Group {label!r} has no hyperparameter {name!r}; its hyperparameters"
        f" are {sorted(state.hyperparams)}."
      )
    if name in state.hyperparams_states:
      raise ValueError(
        f"Hyperparameter {name!r} of group {label!r} follows a schedule, which"
        " sets it again at every step. Pass a number to inject_hyperparams"
        " for a hyperparameter you want to set."
      )
    variable = state.hyperparams[name]
    current = variable.get_value()
    new = jnp.asarray(value, dtype=current.dtype)
    if new.shape != ():
      raise ValueError(
        f"Hyperparameter {name!r} of group {label!r} takes a scalar, got shape"
        f" {new.shape}."
      )
    if index is not None:
      new = current.at[index].set(new)
    variable.set_value(new)

  def reset(self, model: M, *key: str | int) -> tuple[str, ...]:
    """Re-initialize the state of the groups whose Variables all lie under `key`.

    `key` is a path prefix of str and int entries, as in `nnx.state` paths:
    `optimizer.reset(model, 'layers', 3)` resets the groups of block 3 of
    an `nnx.List`. After a declared stack's path, an int selects that layer:
    `optimizer.reset(model, 'stack', 3)`. With no key every group is reset.

    The new state is what `init` gives for the model's current parameters,
    so re-initialize the layer's parameters first if they change too. Other
    groups keep their state bit for bit. `optimizer.step` counts all updates
    and is not reset. Each reset group's own step count (the `count` of Adam
    and of schedules) restarts at 0, so bias correction and schedules start
    over for it. In a vectorized unit only the reset layer's entry along the
    leading axis changes.

    Args:
      model: The model the optimizer was built for.
      *key: The path prefix.

    Returns:
      The labels of the groups that were reset.

    Raises:
      ValueError: No Variable lies under `key`, or a group has Variables
        both under `key` and elsewhere. Reset such a group with
        `reset_groups`, or give the selected part its own group.
    """
    inside, outside = set(), set()
    for group in self.groups:
      for path, layer in group.members:
        under = _under(path, layer, key, self.groups)
        (inside if under else outside).add(group.label)
    if not inside:
      raise ValueError(
        f"No optimized Variable lies under {'/'.join(map(str, key))!r}; group"
        f" labels are {list(self.groups.labels)}."
      )
    split = sorted(inside & outside)
    if split:
      raise ValueError(
        f"Groups {split} have Variables both under {'/'.join(map(str, key))!r}"
        " and elsewhere, so their shared state cannot be reset for part of"
        " them. Reset whole groups with optimizer.reset_groups(model, labels),"
        " or give the part its own group in the manager."
      )
    labels = tuple(label for label in self.groups.labels if label in inside)
    self.reset_groups(model, labels)
    return labels

  def reset_groups(self, model: M, labels: Any) -> None:
    """Re-initialize the state of the groups with the given labels (see `reset`).

    Raises:
      KeyError: A label names no group.
    """
    labels = [labels] if isinstance(labels, str) else list(labels)
    for label in labels:
      self.groups[label]
    places = [self.groups.unit_of(label) for label in labels]
    keys = sorted({key for key, _ in places})
    params = nnx.state(model, self.wrt, graph=self.graph)

    # jit drops the state of the units that are not returned.
    @jax.jit
    def fresh_states(params):
      state = self.tx.init(params)
      return {key: state.inner_states[key].inner_state for key in keys}

    fresh = fresh_states(params)
    for key, index in places:
      current = jax.tree.leaves(
        self.opt_state.inner_states[key].inner_state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
      )
      for variable, value in zip(current, jax.tree.leaves(fresh[key]), strict=True):
        if index is None:
          variable.set_value(value)
        else:
          variable.set_value(variable.get_value().at[index].set(value[index]))

  def _injected_state(self, label: str) -> tuple[Any, int | None] | None:
    """Find the group's `inject_hyperparams` state and its index, or None."""
    key, index = self.groups.unit_of(label)
    state = _find_injected(self.opt_state.inner_states[key].inner_state)
    return None if state is None else (state, index)

  def _injected_labels(self) -> list[str]:
    return [label for label in self.groups.labels if self._injected_state(label) is not None]


_INJECTED_STATES = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def _find_injected(state: Any) -> Any:
  """Return the first `inject_hyperparams` state in `state`, depth first, or None."""
  # NOTE: a group whose transform contains several inject_hyperparams states,
  # such as a chain of two injected transforms, exposes only the first.
  if isinstance(state, _INJECTED_STATES):
    return state
  if isinstance(state, (tuple, list)):
    children = state
  elif isinstance(state, dict):
    children = state.values()
  else:
    return None
  for child in children:
    found = _find_injected(child)
    if found is not None:
      return found
  return None


def _entry(variable: Any, index: int | None) -> jax.Array:
  value = variable.get_value() if isinstance(variable, nnx.Variable) else variable
  return value if index is None else value[index]



def _under(path: tuple, layer: int | None, key: tuple, groups: Groups) -> bool:
  """Check whether the member `(path, layer)` lies under the path prefix `key`.

  For a stacked Variable's layer, an int in `key` where the path continues
  with a name selects a layer: `('stack', 3)` selects layer 3 of
  `stack/attn/kernel`, and so does `('stack', 'attn', 3)`.
  """
  position = 0
  layer_used = False
  for entry in key:
    if position < len(path) and entry == path[position] and type(entry) is type(path[position]):
      position += 1
      continue
    is_int = isinstance(entry, int) and not isinstance(entry, bool)
    if layer is None or layer_used or not is_int:
      return False
    if position < len(path) and isinstance(path[position], int):
      return False
    length = groups.stacks[path].length
    if entry % length != layer or not -length <= entry < length:
      return False
    layer_used = True
  return True
