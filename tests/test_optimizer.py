"""Numerical tests of `ueaj.opt` against hand-built `optax.partition` transforms.

Each test configures an `OptimizerManager` on a small transformer-like model
and compares the updates with those of an `optax.partition` whose labels are
written out by hand here, on a second copy of the same model. Most grouping
tests use `clip_by_global_norm` followed by SGD: clipping scales a gradient
by the norm of its whole group, so a Variable placed in the wrong group, or a
group split or merged by mistake, changes the updates.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ueaj import opt

# The vocabulary is as wide as the model, so every parameter has shape (4, 4)
# or (4,). Eager mode compiles each operation once per shape, so fewer shapes
# keep the eager tests fast.
WIDTH = 4
VOCAB = 4
DEPTH = 6
STEPS = 3
RTOL = 1e-6
# Adam's updates are about 1e-4 here and weight decay changes them by about
# 1e-8, so the absolute tolerance must stay far below that.
ATOL = 1e-10
# Far below the norm of any group's standard normal gradient, so every
# group is clipped and its grouping shows in the updates.
CLIP = 1e-2


def numpy_normal(key, shape, dtype=jnp.float32):
  """Initialize like LeCun normal, drawing with NumPy from the JAX key's data.

  JAX's random functions compile once per shape, and building the first
  model with them took about 7 s instead of 1 s on the shared 2-core CPU
  these tests were written on. This initializer compiles nothing and still
  gives every Variable its own values.
  """
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
  return jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[0]), dtype)


class Block(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.attn = nnx.Linear(WIDTH, WIDTH, kernel_init=numpy_normal, rngs=rngs)
    self.mlp = nnx.Linear(WIDTH, WIDTH, kernel_init=numpy_normal, rngs=rngs)
    self.norm = nnx.LayerNorm(WIDTH, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(x)
    return x + self.mlp(self.norm(x))


class TinyTransformer(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, WIDTH, embedding_init=numpy_normal, rngs=rngs)
    self.layers = nnx.List([Block(rngs) for _ in range(DEPTH)])
    self.head = nnx.Linear(WIDTH, VOCAB, kernel_init=numpy_normal, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    for layer in self.layers:
      x = layer(x)
    return self.head(x)


def make_model() -> TinyTransformer:
  return TinyTransformer(nnx.Rngs(0))


def loss_fn(model: TinyTransformer, tokens: jax.Array) -> jax.Array:
  logits = model(tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


# One batch of 2 sequences of 6 tokens per step.
TOKENS = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (STEPS, 2, 6)), jnp.int32)


def clipped_sgd(learning_rate: float) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(CLIP), optax.sgd(learning_rate))


def is_variable(node) -> bool:
  return isinstance(node, nnx.Variable)


def path_text(keypath) -> str:
  """Format a JAX key path as `layers/0/attn/kernel`."""
  return jax.tree_util.keystr(keypath, simple=True, separator="/")


def hand_partition(transforms: dict, label_of) -> optax.GradientTransformation:
  """Build the reference: `optax.partition` with labels from `label_of(path_text)`."""

  def labels(params):
    return jax.tree_util.tree_map_with_path(
      lambda keypath, _: label_of(path_text(keypath)), params, is_leaf=is_variable
    )

  return optax.partition(transforms, labels)


def as_arrays(tree):
  """Replace Variables by NumPy arrays, dropping metadata such as labels."""

  def convert(leaf):
    return np.asarray(leaf.get_value() if is_variable(leaf) else leaf)

  return jax.tree.map(convert, tree, is_leaf=is_variable)


def assert_trees_close(actual, expected) -> None:
  def check(keypath, actual_leaf, expected_leaf):
    np.testing.assert_allclose(
      actual_leaf, expected_leaf, rtol=RTOL, atol=ATOL, err_msg=path_text(keypath)
    )

  jax.tree_util.tree_map_with_path(check, as_arrays(actual), as_arrays(expected))


def params_of(model):
  return nnx.state(model, nnx.Param)


def label_at(model, path: str) -> str:
  variable = model
  for key in path.split("/"):
    variable = variable[int(key)] if key.isdigit() else getattr(variable, key)
  return variable.get_metadata()[opt.LABEL_KEY]


@nnx.jit
def compute_grads(model, tokens):
  """Return `nnx.grad` of the loss.

  `nnx.jit` compiles this once per labelling of the model, because the
  labels in the Variables' metadata are part of the graph definition.
  """
  return nnx.grad(loss_fn)(model, tokens)


def real_grads(model, step: int):
  return compute_grads(model, TOKENS[step])


def random_grads(model, step: int):
  """Return standard normal gradients shaped like the model's parameters.

  The values depend only on `step`, so two copies of the model get the
  same gradients. Skipping the forward and backward pass keeps eager tests
  fast.
  """
  rng = np.random.default_rng(step)

  def draw(variable):
    return variable.replace(jnp.asarray(rng.standard_normal(variable.shape), jnp.float32))

  return jax.tree.map(draw, params_of(model), is_leaf=is_variable)


def train_with_tx(model, tx, grads_for, *, jit: bool = False, steps: int = STEPS):
  """Apply `steps` steps of `tx.update` to `model` and return each step's updates."""

  def step(model, state, grads):
    params = nnx.state(model, nnx.Param)
    updates, state = tx.update(grads, state, params)
    nnx.update(model, optax.apply_updates(params, updates))
    return updates, state

  if jit:
    step = nnx.jit(step)
  state = tx.init(params_of(model))
  history = []
  for number in range(steps):
    updates, state = step(model, state, grads_for(model, number))
    history.append(updates)
  return history


