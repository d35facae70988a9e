"""Graph walk: a snapshot of the NNX graph that patterns are matched against."""

from __future__ import annotations

import collections.abc
import dataclasses
import types
from typing import Any, Mapping

import jax
from flax import nnx
from flax.nnx import filterlib

from ueaj.opt._keys import Path


@dataclasses.dataclass(frozen=True)
class ParamInfo:
  """The Variable a rule is called for, described like `jax.ShapeDtypeStruct`.

  Attributes:
    shape: Shape of the Variable's value.
    dtype: Dtype of the Variable's value.
    sharding: The value's `jax.sharding.Sharding`, or None when the value
      has none (for example under `nnx.eval_shape`).
    path: Path keys from the root model to the Variable.
    metadata: The Variable's metadata (a read-only view).
    layer: For a Variable of a declared stack, the layer the call is for;
      `shape` and `sharding` then describe that layer's slice. None for
      other Variables.
  """

  shape: tuple[int, ...]
  dtype: Any
  sharding: Any
  path: Path
  metadata: Mapping[str, Any]
  layer: int | None = None

  @property
  def ndim(self) -> int:
    """Number of dimensions."""
    return len(self.shape)

  @property
  def size(self) -> int:
    """Number of elements."""
    size = 1
    for dim in self.shape:
      size *= dim
    return size

  def __repr__(self) -> str:
    layer = "" if self.layer is None else f", layer={self.layer}"
    return (
      f"ParamInfo(path={format_path(self.path)!r}{layer}, shape={self.shape},"
      f" dtype={self.dtype})"
    )


@dataclasses.dataclass(frozen=True)
class Stack:
  """A module whose Variables carry a layer axis (made by `nnx.vmap`/`nnx.scan`).

  Attributes:
    axis: The layer axis of every Variable below the module.
    length: Number of layers.
  """

  axis: int
  length: int


_NO_CHILDREN: Mapping[Any, Any] = types.MappingProxyType({})


class GraphNode:
  """One node of the snapshot: a Module, container or Variable and its children."""

  __slots__ = ("path", "obj", "is_variable", "children", "stack", "sequence_length")

  def __init__(self, path: Path, obj: Any):
    self.path = path
    self.obj = obj
    self.is_variable = isinstance(obj, nnx.Variable)
    # Variables are leaves, so they share one read-only empty mapping. That
    # saves a dict per Variable on large models.
    self.children: dict[Any, GraphNode] | Mapping[Any, GraphNode] = (
      _NO_CHILDREN if self.is_variable else {}
    )
    self.stack: Stack | None = None
    #: Length if the node is a sequence (`nnx.List`, list, tuple), else None.
    self.sequence_length: int | None = None
    if (
      not self.is_variable
      and isinstance(obj, collections.abc.Sequence)
      and not isinstance(obj, (str, bytes))
    ):
      self.sequence_length = len(obj)


