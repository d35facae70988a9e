"""Train a small byte-level transformer language model with per-part optimizers.

The model is a decoder-only transformer written with ``flax.nnx``. It reads
bytes (vocabulary of 256) of the help texts that ship with Python in
``pydoc_data.topics``, so no download is needed. The last tenth of the text
is held out for validation.

``ueaj.opt`` assigns the optimizers: AdamW by default, a learning rate that
falls by a constant factor per block from the top block down, no weight decay
on norms, biases and the token embedding, and optionally a frozen embedding.

Usage::

  python examples/train_lm.py                      # default run
  python examples/train_lm.py --steps 2000 --width 128 --out runs/wide
  python examples/train_lm.py --freeze-embeddings

The run writes ``metrics.json``, ``loss.png`` and ``model.html`` (the model
tree with each parameter's optimizer group) to the ``--out`` folder.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from matplotlib.figure import Figure
from pydoc_data.topics import topics
from tqdm import tqdm

from ueaj import opt

VOCAB_SIZE = 256  # one token per byte value
SAMPLE_PROMPT = "The "
SAMPLE_BYTES = 200
SAMPLE_TEMPERATURE = 0.8


# --------------------------------------------------------------------------- data


def load_text() -> np.ndarray:
  """Load the stdlib help texts as a 1-D array of UTF-8 bytes (dtype uint8)."""
  text = "".join(topics[name] for name in sorted(topics))
  return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def split_train_val(data: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
  """Split the byte array into a training head and a validation tail."""
  split = int(len(data) * (1.0 - val_fraction))
  return data[:split], data[split:]


def windows_to_batch(data: np.ndarray, starts: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
  """Cut ``seq_len + 1`` bytes at each start into inputs and next-byte targets.

  Returns:
    A dict with ``inputs`` and ``targets``, both int32 of shape
    ``(len(starts), seq_len)``.
  """
  windows = data[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)
  return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}


def sample_batch(
  data: np.ndarray, batch_size: int, seq_len: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
  """Draw ``batch_size`` windows at uniformly random offsets."""
  starts = rng.integers(0, len(data) - seq_len, size=batch_size)
  return windows_to_batch(data, starts, seq_len)


def fixed_batches(
  data: np.ndarray, num_batches: int, batch_size: int, seq_len: int
) -> list[dict[str, np.ndarray]]:
  """Cut evenly spaced windows into batches, the same ones on every call.

  Evaluating on fixed windows makes validation losses comparable across
  steps and seeds.
  """
  starts = np.linspace(0, len(data) - seq_len - 1, num_batches * batch_size).astype(np.int64)
  return [
    windows_to_batch(data, chunk, seq_len) for chunk in np.split(starts, num_batches)
  ]


# -------------------------------------------------------------------------- model


def apply_rotary_embedding(x: jax.Array, base: float = 10_000.0) -> jax.Array:
  """Rotate feature pairs of ``x`` by position-dependent angles (RoPE).

  Args:
    x: queries or keys of shape ``(batch, seq, heads, head_dim)``, with an
      even ``head_dim``.
    base: wavelength scale of the lowest frequency.
  """
  seq_len, head_dim = x.shape[1], x.shape[-1]
  half = head_dim // 2
  frequencies = base ** (-jnp.arange(half) / half)
  angles = jnp.arange(seq_len)[:, None] * frequencies[None, :]  # (seq, half)
  cos = jnp.cos(angles)[None, :, None, :]  # shape (1, seq, 1, half), shared by all rows and heads
  sin = jnp.sin(angles)[None, :, None, :]
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


class CausalSelfAttention(nnx.Module):
  """Multi-head self-attention in which each position attends only to itself and earlier ones."""

  def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
    if width % heads or (width // heads) % 2:
      raise ValueError(
        f"invalid width {width} for {heads} heads: the rotary embedding needs an even "
        "head size, so choose --width as a multiple of 2 * --heads"
      )
    self.heads = heads
    self.qkv = nnx.Linear(width, 3 * width, use_bias=False, rngs=rngs)
    self.out = nnx.Linear(width, width, use_bias=False, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, seq_len, width = x.shape
    qkv = self.qkv(x).reshape(batch, seq_len, 3, self.heads, width // self.heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q, k = apply_rotary_embedding(q), apply_rotary_embedding(k)
    y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return self.out(y.reshape(batch, seq_len, width))


class MLP(nnx.Module):
  """Position-wise feed-forward network with a 4x wider GELU hidden layer."""

  def __init__(self, width: int, *, rngs: nnx.Rngs):
    self.up = nnx.Linear(width, 4 * width, rngs=rngs)
    self.down = nnx.Linear(4 * width, width, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.gelu(self.up(x)))


class Block(nnx.Module):
  """Pre-norm transformer block: attention, then MLP, each on a residual branch.

  Attributes:
    layer_idx: depth of the block, 0 for the one next to the embedding. The
      optimizer rule reads it to scale the learning rate.
  """

  def __init__(self, width: int, heads: int, layer_idx: int, *, rngs: nnx.Rngs):
    self.layer_idx = layer_idx
    self.attn_norm = nnx.RMSNorm(width, rngs=rngs)
    self.attn = CausalSelfAttention(width, heads, rngs=rngs)
    self.mlp_norm = nnx.RMSNorm(width, rngs=rngs)
    self.mlp = MLP(width, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.attn_norm(x))
    return x + self.mlp(self.mlp_norm(x))


class Transformer(nnx.Module):
  """Decoder-only language model over bytes."""

  def __init__(self, num_layers: int, width: int, heads: int, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB_SIZE, width, rngs=rngs)
    self.layers = nnx.List(
      [Block(width, heads, layer_idx=i, rngs=rngs) for i in range(num_layers)]
    )
    self.final_norm = nnx.RMSNorm(width, rngs=rngs)
    # A zero head predicts the uniform distribution, so training starts at a
    # loss of exactly ln 256 nats per byte.
    self.head = nnx.Linear(width, VOCAB_SIZE, kernel_init=nnx.initializers.zeros, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Map int tokens of shape ``(batch, seq)`` to next-byte logits ``(batch, seq, 256)``."""
    x = self.embed(tokens)
    for block in self.layers:
      x = block(x)
    return self.head(self.final_norm(x))


