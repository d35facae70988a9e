"""Benchmark `ueaj.opt` against plain Optax optimizers on NNX models.

Run `python benchmarks/bench_opt.py --help` for the options. The script
measures every configuration in one run and prints one table. Each row
gives the time to build the optimizer, the time to trace, lower and compile
one training step, the median step time, the optimizer-state bytes and the
compiled step's memory. Ratios compare each row with (a), a single
`optax.adamw` in `nnx.Optimizer`, and, for the `nnx.List` model, with (b),
a hand-built `optax.partition` that has the same labels as the ueaj
configuration. A second table times labelling and building on a model with
many Variables, and a list checks the project's performance targets.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ueaj import opt

LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-4
# Per-layer decay: layer i of L gets LEARNING_RATE * LAYER_DECAY ** (L - 1 - i).
LAYER_DECAY = 0.9

FULL_PRESET = {
  "layers": [24, 48, 96],
  "width": 128,
  "batch": 16,
  "steps": 50,
  "warmup": 5,
  "repeats": 3,
  "scale_variables": [2500, 5000, 10000],
  "scale_assignments": [10, 25, 50],
}
QUICK_PRESET = {
  "layers": [2, 4],
  "width": 16,
  "batch": 4,
  "steps": 5,
  "warmup": 1,
  "repeats": 1,
  "scale_variables": [400, 800],
  "scale_assignments": [5, 10],
}


# --------------------------------------------------------------------------
# Models


class Block(nnx.Module):
  """A residual block of two `nnx.Linear` layers with bias: four Params."""

  def __init__(self, width: int, rngs: nnx.Rngs, layer_index: int | None = None):
    # Static attribute read by the per-layer decay rule on the List model;
    # None in the stacked model, where `ParamInfo.layer` gives the layer.
    self.layer_index = layer_index
    self.a = nnx.Linear(width, width, rngs=rngs)
    self.b = nnx.Linear(width, width, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return x + self.b(nnx.relu(self.a(x)))


class ListModel(nnx.Module):
  """`layers` blocks in an `nnx.List`, applied one after another."""

  def __init__(self, layers: int, width: int, rngs: nnx.Rngs):
    self.layers = nnx.List([Block(width, rngs, index) for index in range(layers)])

  def __call__(self, x: jax.Array) -> jax.Array:
    for block in self.layers:
      x = block(x)
    return x


class StackedModel(nnx.Module):
  """`layers` blocks stacked by `nnx.vmap` into one module and run with `nnx.scan`."""

  def __init__(self, layers: int, width: int, rngs: nnx.Rngs):
    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create_blocks(rngs: nnx.Rngs) -> Block:
      return Block(width, rngs)

    self.layers = create_blocks(rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def apply_block(x: jax.Array, block: Block) -> jax.Array:
      return block(x)

    return apply_block(x, self.layers)


MODEL_KINDS = ("list", "stacked")


def build_model(kind: str, layers: int, width: int, seed: int = 0) -> nnx.Module:
  """Build a `ListModel` or `StackedModel` with deterministic weights.

  Args:
    kind: `"list"` or `"stacked"`.
    layers: Number of blocks.
    width: Input and output size of every `nnx.Linear`.
    seed: Seed of the `nnx.Rngs` the weights are drawn from.
  """
  if kind == "list":
    return ListModel(layers, width, nnx.Rngs(seed))
  if kind == "stacked":
    return StackedModel(layers, width, nnx.Rngs(seed))
  raise ValueError(f"Invalid model kind {kind!r}; expected one of {MODEL_KINDS}.")


def stacked_like(model: ListModel) -> StackedModel:
  """Build a `StackedModel` whose layer i has the weights of `model.layers[i]`."""
  first = model.layers[0]
  stacked = StackedModel(len(model.layers), first.a.in_features, nnx.Rngs(0))
  block_states = [nnx.state(block, nnx.Param) for block in model.layers]
  weights = jax.tree.map(lambda *layers: jnp.stack(layers), *block_states)
  nnx.update(stacked.layers, weights)
  return stacked


def mse_loss(model: nnx.Module, x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean squared error of `model(x)` against `y`."""
  return jnp.mean((model(x) - y) ** 2)


def make_batch(batch: int, width: int, seed: int = 1) -> tuple[jax.Array, jax.Array]:
  """Draw one fixed `(x, y)` batch of shape `(batch, width)` each."""
  x_key, y_key = jax.random.split(jax.random.key(seed))
  return jax.random.normal(x_key, (batch, width)), jax.random.normal(y_key, (batch, width))


# --------------------------------------------------------------------------
# Configurations


def adamw() -> optax.GradientTransformation:
  """Return AdamW at `LEARNING_RATE` and `WEIGHT_DECAY`, the default of every configuration."""
  return optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)


def decayed_learning_rate(layer: int, layers: int) -> float:
  """Learning rate of `layer` under per-layer decay: the last layer gets the base rate."""
  return LEARNING_RATE * LAYER_DECAY ** (layers - 1 - layer)


def layer_decay_rule(layers: int) -> Callable[[tuple, opt.ParamInfo], optax.GradientTransformation]:
  """Make the ueaj function rule of the per-layer decay configuration.

  The layer is `param.layer` for a declared stack, and otherwise the
  `layer_index` of the `Block` on the Variable's path.
  """

  def rule(modules: tuple, param: opt.ParamInfo) -> optax.GradientTransformation:
    layer = param.layer
    if layer is None:
      block = next(module for module in modules if isinstance(module, Block))
      layer = block.layer_index
    return optax.adamw(decayed_learning_rate(layer, layers), weight_decay=WEIGHT_DECAY)

  return rule


