"""`nnx.Optimizer` replacement that takes an `OptimizerManager`."""

from __future__ import annotations

from typing import Any, TypeVar

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
  `nnx.state(optimizer)` holds the step count and every group's state.

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
    groups = manager.label(model, wrt=wrt)
    super().__init__(model, transform_for(model, groups, wrt, graph), wrt=wrt, graph=graph)
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