class ModelGraph:
  """The Variables selected by `wrt` and the graph nodes above them.

  A Variable shared between several attributes (tied weights) appears once,
  at the first path NNX reports for it, as in `nnx.state`.

  Attributes:
    root: The node of the model itself.
    variables: `(path, variable)` pairs in NNX traversal order.
    values: The value of each Variable in `variables`, by path, read once
      (`Variable.get_value` copies the pytree structure on every call).
  """

  def __init__(self, model: Any, wrt: filterlib.Filter):
    predicate = filterlib.to_predicate(wrt)
    objects: dict[Path, Any] = {}
    self.variables: list[tuple[Path, nnx.Variable]] = []
    for path, obj in nnx.iter_graph(model, graph=True):
      objects[path] = obj
      if isinstance(obj, nnx.Variable) and predicate(path, obj):
        self.variables.append((path, obj))
    self.values: dict[Path, Any] = {
      path: variable.get_value() for path, variable in self.variables
    }

    # Link only the nodes that lead to a selected Variable, so that the
    # matcher and the nearest-path hints never see static fields or
    # Variables outside `wrt`.
    self.root = GraphNode((), model)
    self._nodes: dict[Path, GraphNode] = {(): self.root}
    for path, _ in self.variables:
      self._link(path, objects)

  def _link(self, path: Path, objects: dict[Path, Any]) -> GraphNode:
    """Return the node at `path`, creating it and any missing ancestors."""
    node = self._nodes.get(path)
    if node is None:
      # Siblings share their parent, so the recursion usually stops at once.
      parent = self._link(path[:-1], objects)
      node = self._nodes[path] = GraphNode(path, objects[path])
      parent.children[path[-1]] = node
    return node

  def node(self, path: Path) -> GraphNode:
    return self._nodes[path]

  def declare_stack(self, node: GraphNode, axis: int) -> None:
    """Mark `node` as a stack whose Variables all carry a layer axis `axis`.

    Raises:
      ValueError: The node is a Variable or lies inside another stack, or a
        Variable below it has no axis `axis` or a different number of layers.
    """
    where = format_path(node.path)
    if node.is_variable:
      raise ValueError(
        f"declare_stack selects the Variable {where!r}; declare the module"
        " that nnx.vmap or nnx.scan created instead."
      )
    for depth in range(len(node.path)):
      outer = self._nodes[node.path[:depth]]
      if outer.stack is not None and outer is not node:
        raise ValueError(
          f"Stack {where!r} lies inside the stack {format_path(outer.path)!r};"
          " nested stacks are not supported."
        )
    lengths = {}
    for path, _ in self.variables:
      if path[: len(node.path)] != node.path:
        continue
      shape = tuple(getattr(self.values[path], "shape", ()))
      if not -len(shape) <= axis < len(shape):
        raise ValueError(
          f"Stack {where!r}: the Variable {format_path(path)!r} has shape"
          f" {shape}, which has no axis {axis}. Declare the stack with the"
          " axis that nnx.vmap added (in_axes/out_axes, usually 0)."
        )
      lengths[path] = shape[axis]
    if len(set(lengths.values())) > 1:
      listed = ", ".join(f"{format_path(p)} has {n}" for p, n in list(lengths.items())[:4])
      raise ValueError(
        f"Stack {where!r}: Variables disagree on the number of layers along"
        f" axis {axis} ({listed}). All Variables of a stacked module need the"
        " same layer axis."
      )
    length = next(iter(lengths.values()))
    node.stack = Stack(axis % len(shape), length)

  def stack_above(self, path: Path) -> Stack | None:
    """Return the stack that the Variable at `path` belongs to, if any."""
    for depth in range(len(path)):
      stack = self._nodes[path[:depth]].stack
      if stack is not None:
        return stack
    return None

  def nodes(self) -> collections.abc.Iterable[GraphNode]:
    return self._nodes.values()

  def modules_on(self, path: Path) -> tuple[Any, ...]:
    """Return the graph nodes from the root to the owner of the Variable at `path`."""
    return tuple(self._nodes[path[:depth]].obj for depth in range(len(path)))


def param_info(
  path: Path,
  variable: nnx.Variable,
  stack: Stack | None = None,
  layer: int | None = None,
  value: Any = None,
) -> ParamInfo:
  """Describe `variable`, or one layer of it, for a rule without reading its data.

  `value` is the Variable's value when the caller already has it.
  """
  if value is None:
    value = variable.get_value()
  shape = tuple(getattr(value, "shape", ()))
  dtype = getattr(value, "dtype", None)
  try:
    sharding = getattr(value, "sharding", None)
  except Exception:  # noqa: BLE001 - tracers and deleted arrays may raise here.
    sharding = None
  if stack is not None:
    shape = shape[: stack.axis] + shape[stack.axis + 1 :]
    sharding = _layer_sharding(sharding, stack.axis)
  metadata = types.MappingProxyType(variable.get_metadata())
  return ParamInfo(shape, dtype, sharding, path, metadata, layer)


def _layer_sharding(sharding: Any, axis: int) -> Any:
  # A layer's slice keeps the named sharding of the other axes; other
  # sharding kinds have no per-axis form, so the slice reports none.
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = list(sharding.spec) + [None] * (axis + 1 - len(sharding.spec))
    del spec[axis]
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
  return None


def format_path(path: Path) -> str:
  """Format a path as `layers/0/attn/kernel`; the root is `<root>`."""
  if not path:
    return "<root>"
  return "/".join(str(key) for key in path)


def flatten_paths(tree: Any) -> list[tuple[Path, Any]]:
  """Flatten a state or pytree into `(path, leaf)` pairs; Variables are leaves."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(
    tree, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )
  return [(path_of(keypath), leaf) for keypath, leaf in leaves]


def path_of(keypath: tuple) -> Path:
  """Convert a JAX key path into NNX path keys."""
  return tuple(_key_of(entry) for entry in keypath)


def _key_of(entry: Any) -> Any:
  if isinstance(entry, jax.tree_util.DictKey):
    return entry.key
  if isinstance(entry, jax.tree_util.SequenceKey):
    return entry.idx
  if isinstance(entry, jax.tree_util.GetAttrKey):
    return entry.name
  if isinstance(entry, jax.tree_util.FlattenedIndexKey):
    return entry.key
  return entry