@dataclasses.dataclass(frozen=True)
class Config:
  """One optimizer configuration, written for ueaj and as a hand-built partition.

  Attributes:
    name: Short name used in the table and on the command line.
    description: One line for `--help`.
    assign: Fills an `OptimizerManager` for a model of the given number of
      layers.
    hand_label: Returns the hand-built label of a `ListModel` parameter path,
      such as `('layers', 3, 'a', 'kernel')`, given the number of layers. It
      equals the label ueaj gives that Variable.
    hand_transform: Returns the transform of a hand-built label, given the
      number of layers.
  """

  name: str
  description: str
  assign: Callable[[opt.OptimizerManager, int], None]
  hand_label: Callable[[tuple, int], str]
  hand_transform: Callable[[str, int], optax.GradientTransformation]


def _assign_single(mgr: opt.OptimizerManager, layers: int) -> None:
  mgr[...] = adamw()


def _assign_decay_split(mgr: opt.OptimizerManager, layers: int) -> None:
  mgr[...] = adamw()
  mgr[..., "bias"] = optax.adam(LEARNING_RATE)


def _assign_per_layer(mgr: opt.OptimizerManager, layers: int) -> None:
  mgr["layers", :] = adamw()


def _assign_layer_decay(mgr: opt.OptimizerManager, layers: int) -> None:
  mgr["layers", :] = layer_decay_rule(layers)


def _assign_per_variable(mgr: opt.OptimizerManager, layers: int) -> None:
  mgr["layers", :, ["a", "b"], ["kernel", "bias"]] = adamw()


def _label_all(path: tuple, layers: int) -> str:
  return "..."


def _label_bias_apart(path: tuple, layers: int) -> str:
  return ".../bias" if path[-1] == "bias" else "..."


def _label_layer(path: tuple, layers: int) -> str:
  return f"layers/{path[1]}"


def _label_path(path: tuple, layers: int) -> str:
  return "/".join(str(key) for key in path)


def _adamw_for_any(label: str, layers: int) -> optax.GradientTransformation:
  return adamw()


def _adam_for_bias(label: str, layers: int) -> optax.GradientTransformation:
  return optax.adam(LEARNING_RATE) if label == ".../bias" else adamw()


def _decayed_adamw_for_layer(label: str, layers: int) -> optax.GradientTransformation:
  layer = int(label.split("/")[1])
  return optax.adamw(decayed_learning_rate(layer, layers), weight_decay=WEIGHT_DECAY)


CONFIGS = {
  config.name: config
  for config in [
    Config("single", "one group: mgr[...] = adamw", _assign_single, _label_all, _adamw_for_any),
    Config(
      "decay-split",
      "two groups: mgr[...] = adamw, then mgr[..., 'bias'] = adam",
      _assign_decay_split,
      _label_bias_apart,
      _adam_for_bias,
    ),
    Config(
      "per-layer",
      "one group per layer: mgr['layers', :] = adamw",
      _assign_per_layer,
      _label_layer,
      _adamw_for_any,
    ),
    Config(
      "layer-decay",
      "one group per layer from a rule: adamw at 1e-3 * 0.9 ** (L - 1 - layer)",
      _assign_layer_decay,
      _label_layer,
      _decayed_adamw_for_layer,
    ),
    Config(
      "per-variable",
      "one group per Variable: mgr['layers', :, ['a', 'b'], ['kernel', 'bias']] = adamw",
      _assign_per_variable,
      _label_path,
      _adamw_for_any,
    ),
  ]
}

# Optimizer methods: (a) one optax.adamw for everything, (b) a hand-built
# optax.partition with the labels of a configuration, and the ueaj manager.
METHOD_ADAMW = "adamw"
METHOD_HAND_BUILT = "hand-built"
METHOD_UEAJ = "ueaj"


def make_manager(config: Config, layers: int, stacked: bool) -> opt.OptimizerManager:
  """Build the ueaj manager of `config`, declaring the stack on a `StackedModel`."""
  mgr = opt.OptimizerManager()
  if stacked:
    mgr.declare_stack("layers")
  config.assign(mgr, layers)
  return mgr


def state_path(keypath: Sequence[Any]) -> tuple:
  """Convert a JAX key path of an `nnx.State` into NNX path keys."""
  keys = []
  for entry in keypath:
    if isinstance(entry, jax.tree_util.DictKey):
      keys.append(entry.key)
    elif isinstance(entry, jax.tree_util.SequenceKey):
      keys.append(entry.idx)
    elif isinstance(entry, jax.tree_util.GetAttrKey):
      keys.append(entry.name)
    else:
      keys.append(getattr(entry, "key", entry))
  return tuple(keys)


def hand_built_labels(config: Config, params: Any, layers: int) -> Any:
  """Label every Variable of `params` by its path, as a tree of strings."""
  return jax.tree_util.tree_map_with_path(
    lambda keypath, _: config.hand_label(state_path(keypath), layers),
    params,
    is_leaf=lambda leaf: isinstance(leaf, nnx.Variable),
  )


def hand_built_transform(
  config: Config, model: nnx.Module, layers: int
) -> optax.GradientTransformation:
  """Build the `optax.partition` of `config` for a `ListModel` without ueaj.

  The label tree is computed once. Its leaves sit where the Variables are,
  so it is a prefix of both the Variable state that `init` receives and the
  array state that `update` receives.
  """
  labels = hand_built_labels(config, nnx.state(model, nnx.Param), layers)
  transforms = {
    label: config.hand_transform(label, layers) for label in dict.fromkeys(jax.tree.leaves(labels))
  }
  return optax.partition(transforms, labels)