def train_with_optimizer(model, optimizer, grads_for, *, jit: bool = False, steps: int = STEPS):
  """Apply `steps` steps of `optimizer.update` to `model` and return each step's updates."""

  def step(model, optimizer, grads):
    return optimizer.update(model, grads)

  if jit:
    step = nnx.jit(step)
  return [step(model, optimizer, grads_for(model, number)) for number in range(steps)]


def assert_matches_reference(mgr, transforms: dict, label_of, *, steps: int = 2):
  """Train two copies with `mgr` and with the hand-built partition, and compare.

  Returns:
    The labelled model that `mgr` was built on.
  """
  model = make_model()
  reference = make_model()
  tx = mgr.build(model)
  expected_tx = hand_partition(transforms, label_of)

  actual = train_with_tx(model, tx, random_grads, steps=steps)
  expected = train_with_tx(reference, expected_tx, random_grads, steps=steps)

  assert_trees_close(actual, expected)
  assert_trees_close(params_of(model), params_of(reference))
  return model


def sparse_tree(params, entries: dict[str, dict[tuple[int, ...], float]]):
  """Return zeros shaped like `params` with `entries[path][index]` filled in."""

  def fill(keypath, variable):
    value = np.zeros(variable.shape, np.float32)
    for index, number in entries.get(path_text(keypath), {}).items():
      value[index] = number
    return variable.replace(jnp.asarray(value))

  return jax.tree_util.tree_map_with_path(fill, params, is_leaf=is_variable)


def count_elements(tree) -> int:
  return sum(np.size(leaf) for leaf in jax.tree.leaves(tree))


# The configuration of the `OptimizerManager` docstring, and the same
# configuration written as hand-made labels.


def contract_manager() -> opt.OptimizerManager:
  mgr = opt.OptimizerManager()
  mgr[...] = optax.adam(1e-4)
  mgr["layers", :, "attn"] = optax.adamw(5e-5)
  mgr["layers", mgr.batch[0:4], "mlp"] = optax.adamw(1e-4)
  return mgr


def contract_label(path: str) -> str:
  keys = path.split("/")
  if keys[0] == "layers" and keys[2] == "attn":
    return f"attention {keys[1]}"
  if keys[0] == "layers" and keys[2] == "mlp" and int(keys[1]) < 4:
    return "mlp 0-3"
  return "default"


def contract_transforms() -> dict:
  transforms = {"default": optax.adam(1e-4), "mlp 0-3": optax.adamw(1e-4)}
  for layer in range(DEPTH):
    transforms[f"attention {layer}"] = optax.adamw(5e-5)
  return transforms


# The public API, on the configuration of the OptimizerManager docstring.


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_contract_tx_update(jit):
  model = make_model()
  reference = nnx.clone(model)
  tx = contract_manager().build(model)
  expected_tx = hand_partition(contract_transforms(), contract_label)

  actual = train_with_tx(model, tx, real_grads, jit=jit)
  expected = train_with_tx(reference, expected_tx, real_grads, jit=jit)

  assert isinstance(tx, optax.GradientTransformation)
  assert count_elements(as_arrays(actual[-1])) == 324
  assert np.abs(as_arrays(actual[-1])["layers"][0]["mlp"]["kernel"]).max() > 0
  assert_trees_close(actual, expected)
  assert_trees_close(params_of(model), params_of(reference))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_contract_optimizer_update(jit):
  model = make_model()
  reference = nnx.clone(model)
  optimizer = opt.Optimizer(model, contract_manager(), wrt=nnx.Param)
  expected_optimizer = nnx.Optimizer(
    reference, hand_partition(contract_transforms(), contract_label), wrt=nnx.Param
  )

  actual = train_with_optimizer(model, optimizer, real_grads, jit=jit)
  expected = train_with_optimizer(reference, expected_optimizer, real_grads, jit=jit)

  assert_trees_close(actual, expected)
  assert_trees_close(params_of(model), params_of(reference))
  assert int(optimizer.step[...]) == STEPS
  assert len(optimizer.opt_state.inner_states) == len(contract_transforms())


def test_contract_state_per_group():
  model = make_model()
  tx = contract_manager().build(model)
  state = tx.init(params_of(model))

  expected_labels = {"...", "layers/0:4/mlp", *(f"layers/{i}/attn" for i in range(DEPTH))}
  assert set(state.inner_states) == expected_labels
  # Adam keeps mu and nu for each Variable and one count per group.
  assert len(jax.tree.leaves(state.inner_states["layers/0:4/mlp"])) == 2 * 8 + 1
  assert len(jax.tree.leaves(state.inner_states["layers/2/attn"])) == 2 * 2 + 1
  assert len(jax.tree.leaves(state.inner_states["..."])) == 2 * 19 + 1


