"""End-to-end tests of the example training script examples/train_lm.py."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from ueaj import opt

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_lm.py"

# Tiny settings, so that most of each run's time is compilation.
TINY_FLAGS = [
  "--layers", "2",
  "--width", "32",
  "--heads", "2",
  "--seq-len", "32",
  "--batch-size", "8",
  "--eval-batches", "2",
]


def load_script():
  # examples/ is not a package, so import the script from its file.
  spec = importlib.util.spec_from_file_location("train_lm", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


train_lm = load_script()


def run_script(out: Path, *flags: str) -> dict:
  return train_lm.main([*TINY_FLAGS, *flags, "--out", str(out)])


def embedding_table(model) -> np.ndarray:
  return np.asarray(model.embed.embedding[...])


def group_of(variable) -> str:
  return variable.get_metadata(opt.LABEL_KEY)


def initial_model(seed: int):
  # Must match the constructor call in train_lm.main with TINY_FLAGS.
  return train_lm.Transformer(2, 32, 2, rngs=nnx.Rngs(seed))


TINY_RUN_FLAGS = ["--steps", "30", "--eval-every", "10", "--seed", "0"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("tiny_run")
  return out, run_script(out, *TINY_RUN_FLAGS)


def test_run_writes_outputs(tiny_run):
  out, result = tiny_run
  assert (out / "metrics.json").is_file()
  assert (out / "loss.png").is_file()
  assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")
  assert (out / "model.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")

  metrics = json.loads((out / "metrics.json").read_text())
  expected_keys = {
    "config",
    "optimizer_groups",
    "train_loss",
    "val_loss",
    "final_val_loss",
    "wall_time_s",
    "sample",
  }
  assert expected_keys <= metrics.keys(), f"missing keys: {expected_keys - metrics.keys()}"
  assert metrics["config"]["steps"] == 30
  assert metrics["train_loss"] == result["train_loss"]


def test_run_records_every_step_and_eval(tiny_run):
  _, result = tiny_run
  assert len(result["train_loss"]) == 30
  assert [entry["step"] for entry in result["val_loss"]] == [0, 10, 20, 30]
  assert result["final_val_loss"] == result["val_loss"][-1]["loss"]
  assert all(np.isfinite(result["train_loss"])), result["train_loss"]


def test_run_samples_text_after_prompt(tiny_run):
  _, result = tiny_run
  sample = result["sample"]
  assert sample.startswith(train_lm.SAMPLE_PROMPT), repr(sample)
  # UTF-8 decoding turns every 4 or fewer sampled bytes into at least one
  # character, with U+FFFD for invalid bytes.
  assert len(sample) >= len(train_lm.SAMPLE_PROMPT) + train_lm.SAMPLE_BYTES // 4, repr(sample)


def test_training_lowers_loss(tiny_run):
  _, result = tiny_run
  train_losses = result["train_loss"]
  first, last_mean = train_losses[0], float(np.mean(train_losses[-5:]))
  assert last_mean < first, f"train loss rose: first {first:.4f}, mean of last 5 {last_mean:.4f}"

  val_losses = [entry["loss"] for entry in result["val_loss"]]
  # The zero-initialized head predicts uniform bytes before training.
  assert val_losses[0] == pytest.approx(np.log(256), abs=1e-3), val_losses
  assert val_losses[-1] < val_losses[0], f"val loss did not fall: {val_losses}"


def test_training_updates_embedding(tiny_run):
  _, result = tiny_run
  trained = embedding_table(result["model"])
  initial = embedding_table(initial_model(seed=0))
  assert not np.array_equal(trained, initial), "embedding unchanged without --freeze-embeddings"


def test_optimizer_groups_follow_config(tiny_run):
  _, result = tiny_run
  model = result["model"]
  assert group_of(model.embed.embedding) == "embed"
  assert group_of(model.head.kernel) == "..."
  assert group_of(model.head.bias) == ".../bias"
  assert group_of(model.final_norm.scale) == ".../scale"

  # Inside the blocks the per-layer rule wins over the bias and scale
  # assignment, and puts matrices (AdamW) and vectors (Adam) in separate groups.
  for i, block in enumerate(model.layers):
    matrix_group = group_of(block.attn.qkv.kernel)
    vector_group = group_of(block.mlp.up.bias)
    assert matrix_group.split("#")[0] == f"layers/{i}", matrix_group
    assert vector_group.split("#")[0] == f"layers/{i}", vector_group
    assert group_of(block.attn_norm.scale) == vector_group
    assert group_of(block.mlp.down.kernel) == matrix_group
    assert matrix_group != vector_group


def test_same_seed_same_losses(tmp_path, tiny_run):
  _, first = tiny_run
  second = run_script(tmp_path, *TINY_RUN_FLAGS)
  assert second["train_loss"] == first["train_loss"]
  assert second["val_loss"] == first["val_loss"]
  assert second["sample"] == first["sample"]


def test_freeze_embeddings_keeps_table(tmp_path):
  result = run_script(
    tmp_path, "--steps", "5", "--eval-every", "5", "--seed", "2", "--freeze-embeddings"
  )
  model = result["model"]
  assert result["optimizer"].groups["embed"].frozen
  initial = initial_model(seed=2)
  np.testing.assert_array_equal(embedding_table(model), embedding_table(initial))
  # The head starts at zero, so a nonzero head shows that the other parts trained.
  assert np.any(np.asarray(model.head.kernel[...]) != 0), "the head did not train"


def test_attention_rejects_odd_head_size():
  with pytest.raises(ValueError, match="invalid width 20 for 4 heads"):
    train_lm.CausalSelfAttention(20, 4, rngs=nnx.Rngs(0))


def test_rejects_zero_steps(tmp_path, capsys):
  with pytest.raises(SystemExit):
    train_lm.main(["--steps", "0", "--out", str(tmp_path)])
  assert "--steps must be at least 1, got 0" in capsys.readouterr().err