def build_optimizer(
  method: str, config: Config | None, model: nnx.Module, layers: int
) -> tuple[nnx.Optimizer, int]:
  """Build the optimizer of one table row.

  Args:
    method: `METHOD_ADAMW`, `METHOD_HAND_BUILT` or `METHOD_UEAJ`.
    config: The configuration; unused for `METHOD_ADAMW`.
    model: The model to optimize; ueaj writes labels into its Variables.
    layers: Number of blocks in `model`.

  Returns:
    The optimizer and its number of groups (optimizer states).
  """
  if method == METHOD_ADAMW:
    return nnx.Optimizer(model, adamw(), wrt=nnx.Param), 1
  if method == METHOD_HAND_BUILT:
    transform = hand_built_transform(config, model, layers)
    optimizer = nnx.Optimizer(model, transform, wrt=nnx.Param)
    return optimizer, len(optimizer.opt_state.inner_states)
  if method == METHOD_UEAJ:
    mgr = make_manager(config, layers, stacked=isinstance(model, StackedModel))
    optimizer = opt.Optimizer(model, mgr, wrt=nnx.Param)
    return optimizer, len(optimizer.groups.labels)
  raise ValueError(
    f"Invalid method {method!r}; expected one of"
    f" {(METHOD_ADAMW, METHOD_HAND_BUILT, METHOD_UEAJ)}."
  )


# --------------------------------------------------------------------------
# Measurement of one configuration


@dataclasses.dataclass
class Row:
  """The measurements of one configuration on one model.

  Times are in seconds and sizes in bytes. Memory fields are None when the
  backend has no `memory_analysis()`. `fusions` counts the fusion
  instructions of the compiled step, a measure of program size that does
  not depend on machine load; None when the backend gives no HLO text.
  """

  model: str
  layers: int
  method: str
  config: str
  groups: int
  build_s: float
  trace_s: float
  lower_s: float
  compile_s: float
  step_s: float
  state_bytes: int
  param_bytes: int
  temp_bytes: int | None
  peak_bytes: int | None
  fusions: int | None

  @property
  def label(self) -> str:
    """Row name in the table: `(a) adamw`, `(b) per-layer` or `ueaj per-layer`."""
    if self.method == METHOD_ADAMW:
      return "(a) adamw"
    if self.method == METHOD_HAND_BUILT:
      return f"(b) {self.config}"
    return f"ueaj {self.config}"


def make_train_step(graphdef: Any) -> Callable:
  """Make a pure training step over the split `(model, optimizer)` state.

  The returned function maps `(state, x, y)` to `(loss, new_state)`, so it
  can be traced, lowered and compiled explicitly.
  """

  def train_step(state: Any, x: jax.Array, y: jax.Array) -> tuple[jax.Array, Any]:
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(mse_loss)(model, x, y)
    optimizer.update(model, grads)
    return loss, nnx.state((model, optimizer))

  return train_step


def tree_bytes(tree: Any) -> int:
  """Sum the `nbytes` of every array leaf of `tree`."""
  return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def compiled_memory(compiled: Any) -> tuple[int | None, int | None]:
  """Return (temp bytes, peak bytes) of a compiled function, or Nones if unknown.

  Peak bytes are argument + output + temp - alias: donated arguments that
  outputs reuse (the alias bytes) are counted once.
  """
  try:
    stats = compiled.memory_analysis()
  except (NotImplementedError, jax.errors.JaxRuntimeError):
    return None, None
  if stats is None:
    return None, None
  peak = (
    stats.argument_size_in_bytes
    + stats.output_size_in_bytes
    + stats.temp_size_in_bytes
    - stats.alias_size_in_bytes
  )
  return stats.temp_size_in_bytes, peak


def count_fusions(compiled: Any) -> int | None:
  """Count the fusion instructions in the optimized HLO of a compiled function."""
  try:
    text = compiled.as_text()
  except (NotImplementedError, jax.errors.JaxRuntimeError):
    return None
  return None if text is None else text.count(" fusion(")


def time_call(
  function: Callable[[], Any], repeats: int, pause_gc: bool = False
) -> tuple[float, Any]:
  """Call `function` `repeats` times; return the minimum seconds and the last result.

  A full garbage collection runs before each call, so garbage left by
  earlier rows is not collected inside the timing. With `pause_gc`, the
  collector is also paused while each call runs, as `timeit` does by
  default.
  """
  best = float("inf")
  result = None
  for _ in range(repeats):
    gc.collect()
    enabled = gc.isenabled()
    if pause_gc:
      gc.disable()
    try:
      start = time.perf_counter()
      result = function()
      best = min(best, time.perf_counter() - start)
    finally:
      if enabled:
        gc.enable()
  return best, result


def time_compile_stages(
  graphdef: Any, state: Any, x: jax.Array, y: jax.Array
) -> tuple[float, float, float, Any]:
  """Trace, lower and compile the training step once, timing each stage.

  Each call wraps a new function in a new `jax.jit`, because repeating a
  stage on the same jitted function hits JAX's caches and takes no time.

  Returns:
    The trace, lower and compile seconds, and the compiled step.
  """
  jitted = jax.jit(make_train_step(graphdef), donate_argnums=0)
  start = time.perf_counter()
  traced = jitted.trace(state, x, y)
  traced_at = time.perf_counter()
  lowered = traced.lower()
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  compiled_at = time.perf_counter()
  return traced_at - start, lowered_at - traced_at, compiled_at - lowered_at, compiled


@dataclasses.dataclass
class StepRunner:
  """A compiled training step and its state, run one timed step at a time."""

  graphdef: Any
  compiled: Any
  state: Any
  x: jax.Array
  y: jax.Array

  def run(self, steps: int) -> None:
    """Run `steps` untimed steps."""
    for _ in range(steps):
      _, self.state = self.compiled(self.state, self.x, self.y)
    jax.block_until_ready(self.state)

  def time_step(self) -> float:
    """Run one step and return its wall time in seconds."""
    start = time.perf_counter()
    loss, self.state = self.compiled(self.state, self.x, self.y)
    jax.block_until_ready((loss, self.state))
    return time.perf_counter() - start