# Grouping rules, each against a hand-built partition.


def test_slice_group_per_layer():
  mgr = opt.OptimizerManager()
  mgr[...] = clipped_sgd(1.0)
  mgr["layers", :, "attn"] = clipped_sgd(2.0)

  def label_of(path):
    keys = path.split("/")
    return f"attn {keys[1]}" if "/attn/" in path else "rest"

  transforms = {"rest": clipped_sgd(1.0)}
  transforms.update({f"attn {layer}": clipped_sgd(2.0) for layer in range(DEPTH)})
  model = assert_matches_reference(mgr, transforms, label_of)

  assert label_at(model, "layers/2/attn/kernel") == "layers/2/attn"
  assert label_at(model, "layers/5/attn/bias") == "layers/5/attn"
  assert label_at(model, "layers/2/mlp/kernel") == "..."


def test_batch_one_group():
  mgr = opt.OptimizerManager()
  mgr[...] = clipped_sgd(1.0)
  mgr["layers", mgr.batch[1:4], "attn"] = clipped_sgd(2.0)

  def label_of(path):
    keys = path.split("/")
    if "/attn/" in path and 1 <= int(keys[1]) < 4:
      return "attn 1-3"
    return "rest"

  transforms = {"rest": clipped_sgd(1.0), "attn 1-3": clipped_sgd(2.0)}
  model = assert_matches_reference(mgr, transforms, label_of)

  assert label_at(model, "layers/1/attn/kernel") == "layers/1:4/attn"
  assert label_at(model, "layers/3/attn/bias") == "layers/1:4/attn"
  assert label_at(model, "layers/4/attn/bias") == "..."


def test_batch_list_one_group():
  mgr = opt.OptimizerManager()
  mgr[...] = clipped_sgd(1.0)
  mgr["layers", opt.batch[1, 3], "mlp"] = clipped_sgd(2.0)

  def label_of(path):
    return "mlp 1,3" if re.fullmatch(r"layers/[13]/mlp/.*", path) else "rest"

  transforms = {"rest": clipped_sgd(1.0), "mlp 1,3": clipped_sgd(2.0)}
  model = assert_matches_reference(mgr, transforms, label_of)

  assert label_at(model, "layers/3/mlp/kernel") == "layers/1,3/mlp"


def test_list_group_per_entry():
  mgr = opt.OptimizerManager()
  mgr[...] = clipped_sgd(1.0)
  mgr["layers", [0, 2], ["attn", "mlp"]] = clipped_sgd(2.0)

  def label_of(path):
    keys = path.split("/")
    if keys[0] == "layers" and keys[1] in ("0", "2") and keys[2] in ("attn", "mlp"):
      return f"{keys[2]} {keys[1]}"
    return "rest"

  transforms = {"rest": clipped_sgd(1.0)}
  for layer in (0, 2):
    transforms[f"attn {layer}"] = clipped_sgd(2.0)
    transforms[f"mlp {layer}"] = clipped_sgd(2.0)
  model = assert_matches_reference(mgr, transforms, label_of)

  assert label_at(model, "layers/2/mlp/bias") == "layers/2/mlp"
  assert label_at(model, "layers/0/attn/kernel") == "layers/0/attn"
  assert label_at(model, "layers/1/attn/kernel") == "..."


def test_int_overrides_slice():
  mgr = opt.OptimizerManager()
  mgr[...] = clipped_sgd(1.0)
  mgr["layers", :] = clipped_sgd(2.0)
  mgr["layers", 3] = clipped_sgd(3.0)

  def label_of(path):
    keys = path.split("/")
    return f"layer {keys[1]}" if keys[0] == "layers" else "rest"

  transforms = {"rest": clipped_sgd(1.0)}
  transforms.update({f"layer {layer}": clipped_sgd(2.0) for layer in range(DEPTH)})
  transforms["layer 3"] = clipped_sgd(3.0)
  model = assert_matches_reference(mgr, transforms, label_of)

  assert label_at(model, "layers/3/norm/scale") == "layers/3"
  assert label_at(model, "layers/4/norm/scale") == "layers/4"


def test_negative_int_from_end():
  mgr = opt.OptimizerManager()
  mgr[...] = clipped_sgd(1.0)
  mgr["layers", -2] = clipped_sgd(2.0)

  def label_of(path):
    return "layer 4" if path.startswith("layers/4/") else "rest"

  transforms = {"rest": clipped_sgd(1.0), "layer 4": clipped_sgd(2.0)}
  model = assert_matches_reference(mgr, transforms, label_of)

  assert label_at(model, "layers/4/attn/kernel") == "layers/4"
  assert label_at(model, "layers/5/attn/kernel") == "..."


def test_ellipsis_any_depth():
  mgr = opt.OptimizerManager()
  mgr[...] = clipped_sgd(1.0)
  mgr[..., "bias"] = clipped_sgd(2.0)

  def label_of(path):
    return "biases" if path.endswith("/bias") else "rest"

  transforms = {"rest": clipped_sgd(1.0), "biases": clipped_sgd(2.0)}
  model = assert_matches_reference(mgr, transforms, label_of)

  assert label_at(model, "head/bias") == ".../bias"
  assert label_at(model, "layers/3/norm/bias") == ".../bias"
  assert label_at(model, "layers/3/norm/scale") == "..."


