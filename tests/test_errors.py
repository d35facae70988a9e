"""Every error the library raises for bad input, with its message matched."""

import re

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from ueaj import opt


class Block(nnx.Module):

  def __init__(self, rngs):
    self.attn = nnx.Linear(4, 4, rngs=rngs)
    self.mlp = nnx.Linear(4, 4, rngs=rngs)


class Model(nnx.Module):

  def __init__(self, rngs):
    self.embed = nnx.Embed(10, 4, rngs=rngs)
    self.layers = nnx.List([Block(rngs) for _ in range(3)])
    self.head = nnx.Linear(4, 10, rngs=rngs)

  def __call__(self, tokens):
    hidden = self.embed(tokens)
    for block in self.layers:
      hidden = block.mlp(block.attn(hidden))
    return self.head(hidden)


@pytest.fixture
def model():
  return Model(nnx.Rngs(0))


def manager(*assignments):
  mgr = opt.OptimizerManager()
  for key, value in assignments:
    mgr[key] = value
  return mgr


# Assignment-time errors: the manager must be unchanged afterwards.


@pytest.mark.parametrize(
  "key, message",
  [
    (("layers", 1.5), r"key element 1 \(1\.5\): unsupported key element 1\.5 of type float"),
    (("layers", True), r"unsupported key element True of type bool"),
    (("layers", (0, 1)), r"write them as a list: mgr\['a', \[0, 2\]\]"),
    ((int,), r"Types must be subclasses of nnx\.Module or nnx\.Variable"),
    (("layers", slice("a", None)), r"slice start must be an int or None, got str 'a'"),
    (("layers", [0, 1.0]), r"a list may contain only str and int keys, got float 1\.0"),
  ],
)
def test_assign_bad_key_type(key, message):
  mgr = manager((..., optax.sgd(1.0)))
  with pytest.raises(TypeError, match=message):
    mgr[key] = optax.sgd(0.1)
  assert len(mgr.assignments) == 1


@pytest.mark.parametrize(
  "key, message",
  [
    (("layers", []), r"an empty list matches nothing"),
    (("layers", slice(None, None, 0)), r"slice step cannot be zero"),
    ((), r"Empty key mgr\[\(\)\]: use mgr\[\.\.\.\]"),
  ],
)
def test_assign_key_never_matches(key, message):
  mgr = opt.OptimizerManager()
  with pytest.raises(ValueError, match=message):
    mgr[key] = optax.sgd(0.1)
  assert mgr.assignments == ()


def test_assign_nested_batch():
  with pytest.raises(TypeError, match=r"batch elements cannot be nested"):
    opt.batch[opt.batch[0:2]]


@pytest.mark.parametrize(
  "value, message",
  [
    (3, r"mgr\['layers'\] = int 3: invalid value\. Assign an optax GradientTransformation"),
    ("adam", r"mgr\['layers'\] = str 'adam': invalid value"),
    (optax.adam, r"mgr\['layers'\] = optax\.adam: this is the optax factory.*optax\.adam\(1e-3\)"),
    (lambda param: None, r"a function rule must accept two positional arguments \(modules, param\)"),
  ],
)
def test_assign_bad_value(value, message):
  mgr = manager((..., optax.sgd(1.0)))
  with pytest.raises(TypeError, match=message):
    mgr["layers"] = value
  assert len(mgr.assignments) == 1


# Build-time errors: no Variable may be labelled afterwards.


def assert_unlabelled(model):
  for _, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    assert not variable.has_metadata(opt.LABEL_KEY)


def test_build_typo_lists_nearest(model):
  mgr = manager((..., optax.sgd(1.0)), (("layers", slice(None), "atn"), optax.sgd(0.1)))
  expected = (
    "mgr['layers', :, 'atn'] selects no Variable: element 2 ('atn') matched no"
    " key below 'layers/0' (and 2 other places).\n"
    "Nearest existing paths:\n"
    "  layers/0/attn\n  layers/1/attn\n  layers/2/attn\n  layers/0/mlp\n  layers/1/mlp\n"
  )
  with pytest.raises(opt.UnmatchedPatternError, match=re.escape(expected)):
    mgr.build(model)
  assert_unlabelled(model)


def test_build_typo_at_root(model):
  mgr = manager((..., optax.sgd(1.0)), ("embd", optax.sgd(0.1)))
  with pytest.raises(opt.UnmatchedPatternError, match=r"(?s)below the model root.*\n  embed\n"):
    mgr.build(model)


def test_build_typo_after_any_depth(model):
  mgr = manager((..., optax.sgd(1.0)), ((..., "bais"), optax.sgd(0.1)))
  with pytest.raises(
    opt.UnmatchedPatternError,
    match=r"element 1 \('bais'\) matched no key at any depth\.\nNearest existing paths:\n  layers/\d/\w+/bias",
  ):
    mgr.build(model)


def test_build_index_on_module(model):
  mgr = manager((..., optax.sgd(1.0)), (("embed", 0), optax.sgd(0.1)))
  with pytest.raises(
    opt.UnmatchedPatternError,
    match=re.escape(
      "below 'embed'; Embed is neither a sequence nor a declared stack, so integer"
      " indices and slices do not apply there. If its Variables are stacked along a"
      " layer axis by nnx.vmap or nnx.scan, declare it first:"
      " mgr.declare_stack('embed', axis=0)."
    ),
  ):
    mgr.build(model)