def retime_compiles(measured: list[tuple[Row, StepRunner]], rounds: int) -> None:
  """Trace, lower and compile every row's step `rounds` more times, interleaved.

  Each row keeps the minimum time of each stage. As with `time_steps`, a
  slow phase of the machine then affects every row of the comparison alike.
  """
  for _ in range(rounds):
    for row, runner in measured:
      trace_s, lower_s, compile_s, _ = time_compile_stages(
        runner.graphdef, runner.state, runner.x, runner.y
      )
      row.trace_s = min(row.trace_s, trace_s)
      row.lower_s = min(row.lower_s, lower_s)
      row.compile_s = min(row.compile_s, compile_s)


def time_steps(runners: list[StepRunner], steps: int) -> list[float]:
  """Time `steps` rounds of one step per runner; return each runner's median.

  Interleaving the runners makes a slow phase of a shared machine slow down
  every runner alike, so the ratios between them stay fair. Each round
  starts at the next runner, so no runner always follows the same one.
  """
  times: list[list[float]] = [[] for _ in runners]
  for round_number in range(steps):
    for offset in range(len(runners)):
      index = (round_number + offset) % len(runners)
      times[index].append(runners[index].time_step())
  return [statistics.median(samples) for samples in times]


def measure(
  kind: str,
  method: str,
  config: Config | None,
  layers: int,
  args: argparse.Namespace,
) -> tuple[Row, StepRunner]:
  """Build and compile one configuration, measure it and warm its step up.

  Model initialization is not timed. Building is repeated `args.repeats`
  times and the minimum is kept. Trace, lower and compile are timed once
  here, and `retime_compiles` repeats them next to the other rows of the
  same model. The step has run `args.warmup` untimed steps; the returned
  row's `step_s` is NaN until `time_steps` times the runner.
  """
  model = build_model(kind, layers, args.width, args.seed)
  x, y = make_batch(args.batch, args.width, args.seed + 1)

  build_s, (optimizer, groups) = time_call(
    lambda: build_optimizer(method, config, model, layers), args.repeats
  )
  state_bytes = tree_bytes(nnx.state(optimizer))
  param_bytes = tree_bytes(nnx.state(model, nnx.Param))

  graphdef, state = nnx.split((model, optimizer))
  trace_s, lower_s, compile_s, compiled = time_compile_stages(graphdef, state, x, y)
  temp_bytes, peak_bytes = compiled_memory(compiled)

  runner = StepRunner(graphdef, compiled, state, x, y)
  runner.run(args.warmup)

  row = Row(
    model=kind,
    layers=layers,
    method=method,
    config="" if config is None else config.name,
    groups=groups,
    build_s=build_s,
    trace_s=trace_s,
    lower_s=lower_s,
    compile_s=compile_s,
    step_s=math.nan,
    state_bytes=state_bytes,
    param_bytes=param_bytes,
    temp_bytes=temp_bytes,
    peak_bytes=peak_bytes,
    fusions=count_fusions(compiled),
  )
  return row, runner


def planned_rows(args: argparse.Namespace) -> list[tuple[str, str, Config | None, int]]:
  """List `(model kind, method, config, layers)` for every row, in table order.

  (b) rows exist only for the List model, because a hand-built partition
  cannot give the layers of one stacked array separate states.
  """
  plan = []
  for layers in args.layers:
    for kind in args.models:
      plan.append((kind, METHOD_ADAMW, None, layers))
      for name in args.configs:
        if kind == "list":
          plan.append((kind, METHOD_HAND_BUILT, CONFIGS[name], layers))
        plan.append((kind, METHOD_UEAJ, CONFIGS[name], layers))
  return plan


def warm_up(args: argparse.Namespace) -> None:
  """Run every configuration once at 2 layers and 1 step, untimed.

  JAX compiles each eager operation and caches some traces on first use,
  so without this pass the first rows would pay one-time costs that later
  rows skip.
  """
  tiny = argparse.Namespace(**{**vars(args), "steps": 1, "warmup": 0, "repeats": 1})
  done = set()
  for kind, method, config, _ in planned_rows(args):
    if (kind, method, config) not in done:
      done.add((kind, method, config))
      _, runner = measure(kind, method, config, 2, tiny)
      time_steps([runner], 1)


# --------------------------------------------------------------------------
# Labelling scalability


class Gain(nnx.Module):
  """One Param, so that a type key (`mgr[..., Gain]`) has something to select."""

  def __init__(self):
    self.scale = nnx.Param(jnp.ones((2,)))


class Cell(nnx.Module):
  """A tiny module with four Params: `w`, `b`, `gain/scale` and `shift`."""

  def __init__(self):
    self.w = nnx.Param(jnp.zeros((2, 2)))
    self.b = nnx.Param(jnp.zeros((2,)))
    self.gain = Gain()
    self.shift = nnx.Param(jnp.zeros((2,)))


class WideModel(nnx.Module):
  """An `nnx.List` of `cells` Cells: 4 * cells Variables."""

  def __init__(self, cells: int):
    self.cells = nnx.List([Cell() for _ in range(cells)])


def _ndim_rule(modules: tuple, param: opt.ParamInfo) -> optax.GradientTransformation:
  return adamw() if param.ndim == 2 else optax.adam(LEARNING_RATE)