def test_ellipsis_in_middle():
  mgr = opt.OptimizerManager()
  mgr[...] = clipped_sgd(1.0)
  mgr["layers", ..., "kernel"] = clipped_sgd(2.0)

  def label_of(path):
    if path.startswith("layers/") and path.endswith("/kernel"):
      return "layer kernels"
    return "rest"

  transforms = {"rest": clipped_sgd(1.0), "layer kernels": clipped_sgd(2.0)}
  model = assert_matches_reference(mgr, transforms, label_of)

  assert label_at(model, "layers/0/mlp/kernel") == "layers/.../kernel"
  assert label_at(model, "head/kernel") == "..."


def test_type_element_one_group():
  mgr = opt.OptimizerManager()
  mgr[...] = clipped_sgd(1.0)
  mgr[..., nnx.LayerNorm] = clipped_sgd(2.0)

  def label_of(path):
    return "norms" if "/norm/" in path else "rest"

  transforms = {"rest": clipped_sgd(1.0), "norms": clipped_sgd(2.0)}
  model = assert_matches_reference(mgr, transforms, label_of)

  assert label_at(model, "layers/5/norm/scale") == ".../LayerNorm"
  assert label_at(model, "layers/5/mlp/bias") == "..."


def test_type_after_slice_splits():
  mgr = opt.OptimizerManager()
  mgr[...] = clipped_sgd(1.0)
  mgr["layers", 0:2, nnx.Linear] = clipped_sgd(2.0)

  def label_of(path):
    keys = path.split("/")
    if keys[0] == "layers" and keys[1] in ("0", "1") and keys[2] != "norm":
      return f"linears {keys[1]}"
    return "rest"

  transforms = {
    "rest": clipped_sgd(1.0),
    "linears 0": clipped_sgd(2.0),
    "linears 1": clipped_sgd(2.0),
  }
  model = assert_matches_reference(mgr, transforms, label_of)

  assert label_at(model, "layers/1/mlp/kernel") == "layers/1/Linear"
  assert label_at(model, "layers/1/attn/bias") == "layers/1/Linear"


def test_later_overrides_per_variable():
  mgr = opt.OptimizerManager()
  mgr[...] = clipped_sgd(1.0)
  mgr["layers", opt.batch[:]] = clipped_sgd(2.0)
  mgr["layers", opt.batch[:], "mlp"] = clipped_sgd(3.0)
  mgr["layers", 0, "mlp", "bias"] = clipped_sgd(4.0)

  def label_of(path):
    if path == "layers/0/mlp/bias":
      return "first mlp bias"
    if re.fullmatch(r"layers/\d+/mlp/.*", path):
      return "mlps"
    if path.startswith("layers/"):
      return "layers"
    return "rest"

  transforms = {
    "rest": clipped_sgd(1.0),
    "layers": clipped_sgd(2.0),
    "mlps": clipped_sgd(3.0),
    "first mlp bias": clipped_sgd(4.0),
  }
  model = assert_matches_reference(mgr, transforms, label_of)

  assert label_at(model, "layers/0/mlp/bias") == "layers/0/mlp/bias"
  assert label_at(model, "layers/0/mlp/kernel") == "layers/:/mlp"
  assert label_at(model, "layers/0/attn/kernel") == "layers/:"
  assert label_at(model, "embed/embedding") == "..."


def frozen_manager() -> opt.OptimizerManager:
  mgr = opt.OptimizerManager()
  mgr[...] = optax.adam(1e-2)
  mgr["layers", 0] = None
  mgr["head", "bias"] = None
  return mgr


def test_none_zero_updates():
  mgr = frozen_manager()

  def label_of(path):
    return "frozen" if path.startswith("layers/0/") or path == "head/bias" else "rest"

  transforms = {"rest": optax.adam(1e-2), "frozen": optax.set_to_zero()}
  model = assert_matches_reference(mgr, transforms, label_of)
  updates = as_arrays(train_with_tx(model, mgr.build(model), random_grads, steps=1)[0])

  assert not np.any(updates["head"]["bias"])
  assert not np.any(updates["layers"][0]["attn"]["kernel"])
  assert not np.any(updates["layers"][0]["norm"]["scale"])
  assert np.all(updates["head"]["kernel"] != 0)


def test_none_keeps_params():
  model = make_model()
  before = as_arrays(params_of(model))
  optimizer = opt.Optimizer(model, frozen_manager(), wrt=nnx.Param)
  train_with_optimizer(model, optimizer, random_grads, steps=2)
  after = as_arrays(params_of(model))

  np.testing.assert_array_equal(after["head"]["bias"], before["head"]["bias"])
  jax.tree.map(np.testing.assert_array_equal, after["layers"][0], before["layers"][0])
  trained_kernel = after["layers"][1]["attn"]["kernel"]
  assert not np.allclose(trained_kernel, before["layers"][1]["attn"]["kernel"])