def test_build_unmatched_optional(model):
  mgr = manager((..., optax.sgd(1.0)))
  mgr.assign("encoder", None, required=False)
  mgr.assign(("layers", 7), None, required=False)
  groups = mgr.label(model)
  assert groups.labels == ("...",)


def test_build_unmatched_manager_default(model):
  mgr = opt.OptimizerManager(require_match=False)
  mgr[...] = optax.sgd(1.0)
  mgr["encoder"] = None
  assert mgr.label(model).labels == ("...",)


@pytest.mark.parametrize("key", [("layers", 5), ("layers", -4), ("layers", [0, 5]), ("layers", opt.batch[3])])
def test_build_index_out_of_range(model, key):
  mgr = manager((..., optax.sgd(1.0)), (key, optax.sgd(0.1)))
  with pytest.raises(
    IndexError,
    match=r"out of range for the sequence at 'layers' of length 3 \(valid indices are -3 to 2\)",
  ):
    mgr.build(model)
  assert_unlabelled(model)


def test_build_unassigned_lists_all(model):
  mgr = manager(("layers", optax.sgd(1.0)))
  expected = (
    "3 Variable(s) have no optimizer:\n  embed/embedding\n  head/bias\n  head/kernel\n"
    "Add a default with mgr[...] = optax.adamw(...)"
  )
  with pytest.raises(opt.UnassignedVariablesError, match=re.escape(expected)):
    mgr.build(model)
  assert_unlabelled(model)


def test_build_unassigned_truncates():
  model = nnx.List([nnx.Linear(1, 1, rngs=nnx.Rngs(0)) for _ in range(15)])
  mgr = manager(((0, "bias"), optax.sgd(1.0)))
  with pytest.raises(opt.UnassignedVariablesError, match=r"(?s)29 Variable\(s\).*\n  \.\.\. and 9 more\n"):
    mgr.build(model)


def test_rule_raises(model):
  def broken(modules, param):
    raise KeyError("layer_idx")

  mgr = manager((..., optax.sgd(1.0)), (("layers", 1), broken))
  with pytest.raises(
    opt.RuleError,
    match=re.escape(
      "mgr['layers', 1] rule 'broken' raised KeyError for the Variable at"
      " 'layers/1/attn/bias' (shape (4,), dtype float32): 'layer_idx'"
    ),
  ) as info:
    mgr.build(model)
  assert isinstance(info.value.__cause__, KeyError)
  assert_unlabelled(model)


def test_rule_returns_invalid(model):
  mgr = manager((..., lambda modules, param: 1e-3))
  with pytest.raises(
    opt.RuleError,
    match=r"mgr\[\.\.\.\] rule '<lambda>' returned float 0\.001 for the Variable at 'embed/embedding'; a rule must return",
  ):
    mgr.build(model)


# Update-time errors: readable instead of a raw pytree error.


def test_update_grads_missing_paths(model):
  tx = manager((..., optax.sgd(1.0))).build(model)
  params = nnx.state(model, nnx.Param)
  state = tx.init(params)
  grads = nnx.state(model.layers, nnx.Param)
  with pytest.raises(
    opt.StructureMismatchError,
    match=r"The gradients do not match the 15 parameters the optimizer was built for: 15 path\(s\) missing, first 'embed/embedding'; 12 unexpected path\(s\), first '0/attn/bias'",
  ):
    tx.update(grads, state, params)


def test_update_grads_wrong_shape(model):
  tx = manager((..., optax.sgd(1.0))).build(model)
  params = nnx.state(model, nnx.Param)
  state = tx.init(params)
  grads = jax.tree.map(lambda leaf: jnp.zeros((2,)), params)
  with pytest.raises(
    opt.StructureMismatchError,
    match=re.escape("The gradients at 'embed/embedding' have shape (2,), but the parameter has shape (10, 4)"),
  ):
    tx.update(grads, state, params)


def test_init_params_of_other_model(model):
  tx = manager((..., optax.sgd(1.0))).build(model)
  other = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  with pytest.raises(opt.StructureMismatchError, match=r"The parameters do not match"):
    tx.init(nnx.state(other, nnx.Param))


def test_optimizer_update_under_jit(model):
  optimizer = opt.Optimizer(model, manager((..., optax.sgd(1.0))), wrt=nnx.Param)
  grads = nnx.state(model.layers, nnx.Param)

  @nnx.jit
  def step(model, optimizer, grads):
    optimizer.update(model, grads)

  with pytest.raises(opt.StructureMismatchError, match=r"15 path\(s\) missing"):
    step(model, optimizer, grads)


def test_optimizer_bad_manager(model):
  with pytest.raises(TypeError, match=r"opt\.Optimizer expects an opt\.OptimizerManager or an optax transform, got dict"):
    opt.Optimizer(model, {"...": optax.sgd(1.0)}, wrt=nnx.Param)


def test_metadata_from_other_config(model):
  labelling = manager((..., optax.sgd(1.0)), ("head", optax.sgd(0.1)))
  labelling.label(model)
  groups = manager((..., optax.sgd(1.0))).label(nnx.Linear(1, 1, rngs=nnx.Rngs(0)))
  from ueaj.opt import _manager

  graph = _manager.graph_for(labelling, model, nnx.Param)
  with pytest.raises(opt.MissingLabelError, match=r"Labels \['head'\] in the Variables' metadata belong to no group"):
    _manager.transform_for(graph, groups)


def test_groups_unknown_label(model):
  groups = manager((..., optax.sgd(1.0))).label(model)
  with pytest.raises(KeyError, match=r"No group is labelled 'head'; labels are \['\.\.\.'\]"):
    groups["head"]
