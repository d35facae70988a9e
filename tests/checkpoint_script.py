"""A model and optimizer for checkpoint tests, and a command line to train them.

`tests/test_checkpoint.py` imports `build` and `train`, and runs this file in
fresh processes:

  python tests/checkpoint_script.py straight STEPS SAVE_AT CHECKPOINT OUT.npz
  python tests/checkpoint_script.py resume STEPS CHECKPOINT OUT.npz

`straight` trains STEPS steps and saves a checkpoint after SAVE_AT of them.
`resume` restores that checkpoint into a newly built model and optimizer
and trains the remaining steps. Both write the final model and optimizer
state to OUT.npz.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ueaj import opt


class Block(nnx.Module):
  def __init__(self, rngs):
    self.attn = nnx.Linear(4, 4, rngs=rngs)
    self.mlp = nnx.Linear(4, 4, rngs=rngs)

  def __call__(self, x):
    return x + jnp.tanh(self.mlp(self.attn(x)))


class Model(nnx.Module):
  def __init__(self, rngs):
    self.layers = nnx.List([Block(rngs) for _ in range(3)])
    # A dict key that looks like an int must come back as a str.
    self.extra = nnx.Dict({"3": nnx.Linear(4, 4, rngs=rngs)})

    @nnx.vmap(in_axes=0, out_axes=0)
    def make_stack(key):
      return Block(nnx.Rngs(key))

    self.stack = make_stack(jax.random.split(rngs.params(), 4))
    self.dropout = nnx.Dropout(0.25, rngs=rngs)
    self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    x = self.extra["3"](x)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(x, block):
      return block(x)

    x = run(x, self.stack)
    return self.head(self.dropout(x))


def manager(*, variant=0):
  """The configuration; other `variant`s change it for mismatch tests."""
  mgr = opt.OptimizerManager()
  mgr.declare_stack("stack")
  schedule = optax.linear_schedule(1e-2, 1e-3, 10)
  mgr[...] = optax.inject_hyperparams(optax.adamw)(learning_rate=schedule)
  mgr["layers", :] = optax.adam(1e-2)
  mgr["layers", opt.batch[1:], "mlp"] = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
  mgr["layers", 0, "mlp", "bias"] = None
  mgr["extra", "3"] = optax.sgd(1e-2, momentum=0.9)
  mgr["stack", :] = optax.adam(1e-2)
  mgr["stack", opt.batch[2:]] = optax.adam(3e-3)
  if variant == 1:
    mgr["head"] = optax.sgd(1e-2)
  if variant == 2:
    mgr["extra", "3"] = optax.adam(1e-2)
  return mgr


def build(seed=0, variant=0):
  model = Model(nnx.Rngs(seed))
  optimizer = opt.Optimizer(model, manager(variant=variant), wrt=nnx.Param)
  return model, optimizer


@nnx.jit
def train_step(model, optimizer, x, y):
  def loss_fn(model):
    return ((model(x) - y) ** 2).mean()

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


def batch(step):
  key = jax.random.fold_in(jax.random.key(42), step)
  x = jax.random.normal(key, (8, 4))
  return x, jnp.sin(x[:, :2])


def train(model, optimizer, start, stop):
  for step in range(start, stop):
    train_step(model, optimizer, *batch(step))


def flat_arrays(model, optimizer):
  """Return every array of the model and optimizer state, keyed by path."""
  arrays = {}
  for root, state in (("model", nnx.state(model)), ("optimizer", nnx.state(optimizer))):
    for path, variable in nnx.to_flat_state(state):
      value = variable.get_value()
      if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        value = jax.random.key_data(value)
      arrays["/".join(map(repr, (root, *path)))] = np.asarray(value)
  return arrays


def main():
  command = sys.argv[1]
  model, optimizer = build()
  if command == "straight":
    steps, save_at, checkpoint, out = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    train(model, optimizer, 0, save_at)
    opt.save(checkpoint, model, optimizer)
    train(model, optimizer, save_at, steps)
  elif command == "resume":
    steps, checkpoint, out = int(sys.argv[2]), sys.argv[3], sys.argv[4]
    opt.restore(checkpoint, model, optimizer)
    train(model, optimizer, int(optimizer.step[...]), steps)
  else:
    raise SystemExit(f"unknown command {command!r}; use straight or resume")
  np.savez(out, **flat_arrays(model, optimizer))


if __name__ == "__main__":
  main()
