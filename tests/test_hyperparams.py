"""Tests of Optimizer.hyperparams and Optimizer.set_hyperparam."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ueaj import opt


class Net(nnx.Module):
  def __init__(self, rngs):
    self.a = nnx.Linear(2, 1, use_bias=False, rngs=rngs)
    self.b = nnx.Linear(2, 1, use_bias=False, rngs=rngs)
    self.c = nnx.Linear(2, 1, use_bias=False, rngs=rngs)
    self.d = nnx.Linear(2, 1, use_bias=False, rngs=rngs)


def build():
  model = Net(nnx.Rngs(0))
  mgr = opt.OptimizerManager()
  mgr[...] = optax.sgd(0.1)
  mgr["a"] = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
  # Inside a chain, as people write gradient clipping.
  mgr["b"] = optax.chain(
    optax.clip_by_global_norm(10.0),
    optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3, weight_decay=0.0),
  )
  mgr["d"] = None
  return model, opt.Optimizer(model, mgr, wrt=nnx.Param)


def loss(model, x):
  return sum(layer(x).sum() for layer in (model.a, model.b, model.c, model.d))


X = jnp.array([[1.0, 2.0]])


def test_hyperparams_by_label():
  _, optimizer = build()
  hyperparams = optimizer.hyperparams
  assert list(hyperparams) == ["a", "b"]
  assert list(hyperparams["a"]) == ["learning_rate"]
  assert float(hyperparams["a"]["learning_rate"]) == pytest.approx(0.1)
  assert float(hyperparams["b"]["learning_rate"]) == pytest.approx(1e-3)
  assert hyperparams["b"]["b1"].dtype == jnp.float32


def test_set_hyperparam_changes_next_update():
  model, optimizer = build()
  before = np.array(model.a.kernel[...])
  optimizer.set_hyperparam("a", "learning_rate", 0.5)
  optimizer.update(model, nnx.grad(loss)(model, X))
  # SGD: the kernel moves by -lr * gradient, and the gradient of the sum of
  # x @ kernel is x transposed: [[1], [2]].
  np.testing.assert_allclose(model.a.kernel[...], before - 0.5 * np.array([[1.0], [2.0]]), rtol=1e-6)
  assert optimizer.hyperparams["a"]["learning_rate"].dtype == jnp.float32


def test_set_hyperparam_leaves_other_groups():
  model, optimizer = build()
  before = np.array(model.c.kernel[...])
  optimizer.set_hyperparam("a", "learning_rate", 0.5)
  optimizer.update(model, nnx.grad(loss)(model, X))
  np.testing.assert_allclose(model.c.kernel[...], before - 0.1 * np.array([[1.0], [2.0]]), rtol=1e-6)
  assert float(optimizer.hyperparams["b"]["learning_rate"]) == pytest.approx(1e-3)


def test_set_hyperparam_under_jit():
  model, optimizer = build()

  @nnx.jit
  def step(model, optimizer, lr):
    optimizer.set_hyperparam("a", "learning_rate", lr)
    optimizer.update(model, nnx.grad(loss)(model, X))
    return optimizer.hyperparams["a"]["learning_rate"]

  start = np.array(model.a.kernel[...])
  seen = step(model, optimizer, jnp.float32(0.25))
  seen = step(model, optimizer, jnp.float32(0.75))
  assert float(seen) == 0.75
  expected = start - (0.25 + 0.75) * np.array([[1.0], [2.0]])
  np.testing.assert_allclose(model.a.kernel[...], expected, rtol=1e-6)
  assert float(optimizer.hyperparams["a"]["learning_rate"]) == 0.75


def test_set_hyperparam_inside_chain():
  model, optimizer = build()
  optimizer.set_hyperparam("b", "learning_rate", 0.0)
  before = np.array(model.b.kernel[...])
  optimizer.update(model, nnx.grad(loss)(model, X))
  np.testing.assert_array_equal(model.b.kernel[...], before)


def test_set_hyperparam_keeps_float32():
  _, optimizer = build()
  optimizer.set_hyperparam("a", "learning_rate", np.float64(0.3))
  value = optimizer.hyperparams["a"]["learning_rate"]
  assert value.dtype == jnp.float32
  assert float(value) == pytest.approx(0.3)


def test_unknown_label_lists_groups():
  _, optimizer = build()
  with pytest.raises(KeyError, match=r"'z'.*\['a', 'b'\]"):
    optimizer.set_hyperparam("z", "learning_rate", 0.1)


def test_group_without_injection_names_it():
  _, optimizer = build()
  # Group '...' is the plain optax.sgd default, which model.c belongs to.
  with pytest.raises(ValueError, match=r"Group '...' has no injected.*\['a', 'b'\]"):
    optimizer.set_hyperparam("...", "learning_rate", 0.1)
  with pytest.raises(ValueError, match="Group 'd' has no injected"):
    optimizer.set_hyperparam("d", "learning_rate", 0.1)


def test_unknown_hyperparameter_lists_names():
  _, optimizer = build()
  with pytest.raises(KeyError, match=r"'lr'.*\['learning_rate'\]"):
    optimizer.set_hyperparam("a", "lr", 0.1)


def test_scheduled_hyperparameter_rejected():
  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  mgr = opt.OptimizerManager()
  mgr[...] = optax.inject_hyperparams(optax.sgd)(learning_rate=optax.linear_schedule(1.0, 0.0, 10))
  optimizer = opt.Optimizer(model, mgr, wrt=nnx.Param)
  assert float(optimizer.hyperparams["..."]["learning_rate"]) == 1.0
  with pytest.raises(ValueError, match="'learning_rate' of group '...' follows a schedule"):
    optimizer.set_hyperparam("...", "learning_rate", 0.5)


def test_non_scalar_rejected():
  _, optimizer = build()
  with pytest.raises(ValueError, match=r"takes a scalar, got shape \(2,\)"):
    optimizer.set_hyperparam("a", "learning_rate", [0.1, 0.2])


def test_indexed_group_entry(monkeypatch):
  # A vectorized group keeps the values of several groups along a leading
  # axis; unit_of gives each group's index.
  _, optimizer = build()
  state = optimizer._injected_state("a")[0]
  state.hyperparams["learning_rate"].set_value(jnp.array([0.1, 0.2, 0.3], jnp.float32))
  unit_of = optimizer.groups.unit_of
  monkeypatch.setattr(
    optimizer.groups, "unit_of", lambda label: (label, 1) if label == "a" else unit_of(label)
  )
  assert float(optimizer.hyperparams["a"]["learning_rate"]) == pytest.approx(0.2)
  optimizer.set_hyperparam("a", "learning_rate", 0.9)
  np.testing.assert_allclose(
    state.hyperparams["learning_rate"].get_value(), [0.1, 0.9, 0.3], rtol=1e-6
  )
  assert jax.numpy.asarray(state.hyperparams["learning_rate"].get_value()).dtype == jnp.float32


class StackedBlock(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(2, 2, rngs=rngs)


class StackedNet(nnx.Module):
  def __init__(self, rngs):
    @nnx.split_rngs(splits=4)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return StackedBlock(rngs)

    self.layers = create(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(x, block):
      return block.linear(x)

    return run(x, self.layers)


def test_vectorized_unit_hyperparams():
  model = StackedNet(nnx.Rngs(0))
  mgr = opt.OptimizerManager()
  mgr.declare_stack("layers")
  mgr["layers", :] = lambda modules, param: optax.inject_hyperparams(optax.sgd)(
    learning_rate=0.1 * (param.layer + 1)
  )
  optimizer = opt.Optimizer(model, mgr, wrt=nnx.Param)
  assert optimizer.groups.unit_of("layers/2") == ("layers/0~layers/3", 2)
  rates = {label: float(values["learning_rate"]) for label, values in optimizer.hyperparams.items()}
  assert rates == pytest.approx({"layers/0": 0.1, "layers/1": 0.2, "layers/2": 0.3, "layers/3": 0.4})

  optimizer.set_hyperparam("layers/2", "learning_rate", 0.0)
  before = np.array(model.layers.linear.kernel[...])
  grads = nnx.grad(lambda model: (model(jnp.ones((1, 2))) ** 2).sum())(model)
  optimizer.update(model, grads)
  after = np.array(model.layers.linear.kernel[...])
  np.testing.assert_array_equal(after[2], before[2])
  for layer, rate in [(0, 0.1), (1, 0.2), (3, 0.4)]:
    expected = before[layer] - rate * np.array(grads["layers"]["linear"]["kernel"][...])[layer]
    np.testing.assert_allclose(after[layer], expected, rtol=1e-5, atol=1e-7)
  assert float(optimizer.hyperparams["layers/3"]["learning_rate"]) == pytest.approx(0.4)