def test_none_holds_no_state():
  model = make_model()
  groups = frozen_manager().label(model)
  state = frozen_manager().build(model).init(params_of(model))

  assert groups["layers/0"].frozen
  assert groups["head/bias"].frozen
  assert state.inner_states["layers/0"].inner_state == optax.EmptyState()
  assert state.inner_states["head/bias"].inner_state == optax.EmptyState()
  assert jax.tree.leaves(state.inner_states["layers/0"]) == []
  # 324 elements, less 48 in layer 0 and 4 in the head bias, leaves 272
  # trained elements. Adam keeps mu and nu for each, plus one count.
  assert count_elements(state) == 2 * 272 + 1


# Separate versus shared state, with hand-computed numbers.
#
# Only the MLPs are trained, with clip_by_global_norm(1) then SGD(1), so an
# update is -g * min(1, 1 / norm) where norm covers the gradient's group.
# Layer 0's gradient has norm 5, layer 1's 0.5 and layer 2's 2.

SPARSE_GRADS = {
  "layers/0/mlp/kernel": {(0, 0): 3.0},
  "layers/0/mlp/bias": {(1,): 4.0},
  "layers/1/mlp/kernel": {(1, 1): 0.5},
  "layers/2/mlp/kernel": {(2, 3): 2.0},
}
PER_LAYER_UPDATES = {
  "layers/0/mlp/kernel": {(0, 0): -0.6},
  "layers/0/mlp/bias": {(1,): -0.8},
  "layers/1/mlp/kernel": {(1, 1): -0.5},
  "layers/2/mlp/kernel": {(2, 3): -1.0},
}
# One group over all layers: norm sqrt(9 + 16 + 0.25 + 4) = sqrt(29.25).
JOINT_SCALE = 1.0 / np.sqrt(29.25)
JOINT_UPDATES = {
  "layers/0/mlp/kernel": {(0, 0): -3.0 * JOINT_SCALE},
  "layers/0/mlp/bias": {(1,): -4.0 * JOINT_SCALE},
  "layers/1/mlp/kernel": {(1, 1): -0.5 * JOINT_SCALE},
  "layers/2/mlp/kernel": {(2, 3): -2.0 * JOINT_SCALE},
}
# Layers 0 and 2 share a group with norm sqrt(9 + 16 + 4) = sqrt(29), and
# layer 1 is alone.
PAIR_SCALE = 1.0 / np.sqrt(29.0)
PAIR_UPDATES = {
  "layers/0/mlp/kernel": {(0, 0): -3.0 * PAIR_SCALE},
  "layers/0/mlp/bias": {(1,): -4.0 * PAIR_SCALE},
  "layers/1/mlp/kernel": {(1, 1): -0.5},
  "layers/2/mlp/kernel": {(2, 3): -2.0 * PAIR_SCALE},
}


def clipped_mlp_updates(*keys):
  """Return the parameters and one step's updates on SPARSE_GRADS when `keys` get clipped SGD."""
  model = make_model()
  mgr = opt.OptimizerManager()
  mgr[...] = None
  for key in keys:
    mgr[key] = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0))
  tx = mgr.build(model)
  params = params_of(model)
  updates, _ = tx.update(sparse_tree(params, SPARSE_GRADS), tx.init(params), params)
  return params, updates


@pytest.mark.parametrize(
  ("keys", "expected"),
  [
    ([("layers", slice(None), "mlp")], PER_LAYER_UPDATES),
    ([("layers", [0, 1, 2], "mlp")], PER_LAYER_UPDATES),
    ([("layers", opt.batch[:], "mlp")], JOINT_UPDATES),
    ([("layers", ..., "mlp")], JOINT_UPDATES),
    ([("layers", opt.batch[:], "mlp"), ("layers", 1, "mlp")], PAIR_UPDATES),
    ([("layers", opt.batch[0, 1, 2], "mlp"), ("layers", 1)], PAIR_UPDATES),
  ],
  ids=["slice", "list", "batch", "ellipsis", "int-override", "batch-list-override"],
)
def test_clip_grouping_numbers(keys, expected):
  params, updates = clipped_mlp_updates(*keys)

  assert_trees_close(updates, sparse_tree(params, expected))


def test_clip_per_layer_exact():
  _, updates = clipped_mlp_updates(("layers", slice(None), "mlp"))
  layers = as_arrays(updates)["layers"]

  assert layers[0]["mlp"]["kernel"][0, 0] == pytest.approx(-0.6, rel=1e-6)
  assert layers[0]["mlp"]["bias"][1] == pytest.approx(-0.8, rel=1e-6)
  assert layers[1]["mlp"]["kernel"][1, 1] == pytest.approx(-0.5, rel=1e-6)
  assert layers[2]["mlp"]["kernel"][2, 3] == pytest.approx(-1.0, rel=1e-6)


