"""Configuration identity of transforms built by rules."""

import functools
import types

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ueaj.opt._config import fingerprint


@pytest.mark.parametrize(
  "make",
  [
    lambda: optax.adamw(1e-3, weight_decay=0.1),
    lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1)),
    lambda: optax.adamw(optax.cosine_decay_schedule(1e-3, 100)),
    lambda: optax.masked(optax.sgd(0.1), {"w": True}),
    lambda: optax.sgd(jnp.float32(0.1)),
    lambda: optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3),
  ],
)
def test_equal_configs_equal(make):
  assert fingerprint(make()) == fingerprint(make())


@pytest.mark.parametrize(
  "first, second",
  [
    (lambda: optax.adamw(1e-3), lambda: optax.adamw(2e-3)),
    (lambda: optax.adamw(1e-3), lambda: optax.adam(1e-3)),
    (lambda: optax.sgd(1), lambda: optax.sgd(1.0)),
    (lambda: optax.sgd(np.float32(0.1)), lambda: optax.sgd(np.float32(0.2))),
    (
      lambda: optax.adamw(optax.cosine_decay_schedule(1e-3, 100)),
      lambda: optax.adamw(optax.cosine_decay_schedule(1e-3, 200)),
    ),
    (lambda: optax.masked(optax.sgd(0.1), {"w": True}), lambda: optax.masked(optax.sgd(0.1), {"w": False})),
  ],
)
def test_different_configs_differ(first, second):
  assert fingerprint(first()) != fingerprint(second())


def test_partial_compares_arguments():
  assert fingerprint(functools.partial(optax.sgd, 0.1)) == fingerprint(functools.partial(optax.sgd, 0.1))
  assert fingerprint(functools.partial(optax.sgd, 0.1)) != fingerprint(functools.partial(optax.sgd, 0.2))


def test_plain_objects_compare_attributes():
  class Holder:
    def __init__(self, value):
      self.value = value

  assert fingerprint(Holder(1.0)) == fingerprint(Holder(1.0))
  assert fingerprint(Holder(1.0)) != fingerprint(Holder(2.0))


def test_injected_schedules_equal():
  def make(scale):
    def schedule(step):
      return scale * optax.constant_schedule(1e-3)(step)

    return optax.inject_hyperparams(optax.adam)(learning_rate=schedule)

  assert fingerprint(make(2.0)) == fingerprint(make(2.0))
  assert fingerprint(make(2.0)) != fingerprint(make(3.0))


def test_modules_compare_identity():
  from flax import nnx

  first = nnx.Linear(1, 1, rngs=nnx.Rngs(0))
  second = nnx.Linear(1, 1, rngs=nnx.Rngs(0))
  assert fingerprint(first) == fingerprint(first)
  assert fingerprint(first) != fingerprint(second)


def test_opaque_object_identity():
  class Opaque:
    __slots__ = ()

  first, second = Opaque(), Opaque()
  assert fingerprint(first) == fingerprint(first)
  assert fingerprint(first) != fingerprint(second)


def test_recursive_closure_terminates():
  def outer():
    def inner(n):
      return inner(n - 1) if n else 0

    return inner

  assert fingerprint(outer()) == fingerprint(outer())


def test_number_types_stay_apart():
  assert fingerprint(1) != fingerprint(1.0)
  assert fingerprint(True) != fingerprint(1)
  assert fingerprint(np.float64(0.1)) == fingerprint(0.1)
  assert fingerprint("0.1") != fingerprint(0.1)


def test_empty_cell_differs_from_contents():
  def outer(late):
    def inner():
      return late

    return inner

  code = outer(None).__code__

  def with_cell(*contents):
    return types.FunctionType(code, {}, closure=(types.CellType(*contents),))

  assert fingerprint(with_cell()) == fingerprint(with_cell())
  for value in [None, "empty cell", ("empty cell",)]:
    assert fingerprint(with_cell()) != fingerprint(with_cell(value)), value
    assert fingerprint(with_cell(value)) == fingerprint(with_cell(value)), value


def test_shared_subtransform_equals_copies():
  inner = optax.sgd(0.1)
  assert fingerprint(optax.chain(inner, inner)) == fingerprint(optax.chain(optax.sgd(0.1), optax.sgd(0.1)))
