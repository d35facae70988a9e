"""Tests for `benchmarks/bench_opt.py`: the report's contents and the optimizers it compares.

The benchmark runs once at a tiny size for the whole module. Nothing here
asserts on timings, only on the presence and sanity of the measurements.
"""

import importlib.util
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

BENCH_PATH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "bench_opt.py"


def _load_bench():
  spec = importlib.util.spec_from_file_location("bench_opt", BENCH_PATH)
  module = importlib.util.module_from_spec(spec)
  # Dataclasses look their module up in sys.modules while the file executes.
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


bench = _load_bench()

TINY_LAYERS = 2
SCALE_VARIABLES = (40, 80)
SCALE_ASSIGNMENTS = (3, 6)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """Run the benchmark's main once at the tiny size; return (report, JSON data)."""
  json_path = tmp_path_factory.mktemp("bench") / "bench.json"
  report = bench.main([
    "--quick",
    "--layers", str(TINY_LAYERS),
    "--steps", "2",
    "--warmup", "0",
    # Two repeats run the interleaved second round of traces and compiles.
    "--repeats", "2",
    "--scale-variables", *map(str, SCALE_VARIABLES),
    "--scale-assignments", *map(str, SCALE_ASSIGNMENTS),
    "--json", str(json_path),
  ])
  return report, json.loads(json_path.read_text())


def _rows_by_key(report):
  return {(row.model, row.layers, row.label): row for row in report.rows}


def test_report_has_every_row(run):
  report, _ = run
  expected = {("list", TINY_LAYERS, "(a) adamw"), ("stacked", TINY_LAYERS, "(a) adamw")}
  for name in bench.CONFIGS:
    expected.add(("list", TINY_LAYERS, f"(b) {name}"))
    expected.add(("list", TINY_LAYERS, f"ueaj {name}"))
    expected.add(("stacked", TINY_LAYERS, f"ueaj {name}"))
  assert set(_rows_by_key(report)) == expected
  assert len(report.rows) == len(expected)


def test_report_text_names_every_row(run):
  report, _ = run
  for row in report.rows:
    assert row.label in report.text


@pytest.mark.parametrize("field", ["build_s", "trace_s", "lower_s", "compile_s", "step_s"])
def test_report_times_positive(run, field):
  report, _ = run
  for row in report.rows:
    assert getattr(row, field) > 0, (row.label, row.model)


class FakeRunner:
  """A runner that records its steps in a shared log and reports `seconds` per step."""

  def __init__(self, name, seconds, log):
    self.name, self.seconds, self.log = name, seconds, log

  def time_step(self):
    self.log.append(self.name)
    return self.seconds


def test_time_steps_interleaves():
  log = []
  runners = [FakeRunner(name, seconds, log) for name, seconds in [("a", 1.0), ("b", 2.0), ("c", 3.0)]]
  medians = bench.time_steps(runners, 3)

  assert medians == [1.0, 2.0, 3.0]
  assert log == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_report_sizes_sane(run):
  report, _ = run
  for row in report.rows:
    # Adam and AdamW keep two moments per parameter, plus step counters.
    assert row.state_bytes >= 2 * row.param_bytes, (row.label, row.model)
    assert row.state_bytes < 3 * row.param_bytes, (row.label, row.model)
    if row.peak_bytes is not None:
      assert row.temp_bytes is not None
      assert row.peak_bytes >= row.param_bytes + row.state_bytes, (row.label, row.model)


def test_state_bytes_equal_hand_built(run):
  report, _ = run
  rows = _rows_by_key(report)
  for name in bench.CONFIGS:
    ueaj = rows["list", TINY_LAYERS, f"ueaj {name}"]
    hand_built = rows["list", TINY_LAYERS, f"(b) {name}"]
    assert ueaj.state_bytes == hand_built.state_bytes, name
    assert ueaj.groups == hand_built.groups, name


def test_group_counts(run):
  report, _ = run
  rows = _rows_by_key(report)
  expected = {
    "single": 1,
    "decay-split": 2,
    "per-layer": TINY_LAYERS,
    "layer-decay": TINY_LAYERS,
    "per-variable": 4 * TINY_LAYERS,
  }
  for model in bench.MODEL_KINDS:
    for name, groups in expected.items():
      assert rows[model, TINY_LAYERS, f"ueaj {name}"].groups == groups, (model, name)


def test_ratios_against_baselines(run):
  report, _ = run
  for row in report.rows:
    ratios = bench.row_ratios(report.rows, row)
    expected = set()
    if row.method != bench.METHOD_ADAMW:
      expected.add("a")
    if row.method == bench.METHOD_UEAJ and row.model == "list":
      expected.add("b")
    assert set(ratios) == expected, (row.label, row.model)
    for by_metric in ratios.values():
      assert by_metric["compile_s"] > 0