# ---------------------------------------------------------------------- optimizer


def make_schedule(args: argparse.Namespace) -> optax.Schedule:
  """Return the learning-rate schedule: warm-up, then cosine decay."""
  # Warm up over the first tenth of training (at most 100 steps), then decay
  # to a tenth of the peak. Optax requires decay_steps > warmup_steps.
  warmup_steps = max(1, min(100, args.steps // 10))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=args.lr,
    warmup_steps=warmup_steps,
    decay_steps=max(args.steps, warmup_steps + 1),
    end_value=args.lr / 10,
  )


def build_optimizer(model: Transformer, args: argparse.Namespace) -> opt.Optimizer:
  """Assign an optax transform to each part of ``model``.

  When several assignments match a parameter, the last one wins, so the
  general cases come first and the exceptions after them.
  """
  schedule = make_schedule(args)
  top_layer = args.layers - 1

  def block_rule(modules, param):
    # Each block trains at layer_lr_decay times the learning rate of the block above it.
    block = next(m for m in modules if hasattr(m, "layer_idx"))
    scale = args.layer_lr_decay ** (top_layer - block.layer_idx)

    def block_schedule(step):
      return scale * schedule(step)

    # inject_hyperparams keeps the current learning rate in the optimizer
    # state, where optimizer.hyperparams reads it for logging.
    if param.ndim == 2:  # weight matrices
      return optax.inject_hyperparams(optax.adamw)(
        learning_rate=block_schedule, weight_decay=args.weight_decay
      )
    return optax.inject_hyperparams(optax.adam)(learning_rate=block_schedule)  # norm scales and biases

  mgr = opt.OptimizerManager()
  mgr[...] = optax.adamw(schedule, weight_decay=args.weight_decay)
  mgr[..., ["bias", "scale"]] = optax.adam(schedule)
  mgr["layers", :] = block_rule  # also decides bias and scale inside the blocks
  mgr["embed"] = optax.adam(schedule)
  if args.freeze_embeddings:
    mgr["embed"] = None
  return opt.Optimizer(model, mgr, wrt=nnx.Param)


# ----------------------------------------------------------------------- training


def loss_fn(model: Transformer, batch: dict[str, jax.Array]) -> jax.Array:
  """Compute the mean next-byte cross-entropy, in nats per byte."""
  logits = model(batch["inputs"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()


@nnx.jit
def train_step(
  model: Transformer, optimizer: opt.Optimizer, batch: dict[str, jax.Array]
) -> jax.Array:
  """Apply one optimizer update in place and return the batch loss before it."""
  loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def eval_step(model: Transformer, batch: dict[str, jax.Array]) -> jax.Array:
  return loss_fn(model, batch)


def evaluate(model: Transformer, batches: Sequence[dict[str, np.ndarray]]) -> float:
  """Return the mean loss over batches of equal size."""
  return float(np.mean([eval_step(model, batch) for batch in batches]))


@nnx.jit(static_argnames=("num_bytes", "seq_len"))
def generate(
  model: Transformer,
  prompt: jax.Array,
  key: jax.Array,
  temperature: float,
  *,
  num_bytes: int,
  seq_len: int,
) -> jax.Array:
  """Continue ``prompt`` by ``num_bytes`` bytes sampled at ``temperature``.

  Args:
    model: the language model.
    prompt: int32 bytes of shape ``(prompt_len,)``, with ``prompt_len >= 1``.
    key: PRNG key for the sampling.
    temperature: divisor of the logits. Values below 1 favor likely bytes.
    num_bytes: number of bytes to append.
    seq_len: max number of bytes in the model's context, as in training.

  Returns:
    The prompt and the new bytes, int32 of shape ``(prompt_len + num_bytes,)``.
  """
  prompt_len = prompt.shape[0]
  buffer = jnp.zeros(max(prompt_len + num_bytes, seq_len), jnp.int32).at[:prompt_len].set(prompt)

  def append_byte(i, buffer):
    last = prompt_len - 1 + i  # position of the newest byte
    # The window ends at the newest byte once there are seq_len bytes.
    # Before that it starts at 0, and causal attention keeps the zeros
    # after the newest byte out of its logits.
    start = jnp.maximum(0, last + 1 - seq_len)
    window = jax.lax.dynamic_slice(buffer, (start,), (seq_len,))
    logits = model(window[None])[0, last - start]
    next_byte = jax.random.categorical(jax.random.fold_in(key, i), logits / temperature)
    return buffer.at[last + 1].set(next_byte.astype(jnp.int32))

  return jax.lax.fori_loop(0, num_bytes, append_byte, buffer)[: prompt_len + num_bytes]


def train(
  model: Transformer,
  optimizer: opt.Optimizer,
  train_data: np.ndarray,
  val_batches: Sequence[dict[str, np.ndarray]],
  args: argparse.Namespace,
) -> tuple[list[float], list[dict[str, float]]]:
  """Run ``args.steps`` training steps, evaluating every ``args.eval_every``.

  Returns:
    The training loss of every step, and the validation losses as
    ``{"step": s, "loss": l}`` entries, taken before step 0, every
    ``args.eval_every`` steps and after the last step.
  """
  rng = np.random.default_rng(args.seed)
  train_losses = []  # device arrays, read back at the end to keep steps asynchronous
  val_losses = [{"step": 0, "loss": evaluate(model, val_batches)}]
  tqdm.write(f"step 0: val loss {val_losses[0]['loss']:.3f}")

  progress = tqdm(range(1, args.steps + 1), desc="train", unit="step")
  for step in progress:
    batch = sample_batch(train_data, args.batch_size, args.seq_len, rng)
    train_losses.append(train_step(model, optimizer, batch))
    if step % 10 == 0:
      progress.set_postfix(loss=f"{float(train_losses[-1]):.3f}")
    if step % args.eval_every == 0 or step == args.steps:
      val_loss = evaluate(model, val_batches)
      val_losses.append({"step": step, "loss": val_loss})
      tqdm.write(f"step {step}: val loss {val_loss:.3f}")
      log_learning_rates(optimizer)
  progress.close()

  return [float(loss) for loss in jax.device_get(train_losses)], val_losses


def log_learning_rates(optimizer: opt.Optimizer) -> None:
  """Print the current learning rate of every group built with inject_hyperparams."""
  rates = {
    label: float(values["learning_rate"])
    for label, values in optimizer.hyperparams.items()
    if "learning_rate" in values
  }
  if rates:
    tqdm.write("  lr " + ", ".join(f"{label} {rate:.2e}" for label, rate in rates.items()))


# ------------------------------------------------------------------------ outputs


def plot_losses(
  train_losses: Sequence[float], val_losses: Sequence[dict[str, float]], path: Path
) -> None:
  """Save training and validation loss curves as an image."""
  fig = Figure(figsize=(7, 4.5))
  ax = fig.subplots()
  ax.plot(range(1, len(train_losses) + 1), train_losses, alpha=0.5, label="train (per step)")
  ax.plot(
    [entry["step"] for entry in val_losses],
    [entry["loss"] for entry in val_losses],
    marker="o",
    label="validation",
  )
  ax.axhline(np.log(VOCAB_SIZE), color="gray", linestyle=":", label="uniform (ln 256)")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats per byte)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument("--steps", type=int, default=400, help="number of optimizer steps")
  parser.add_argument("--layers", type=int, default=4, help="number of transformer blocks")
  parser.add_argument("--width", type=int, default=64, help="model dimension, in features")
  parser.add_argument("--heads", type=int, default=4, help="attention heads per block")
  parser.add_argument("--seq-len", type=int, default=64, help="context length, in bytes")
  parser.add_argument("--batch-size", type=int, default=32, help="sequences per step")
  parser.add_argument(
    "--lr",
    type=float,
    default=3e-3,
    help="peak learning rate of the top block and of everything outside the blocks",
  )
  parser.add_argument(
    "--weight-decay", type=float, default=0.1, help="AdamW weight decay of weight matrices"
  )
  parser.add_argument(
    "--layer-lr-decay",
    type=float,
    default=0.8,
    help="learning-rate factor per block: block i trains at lr * factor ** (layers - 1 - i)",
  )
  parser.add_argument(
    "--seed",
    type=int,
    default=0,
    help="seed of the parameter initialization, the batch sampling and the text sample",
  )
  parser.add_argument(
    "--eval-every", type=int, default=100, help="steps between validation evaluations"
  )
  parser.add_argument(
    "--eval-batches",
    type=int,
    default=8,
    help="number of fixed validation batches averaged per evaluation",
  )
  parser.add_argument(
    "--out",
    type=Path,
    default=Path("runs/train_lm"),
    help="output folder for metrics.json, loss.png and model.html",
  )
  parser.add_argument(
    "--freeze-embeddings",
    action="store_true",
    help="keep the token embedding at its initial values",
  )
  args = parser.parse_args(argv)

  for name in ("steps", "layers", "heads", "seq_len", "batch_size", "eval_every", "eval_batches"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
  return args


def main(argv: Sequence[str] | None = None) -> dict:
  """Train, evaluate and sample a model as configured by the command line.

  Args:
    argv: command-line arguments without the program name. ``None`` reads
      ``sys.argv``.

  Returns:
    The metrics written to ``metrics.json``, plus the trained model under
    ``"model"`` and its optimizer under ``"optimizer"``.
  """
  args = parse_args(argv)
  args.out.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()

  train_data, val_data = split_train_val(load_text())
  val_batches = fixed_batches(val_data, args.eval_batches, args.batch_size, args.seq_len)

  model = Transformer(args.layers, args.width, args.heads, rngs=nnx.Rngs(args.seed))
  optimizer = build_optimizer(model, args)
  print(optimizer.groups)

  train_losses, val_losses = train(model, optimizer, train_data, val_batches, args)

  prompt = np.frombuffer(SAMPLE_PROMPT.encode("utf-8"), dtype=np.uint8).astype(np.int32)
  sample_bytes = generate(
    model,
    prompt,
    jax.random.key(args.seed),
    SAMPLE_TEMPERATURE,
    num_bytes=SAMPLE_BYTES,
    seq_len=args.seq_len,
  )
  sample = bytes(np.asarray(sample_bytes, dtype=np.uint8)).decode("utf-8", errors="replace")
  print(f"\nsample:\n{sample}\n")

  metrics = {
    "config": {**vars(args), "out": str(args.out)},
    "optimizer_groups": str(optimizer.groups),
    "train_loss": train_losses,
    "val_loss": val_losses,
    "final_val_loss": val_losses[-1]["loss"],
    "wall_time_s": time.perf_counter() - start,
    "sample": sample,
  }
  (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
  plot_losses(train_losses, val_losses, args.out / "loss.png")
  page = opt.render_html(model, optimizer.groups)
  (args.out / "model.html").write_text(page, encoding="utf-8")
  print(
    f"final val loss {metrics['final_val_loss']:.3f} after {metrics['wall_time_s']:.0f} s,"
    f" outputs in {args.out}"
  )

  return {**metrics, "model": model, "optimizer": optimizer}


if __name__ == "__main__":
  main()
