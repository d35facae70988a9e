"""Mixed precision per group: `opt.precision` and `opt.check_dtype_stability`."""

import importlib.util
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ueaj import opt
from ueaj.opt import _precision
from ueaj.opt._plan import plan_units

BF16 = jnp.bfloat16
F32 = jnp.float32


def floating_dtypes(state):
  return {leaf.dtype for leaf in jax.tree.leaves(state) if jnp.issubdtype(leaf.dtype, jnp.floating)}


def record_dtypes(seen):
  """Build a transform that negates floating gradients and records the dtypes its update receives."""

  def init_fn(params):
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    seen.append(
      (
        {leaf.dtype for leaf in jax.tree.leaves(updates)},
        None if params is None else {leaf.dtype for leaf in jax.tree.leaves(params)},
      )
    )
    return jax.tree.map(lambda g: -g if jnp.issubdtype(g.dtype, jnp.floating) else g, updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def bits(array):
  return np.asarray(jax.device_get(array)).view(np.uint16)


# ------------------------------------------------------------------ the wrapper


def test_state_dtype_sets_every_moment():
  params = {"w": jnp.ones((3, 2), F32), "b": jnp.ones((2,), BF16)}
  tx = opt.precision(optax.adamw(1e-3), state_dtype=BF16)
  state = tx.init(params)
  adam = state.inner_state[0]
  for moment in (adam.mu, adam.nu):
    assert moment["w"].dtype == BF16
    assert moment["b"].dtype == BF16
  assert adam.count.dtype == jnp.int32

  _, new_state = tx.update(params, state, params)
  assert jax.tree.map(lambda x: x.dtype, new_state) == jax.tree.map(lambda x: x.dtype, state)


def test_optax_mu_dtype_leaves_nu_low():
  # The behaviour of optax 0.2.8 that the policy exists for.
  params = {"w": jnp.ones(3, BF16)}
  state = optax.adamw(1e-3, mu_dtype=F32).init(params)
  assert state[0].mu["w"].dtype == F32
  assert state[0].nu["w"].dtype == BF16


def test_state_dtype_none_follows_compute():
  params = {"w": jnp.ones(3, BF16)}
  state = opt.precision(optax.adam(1e-3)).init(params)
  assert floating_dtypes(state.inner_state) == {jnp.dtype(F32)}

  state = opt.precision(optax.adam(1e-3), compute_dtype=None).init(params)
  assert floating_dtypes(state.inner_state) == {jnp.dtype(BF16)}


def test_float32_state_matches_plain_optax():
  params = {"w": jnp.ones((4, 4), F32)}
  plain = optax.adam(1e-3).init(params)
  wrapped = opt.precision(optax.adam(1e-3), state_dtype=F32).init(params).inner_state
  assert sum(x.nbytes for x in jax.tree.leaves(plain)) == sum(
    x.nbytes for x in jax.tree.leaves(wrapped)
  )


@pytest.mark.parametrize("compute_dtype", [F32, BF16, None])
def test_injected_hyperparameters_stay_float32(compute_dtype):
  params = {"w": jnp.ones(3, BF16)}
  inner = optax.inject_hyperparams(optax.adam)(
    learning_rate=optax.linear_schedule(1e-3, 1e-4, 10), b1=0.9
  )
  tx = opt.precision(inner, state_dtype=BF16, compute_dtype=compute_dtype)
  state = tx.init(params)
  hyperparams = state.inner_state.hyperparams
  assert {value.dtype for value in hyperparams.values()} == {jnp.dtype(F32)}
  # Equal to what float32 parameters give, so not rounded through bfloat16.
  expected = inner.init({"w": jnp.ones(3, F32)}).hyperparams
  assert hyperparams["b1"] == expected["b1"]
  assert hyperparams["learning_rate"] == expected["learning_rate"]
  assert state.inner_state.inner_state[0].mu["w"].dtype == BF16

  for _ in range(2):
    _, state = tx.update(params, state, params)
  assert {value.dtype for value in state.inner_state.hyperparams.values()} == {jnp.dtype(F32)}
  assert state.inner_state.inner_state[0].nu["w"].dtype == BF16


def test_compute_dtype_upcasts_inner_inputs():
  params = {"w": jnp.full(3, 0.5, BF16), "step": jnp.zeros((), jnp.int32)}
  grads = {"w": jnp.ones(3, BF16), "step": jnp.zeros((), jnp.int32)}
  seen = []
  tx = opt.precision(record_dtypes(seen), compute_dtype=F32)
  updates, _ = tx.update(grads, tx.init(params), params)
  update_dtypes, param_dtypes = seen[-1]
  assert update_dtypes == {jnp.dtype(F32), jnp.dtype(jnp.int32)}
  assert param_dtypes == {jnp.dtype(F32), jnp.dtype(jnp.int32)}
  # The update comes back in the parameter's dtype; integers are untouched.
  assert updates["w"].dtype == BF16
  assert updates["step"].dtype == jnp.int32


def test_compute_dtype_none_keeps_input_dtypes():
  params = {"w": jnp.full(3, 0.5, BF16)}
  seen = []
  tx = opt.precision(record_dtypes(seen), compute_dtype=None)
  updates, _ = tx.update(params, tx.init(params), params)
  assert seen[-1] == ({jnp.dtype(BF16)}, {jnp.dtype(BF16)})
  assert updates["w"].dtype == BF16


def test_compute_in_float32_changes_result():
  # The second moment after one step is (1 - b2) * g**2, computed and stored in float32.
  params = {"w": jnp.ones(8, BF16)}
  grads = {"w": jnp.linspace(0.001, 0.002, 8).astype(BF16)}
  results = {}
  for compute in (F32, None):
    tx = opt.precision(optax.adam(1e-2, b2=0.99), compute_dtype=compute)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    results[compute] = state.inner_state[0].nu["w"]
  assert results[F32].dtype == F32
  assert results[None].dtype == BF16
  np.testing.assert_allclose(
    results[F32], 0.01 * np.asarray(grads["w"], np.float32) ** 2, rtol=1e-6
  )


def test_master_weights_land_bit_exactly():
  key = jax.random.key(0)
  shape = (64,)
  values = jax.random.normal(key, shape) * jnp.logspace(-3, 2, 64)
  values = values.at[:4].set(jnp.array([0.0, -0.0, 1e-8, 3e4]))
  params = {"w": values.astype(BF16), "scale": jnp.ones((4,), F32)}
  tx = opt.precision(optax.adam(3e-3), master_weights=True)
  state = tx.init(params)
  assert state.master["w"].dtype == F32
  assert state.master["scale"] is None

  for step in range(20):
    grads = {
      "w": jax.random.normal(jax.random.fold_in(key, step), shape).astype(BF16),
      "scale": jnp.ones((4,), F32),
    }
    updates, state = tx.update(grads, state, params)
    assert updates["w"].dtype == F32
    assert updates["scale"].dtype == F32
    params = optax.apply_updates(params, updates)
    assert params["w"].dtype == BF16
    np.testing.assert_array_equal(bits(params["w"]), bits(state.master["w"].astype(BF16)))


def test_master_weights_keep_small_updates():
  params = {"w": jnp.ones(4, BF16)}
  grads = {"w": jnp.ones(4, BF16)}
  results = {}
  for master in (False, True):
    tx = opt.precision(optax.sgd(1e-3), master_weights=master)
    state, current = tx.init(params), params
    for _ in range(20):
      updates, state = tx.update(grads, state, current)
      current = optax.apply_updates(current, updates)
    results[master] = current["w"]
  # A step of 1e-3 is under half the gap from 1.0 to the next smaller bfloat16 (2**-8), so it rounds away.
  np.testing.assert_array_equal(results[False], jnp.ones(4, BF16))
  np.testing.assert_array_equal(results[True], jnp.full(4, 0.98, F32).astype(BF16))


def test_master_weights_see_decay_on_master():
  params = {"w": jnp.ones(2, BF16)}
  tx = opt.precision(optax.adamw(1e-3, weight_decay=0.5), master_weights=True)
  state = tx.init(params)
  zero = {"w": jnp.zeros(2, BF16)}
  for _ in range(3):
    updates, state = tx.update(zero, state, params)
    params = optax.apply_updates(params, updates)
  # Decay alone: master *= (1 - 5e-4) per step, computed on the float32 copy.
  np.testing.assert_allclose(state.master["w"], (1 - 5e-4) ** 3, rtol=1e-6)


def test_master_weights_on_float32_warns():
  params = {"w": jnp.ones(3, F32)}
  tx = opt.precision(optax.adam(1e-3), master_weights=True)
  with pytest.warns(UserWarning, match="does nothing"):
    state = tx.init(params)
  assert state.master == {"w": None}


def test_master_weights_need_params():
  params = {"w": jnp.ones(3, BF16)}
  tx = opt.precision(optax.adam(1e-3), master_weights=True)
  with pytest.raises(ValueError, match=r"needs the parameters in update.*tx.update\(grads, state, params\)"):
    tx.update(params, tx.init(params))


@pytest.mark.parametrize("name", ["state_dtype", "compute_dtype"])
@pytest.mark.parametrize("dtype", [jnp.int32, "nonsense"])
def test_invalid_dtype_raises(name, dtype):
  with pytest.raises(ValueError, match=f"{name}=.* is not a floating dtype"):
    opt.precision(optax.adam(1e-3), **{name: dtype})


def test_factory_instead_of_transform_raises():
  with pytest.raises(TypeError, match=r"Call the optax factory first"):
    opt.precision(optax.adam)


def test_precision_is_jittable_and_stable():
  params = {"w": jnp.ones((2, 3), BF16)}
  tx = opt.precision(optax.adamw(1e-3), state_dtype=BF16, master_weights=True)
  state = tx.init(params)
  step = jax.jit(tx.update)
  updates, state = step(params, state, params)
  updates, state = step(params, state, params)
  assert step._cache_size() == 1


# ------------------------------------------------------------- dtype stability


def test_stability_check_names_group_and_path():
  params = {"kernel": jax.ShapeDtypeStruct((4, 4), BF16)}
  grads = {"kernel": jax.ShapeDtypeStruct((4, 4), F32)}
  opt.check_dtype_stability(optax.adam(1e-3), params, label="layers/0")
  with pytest.raises(ValueError) as error:
    opt.check_dtype_stability(optax.adam(1e-3), params, label="layers/0", grads_specs=grads)
  message = str(error.value)
  assert "group 'layers/0': optimizer state '0/mu/kernel' changes dtype from bfloat16 to float32" in message
  assert "opt.precision(..., state_dtype=...)" in message


def test_stability_check_passes_precision():
  params = {"kernel": jax.ShapeDtypeStruct((4, 4), BF16)}
  grads = {"kernel": jax.ShapeDtypeStruct((4, 4), F32)}
  tx = opt.precision(optax.adam(1e-3), state_dtype=BF16, master_weights=True)
  opt.check_dtype_stability(tx, params, label="layers/0", grads_specs=grads)


def test_stability_check_custom_accumulator():
  def init_fn(params):
    return jax.tree.map(jnp.zeros_like, params)

  def update_fn(updates, state, params=None):
    # Accumulating into float32 promotes a bfloat16 state.
    return updates, jax.tree.map(lambda s, g: s + g.astype(F32), state, updates)

  params = (jax.ShapeDtypeStruct((3,), BF16),)
  with pytest.raises(ValueError, match=r"group 'head': optimizer state '0' changes dtype from bfloat16 to float32"):
    opt.check_dtype_stability(
      optax.GradientTransformation(init_fn, update_fn), params, label="head"
    )


class Net(nnx.Module):

  def __init__(self, rngs, depth=3, dtype=F32):
    self.embed = nnx.Embed(8, 4, param_dtype=dtype, rngs=rngs)
    self.layers = nnx.List(
      [nnx.Linear(4, 4, param_dtype=dtype, rngs=rngs) for _ in range(depth)]
    )
    self.norm = nnx.LayerNorm(4, param_dtype=dtype, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    for layer in self.layers:
      x = x + jnp.tanh(layer(x))
    return self.norm(x)


def loss_of(model, tokens):
  return (model(tokens).astype(F32) ** 2).mean()


def test_stability_check_on_built_transform():
  model = Net(nnx.Rngs(0), dtype=BF16)
  mgr = opt.OptimizerManager()
  mgr[...] = optax.adam(1e-3)
  mgr["layers", :] = optax.adam(1e-3)
  tx = mgr.build(model)
  params = nnx.state(model, nnx.Param)
  opt.check_dtype_stability(tx, params)

  # Float32 gradients of bfloat16 parameters turn adam's moments into float32.
  grads = jax.tree.map(lambda x: x.astype(F32), params)
  with pytest.raises(ValueError) as error:
    opt.check_dtype_stability(tx, params, grads_specs=grads)
  message = str(error.value)
  assert "group '...': optimizer state '0/mu/.../0' changes dtype from bfloat16 to float32" in message
  assert "group 'layers/0': optimizer state '0/mu/layers/0/0' changes dtype" in message


def plan_of(model, mgr):
  groups = mgr.label(model)
  state = nnx.state(model, nnx.Param)
  labels = opt._transform.labels_from_metadata(opt._graph.flatten_paths(state))
  flat = {path: variable.get_value() for path, variable in opt._graph.flatten_paths(state)}
  shapes = {path: value.shape for path, value in flat.items()}
  dtypes = {path: value.dtype for path, value in flat.items()}
  units = plan_units(groups, labels, shapes, dtypes)
  return units, labels, shapes, dtypes


def test_unit_check_passes_plan():
  mgr = opt.OptimizerManager()
  mgr[...] = optax.adam(1e-3)
  mgr["layers", :] = opt.precision(optax.adam(1e-3), state_dtype=BF16)
  _precision.check_units_dtype_stability(*plan_of(Net(nnx.Rngs(0), dtype=BF16), mgr))


def test_unit_check_names_vectorized_unit():
  def unstable(modules, param):
    # A per-layer float32 b1 (an array once vectorized) promotes bfloat16 moments.
    return optax.adam(1e-3, b1=0.9 - 0.01 * param.layer)

  mgr = opt.OptimizerManager()
  mgr.declare_stack("layers")
  mgr[...] = optax.adam(1e-3)
  mgr["layers", :] = unstable
  units, labels, shapes, dtypes = plan_of(Stacked(nnx.Rngs(0), dtype=BF16), mgr)
  assert any(unit.vectorized for unit in units)
  with pytest.raises(ValueError, match=r"group 'layers/0~layers/3': optimizer state '0/mu/.*' changes dtype from bfloat16 to float32"):
    _precision.check_units_dtype_stability(units, labels, shapes, dtypes)

  mgr["layers", :] = lambda modules, param: opt.precision(
    optax.adam(1e-3, b1=0.9 - 0.01 * param.layer), state_dtype=BF16
  )
  _precision.check_units_dtype_stability(*plan_of(Stacked(nnx.Rngs(0), dtype=BF16), mgr))


# ------------------------------------------------------------ with the manager


def group_state(optimizer, label):
  key, index = optimizer.groups.unit_of(label)
  state = optimizer.opt_state.inner_states[key].inner_state
  if index is not None:
    state = jax.tree.map(lambda x: x[index], state)
  return state


def floating_bytes(state):
  return sum(
    leaf.nbytes for leaf in jax.tree.leaves(state) if jnp.issubdtype(leaf.dtype, jnp.floating)
  )


def all_bytes(state):
  return sum(leaf.nbytes for leaf in jax.tree.leaves(state))


def train(model, optimizer, steps=2):
  tokens = jnp.arange(6) % 8

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(loss_of)(model, tokens)
    optimizer.update(model, grads)

  for _ in range(steps):
    step(model, optimizer)


def build(assign, dtype=F32):
  model = Net(nnx.Rngs(0), dtype=dtype)
  mgr = opt.OptimizerManager()
  mgr[...] = optax.adam(1e-3)
  assign(mgr)
  return model, opt.Optimizer(model, mgr, wrt=nnx.Param)


def test_bf16_moments_halve_group_state():
  def baseline(mgr):
    mgr["layers", :] = optax.adam(1e-3)

  def halved(mgr):
    mgr["layers", :] = opt.precision(optax.adam(1e-3), state_dtype=BF16)

  _, plain = build(baseline)
  model, small = build(halved)
  train(model, small)
  for label in ("layers/0", "layers/1", "layers/2"):
    before, after = group_state(plain, label), group_state(small, label)
    assert floating_bytes(after) * 2 == floating_bytes(before)
    # The int32 step count is the only state that is not halved.
    assert all_bytes(after) * 2 == all_bytes(before) + 4
    assert floating_dtypes(after) == {jnp.dtype(BF16)}
  assert all_bytes(group_state(small, "...")) == all_bytes(group_state(plain, "..."))
  assert floating_dtypes(group_state(small, "...")) == {jnp.dtype(F32)}


def test_batch_and_frozen_groups():
  def assign(mgr):
    mgr["layers", mgr.batch[0:2]] = opt.precision(optax.adam(1e-3), state_dtype=BF16)
    mgr["layers", 2] = None
    mgr["embed"] = opt.precision(optax.adam(1e-3), master_weights=True)

  model, optimizer = build(assign, dtype=BF16)
  frozen = model.layers[2].kernel.get_value()
  train(model, optimizer, steps=3)
  np.testing.assert_array_equal(bits(model.layers[2].kernel.get_value()), bits(frozen))

  batched = group_state(optimizer, "layers/0:2")
  assert floating_dtypes(batched.inner_state) == {jnp.dtype(BF16)}
  # Adam's moments hold the group's pieces under its key, as optax.partition passes them.
  assert [x.shape for x in batched.inner_state[0].mu["layers/0:2"]] == [(4,), (4, 4), (4,), (4, 4)]
  assert jax.tree.leaves(group_state(optimizer, "layers/2")) == []

  embed = group_state(optimizer, "embed")
  (master,) = embed.master["embed"]
  assert master.dtype == F32
  np.testing.assert_array_equal(
    bits(model.embed.embedding.get_value()), bits(master.astype(BF16))
  )
  # The default group (norm) stays plain optax: bfloat16 moments of bfloat16 params.
  assert floating_dtypes(group_state(optimizer, "...")) == {jnp.dtype(BF16)}


def test_rule_returns_precision():
  def rule(modules, param):
    if param.ndim == 2:
      return opt.precision(optax.adamw(1e-3), state_dtype=BF16, master_weights=True)
    return optax.adam(1e-3)

  def assign(mgr):
    mgr["layers", :] = rule

  model, optimizer = build(assign, dtype=BF16)
  train(model, optimizer)
  label = model.layers[0].kernel.get_metadata()["opt_group"]
  assert label.startswith("layers/0#")
  state = group_state(optimizer, label)
  assert floating_dtypes(state.inner_state) == {jnp.dtype(BF16)}
  np.testing.assert_array_equal(
    bits(model.layers[0].kernel.get_value()), bits(state.master[label][0].astype(BF16))
  )


LAYERS = 4


class Block(nnx.Module):

  def __init__(self, rngs, dtype):
    self.attn = nnx.Linear(4, 4, param_dtype=dtype, rngs=rngs)
    self.mlp = nnx.Linear(4, 4, param_dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return x + jnp.tanh(self.mlp(self.attn(x)))


class Stacked(nnx.Module):

  def __init__(self, rngs, dtype=F32):
    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return Block(rngs, dtype)

    self.layers = create(rngs)
    self.head = nnx.Linear(4, 2, param_dtype=dtype, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(x, block):
      return block(x)

    return self.head(run(x, self.layers))


def train_stacked(model, optimizer, steps=3):
  x = jnp.linspace(-1, 1, 12).reshape(3, 4).astype(model.head.kernel.get_value().dtype)

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: (m(x).astype(F32) ** 2).mean())(model)
    optimizer.update(model, grads)

  for _ in range(steps):
    step(model, optimizer)


def test_stacked_layers_vectorize_precision():
  def decay(modules, param):
    return opt.precision(
      optax.adamw(1e-3 * 0.5 ** (LAYERS - 1 - param.layer)),
      state_dtype=BF16,
      master_weights=True,
    )

  model = Stacked(nnx.Rngs(0), dtype=BF16)
  mgr = opt.OptimizerManager()
  mgr.declare_stack("layers")
  mgr[...] = optax.adam(1e-3)
  mgr["layers", :] = decay
  optimizer = opt.Optimizer(model, mgr, wrt=nnx.Param)
  key, index = optimizer.groups.unit_of("layers/2")
  assert index == 2
  assert "~" in key

  train_stacked(model, optimizer)
  state = optimizer.opt_state.inner_states[key].inner_state
  assert floating_dtypes(state.inner_state) == {jnp.dtype(BF16)}
  # A vectorized unit receives the stacked leaves as a tuple, in path order.
  masters = state.master
  stacked = [
    model.layers.attn.bias, model.layers.attn.kernel, model.layers.mlp.bias, model.layers.mlp.kernel
  ]
  assert len(masters) == len(stacked)
  for master, variable in zip(masters, stacked):
    assert master.dtype == F32
    assert master.shape == variable.get_value().shape
    # Every layer's parameter is its own master copy rounded to bfloat16.
    np.testing.assert_array_equal(bits(variable.get_value()), bits(master.astype(BF16)))


def test_stacked_halves_per_layer_state():
  def assign(mgr, state_dtype):
    mgr.declare_stack("layers")
    mgr[...] = optax.adam(1e-3)
    mgr["layers", :] = opt.precision(optax.adam(1e-3), state_dtype=state_dtype)

  sizes = {}
  for state_dtype in (F32, BF16):
    model = Stacked(nnx.Rngs(0))
    mgr = opt.OptimizerManager()
    assign(mgr, state_dtype)
    optimizer = opt.Optimizer(model, mgr, wrt=nnx.Param)
    train_stacked(model, optimizer, steps=1)
    sizes[state_dtype] = (
      floating_bytes(group_state(optimizer, "layers/1")),
      all_bytes(group_state(optimizer, "...")),
    )
  assert sizes[BF16][0] * 2 == sizes[F32][0]
  assert sizes[BF16][1] == sizes[F32][1]


# ------------------------------------------------------------------ trajectory


def load_example():
  path = Path(__file__).resolve().parent.parent / "examples" / "train_lm.py"
  spec = importlib.util.spec_from_file_location("train_lm_for_precision", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_master_weights_follow_float32_trajectory():
  # A reduced benchmarks/precision_trajectory.py: one block of width 8, 24
  # steps of adam at 1e-3. Such steps are under half the bfloat16 spacing of
  # weights of magnitude 0.5 or more (the norm scales start at 1.0), so the
  # run without master weights drops them.
  example = load_example()
  data = example.load_text()[:20_000]
  rng = np.random.default_rng(0)
  batches = [example.sample_batch(data, 4, 8, rng) for _ in range(24)]

  def loss_fn(model, batch):
    logits = model(batch["inputs"]).astype(F32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

  def run(dtype, master):
    model = example.Transformer(1, 8, 2, rngs=nnx.Rngs(0))
    mgr = opt.OptimizerManager()
    if dtype == F32:
      mgr[...] = optax.adam(1e-3)
    else:
      state = nnx.state(model, nnx.Param)
      nnx.update(model, jax.tree.map(lambda x: x.astype(dtype), state))
      mgr[...] = opt.precision(optax.adam(1e-3), master_weights=master)
    optimizer = opt.Optimizer(model, mgr, wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    # jax.jit on the split state: less Python work per step than nnx.jit.
    @jax.jit
    def step(state, batch):
      model, optimizer = nnx.merge(graphdef, state)
      loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
      optimizer.update(model, grads)
      return loss, nnx.state((model, optimizer))

    losses = []
    for batch in batches:
      loss, state = step(state, batch)
      losses.append(loss)
    return np.array(jax.device_get(losses))

  reference = run(F32, False)
  with_master = np.abs(run(BF16, True) - reference)[-8:].mean()
  without_master = np.abs(run(BF16, False) - reference)[-8:].mean()
  assert reference[-8:].mean() < reference[:4].mean() - 0.05
  assert with_master < 0.01
  assert without_master > 5 * with_master