def add_scale_assignments(mgr: opt.OptimizerManager, count: int, cells: int) -> None:
  """Add `count` assignments that mix every key kind to `mgr` for a `WideModel`.

  The first assignment is the default `mgr[...]`. The others cycle through
  names, `...`, slices with and without a step, `batch[...]`, lists,
  negative ints, a module type and a function rule, at positions spread
  over the cells. Plain slices, which give each cell its own group, span at
  most 8 cells, and wider ranges use `batch[...]`, which makes one group,
  so the number of groups stays near the number of assignments.
  """
  mgr[...] = adamw()
  for index in range(1, count):
    rate = LEARNING_RATE * (1 + index / count)
    start = (index * 7919) % max(cells - 8, 1)
    kind = index % 8
    if kind == 0:
      mgr[..., ("w", "b", "shift")[index % 3]] = optax.adam(rate)
    elif kind == 1:
      mgr["cells", start : start + 8] = optax.sgd(rate)
    elif kind == 2:
      mgr["cells", mgr.batch[start : cells : 16], "w"] = optax.adamw(rate)
    elif kind == 3:
      mgr["cells", [start, start + 3, start + 5], ["b", "shift"]] = optax.adam(rate)
    elif kind == 4:
      mgr["cells", -1 - (index % cells)] = None
    elif kind == 5:
      mgr["cells", mgr.batch[start : start + cells // 4], Gain] = optax.sgd(rate)
    elif kind == 6:
      mgr["cells", mgr.batch[start:], ...] = _ndim_rule
    else:
      mgr["cells", start : start + 8 : 2, ..., "scale"] = optax.adam(rate)


@dataclasses.dataclass
class ScaleRow:
  """Labelling and building time for one model size and assignment count.

  `state_s` is the time of `nnx.state(model, nnx.Param)` on the same model:
  Flax's own traversal, which every optimizer pays, as a reference.
  `build_paused_s` is the build time with Python's garbage collector paused:
  the work of `build` itself, without the full collections that its
  allocations trigger over the whole process.
  """

  variables: int
  assignments: int
  groups: int
  state_s: float
  label_s: float
  build_s: float
  build_paused_s: float

  @property
  def build_per_unit_ns(self) -> float:
    """Build time per (Variable x assignment), in nanoseconds."""
    return self.build_s / (self.variables * self.assignments) * 1e9

  @property
  def build_over_state(self) -> float:
    """Build time as a multiple of one `nnx.state` call on the same model."""
    return self.build_s / self.state_s


# A WideModel needs at least 8 cells for every key of add_scale_assignments
# to select something.
MIN_SCALE_VARIABLES = 32


def measure_labelling(args: argparse.Namespace) -> list[ScaleRow]:
  """Time `mgr.label` and `mgr.build` (which labels again) over the requested sizes."""
  rows = []
  for variables in args.scale_variables:
    model = WideModel(variables // 4)
    cells = len(model.cells)
    state_s, _ = time_call(lambda: nnx.state(model, nnx.Param), args.repeats)
    for count in args.scale_assignments:
      mgr = opt.OptimizerManager()
      add_scale_assignments(mgr, count, cells)
      label_s, groups = time_call(lambda: mgr.label(model), args.repeats)
      build_s, _ = time_call(lambda: mgr.build(model), args.repeats)
      paused_s, _ = time_call(lambda: mgr.build(model), args.repeats, pause_gc=True)
      row = ScaleRow(4 * cells, count, len(groups.labels), state_s, label_s, build_s, paused_s)
      rows.append(row)
      progress(
        f"labelling {row.variables} Variables x {count} assignments:"
        f" label {label_s:.3f} s, build {build_s:.3f} s ({paused_s:.3f} s with GC paused)"
      )
  return rows


# --------------------------------------------------------------------------
# Report


def progress(message: str) -> None:
  """Print one progress line to stderr."""
  print(message, file=sys.stderr, flush=True)


def format_bytes(count: int | None) -> str:
  """Format a byte count with a binary unit, or `n/a` when unknown."""
  if count is None:
    return "n/a"
  value = float(count)
  for unit in ("B", "KiB", "MiB"):
    if value < 1024:
      return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
    value /= 1024
  return f"{value:.2f} GiB"


@dataclasses.dataclass(frozen=True)
class Metric:
  """A column of the main table."""

  field: str
  header: str
  format: Callable[[Any], str]


METRICS = [
  Metric("build_s", "build s", lambda value: f"{value:.3f}"),
  Metric("trace_s", "trace s", lambda value: f"{value:.3f}"),
  Metric("lower_s", "lower s", lambda value: f"{value:.3f}"),
  Metric("compile_s", "compile s", lambda value: f"{value:.3f}"),
  Metric("step_s", "step ms", lambda value: f"{value * 1e3:.2f}"),
  Metric("state_bytes", "opt state", format_bytes),
  Metric("temp_bytes", "temp", format_bytes),
  Metric("peak_bytes", "peak", format_bytes),
  Metric("fusions", "fusions", lambda value: "n/a" if value is None else str(value)),
]


def baseline_of(rows: list[Row], row: Row, method: str) -> Row | None:
  """Find the row of `method` that `row` is compared with (same model and layers)."""
  for other in rows:
    if (other.model, other.layers, other.method) != (row.model, row.layers, method):
      continue
    if method == METHOD_HAND_BUILT and other.config != row.config:
      continue
    return other
  return None


def ratio(value: Any, reference: Any) -> float | None:
  """Return `value / reference`, or None when either is missing or the reference is 0."""
  if value is None or reference is None or reference == 0:
    return None
  return value / reference


def row_ratios(rows: list[Row], row: Row) -> dict[str, dict[str, float | None]]:
  """Compute the ratio of each metric of `row` to (a) and, for ueaj on List, to (b)."""
  references = {}
  if row.method != METHOD_ADAMW:
    references["a"] = baseline_of(rows, row, METHOD_ADAMW)
  if row.method == METHOD_UEAJ and row.model == "list":
    references["b"] = baseline_of(rows, row, METHOD_HAND_BUILT)
  return {
    name: {
      metric.field: ratio(getattr(row, metric.field), getattr(reference, metric.field))
      for metric in METRICS
    }
    for name, reference in references.items()
    if reference is not None
  }


def format_cell(metric: Metric, row: Row, ratios: dict[str, dict[str, float | None]]) -> str:
  """Format a value followed by its ratios, as `1.234 (1.02/0.99)`."""
  text = metric.format(getattr(row, metric.field))
  parts = [ratios[name][metric.field] for name in ("a", "b") if name in ratios]
  if parts:
    text += " (" + "/".join("-" if part is None else f"{part:.2f}" for part in parts) + ")"
  return text


def render_table(header: list[str], body: list[list[str]], markdown: bool) -> str:
  """Render rows as a Markdown table or as aligned plain text."""
  if markdown:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)
  widths = [max(len(cells[column]) for cells in [header, *body]) for column in range(len(header))]

  def line(cells: list[str]) -> str:
    return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()

  dashes = ["-" * width for width in widths]
  return "\n".join(line(cells) for cells in [header, dashes, *body])


def main_table(rows: list[Row], markdown: bool) -> str:
  """Render the configurations table."""
  header = ["model", "L", "configuration", "groups"] + [metric.header for metric in METRICS]
  body = []
  for row in rows:
    ratios = row_ratios(rows, row)
    cells = [row.model, str(row.layers), row.label, str(row.groups)]
    body.append(cells + [format_cell(metric, row, ratios) for metric in METRICS])
  return render_table(header, body, markdown)


def scale_table(rows: list[ScaleRow], markdown: bool) -> str:
  """Render the labelling scalability table."""
  header = [
    "Variables", "assignments", "groups", "nnx.state s", "label s", "build s",
    "build / nnx.state", "build s, GC paused", "build ns per Variable x assignment",
  ]
  body = [
    [
      f"{row.variables:,}",
      str(row.assignments),
      str(row.groups),
      f"{row.state_s:.3f}",
      f"{row.label_s:.3f}",
      f"{row.build_s:.3f}",
      f"{row.build_over_state:.2f}x",
      f"{row.build_paused_s:.3f}",
      f"{row.build_per_unit_ns:.0f}",
    ]
    for row in rows
  ]
  return render_table(header, body, markdown)


@dataclasses.dataclass
class Target:
  """One performance target and its outcome."""

  name: str
  measured: str
  met: bool | None


def find_row(rows: list[Row], model: str, layers: int, method: str, config: str = "") -> Row | None:
  """Return the row with these keys, or None."""
  for row in rows:
    if (row.model, row.layers, row.method, row.config) == (model, layers, method, config):
      return row
  return None


def _ratio_target(
  rows: list[Row],
  name: str,
  model: str,
  layer_counts: Sequence[int],
  config: str,
  metric: str,
  reference_method: str,
  limit: float,
  show_fusions: bool = False,
) -> Target:
  """Check that `metric` of ueaj `config` is at most `limit` times the reference row's.

  The outcome is None (n/a) when a layer count lacks either row. With
  `show_fusions`, each layer count also lists the fusion counts of both
  compiled steps, which do not depend on machine load.
  """
  reference_config = config if reference_method == METHOD_HAND_BUILT else ""
  parts = []
  values = []
  for layers in layer_counts:
    row = find_row(rows, model, layers, METHOD_UEAJ, config)
    reference = find_row(rows, model, layers, reference_method, reference_config)
    value = None
    if row is not None and reference is not None:
      value = ratio(getattr(row, metric), getattr(reference, metric))
    values.append(value)
    part = f"L={layers}: " + ("not measured" if value is None else f"{value:.2f}x")
    if show_fusions and value is not None:
      part += f" (fusions {row.fusions} vs {reference.fusions})"
    parts.append(part)
  if not values or None in values:
    return Target(name, ", ".join(parts) or "not measured", None)
  return Target(name, ", ".join(parts), all(value <= limit for value in values))


def evaluate_targets(
  rows: list[Row], scale_rows: list[ScaleRow], layers: Sequence[int]
) -> list[Target]:
  """Check the measured rows against the project's performance targets.

  Targets stated for 96 layers (48 and 96 for the stacked model) use those
  layer counts when the run has them, and otherwise the largest measured
  (the two largest for the stacked model).
  """
  largest = [96] if 96 in layers else [max(layers)]
  stacked_layers = [count for count in layers if count in (48, 96)] or sorted(layers)[-2:]
  return [
    _ratio_target(
      rows, "compile time, ueaj per-layer on the List model <= 1.3x (a)",
      "list", largest, "per-layer", "compile_s", METHOD_ADAMW, 1.3,
    ),
    _ratio_target(
      rows, "step time, ueaj per-layer on the List model <= 1.05x (b)",
      "list", sorted(layers), "per-layer", "step_s", METHOD_HAND_BUILT, 1.05,
      show_fusions=True,
    ),
    state_bytes_target(rows),
    labelling_target(scale_rows),
    _ratio_target(
      rows, "compile time, ueaj layer-decay on the stacked model <= 1.1x (a)",
      "stacked", stacked_layers, "layer-decay", "compile_s", METHOD_ADAMW, 1.1,
    ),
    _ratio_target(
      rows, "step time, ueaj layer-decay on the stacked model <= 1.05x (a)",
      "stacked", stacked_layers, "layer-decay", "step_s", METHOD_ADAMW, 1.05,
      show_fusions=True,
    ),
    extra_buffer_target(rows, stacked_layers),
  ]


def state_bytes_target(rows: list[Row]) -> Target:
  """Check that every ueaj row of the List model has exactly the state bytes of its (b) row."""
  name = "optimizer-state bytes, ueaj == (b) on the List model"
  compared = 0
  unequal = []
  for row in rows:
    if row.model != "list" or row.method != METHOD_UEAJ:
      continue
    reference = find_row(rows, "list", row.layers, METHOD_HAND_BUILT, row.config)
    if reference is None:
      continue
    compared += 1
    if row.state_bytes != reference.state_bytes:
      unequal.append(
        f"{row.config} L={row.layers}: {row.state_bytes} vs {reference.state_bytes} bytes"
      )
  if compared == 0:
    return Target(name, "not measured", None)
  measured = f"equal in {compared - len(unequal)} of {compared} configurations"
  if unequal:
    measured += "; " + "; ".join(unequal)
  return Target(name, measured, not unequal)


def labelling_target(scale_rows: list[ScaleRow]) -> Target:
  """Check that the largest labelling run builds in under a second and grows linearly.

  The one-second bound applies to the build time as a user sees it, garbage
  collection included. Growth is judged on the build time with the garbage
  collector paused, because a full collection scans the whole process,
  model included, so its cost grows faster than the work of `build` (one
  `nnx.state` call grows the same way). Growth counts as linear when that
  time grows by at most 1.25 times the growth of the Variables (at the
  largest assignment count) and of the assignments (at the largest model).
  """
  name = "label + build, largest model x most assignments < 1 s, linear growth"
  if not scale_rows:
    return Target(name, "not measured", None)
  largest = max(scale_rows, key=lambda row: (row.variables, row.assignments))
  same_count = [row for row in scale_rows if row.assignments == largest.assignments]
  same_model = [row for row in scale_rows if row.variables == largest.variables]
  fewest_variables = min(same_count, key=lambda row: row.variables)
  fewest_assignments = min(same_model, key=lambda row: row.assignments)
  variable_growth = largest.variables / fewest_variables.variables
  assignment_growth = largest.assignments / fewest_assignments.assignments
  variable_time = largest.build_paused_s / fewest_variables.build_paused_s
  assignment_time = largest.build_paused_s / fewest_assignments.build_paused_s
  linear = variable_time <= 1.25 * variable_growth and assignment_time <= 1.25 * assignment_growth
  measured = (
    f"{largest.variables:,} Variables x {largest.assignments}: build {largest.build_s:.3f} s"
    f" ({largest.build_over_state:.2f}x one nnx.state call); with GC paused,"
    f" Variables x{variable_growth:.1f} -> time x{variable_time:.2f},"
    f" assignments x{assignment_growth:.1f} -> time x{assignment_time:.2f}"
  )
  return Target(name, measured, largest.build_s < 1.0 and linear)


def extra_buffer_target(rows: list[Row], layer_counts: Sequence[int]) -> Target:
  """Check that ueaj layer-decay on the stacked model adds no parameter-sized temp buffer.

  The extra temp bytes over (a) must be less than the parameters' bytes.
  """
  name = "stacked layer-decay: extra temp bytes over (a) < parameter bytes"
  parts = []
  met: bool | None = True
  for layers in layer_counts:
    row = find_row(rows, "stacked", layers, METHOD_UEAJ, "layer-decay")
    reference = find_row(rows, "stacked", layers, METHOD_ADAMW)
    if row is None or reference is None or row.temp_bytes is None or reference.temp_bytes is None:
      parts.append(f"L={layers}: not measured")
      met = None
      continue
    extra = row.temp_bytes - reference.temp_bytes
    parts.append(f"L={layers}: {extra / row.param_bytes:+.2f} x parameter bytes")
    if met is not None and extra >= row.param_bytes:
      met = False
  return Target(name, ", ".join(parts), met)


def targets_table(targets: list[Target], markdown: bool) -> str:
  """Render the targets and their outcomes."""
  outcome = {True: "met", False: "missed", None: "n/a"}
  body = [[target.name, target.measured, outcome[target.met]] for target in targets]
  return render_table(["target", "measured", "outcome"], body, markdown)


def environment() -> dict[str, Any]:
  """Describe the machine and the library versions."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as cpuinfo:
      for line in cpuinfo:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return {
    "cpu": cpu,
    "cpu_count": os.cpu_count(),
    "device": str(jax.devices()[0].device_kind),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "flax": flax.__version__,
    "optax": optax.__version__,
  }


@dataclasses.dataclass
class Report:
  """Everything one run measured, and the text it printed."""

  rows: list[Row]
  scale_rows: list[ScaleRow]
  targets: list[Target]
  environment: dict[str, Any]
  arguments: dict[str, Any]
  text: str

  def to_json(self) -> dict[str, Any]:
    """Return the report as JSON-compatible data, with ratios per row."""
    return {
      "environment": self.environment,
      "arguments": self.arguments,
      "rows": [
        {**dataclasses.asdict(row), "label": row.label, "ratios": row_ratios(self.rows, row)}
        for row in self.rows
      ],
      "labelling": [
        {**dataclasses.asdict(row), "build_per_unit_ns": row.build_per_unit_ns}
        for row in self.scale_rows
      ],
      "targets": [dataclasses.asdict(target) for target in self.targets],
    }


def render_report(
  rows: list[Row],
  scale_rows: list[ScaleRow],
  targets: list[Target],
  env: dict[str, Any],
  args: argparse.Namespace,
) -> str:
  """Render the environment line, the three tables and their legends."""
  markdown = args.markdown
  parts = [
    f"{env['cpu']}, {env['cpu_count']} CPUs, device {env['device']}; Python {env['python']},"
    f" jax {env['jax']}, flax {env['flax']}, optax {env['optax']}",
    f"width {args.width}, batch {args.batch}, {args.steps} timed steps after {args.warmup},"
    f" {args.repeats} repeat(s) per build/trace/lower/compile (minimum kept)",
    "",
    main_table(rows, markdown),
    "",
    "Cells show value (ratio to (a) / ratio to (b)). (a): one optax.adamw in nnx.Optimizer."
    " (b): hand-built optax.partition with the same labels, List model only."
    " step: median. temp and peak: the compiled step's memory_analysis(),"
    " with peak = argument + output + temp - alias. fusions: fusion instructions in the"
    " compiled step's HLO.",
  ]
  if scale_rows:
    parts += [
      "",
      scale_table(scale_rows, markdown),
      "",
      "Labelling: a WideModel (nnx.List of cells with 4 Params each) and assignments that mix"
      " names, ..., slices, lists, batch, negative ints, a type and a rule. build includes"
      " label; nnx.state is Flax's own traversal of the same model, for reference.",
    ]
  parts += ["", targets_table(targets, markdown)]
  return "\n".join(parts)


# --------------------------------------------------------------------------
# Command line


def _preset_help(key: str) -> str:
  return f"default {FULL_PRESET[key]}, with --quick {QUICK_PRESET[key]}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  """Parse the command line and fill unset options from the full or quick preset."""
  parser = argparse.ArgumentParser(
    description="Benchmark ueaj.opt optimizers against plain optax on NNX models."
  )
  parser.add_argument(
    "--layers", type=int, nargs="+", metavar="L",
    help=f"numbers of blocks of the models ({_preset_help('layers')})",
  )
  parser.add_argument(
    "--width", type=int, metavar="D",
    help=f"input and output features of every nnx.Linear ({_preset_help('width')})",
  )
  parser.add_argument(
    "--batch", type=int, metavar="B", help=f"examples per step ({_preset_help('batch')})"
  )
  parser.add_argument(
    "--steps", type=int, metavar="N",
    help="timed training steps per row, interleaved with the steps of the other rows of"
    f" the same model and depth; the median is reported ({_preset_help('steps')})",
  )
  parser.add_argument(
    "--warmup", type=int, metavar="N",
    help=f"untimed training steps before the timed ones ({_preset_help('warmup')})",
  )
  parser.add_argument(
    "--repeats", type=int, metavar="N",
    help="times each build, trace, lower, compile and labelling runs; the minimum time is"
    " reported. Traces, lowerings and compiles of one model and depth are repeated"
    f" interleaved ({_preset_help('repeats')})",
  )
  parser.add_argument(
    "--models", nargs="+", choices=MODEL_KINDS, default=list(MODEL_KINDS),
    help="models to measure (default: both)",
  )
  parser.add_argument(
    "--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS), metavar="NAME",
    help="configurations to measure (default: all): "
    + "; ".join(f"{config.name} ({config.description})" for config in CONFIGS.values()),
  )
  parser.add_argument(
    "--scale-variables", type=int, nargs="+", metavar="V",
    help="model sizes of the labelling measurement, in Variables; 0 skips it"
    f" ({_preset_help('scale_variables')})",
  )
  parser.add_argument(
    "--scale-assignments", type=int, nargs="+", metavar="A",
    help=f"assignment counts of the labelling measurement ({_preset_help('scale_assignments')})",
  )
  parser.add_argument(
    "--seed", type=int, default=0, help="seed of the weights and the batch (default 0)"
  )
  parser.add_argument(
    "--quick", action="store_true",
    help="smoke run at the tiny --quick sizes, without the warm-up pass",
  )
  parser.add_argument(
    "--no-warmup-pass", action="store_true",
    help="skip the untimed 2-layer pass over all configurations that absorbs one-time"
    " JAX costs",
  )
  parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
  parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
  args = parser.parse_args(argv)

  preset = QUICK_PRESET if args.quick else FULL_PRESET
  for key, value in preset.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  if args.scale_variables == [0]:
    args.scale_variables = []
  for name in ("width", "batch", "steps", "repeats"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be at least 1, got {getattr(args, name)}.")
  if args.warmup < 0:
    parser.error(f"--warmup must be at least 0, got {args.warmup}.")
  if min(args.layers) < 1:
    parser.error(f"--layers must be at least 1, got {args.layers}.")
  if any(count < MIN_SCALE_VARIABLES for count in args.scale_variables):
    parser.error(
      f"--scale-variables must be 0 or at least {MIN_SCALE_VARIABLES}, got"
      f" {args.scale_variables}."
    )
  if min(args.scale_assignments) < 1:
    parser.error(f"--scale-assignments must be at least 1, got {args.scale_assignments}.")
  return args


def main(argv: Sequence[str] | None = None) -> Report:
  """Run the benchmark, print the report and return it."""
  args = parse_args(argv)
  env = environment()

  if not (args.quick or args.no_warmup_pass):
    progress("warm-up pass at 2 layers (untimed)")
    warm_up(args)

  plan = planned_rows(args)
  rows: list[Row] = []
  number = 0
  # The rows of one model and depth are consecutive in the plan, and their
  # compiles and steps are timed together, interleaved.
  for (kind, layers), entries in itertools.groupby(plan, key=lambda entry: (entry[0], entry[3])):
    measured = []
    for _, method, config, _ in entries:
      number += 1
      row, runner = measure(kind, method, config, layers, args)
      measured.append((row, runner))
      progress(
        f"[{number}/{len(plan)}] {kind} L={layers} {row.label}: build {row.build_s:.3f} s,"
        f" compile {row.compile_s:.3f} s"
      )
    retime_compiles(measured, args.repeats - 1)
    medians = time_steps([runner for _, runner in measured], args.steps)
    for (row, _), median in zip(measured, medians):
      row.step_s = median
      rows.append(row)
    progress(
      f"{kind} L={layers} step ms: "
      + ", ".join(f"{row.label} {row.step_s * 1e3:.2f}" for row, _ in measured)
    )

  scale_rows = measure_labelling(args)
  targets = evaluate_targets(rows, scale_rows, args.layers)
  text = render_report(rows, scale_rows, targets, env, args)
  print(text)

  report = Report(rows, scale_rows, targets, env, vars(args).copy(), text)
  if args.json:
    with open(args.json, "w") as output:
      json.dump(report.to_json(), output, indent=2)
    progress(f"wrote {args.json}")
  return report


if __name__ == "__main__":
  main()
