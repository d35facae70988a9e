"""Tests of opt.summary, opt.describe_transform and opt.explain."""

import jax
import optax
import pytest
from flax import nnx

from ueaj import opt


class Net(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(3, 4, rngs=rngs)  # kernel 12 + bias 4 float32
    self.out = nnx.Linear(4, 2, rngs=rngs)  # kernel 8 + bias 2
    self.embed = nnx.Embed(5, 3, rngs=rngs)  # 15


def manager():
  mgr = opt.OptimizerManager()
  mgr[...] = optax.adamw(1e-3)
  mgr["out"] = optax.sgd(0.1, momentum=0.9)
  mgr["embed"] = None
  mgr["hidden", "bias"] = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)
  return mgr


# Worked out by hand, float32 (4 bytes) everywhere:
# - '...' is hidden/kernel (12 elements, 48 B) with AdamW: mu and nu (48 B
#   each) and an int32 count (4 B) = 100 B.
# - 'out' (10 elements, 40 B) with SGD momentum: one trace (40 B), no count.
# - 'embed' is frozen: no state.
# - 'hidden/bias' (4 elements, 16 B) with injected Adam: the injection's count
#   (4 B), five float hyperparameters (lr, b1, b2, eps, eps_root: 20 B), and
#   Adam's count, mu and nu (4 + 16 + 16 B) = 60 B.
EXPECTED = [
  {
    "label": "...",
    "source": "mgr[...] = transform",
    "transform": "chain(scale_by_adam, add_decayed_weights, scale)",
    "variables": 1,
    "elements": 12,
    "param_bytes": 48,
    "state_bytes": 100,
  },
  {
    "label": "out",
    "source": "mgr['out'] = transform",
    "transform": "chain(trace, scale)",
    "variables": 2,
    "elements": 10,
    "param_bytes": 40,
    "state_bytes": 40,
  },
  {
    "label": "embed",
    "source": "mgr['embed'] = frozen",
    "transform": "frozen",
    "variables": 1,
    "elements": 15,
    "param_bytes": 60,
    "state_bytes": 0,
  },
  {
    "label": "hidden/bias",
    "source": "mgr['hidden', 'bias'] = transform",
    "transform": "inject_hyperparams(adam)",
    "variables": 1,
    "elements": 4,
    "param_bytes": 16,
    "state_bytes": 60,
  },
]


def test_summary_of_model_rows():
  model = Net(nnx.Rngs(0))
  assert opt.summary(model, manager()).rows == EXPECTED


def test_summary_of_optimizer_matches_model():
  model = Net(nnx.Rngs(0))
  optimizer = opt.Optimizer(model, manager(), wrt=nnx.Param)
  assert opt.summary(optimizer).rows == EXPECTED
  assert opt.summary(model, optimizer.groups).rows == EXPECTED


def test_state_bytes_match_real_state():
  model = Net(nnx.Rngs(0))
  optimizer = opt.Optimizer(model, manager(), wrt=nnx.Param)
  real = sum(leaf.nbytes for leaf in jax.tree.leaves(optimizer.opt_state))
  assert real == 200
  assert opt.summary(optimizer).total_state_bytes == real


def test_summary_table_text():
  model = Net(nnx.Rngs(0))
  lines = str(opt.summary(model, manager())).splitlines()
  assert lines[0].split() == [
    "group", "assignment", "transform", "variables", "elements", "param", "bytes", "state", "bytes",
  ]
  assert lines[2].split()[-6:] == ["1", "12", "48", "B", "100", "B"]
  assert lines[-1].split() == ["total", "5", "41", "164", "B", "200", "B"]


def test_summary_to_dicts_copies():
  summary = opt.summary(Net(nnx.Rngs(0)), manager())
  rows = summary.to_dicts()
  rows[0]["label"] = "changed"
  assert summary.rows[0]["label"] == "..."


def test_summary_of_model_needs_groups():
  with pytest.raises(TypeError, match="needs the model's groups"):
    opt.summary(Net(nnx.Rngs(0)))


def test_summary_groups_of_other_model():
  groups = manager().label(Net(nnx.Rngs(0)))
  other = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  with pytest.raises(KeyError, match="'hidden/kernel'"):
    opt.summary(other, groups)


def test_format_bytes():
  from ueaj.opt._summary import format_bytes

  assert format_bytes(0) == "0 B"
  assert format_bytes(1023) == "1023 B"
  assert format_bytes(1536) == "1.5 KiB"
  assert format_bytes(3 * 1024**3) == "3.0 GiB"


@pytest.mark.parametrize(
  ("transform", "expected"),
  [
    (optax.adamw(1e-3), "chain(scale_by_adam, add_decayed_weights, scale)"),
    (optax.adam(optax.linear_schedule(0.0, 1.0, 10)), "chain(scale_by_adam, scale_by_schedule)"),
    (optax.sgd(0.1), "chain(identity, scale)"),
    (optax.lion(1e-4), "chain(scale_by_lion, add_decayed_weights, scale)"),
    (
      optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)),
      "chain(clip_by_global_norm, chain(scale_by_adam, scale))",
    ),
    (optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3), "inject_hyperparams(adamw)"),
    (optax.masked(optax.sgd(1.0), {"a": True}), "masked(chain(identity, scale))"),
    (optax.named_chain(("clip", optax.clip(1.0))), "named_chain(clip=clip)"),
    (optax.set_to_zero(), "set_to_zero"),
    (None, "frozen"),
  ],
)
def test_describe_transform(transform, expected):
  assert opt.describe_transform(transform) == expected