def test_clip_joint_exact():
  _, updates = clipped_mlp_updates(("layers", opt.batch[:], "mlp"))
  layers = as_arrays(updates)["layers"]

  assert layers[0]["mlp"]["kernel"][0, 0] == pytest.approx(-0.5547002, rel=1e-6)
  assert layers[0]["mlp"]["bias"][1] == pytest.approx(-0.7396003, rel=1e-6)
  assert layers[1]["mlp"]["kernel"][1, 1] == pytest.approx(-0.0924500, rel=1e-6)
  assert layers[2]["mlp"]["kernel"][2, 3] == pytest.approx(-0.3698001, rel=1e-6)


# Function rules.


def test_rule_modules_and_param():
  model = make_model()
  model.layers[2].attn.kernel.set_metadata("tag", "marked")
  calls = {}

  def record(modules, param):
    calls[param.path] = (modules, param)
    return optax.sgd(0.1)

  mgr = opt.OptimizerManager()
  mgr[...] = record
  mgr.build(model)
  modules, param = calls[("layers", 2, "attn", "kernel")]
  kernel = model.layers[2].attn.kernel

  assert len(modules) == 4
  assert modules[0] is model
  assert modules[1] is model.layers
  assert modules[2] is model.layers[2]
  assert modules[-1] is model.layers[2].attn
  assert calls[("embed", "embedding")][0][-1] is model.embed
  assert param.shape == (WIDTH, WIDTH)
  assert param.dtype == jnp.float32
  assert param.ndim == 2
  assert param.path == ("layers", 2, "attn", "kernel")
  assert param.metadata["tag"] == "marked"
  assert param.sharding == kernel.get_value().sharding
  assert calls[("layers", 2, "norm", "scale")][1].ndim == 1


def test_rule_called_per_won_variable():
  calls = []

  def record(modules, param):
    calls.append(param.path)
    return optax.sgd(0.1)

  mgr = opt.OptimizerManager()
  mgr[...] = optax.sgd(0.1)
  mgr["layers", :] = record
  mgr["layers", 0] = None
  mgr.build(make_model())

  assert len(calls) == (DEPTH - 1) * 6
  assert len(set(calls)) == len(calls)
  assert not any(path[1] == 0 for path in calls)


def test_rule_fresh_transform_shares_state():
  model = make_model()
  mgr = opt.OptimizerManager()
  mgr[...] = optax.adam(1e-3)
  mgr["layers", :] = lambda modules, param: optax.adamw(1e-3)
  groups = mgr.label(model)
  state = mgr.build(model).init(params_of(model))

  assert len(groups) == 1 + DEPTH
  assert groups.labels[1:] == tuple(f"layers/{layer}" for layer in range(DEPTH))
  # One AdamW state per layer, with one count and mu and nu for each of the
  # layer's 6 Variables. The default Adam group has 3 Variables.
  assert len(jax.tree.leaves(state.inner_states["layers/3"])) == 1 + 2 * 6
  assert len(jax.tree.leaves(state)) == (1 + 2 * 3) + DEPTH * (1 + 2 * 6)


def test_rule_fresh_transform_numbers():
  mgr = opt.OptimizerManager()
  mgr[...] = clipped_sgd(1.0)
  mgr["layers", opt.batch[:]] = lambda modules, param: clipped_sgd(2.0)

  def label_of(path):
    return "layers" if path.startswith("layers/") else "rest"

  transforms = {"rest": clipped_sgd(1.0), "layers": clipped_sgd(2.0)}
  model = assert_matches_reference(mgr, transforms, label_of)

  assert label_at(model, "layers/4/mlp/bias") == "layers/:"


def test_rule_configs_split_groups():
  mgr = opt.OptimizerManager()
  mgr[...] = clipped_sgd(1.0)
  mgr["layers", opt.batch[:]] = lambda modules, param: clipped_sgd(
    2.0 if param.ndim == 2 else 0.5
  )

  def label_of(path):
    if not path.startswith("layers/"):
      return "rest"
    return "matrices" if path.endswith("/kernel") else "vectors"

  transforms = {
    "rest": clipped_sgd(1.0),
    "matrices": clipped_sgd(2.0),
    "vectors": clipped_sgd(0.5),
  }
  model = assert_matches_reference(mgr, transforms, label_of)

  # The first Variable in NNX order is layers/0/attn/bias, a vector.
  assert label_at(model, "layers/0/attn/bias") == "layers/:#1"
  assert label_at(model, "layers/5/norm/scale") == "layers/:#1"
  assert label_at(model, "layers/5/mlp/kernel") == "layers/:#2"


def test_rule_prebuilt_transforms_group():
  # A rule that hands out prebuilt transforms, one object per kind, more
  # kinds than the rule results that labelling remembers by identity.
  prebuilt = [clipped_sgd(0.1 * (kind + 1)) for kind in range(20)]
  kind_of = {"attn": 0, "mlp": 1, "norm": 2}
  mgr = opt.OptimizerManager()
  mgr[...] = clipped_sgd(1.0)
  mgr["layers", opt.batch[:]] = lambda modules, param: prebuilt[
    kind_of[param.path[2]] + 3 * (param.path[-1] == "bias") + 6 * (param.path[1] % 3)
  ]

  def label_of(path):
    keys = path.split("/")
    if keys[0] != "layers":
      return "rest"
    return f"{keys[2]} {keys[-1] == 'bias'} {int(keys[1]) % 3}"

  transforms = {"rest": clipped_sgd(1.0)}
  for module, kind in kind_of.items():
    for is_bias in (False, True):
      for remainder in range(3):
        transform = clipped_sgd(0.1 * (kind + 3 * is_bias + 6 * remainder + 1))
        transforms[f"{module} {is_bias} {remainder}"] = transform
  model = assert_matches_reference(mgr, transforms, label_of)

  labels = {label_at(model, f"layers/{layer}/mlp/kernel") for layer in range(DEPTH)}
  assert len(labels) == 3


