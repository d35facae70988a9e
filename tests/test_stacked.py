"""Stacked layers: a vmapped stack behaves exactly like an nnx.List of blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ueaj import opt

LAYERS = 4


class Block(nnx.Module):

  def __init__(self, rngs):
    self.attn = nnx.Linear(4, 4, rngs=rngs)
    self.mlp = nnx.Linear(4, 4, rngs=rngs)

  def __call__(self, x):
    return x + jnp.tanh(self.mlp(self.attn(x)))


class Stacked(nnx.Module):

  def __init__(self, rngs):
    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return Block(rngs)

    self.layers = create(rngs)
    self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(x, block):
      return block(x)

    return self.head(run(x, self.layers))


class Listed(nnx.Module):
  """The same parameters as a `Stacked` model, one block per list entry."""

  def __init__(self, stacked):
    graphdef, state = nnx.split(stacked.layers)
    self.layers = nnx.List(
      [nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state)) for i in range(LAYERS)]
    )
    self.head = nnx.clone(stacked.head)

  def __call__(self, x):
    for block in self.layers:
      x = block(x)
    return self.head(x)


def decay_rule(modules, param):
  """Decay the learning rate towards the input; both models give the same layer."""
  if param.layer is not None:
    layer = param.layer
  else:
    layer = next(i for i, block in enumerate(modules[1]) if block is modules[2])
  return optax.adamw(1e-2 * 0.5 ** (LAYERS - 1 - layer), weight_decay=0.1)


CONFIGS = {
  "per_layer": lambda mgr: mgr.assign(("layers", slice(None)), optax.chain(optax.clip_by_global_norm(0.01), optax.sgd(0.1))),
  "batch": lambda mgr: mgr.assign(("layers", opt.batch[1:3]), optax.chain(optax.clip_by_global_norm(0.01), optax.sgd(0.1))),
  "int_override": lambda mgr: (
    mgr.assign(("layers", slice(None), "attn"), optax.adam(1e-2)),
    mgr.assign(("layers", -1), optax.sgd(0.3)),
  ),
  "rule": lambda mgr: mgr.assign(("layers", slice(None)), decay_rule),
  "frozen": lambda mgr: (
    mgr.assign(("layers", slice(None)), optax.adam(1e-2)),
    mgr.assign(("layers", [0, 2]), None),
  ),
  "split_structures": lambda mgr: (
    mgr.assign(("layers",), optax.adam(1e-2)),
    mgr.assign(("layers", 0), optax.sgd(0.1)),
  ),
}


def build(config, stacked):
  mgr = opt.OptimizerManager()
  if stacked:
    mgr.declare_stack("layers")
  mgr[...] = optax.adam(1e-3)
  CONFIGS[config](mgr)
  return mgr


@pytest.fixture
def models():
  stacked = Stacked(nnx.Rngs(0))
  return stacked, Listed(stacked)


def loss(model, x):
  return (model(x) ** 2).sum()


def stacked_value(tree, path, layer):
  """Return the stacked model's entry for a path of the list model."""
  if path[0] == "head":
    return tree["head"][path[1]][...]
  return tree["layers"][path[2]][path[3]][...][layer]


def list_grads(listed, stacked_grads, x):
  """Return gradients for the list model that equal the stacked model's."""
  grads = nnx.grad(loss)(listed, x)
  for path, variable in nnx.to_flat_state(grads):
    layer = path[1] if path[0] == "layers" else None
    variable[...] = stacked_value(stacked_grads, path, layer)
  return grads


def assert_same(stacked_tree, listed_tree):
  for path, variable in nnx.to_flat_state(listed_tree):
    layer = path[1] if path[0] == "layers" else None
    np.testing.assert_allclose(
      stacked_value(stacked_tree, path, layer),
      variable[...],
      rtol=1e-6,
      atol=1e-6,
      err_msg=str(path),
    )


# Every configuration under nnx.jit; two of them eagerly as well.
CASES = [(config, True) for config in sorted(CONFIGS)] + [("batch", False), ("rule", False)]


@pytest.mark.parametrize("config, jit", CASES, ids=[f"{c}-{'jit' if j else 'eager'}" for c, j in CASES])
def test_stacked_equals_list(models, config, jit):
  stacked, listed = models
  stacked_opt = opt.Optimizer(stacked, build(config, True), wrt=nnx.Param)
  listed_opt = opt.Optimizer(listed, build(config, False), wrt=nnx.Param)
  assert set(stacked_opt.groups.labels) == set(listed_opt.groups.labels)
  x = jax.random.normal(jax.random.key(1), (3, 4))

  def update(model, optimizer, grads):
    return optimizer.update(model, grads)

  if jit:
    update = nnx.jit(update)
  # Both optimizers get the same gradients, so that only the optimizers are
  # compared (scan and a Python loop round the gradients differently).
  for _ in range(3):
    stacked_grads = nnx.grad(loss)(stacked, x)
    stacked_updates = update(stacked, stacked_opt, stacked_grads)
    listed_updates = update(listed, listed_opt, list_grads(listed, stacked_grads, x))
    assert_same(nnx.State(stacked_updates), nnx.State(listed_updates))
    assert_same(nnx.state(stacked, nnx.Param), nnx.state(listed, nnx.Param))