def test_explain_string_path():
  model = Net(nnx.Rngs(0))
  explanation = opt.explain(manager(), model, "hidden/bias")
  assert explanation.path == "hidden/bias"
  assert explanation.variable == "Param float32(4,)"
  assert explanation.matches == (
    {"assignment": 0, "source": "mgr[...] = transform", "label": "..."},
    {"assignment": 3, "source": "mgr['hidden', 'bias'] = transform", "label": "hidden/bias"},
  )
  assert explanation.winner == 3
  assert explanation.group == "hidden/bias"
  assert explanation.transform == "inject_hyperparams(adam)"
  assert explanation.error is None


def test_explain_tuple_path_report():
  model = Net(nnx.Rngs(0))
  text = str(opt.explain(manager(), model, ("out", "kernel")))
  assert text.splitlines() == [
    "out/kernel: Param float32(4, 2)",
    "  selected by 2 assignment(s); the last one wins:",
    "    #0  mgr[...] = transform    label '...'",
    "    #1  mgr['out'] = transform  label 'out'  <- wins",
    "  group 'out': chain(trace, scale)",
  ]


def test_explain_rule_variant_label():
  class Stack(nnx.Module):
    def __init__(self, rngs):
      self.layers = nnx.List([nnx.Linear(2, 2, rngs=rngs) for _ in range(2)])

  def by_rank(modules, param):
    return optax.adamw(1e-3) if param.ndim == 2 else optax.adam(1e-3)

  mgr = opt.OptimizerManager()
  mgr["layers", :] = by_rank
  explanation = opt.explain(mgr, Stack(nnx.Rngs(0)), "layers/1/kernel")
  assert explanation.matches[0]["label"] == "layers/1"
  assert explanation.group == "layers/1#2"
  assert explanation.transform == "chain(scale_by_adam, add_decayed_weights, scale)"


def test_explain_writes_no_label():
  model = Net(nnx.Rngs(0))
  opt.explain(manager(), model, "hidden/kernel")
  assert not model.hidden.kernel.has_metadata(opt.LABEL_KEY)


def test_explain_unassigned_variable():
  mgr = opt.OptimizerManager()
  mgr["out"] = optax.sgd(0.1)
  explanation = opt.explain(mgr, Net(nnx.Rngs(0)), "embed/embedding")
  assert explanation.matches == ()
  assert explanation.winner is None
  assert explanation.group is None
  assert explanation.error.startswith("UnassignedVariablesError: 3 Variable(s) have no optimizer")
  assert "no assignment selects it" in str(explanation)


def test_explain_missing_path():
  with pytest.raises(LookupError, match="'hiden/kernel'") as error:
    opt.explain(manager(), Net(nnx.Rngs(0)), "hiden/kernel")
  assert "nearest paths:\n  hidden/kernel\n" in str(error.value)


def test_explain_module_path():
  with pytest.raises(LookupError) as error:
    opt.explain(manager(), Net(nnx.Rngs(0)), ("hidden",))
  assert str(error.value).endswith("contains these:\n  hidden/bias\n  hidden/kernel")


class StackedBlock(nnx.Module):
  def __init__(self, rngs):
    self.attn = nnx.Linear(4, 4, rngs=rngs)
    self.mlp = nnx.Linear(4, 4, rngs=rngs)


class StackedNet(nnx.Module):
  def __init__(self, rngs):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return StackedBlock(rngs)

    self.layers = create(rngs)
    self.head = nnx.Linear(4, 2, rngs=rngs)


def stacked_manager():
  mgr = opt.OptimizerManager()
  mgr.declare_stack("layers")
  mgr[...] = optax.adamw(1e-3)
  mgr["layers", :, "attn"] = lambda modules, param: optax.adam(1e-3 * 0.5 ** param.layer)
  mgr["layers", mgr.batch[1:], "mlp"] = optax.sgd(0.1, momentum=0.9)
  mgr["layers", 0] = None
  return mgr


def test_summary_of_stacked_model():
  model = StackedNet(nnx.Rngs(0))
  optimizer = opt.Optimizer(model, stacked_manager(), wrt=nnx.Param)
  rows = {row["label"]: row for row in opt.summary(optimizer).rows}
  assert opt.summary(model, optimizer.groups).rows == list(rows.values())
  # Layer 1's attention (kernel 16 + bias 4 floats) with Adam: mu, nu and a count.
  assert rows["layers/1/attn"]["elements"] == 20
  assert rows["layers/1/attn"]["state_bytes"] == 2 * 80 + 4
  # Layers 1 and 2 of the MLP share one SGD-momentum state: one trace.
  assert rows["layers/1:/mlp"]["variables"] == 2
  assert rows["layers/1:/mlp"]["state_bytes"] == 2 * 80
  assert rows["layers/0"]["state_bytes"] == 0


def test_explain_stacked_layer():
  model = StackedNet(nnx.Rngs(0))
  explanation = opt.explain(stacked_manager(), model, "layers/2/attn/kernel")
  assert explanation.path == "layers/attn/kernel"
  assert explanation.variable == "Param float32(3, 4, 4), layer 2 of its stack"
  assert [match["label"] for match in explanation.matches] == ["...", "layers/2/attn"]
  assert explanation.winner == 1
  assert explanation.group == "layers/2/attn"
  first = opt.explain(stacked_manager(), model, ("layers", 0, "attn", "kernel"))
  assert first.group == "layers/0"
  assert first.transform == "frozen"


def test_explain_stacked_without_layer():
  with pytest.raises(LookupError, match="'layers/attn/kernel' is a stacked Variable with 3 layers"):
    opt.explain(stacked_manager(), StackedNet(nnx.Rngs(0)), "layers/attn/kernel")