def test_rule_none_freezes():
  mgr = opt.OptimizerManager()
  mgr[...] = clipped_sgd(1.0)
  mgr["layers", :] = lambda modules, param: None if param.ndim == 1 else clipped_sgd(2.0)

  def label_of(path):
    keys = path.split("/")
    if keys[0] != "layers":
      return "rest"
    return f"kernels {keys[1]}" if keys[-1] == "kernel" else "frozen"

  transforms = {"rest": clipped_sgd(1.0), "frozen": optax.set_to_zero()}
  transforms.update({f"kernels {layer}": clipped_sgd(2.0) for layer in range(DEPTH)})
  model = assert_matches_reference(mgr, transforms, label_of)

  assert label_at(model, "layers/0/attn/bias") == "layers/0#1"
  assert label_at(model, "layers/0/attn/kernel") == "layers/0#2"


# Labels in metadata.


def test_labels_plain_strings():
  model = make_model()
  contract_manager().build(model)
  expected = {
    "embed/embedding": "...",
    "head/kernel": "...",
    "layers/0/attn/kernel": "layers/0/attn",
    "layers/5/attn/bias": "layers/5/attn",
    "layers/0/mlp/kernel": "layers/0:4/mlp",
    "layers/3/mlp/bias": "layers/0:4/mlp",
    "layers/4/mlp/kernel": "...",
    "layers/2/norm/scale": "...",
  }

  for path, label in expected.items():
    assert label_at(model, path) == label, path
    assert type(label_at(model, path)) is str, path


def test_build_twice_same_result():
  model = make_model()
  first_tx = contract_manager().build(model)
  first_labels = as_labels(model)
  first_state = first_tx.init(params_of(model))
  second_tx = contract_manager().build(model)
  second_state = second_tx.init(params_of(model))

  other = make_model()
  other_state = contract_manager().build(other).init(params_of(other))

  assert as_labels(model) == first_labels
  assert jax.tree.structure(second_state) == jax.tree.structure(first_state)
  assert as_labels(other) == first_labels
  assert jax.tree.structure(other_state) == jax.tree.structure(first_state)


def as_labels(model) -> dict[str, str]:
  return {
    path_text(keypath): variable.get_metadata()[opt.LABEL_KEY]
    for keypath, variable in jax.tree_util.tree_flatten_with_path(
      params_of(model), is_leaf=is_variable
    )[0]
  }


def test_build_keeps_other_metadata():
  model = make_model()
  kernel = model.layers[1].mlp.kernel
  kernel.set_metadata("tag", "marked")
  before = dict(kernel.get_metadata())
  contract_manager().build(model)
  after = dict(kernel.get_metadata())

  assert after.pop(opt.LABEL_KEY) == "layers/0:4/mlp"
  assert after == before


def test_rebuild_replaces_labels():
  model = make_model()
  contract_manager().build(model)
  mgr = opt.OptimizerManager()
  mgr[...] = optax.sgd(0.1)
  mgr["layers", :] = optax.sgd(0.2)
  mgr.build(model)

  assert label_at(model, "layers/0/attn/kernel") == "layers/0"
  assert label_at(model, "layers/4/mlp/bias") == "layers/4"
  assert label_at(model, "head/bias") == "..."


class TiedAndLong(nnx.Module):
  """Keys whose sorted order differs from attribute order, and a tied Param."""

  def __init__(self):
    shared = nnx.Param(jnp.zeros((2,)))
    self.zeta = shared
    # Twelve entries: sorted as ints, 10 and 11 come after 9, not after 1.
    self.items = nnx.List([nnx.Param(jnp.full((2,), float(i))) for i in range(12)])
    self.table = nnx.Dict(beta=nnx.Param(jnp.ones((3,))), alpha=nnx.Param(jnp.ones((1,))))
    self.alias = shared


def test_build_follows_state_order():
  model = TiedAndLong()
  mgr = opt.OptimizerManager()
  mgr[...] = optax.sgd(1.0)
  mgr["items", 10] = optax.sgd(0.5)
  mgr["table", "beta"] = optax.sgd(0.25)
  tx = mgr.build(model)

  state = nnx.state(model, nnx.Param)
  grads = jax.tree.map(jnp.ones_like, state)
  updates, _ = jax.jit(tx.update)(grads, tx.init(state), state)
  flat = jax.tree_util.tree_flatten_with_path(updates, is_leaf=is_variable)[0]
  paths = [path_text(keypath) for keypath, _ in flat]
  state_paths = [
    path_text(keypath)
    for keypath, _ in jax.tree_util.tree_flatten_with_path(state, is_leaf=is_variable)[0]
  ]

  assert paths == state_paths
  # The tied Param is one leaf, at the path NNX reports first.
  assert ("zeta" in paths) != ("alias" in paths)
  assert paths.index("items/9") + 1 == paths.index("items/10")
  rates = {"items/10": 0.5, "table/beta": 0.25}
  for path, (_, update) in zip(paths, flat):
    np.testing.assert_allclose(update.get_value(), -rates.get(path, 1.0), err_msg=path)


