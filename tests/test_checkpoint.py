"""Checkpoints with Orbax: exact resumption, typed keys, mismatch errors, reset."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ueaj import opt

pytest.importorskip("orbax.checkpoint")

import checkpoint_script as script  # noqa: E402  (tests/ is on sys.path)

SCRIPT = pathlib.Path(script.__file__)


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  process = subprocess.run(
    [sys.executable, str(SCRIPT), *map(str, args)],
    capture_output=True, text=True, env=env, timeout=900,
  )
  assert process.returncode == 0, process.stderr[-4000:]


def _assert_same(left, right):
  assert left.keys() == right.keys()
  different = [key for key in left if not np.array_equal(left[key], right[key])]
  assert different == []


def test_resume_matches_uninterrupted(tmp_path):
  checkpoint = tmp_path / "checkpoint"
  _run("straight", 6, 3, checkpoint, tmp_path / "straight.npz")
  _run("resume", 6, checkpoint, tmp_path / "resumed.npz")
  straight = dict(np.load(tmp_path / "straight.npz"))
  resumed = dict(np.load(tmp_path / "resumed.npz"))
  _assert_same(straight, resumed)
  assert int(resumed["'optimizer'/'step'"]) == 6


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A model and optimizer after two steps, and a checkpoint of them."""
  model, optimizer = script.build()
  script.train(model, optimizer, 0, 2)
  directory = tmp_path_factory.mktemp("saved") / "checkpoint"
  opt.save(directory, model, optimizer)
  return model, optimizer, directory


def test_restore_equals_saved(trained):
  model, optimizer, directory = trained
  fresh_model, fresh_optimizer = script.build(seed=1)
  opt.restore(directory, fresh_model, fresh_optimizer)
  _assert_same(script.flat_arrays(model, optimizer), script.flat_arrays(fresh_model, fresh_optimizer))


def test_path_key_types_survive(trained):
  _, _, directory = trained
  paths = [row["path"] for row in opt.read_table(directory)["paths"]]
  assert ["model", "layers", 0, "attn", "kernel"] in paths
  assert ["model", "extra", "3", "kernel"] in paths
  assert ["model", "extra", 3, "kernel"] not in paths
  model, optimizer = script.build(seed=1)
  opt.restore(directory, model, optimizer)
  assert isinstance(model.extra["3"], nnx.Linear)
  assert list(model.extra.keys()) == ["3"]


def test_group_labels_survive(trained):
  _, optimizer, directory = trained
  table = opt.read_table(directory)["groups"]
  assert [row["label"] for row in table] == list(optimizer.groups.labels)
  assert table == opt.group_table(optimizer.groups)
  assert table[0]["label"] == "..."
  assert any(row["unit"] == ["stack/0~stack/1", 1] for row in table)


def test_changed_groups_raise(trained):
  _, _, directory = trained
  model, optimizer = script.build(seed=1, variant=1)
  before = script.flat_arrays(model, optimizer)
  with pytest.raises(opt.CheckpointMismatchError) as error:
    opt.restore(directory, model, optimizer)
  message = str(error.value)
  assert "added: head" in message
  assert "removed: ..." in message
  _assert_same(before, script.flat_arrays(model, optimizer))


def test_changed_transform_raises(trained):
  _, _, directory = trained
  model, optimizer = script.build(seed=1, variant=2)
  with pytest.raises(opt.CheckpointMismatchError, match=r"changed: extra/3 \(transform\)"):
    opt.restore(directory, model, optimizer)


def test_model_only_checkpoint(tmp_path):
  model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  opt.save(tmp_path / "model", model)
  other = nnx.Linear(2, 3, rngs=nnx.Rngs(1))
  opt.restore(tmp_path / "model", other)
  np.testing.assert_array_equal(other.kernel[...], model.kernel[...])


