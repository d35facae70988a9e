"""Measure how closely bfloat16 training follows float32 training, with and without master weights.

The model, data and learning-rate schedule are those of `examples/train_lm.py`
(its default size: 4 blocks of width 64, 64-byte context, batch 32, AdamW at
peak 3e-3 with warmup and cosine decay). Three runs start from the same
initialization and see the same batches:

- `float32`: float32 parameters, plain `optax.adamw`;
- `bf16 + master`: bfloat16 parameters, `opt.precision(adamw,
  compute_dtype=float32, master_weights=True)`;
- `bf16`: bfloat16 parameters, `opt.precision(adamw, compute_dtype=float32)`
  without master weights, so every update is rounded into the bfloat16
  parameter.

The bfloat16 runs also compute the forward pass in bfloat16 (the logits are
cast to float32 for the loss). The script prints the mean absolute
difference of the training loss to the float32 run, the final validation
losses and the relative parameter distance to the float32 run.

Usage::

  python benchmarks/precision_trajectory.py            # 200 steps
  python benchmarks/precision_trajectory.py --steps 50 --layers 1 --width 32
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ueaj import opt

_EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train_lm.py"


def load_example():
  """Import `examples/train_lm.py` as a module without running it."""
  spec = importlib.util.spec_from_file_location("train_lm_example", _EXAMPLE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def cast_params(model: nnx.Module, dtype) -> None:
  """Cast every floating `nnx.Param` of `model` to `dtype` in place."""
  state = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda value: value.astype(dtype), state))


def make_run(example, args, variant: str):
  """Build the model and optimizer of one variant, from the same seed."""
  model = example.Transformer(args.layers, args.width, args.heads, rngs=nnx.Rngs(args.seed))
  schedule = example.make_schedule(args)
  adamw = optax.adamw(schedule, weight_decay=args.weight_decay)
  mgr = opt.OptimizerManager()
  if variant == "float32":
    mgr[...] = adamw
  else:
    cast_params(model, jnp.bfloat16)
    mgr[...] = opt.precision(
      adamw, compute_dtype=jnp.float32, master_weights=variant == "bf16 + master"
    )
  return model, opt.Optimizer(model, mgr, wrt=nnx.Param)


def loss_fn(model, batch):
  logits = model(batch["inputs"]).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()


@nnx.jit
def train_step(model, optimizer, batch):
  loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def eval_step(model, batch):
  return loss_fn(model, batch)


def flat_params(model) -> np.ndarray:
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  return np.concatenate([np.asarray(leaf, dtype=np.float32).ravel() for leaf in leaves])


def run_variant(example, args, variant, train_batches, val_batches):
  model, optimizer = make_run(example, args, variant)
  initial = flat_params(model)
  losses = [train_step(model, optimizer, batch) for batch in train_batches]
  losses = np.array([float(loss) for loss in jax.device_get(losses)])
  val = float(np.mean([float(eval_step(model, batch)) for batch in val_batches]))
  return {"loss": losses, "val": val, "initial": initial, "final": flat_params(model)}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
  parser.add_argument("--layers", type=int, default=4, help="transformer blocks")
  parser.add_argument("--width", type=int, default=64, help="model width, in features")
  parser.add_argument("--heads", type=int, default=4, help="attention heads")
  parser.add_argument("--seq-len", type=int, default=64, help="context length, in bytes")
  parser.add_argument("--batch-size", type=int, default=32, help="sequences per step")
  parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
  parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
  parser.add_argument("--seed", type=int, default=0, help="initialization and batch seed")
  args = parser.parse_args(argv)

  example = load_example()
  train_data, val_data = example.split_train_val(example.load_text())
  rng = np.random.default_rng(args.seed)
  train_batches = [
    example.sample_batch(train_data, args.batch_size, args.seq_len, rng) for _ in range(args.steps)
  ]
  val_batches = example.fixed_batches(val_data, 8, args.batch_size, args.seq_len)

  results = {}
  for variant in ("float32", "bf16 + master", "bf16"):
    start = time.perf_counter()
    results[variant] = run_variant(example, args, variant, train_batches, val_batches)
    results[variant]["seconds"] = time.perf_counter() - start

  reference = results["float32"]
  moved = np.linalg.norm(reference["final"] - reference["initial"])
  tail = max(1, args.steps // 4)
  print(
    f"{args.steps} steps, {args.layers} blocks of width {args.width}, seq {args.seq_len},"
    f" batch {args.batch_size}, peak lr {args.lr}"
  )
  header = (
    f"{'run':<14} {'mean |dloss|':>12} {'last-quarter |dloss|':>20}"
    f" {'final train':>11} {'val loss':>8} {'param dist':>10} {'time s':>6}"
  )
  print(header)
  summary = {}
  for variant, result in results.items():
    difference = np.abs(result["loss"] - reference["loss"])
    distance = np.linalg.norm(result["final"] - reference["final"]) / moved
    summary[variant] = {
      "mean_abs_loss_diff": float(difference.mean()),
      "tail_abs_loss_diff": float(difference[-tail:].mean()),
      "final_train_loss": float(result["loss"][-tail:].mean()),
      "val_loss": result["val"],
      "relative_param_distance": float(distance),
    }
    print(
      f"{variant:<14} {difference.mean():>12.4f} {difference[-tail:].mean():>20.4f}"
      f" {result['loss'][-tail:].mean():>11.4f} {result['val']:>8.4f} {distance:>10.4f}"
      f" {result['seconds']:>6.0f}"
    )
  print(
    "param dist: ||params - float32 params|| / ||float32 params - initial params||."
    " final train: mean training loss over the last quarter of the steps."
  )
  return summary


if __name__ == "__main__":
  main()