# opt.Optimizer.


def test_optimizer_is_nnx_optimizer():
  optimizer = opt.Optimizer(make_model(), contract_manager(), wrt=nnx.Param)

  assert issubclass(opt.Optimizer, nnx.Optimizer)
  assert isinstance(optimizer, nnx.Optimizer)


def test_optimizer_created_in_jit():
  model = make_model()
  reference = nnx.clone(model)

  @nnx.jit
  def create(model):
    return opt.Optimizer(model, contract_manager(), wrt=nnx.Param)

  # checking_leaks raises if a tracer from `create` stays reachable, for
  # example in the optimizer's groups or in the Variables' metadata.
  with jax.checking_leaks():
    optimizer = create(model)
  expected_optimizer = nnx.Optimizer(
    reference, hand_partition(contract_transforms(), contract_label), wrt=nnx.Param
  )
  actual = train_with_optimizer(model, optimizer, random_grads, steps=2)
  expected = train_with_optimizer(reference, expected_optimizer, random_grads, steps=2)

  assert isinstance(optimizer, opt.Optimizer)
  assert optimizer.groups.labels[0] == "..."
  assert_trees_close(actual, expected)
  assert_trees_close(params_of(model), params_of(reference))


def test_optimizer_state_contents():
  model = make_model()
  optimizer = opt.Optimizer(model, contract_manager(), wrt=nnx.Param)
  state = nnx.state(optimizer)

  assert set(state.keys()) == {"step", "opt_state"}
  assert int(state["step"][...]) == 0
  assert "layers/0:4/mlp" in state["opt_state"]["inner_states"]

  train_with_optimizer(model, optimizer, random_grads, steps=1)

  assert int(nnx.state(optimizer)["step"][...]) == 1


def test_optimizer_split_merge():
  model = make_model()
  optimizer = opt.Optimizer(model, contract_manager(), wrt=nnx.Param)
  train_with_optimizer(model, optimizer, random_grads, steps=1)
  copy = nnx.clone(model)

  graphdef, state = nnx.split(optimizer)
  # Copy the arrays so that the merged optimizer shares no Variable with
  # the original one.
  merged = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
  actual = train_with_optimizer(copy, merged, random_grads, steps=2)
  expected = train_with_optimizer(model, optimizer, random_grads, steps=2)

  assert isinstance(merged, opt.Optimizer)
  assert int(merged.step[...]) == 3
  assert_trees_close(actual, expected)
  assert_trees_close(params_of(copy), params_of(model))


def test_build_tx_in_nnx_optimizer():
  model = make_model()
  reference = nnx.clone(model)
  optimizer = nnx.Optimizer(model, contract_manager().build(model), wrt=nnx.Param)
  expected_optimizer = nnx.Optimizer(
    reference, hand_partition(contract_transforms(), contract_label), wrt=nnx.Param
  )

  actual = train_with_optimizer(model, optimizer, random_grads, steps=2)
  expected = train_with_optimizer(reference, expected_optimizer, random_grads, steps=2)

  assert_trees_close(actual, expected)
  assert_trees_close(params_of(model), params_of(reference))


def test_optimizer_plain_transform():
  model = make_model()
  reference = nnx.clone(model)
  optimizer = opt.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  expected_optimizer = nnx.Optimizer(reference, optax.adam(1e-3), wrt=nnx.Param)

  actual = train_with_optimizer(model, optimizer, random_grads, steps=2)
  expected = train_with_optimizer(reference, expected_optimizer, random_grads, steps=2)

  assert optimizer.groups.labels == ("...",)
  assert_trees_close(actual, expected)
  assert_trees_close(params_of(model), params_of(reference))


def test_groups_table(capsys):
  optimizer = opt.Optimizer(make_model(), contract_manager(), wrt=nnx.Param)
  print(optimizer.groups)
  lines = capsys.readouterr().out.splitlines()
  rows = [re.split(r"\s{2,}", line.strip()) for line in lines]

  assert rows[0] == ["group", "assignment", "variables", "elements"]
  assert set(lines[1]) == {"-", " "}
  # Header, separator, the default group, one group per attention, the MLPs.
  assert len(rows) == 2 + 1 + DEPTH + 1
  assert rows[2] == ["...", "mgr[...] = transform", "19", "124"]
  assert rows[3] == ["layers/0/attn", "mgr['layers', :, 'attn'] = transform", "2", "20"]
  assert rows[8] == ["layers/5/attn", "mgr['layers', :, 'attn'] = transform", "2", "20"]
  assert rows[9] == ["layers/0:4/mlp", "mgr['layers', batch[0:4], 'mlp'] = transform", "8", "80"]
