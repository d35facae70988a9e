"""Key parsing and formatting."""

import pytest
from flax import nnx

from ueaj import opt
from ueaj.opt import _keys


@pytest.mark.parametrize(
  "key, text",
  [
    (..., "mgr[...]"),
    ("layers", "mgr['layers']"),
    (("layers", slice(None), "attn"), "mgr['layers', :, 'attn']"),
    (("layers", slice(2, -1, 2)), "mgr['layers', 2:-1:2]"),
    (("layers", -1), "mgr['layers', -1]"),
    (("layers", ["q", 0]), "mgr['layers', ['q', 0]]"),
    ((..., nnx.LayerNorm), "mgr[..., nnx.LayerNorm]"),
    (("layers", opt.batch[0:4], "mlp"), "mgr['layers', batch[0:4], 'mlp']"),
    (("layers", opt.batch[0, 2]), "mgr['layers', batch[0, 2]]"),
  ],
)
def test_format_round_trip(key, text):
  assert _keys.format_pattern(_keys.parse_key(key)) == text


def test_batch_same_on_manager():
  mgr = opt.OptimizerManager()
  assert mgr.batch[0:4] == opt.batch[0:4]
  assert mgr.batch is opt.batch


def test_batch_tuple_is_list():
  assert opt.batch[0, 2] == opt.batch[[0, 2]]


def test_elements_hashable():
  pattern = _keys.parse_key(("layers", slice(None), [0, "q"], opt.batch[1:3], ..., nnx.Linear))
  assert hash(pattern) == hash(_keys.parse_key(("layers", slice(None), [0, "q"], opt.batch[1:3], ..., nnx.Linear)))


def test_slice_indices_numpy_rules():
  element = _keys.parse_element(slice(-3, None, -1), "test")
  assert list(element.indices(5)) == list(range(5)[-3::-1])


def test_manager_repr_lists_assignments():
  mgr = opt.OptimizerManager()
  mgr[...] = None
  mgr["head"] = lambda modules, param: None
  assert repr(mgr) == "OptimizerManager(\n  mgr[...] = frozen\n  mgr['head'] = rule <lambda>\n)"
