"""Check optimizer-state sharding on 8 simulated CPU devices and print JSON.

`tests/test_sharding.py` runs this file in a subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=8`, because the pytest
process has already started JAX with one device. Usage:

  python tests/sharding_script.py auto|explicit
"""

import json
import sys

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import AxisType

from ueaj import opt

_init = nnx.initializers.lecun_normal()


def _kernel(*names):
  return nnx.with_partitioning(_init, names)


class Block(nnx.Module):
  def __init__(self, rngs, specs):
    attn, bias, mlp = specs
    self.attn = nnx.Linear(
      8, 16, kernel_init=_kernel(*attn),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), bias), rngs=rngs,
    )
    self.mlp = nnx.Linear(16, 8, kernel_init=_kernel(*mlp), use_bias=False, rngs=rngs)

  def __call__(self, x):
    return x + self.mlp(jnp.tanh(self.attn(x)))


FULL = (("data", "model"), ("model",), ("model", "data"))
MODEL_ONLY = ((None, "model"), ("model",), ("model", None))


class Model(nnx.Module):
  def __init__(self, rngs):
    self.layers = nnx.List([Block(rngs, FULL) for _ in range(3)])

    # Layer axis unsharded.
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
    def make_stack(key):
      return Block(nnx.Rngs(key), FULL)

    # Layer axis sharded over 'data'.
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "data"})
    def make_sharded(key):
      return Block(nnx.Rngs(key), MODEL_ONLY)

    self.stack = make_stack(jax.random.split(rngs.params(), 4))
    self.sharded = make_sharded(jax.random.split(rngs.params(), 4))
    self.head = nnx.Linear(8, 4, kernel_init=_kernel(None, "model"), rngs=rngs)

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    for stack in (self.stack, self.sharded):
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def run(x, block):
        return block(x)

      x = run(x, stack)
    return self.head(x)


def manager():
  mgr = opt.OptimizerManager()
  mgr.declare_stack("stack")
  mgr.declare_stack("sharded")
  mgr[...] = optax.adamw(1e-3)
  mgr["layers", :] = optax.adam(1e-3)
  mgr["layers", opt.batch[1:], "mlp"] = None
  mgr["stack", :] = optax.adam(1e-3)
  mgr["stack", opt.batch[2:]] = optax.sgd(1e-2, momentum=0.9)
  mgr["sharded", :] = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
  mgr["sharded", opt.batch[:2], "mlp"] = None
  return mgr


def state_report(model, optimizer):
  """Compare every state array with the parameter it mirrors."""
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  rows = []
  seen_keys = set()
  for group in optimizer.groups:
    key, _ = optimizer.groups.unit_of(group.label)
    if key in seen_keys:
      continue
    seen_keys.add(key)
    state = nnx.as_pure(optimizer.opt_state.inner_states[key].inner_state)
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
      entries = [
        getattr(entry, "key", getattr(entry, "idx", getattr(entry, "name", None)))
        for entry in keypath
      ]
      where = jax.tree_util.keystr(keypath)
      # Parameter-shaped state is `...[unit key][i]`, or `...[i]` right
      # under a state field for a vectorized unit (key contains '~'), where
      # i is the piece: the group's i-th path.
      index = None
      if key in entries[:-1]:
        index = entries[entries.index(key) + 1]
      elif "~" in key and isinstance(entries[-1], int) and isinstance(entries[-2], str):
        index = entries[-1]
      row = {"unit": key, "where": where, "shape": list(leaf.shape),
             "spec": str(leaf.sharding.spec)}
      if index is None:
        row["kind"] = "other"
        row["ok"] = bool(leaf.sharding.is_fully_replicated)
      else:
        path = group.paths[index]
        param = params[path][...]
        row["kind"] = "param"
        row["param"] = "/".join(map(str, path))
        row["param_spec"] = str(param.sharding.spec)
        row["ok"] = bool(leaf.sharding.is_equivalent_to(param.sharding, leaf.ndim))
      row["leading"] = str(leaf.sharding.spec[0]) if leaf.ndim and len(leaf.sharding.spec) else None
      row["ndim"] = leaf.ndim
      rows.append(row)
  # A vectorized unit's per-layer vectors (counts) are sharded as the layer
  # axis of its parameter-shaped state.
  for row in rows:
    if row["kind"] == "other" and "~" in row["unit"] and row["ndim"] == 1:
      leading = {r["leading"] for r in rows if r["unit"] == row["unit"] and r["kind"] == "param"}
      row["ok"] = leading == {row["leading"]} or (row["ok"] and leading == {"None"})
  return rows


def main():
  mode = sys.argv[1]
  axis_type = AxisType.Explicit if mode == "explicit" else AxisType.Auto
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type, axis_type))
  result = {"devices": jax.device_count()}
  with jax.set_mesh(mesh):
    model = Model(nnx.Rngs(0))
    # flax 0.12.8 leaves the arrays of an `nnx.vmap` stack unsharded along the
    # layer axis even where the metadata names a mesh axis. Place every
    # parameter as its metadata specifies.
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.device_put(state, nnx.get_named_sharding(state, mesh)))
    before = {
      "/".join(map(str, path)): dict(variable.get_metadata())
      for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    shardings_before = {
      path: variable[...].sharding
      for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    mgr = manager()
    # Labels written inside nnx.jit do not reach the Variables outside it
    # (flax 0.12.8), so label outside too, to check the metadata.
    mgr.label(model)
    optimizer = nnx.jit(lambda model: opt.Optimizer(model, mgr, wrt=nnx.Param))(model)
    after = {
      "/".join(map(str, path)): dict(variable.get_metadata())
      for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    result["metadata_before"] = {k: repr(sorted(v.items())) for k, v in before.items()}
    result["metadata_after"] = {
      k: repr(sorted((n, m) for n, m in v.items() if n != opt.LABEL_KEY))
      for k, v in after.items()
    }
    result["labels"] = {k: repr(v.get(opt.LABEL_KEY)) for k, v in after.items()}
    result["groups"] = list(optimizer.groups.labels)
    result["units"] = {label: list(optimizer.groups.unit_of(label)) for label in optimizer.groups.labels}
    result["init"] = state_report(model, optimizer)

    @nnx.jit
    def train_step(model, optimizer, x):
      if mode == "explicit":
        # Explicit axes need output shardings for every matmul of the
        # forward pass, but a loss on the parameters alone needs none.
        def loss_fn(model):
          leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
          return sum(jnp.sum(jnp.tanh(leaf) * x[0, 0]) for leaf in leaves)
      else:
        def loss_fn(model):
          return (model(x) ** 2).mean()

      loss, grads = nnx.value_and_grad(loss_fn)(model)
      optimizer.update(model, grads)
      if mode == "auto":
        # With Auto axes, jit picks output shardings, so pin the parameters.
        state = nnx.state(model, nnx.Param)
        nnx.update(model, jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state)))
      return loss

    x = jax.random.normal(jax.random.key(1), (8, 8))
    losses = [float(train_step(model, optimizer, x)) for _ in range(3)]
    result["losses"] = losses
    result["step"] = int(optimizer.step[...])
    result["trained"] = state_report(model, optimizer)
    result["params_moved"] = [
      "/".join(map(str, path))
      for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))
      if not variable[...].sharding.is_equivalent_to(shardings_before[path], variable[...].ndim)
    ]
  print(json.dumps(result))


if __name__ == "__main__":
  main()
