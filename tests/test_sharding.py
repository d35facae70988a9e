"""Optimizer-state sharding on a 2D mesh of 8 simulated CPU devices.

The checks run in a subprocess (`tests/sharding_script.py`) because the
pytest process has already started JAX with one device.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("sharding_script.py")


def _run(mode):
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
  env["JAX_PLATFORMS"] = "cpu"
  process = subprocess.run(
    [sys.executable, str(SCRIPT), mode], capture_output=True, text=True, env=env, timeout=900
  )
  assert process.returncode == 0, process.stderr[-4000:]
  return json.loads(process.stdout.splitlines()[-1])


@pytest.fixture(scope="module", params=["auto", "explicit"])
def report(request):
  return _run(request.param)


def test_sharding_runs_on_eight_devices(report):
  assert report["devices"] == 8


def test_state_sharding_after_init(report):
  wrong = [row for row in report["init"] if not row["ok"]]
  assert wrong == []


def test_state_sharding_after_training(report):
  wrong = [row for row in report["trained"] if not row["ok"]]
  assert wrong == []
  assert report["step"] == 3


def test_state_covers_every_unit(report):
  units = {row["unit"] for row in report["init"] if row["kind"] == "param"}
  # The frozen groups hold no state.
  expected = {key for key, _ in report["units"].values()} - {"layers/1:/mlp", "sharded/:2/mlp"}
  assert units == expected


def test_vectorized_units_present(report):
  assert report["units"]["stack/1"] == ["stack/0~stack/1", 1]
  assert report["units"]["sharded/3"] == ["sharded/2~sharded/3", 1]


def test_training_keeps_parameter_sharding(report):
  assert report["params_moved"] == []


def test_labels_keep_sharding_metadata(report):
  assert report["metadata_after"] == report["metadata_before"]
  annotated = [path for path, text in report["metadata_before"].items() if "out_sharding" in text]
  assert "stack/attn/kernel" in annotated
  assert "layers/2/mlp/kernel" in annotated


def test_labels_written(report):
  assert report["labels"]["layers/0/attn/kernel"] == "'layers/0'"
  assert report["labels"]["stack/attn/kernel"] == "('stack/0', 'stack/1', 'stack/2:', 'stack/2:')"