def test_labels_per_layer(models):
  stacked, _ = models
  build("int_override", True).label(stacked)
  assert stacked.layers.attn.kernel.get_metadata()["opt_group"] == (
    "layers/0/attn", "layers/1/attn", "layers/2/attn", "layers/3",
  )
  assert stacked.layers.mlp.bias.get_metadata()["opt_group"] == ("...", "...", "...", "layers/3")
  assert stacked.head.bias.get_metadata()["opt_group"] == "..."


def test_rule_sees_layer(models):
  stacked, _ = models
  calls = []

  def rule(modules, param):
    calls.append((modules, param))
    return optax.sgd(0.1)

  mgr = opt.OptimizerManager()
  mgr.declare_stack("layers")
  mgr[...] = optax.adam(1e-3)
  mgr["layers", 1:3, "attn", "kernel"] = rule
  mgr.label(stacked)
  assert [param.layer for _, param in calls] == [1, 2]
  modules, param = calls[0]
  assert modules[0] is stacked
  assert modules[1] is stacked.layers
  assert modules[2] is stacked.layers.attn
  assert param.shape == (4, 4)
  assert param.ndim == 2
  assert param.path == ("layers", "attn", "kernel")


def test_decay_runs_vectorized(models):
  stacked, _ = models
  optimizer = opt.Optimizer(stacked, build("rule", True), wrt=nnx.Param)
  units = {optimizer.groups.unit_of(label) for label in optimizer.groups.labels if label.startswith("layers")}
  assert units == {("layers/0~layers/3", layer) for layer in range(LAYERS)}
  state = optimizer.opt_state.inner_states["layers/0~layers/3"].inner_state
  counts = [leaf for leaf in jax.tree.leaves(state) if leaf.ndim == 1 and leaf.dtype == jnp.int32]
  assert counts and all(count.shape == (LAYERS,) for count in counts)


def test_separate_step_counts(models):
  stacked, _ = models
  mgr = build("per_layer", True)
  mgr["layers", :] = optax.adam(1e-2)
  mgr["layers", 1] = None
  optimizer = opt.Optimizer(stacked, mgr, wrt=nnx.Param)
  x = jnp.ones((2, 4))
  optimizer.update(stacked, nnx.grad(loss)(stacked, x))
  key, _ = optimizer.groups.unit_of("layers/0")
  state = optimizer.opt_state.inner_states[key].inner_state
  counts = [leaf[...] for leaf in jax.tree.leaves(state) if leaf[...].shape == (LAYERS - 1,)]
  np.testing.assert_array_equal(counts[0], np.ones(LAYERS - 1))


def test_scan_training_decreases_loss(models):
  stacked, _ = models
  optimizer = opt.Optimizer(stacked, build("rule", True), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(2), (8, 4))

  @nnx.jit
  def train_step(model, optimizer, x):
    value, grads = nnx.value_and_grad(loss)(model, x)
    optimizer.update(model, grads)
    return value

  losses = [float(train_step(stacked, optimizer, x)) for _ in range(20)]
  assert losses[-1] < losses[0]


def test_undeclared_stack_shows_fix(models):
  stacked, _ = models
  mgr = opt.OptimizerManager()
  mgr[...] = optax.adam(1e-3)
  mgr["layers", :] = optax.sgd(0.1)
  with pytest.raises(opt.UnmatchedPatternError, match=r"declare it first: mgr\.declare_stack\('layers', axis=0\)"):
    mgr.build(stacked)


def test_stack_index_out_of_range(models):
  stacked, _ = models
  mgr = build("per_layer", True)
  mgr["layers", 4] = None
  with pytest.raises(IndexError, match=r"index 4 is out of range for the sequence at 'layers' of length 4"):
    mgr.build(stacked)


def test_declare_stack_bad_axis(models):
  stacked, _ = models
  mgr = build("per_layer", True)
  mgr.declare_stack("head", axis=2)
  with pytest.raises(ValueError, match=r"Stack 'head': the Variable 'head/bias' has shape \(2,\), which has no axis 2"):
    mgr.build(stacked)


def test_declare_stack_uneven_layers(models):
  stacked, _ = models
  mgr = opt.OptimizerManager()
  mgr.declare_stack(...)
  mgr[...] = optax.sgd(0.1)
  with pytest.raises(ValueError, match=r"Stack '<root>': Variables disagree on the number of layers along axis 0"):
    mgr.build(stacked)


def test_declare_stack_on_variable(models):
  stacked, _ = models
  mgr = opt.OptimizerManager()
  mgr.declare_stack(("head", "bias"))
  mgr[...] = optax.sgd(0.1)
  with pytest.raises(ValueError, match=r"declare_stack selects the Variable 'head/bias'"):
    mgr.build(stacked)


def test_declare_stack_typo(models):
  stacked, _ = models
  mgr = opt.OptimizerManager()
  mgr.declare_stack("layer")
  mgr[...] = optax.sgd(0.1)
  with pytest.raises(opt.UnmatchedPatternError, match=r"(?s)mgr\['layer'\] selects no Variable.*\n  layers\n"):
    mgr.build(stacked)


def test_unassigned_layers_listed(models):
  stacked, _ = models
  mgr = opt.OptimizerManager()
  mgr.declare_stack("layers")
  mgr["head"] = optax.sgd(0.1)
  mgr["layers", [0, 1, 3]] = optax.sgd(0.1)
  with pytest.raises(opt.UnassignedVariablesError, match=r"layers/attn/bias \(layers 2\)"):
    mgr.build(stacked)