def test_labelling_rows(run):
  report, _ = run
  sizes = [(row.variables, row.assignments) for row in report.scale_rows]
  assert sizes == [(v, a) for v in SCALE_VARIABLES for a in SCALE_ASSIGNMENTS]
  for row in report.scale_rows:
    assert row.label_s > 0
    assert row.build_s > 0
    assert row.build_paused_s > 0
    assert row.state_s > 0
    assert row.groups >= 1


def test_targets_listed(run):
  report, _ = run
  assert len(report.targets) == 7
  state_target = next(target for target in report.targets if "state bytes" in target.name)
  assert state_target.met is True


def test_json_matches_report(run):
  report, data = run
  assert len(data["rows"]) == len(report.rows)
  assert len(data["labelling"]) == len(report.scale_rows)
  assert data["environment"]["jax"] == jax.__version__
  first_ueaj = next(row for row in data["rows"] if row["method"] == bench.METHOD_UEAJ)
  assert "a" in first_ueaj["ratios"]


def test_markdown_table(run):
  report, _ = run
  lines = bench.main_table(report.rows, markdown=True).splitlines()
  assert lines[0].startswith("| model |")
  assert lines[1].startswith("|---")
  assert len(lines) == 2 + len(report.rows)
  assert all(line.startswith("| ") and line.endswith(" |") for line in lines[2:])


# --------------------------------------------------------------------------
# The optimizers the benchmark compares compute the same updates.

LAYERS = 4
WIDTH = 8
STEPS = 3


def _updates_over_steps(model, optimizer):
  """Take STEPS eager steps on one fixed batch; return each step's updates as arrays."""
  x, y = bench.make_batch(4, WIDTH)
  all_updates = []
  for _ in range(STEPS):
    grads = nnx.grad(bench.mse_loss)(model, x, y)
    updates = optimizer.update(model, grads)
    all_updates.append(nnx.to_flat_state(nnx.as_pure(nnx.State(updates))))
  return all_updates


@pytest.mark.parametrize("name", list(bench.CONFIGS))
def test_ueaj_equals_hand_built(name):
  config = bench.CONFIGS[name]
  ueaj_model = bench.build_model("list", LAYERS, WIDTH)
  hand_model = bench.build_model("list", LAYERS, WIDTH)
  ueaj_optimizer, _ = bench.build_optimizer(bench.METHOD_UEAJ, config, ueaj_model, LAYERS)
  hand_optimizer, _ = bench.build_optimizer(bench.METHOD_HAND_BUILT, config, hand_model, LAYERS)

  ueaj_updates = _updates_over_steps(ueaj_model, ueaj_optimizer)
  hand_updates = _updates_over_steps(hand_model, hand_optimizer)

  for step, (ueaj_step, hand_step) in enumerate(zip(ueaj_updates, hand_updates)):
    assert [path for path, _ in ueaj_step] == [path for path, _ in hand_step]
    for (path, ueaj_value), (_, hand_value) in zip(ueaj_step, hand_step):
      np.testing.assert_array_equal(ueaj_value, hand_value, err_msg=f"step {step}, {path}")


def test_hand_built_labels_equal_ueaj():
  for name, config in bench.CONFIGS.items():
    model = bench.build_model("list", LAYERS, WIDTH)
    mgr = bench.make_manager(config, LAYERS, stacked=False)
    mgr.label(model)
    params = nnx.state(model, nnx.Param)
    hand = nnx.to_flat_state(bench.hand_built_labels(config, params, LAYERS))
    for (path, label), (_, variable) in zip(hand, nnx.to_flat_state(params)):
      assert label == variable.get_metadata()["opt_group"], (name, path)


def test_stacked_like_copies_weights():
  model = bench.build_model("list", LAYERS, WIDTH)
  stacked = bench.stacked_like(model)
  x, _ = bench.make_batch(4, WIDTH)
  np.testing.assert_allclose(stacked(x), model(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["per-layer", "layer-decay", "per-variable"])
def test_stacked_equals_list(name):
  config = bench.CONFIGS[name]
  list_model = bench.build_model("list", LAYERS, WIDTH)
  stacked_model = bench.stacked_like(list_model)
  list_optimizer, list_groups = bench.build_optimizer(bench.METHOD_UEAJ, config, list_model, LAYERS)
  stacked_optimizer, stacked_groups = bench.build_optimizer(
    bench.METHOD_UEAJ, config, stacked_model, LAYERS
  )
  assert list_groups == stacked_groups

  list_updates = _updates_over_steps(list_model, list_optimizer)
  stacked_updates = _updates_over_steps(stacked_model, stacked_optimizer)

  for step, (list_step, stacked_step) in enumerate(zip(list_updates, stacked_updates)):
    by_path = dict(list_step)
    for path, stacked_value in stacked_step:
      # ('layers', 'a', 'kernel') in the stack is ('layers', i, 'a', 'kernel') in the List.
      layers = [by_path[(path[0], layer, *path[1:])] for layer in range(LAYERS)]
      np.testing.assert_allclose(
        stacked_value, jnp.stack(layers), rtol=0, atol=1e-6, err_msg=f"step {step}, {path}"
      )