def test_missing_and_extra_paths_raise(tmp_path):
  opt.save(tmp_path / "with_bias", nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
  opt.save(tmp_path / "without_bias", nnx.Linear(2, 3, use_bias=False, rngs=nnx.Rngs(0)))
  with pytest.raises(opt.CheckpointMismatchError, match=r"1 saved path\(s\) not in the state: model/bias"):
    opt.restore(tmp_path / "with_bias", nnx.Linear(2, 3, use_bias=False, rngs=nnx.Rngs(1)))
  with pytest.raises(opt.CheckpointMismatchError, match=r"1 path\(s\) not in the checkpoint: model/bias"):
    opt.restore(tmp_path / "without_bias", nnx.Linear(2, 3, rngs=nnx.Rngs(1)))


def test_shape_mismatch_raises(tmp_path):
  opt.save(tmp_path / "small", nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
  with pytest.raises(opt.CheckpointMismatchError, match=r"model/bias: .* shape \(3,\)"):
    opt.restore(tmp_path / "small", nnx.Linear(2, 4, rngs=nnx.Rngs(0)))


def test_optimizer_presence_must_match(trained):
  _, _, directory = trained
  model, _ = script.build(seed=1)
  with pytest.raises(opt.CheckpointMismatchError, match="group table"):
    opt.restore(directory, model)


def _unit_leaves(optimizer, key):
  state = optimizer.opt_state.inner_states[key].inner_state
  return [np.asarray(leaf) for leaf in jax.tree.leaves(nnx.as_pure(state))]


def _all_units(optimizer):
  return {key: _unit_leaves(optimizer, key) for key in optimizer.opt_state.inner_states}


def _same_leaves(left, right):
  return len(left) == len(right) and all(np.array_equal(a, b) for a, b in zip(left, right))


def test_reset_layer_group():
  model, optimizer = script.build()
  script.train(model, optimizer, 0, 2)
  before = _all_units(optimizer)
  fresh = _all_units(script.build()[1])

  assert optimizer.reset(model, "layers", 0) == ("layers/0", "layers/0/mlp/bias")

  after = _all_units(optimizer)
  for key in before:
    if key == "layers/0":
      assert _same_leaves(after[key], fresh[key])
    else:
      assert _same_leaves(after[key], before[key]), key
  assert int(optimizer.step[...]) == 2
  state = optimizer.opt_state.inner_states["layers/0"].inner_state
  assert int(state[0].count[...]) == 0


def test_reset_vectorized_layer():
  model, optimizer = script.build()
  script.train(model, optimizer, 0, 2)
  before = _all_units(optimizer)

  assert optimizer.reset(model, "stack", 1) == ("stack/1",)

  key, index = optimizer.groups.unit_of("stack/1")
  after = _all_units(optimizer)
  for other in before:
    if other != key:
      assert _same_leaves(after[other], before[other]), other
  for old, new in zip(before[key], after[key]):
    np.testing.assert_array_equal(new[1 - index], old[1 - index])
  counts = optimizer.opt_state.inner_states[key].inner_state[0].count[...]
  assert counts.tolist() == [2, 0]


def test_reset_after_reinitializing_layer():
  model, optimizer = script.build()
  script.train(model, optimizer, 0, 2)
  new_layer = script.Block(nnx.Rngs(7))
  # Pure values keep the Variables and their metadata, labels included.
  nnx.update(model.layers[0], nnx.as_pure(nnx.state(new_layer)))
  assert model.layers[0].attn.kernel.get_metadata()[opt.LABEL_KEY] == "layers/0"

  assert optimizer.reset(model, "layers", 0) == ("layers/0", "layers/0/mlp/bias")

  np.testing.assert_array_equal(model.layers[0].attn.kernel[...], new_layer.attn.kernel[...])
  state = optimizer.opt_state.inner_states["layers/0"].inner_state
  assert int(state[0].count[...]) == 0
  script.train(model, optimizer, 2, 3)
  assert int(state[0].count[...]) == 1


def test_reset_partial_group_raises():
  model, optimizer = script.build()
  # Group layers/1:/mlp contains the MLPs of layers 1 and 2.
  with pytest.raises(ValueError, match=r"layers/1:/mlp"):
    optimizer.reset(model, "layers", 1)
  assert optimizer.reset(model, "layers", 1, "attn") == ("layers/1",)


def test_reset_unknown_path_raises():
  model, optimizer = script.build()
  with pytest.raises(ValueError, match="No optimized Variable"):
    optimizer.reset(model, "missing")


def test_reset_str_key_is_not_int():
  model, optimizer = script.build()
  assert optimizer.reset(model, "extra", "3") == ("extra/3",)
  with pytest.raises(ValueError, match="No optimized Variable"):
    optimizer.reset(model, "extra", 3)
