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
  """

  shape: tuple[int, ...]
  dtype: Any
  sharding: Any
  path: Path
  metadata: Mapping[str, Any]

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
    return (
      f"ParamInfo(path={format_path(self.path)!r}, shape={self.shape},"
      f" dtype={self.dtype})"
    )


class GraphNode:
  """One node of the snapshot: a Module, container or Variable and its children."""

  __slots__ = ("path", "obj", "children")

  def __init__(self, path: Path, obj: Any):
    self.path = path
    self.obj = obj
    self.children: dict[Any, GraphNode] = {}

  @property
  def sequence_length(self) -> int | None:
    """Length if the node is a sequence (`nnx.List`, list, tuple), else None."""
    if isinstance(self.obj, collections.abc.Sequence) and not isinstance(
      self.obj, (str, bytes)
    ):
      return len(self.obj)
    return None

  @property
  def is_variable(self) -> bool:
    return isinstance(self.obj, nnx.Variable)


class ModelGraph:
  """The Variables selected by `wrt` and the graph nodes above them.

  A Variable shared between several attributes (tied weights) appears once,
  at the first path NNX reports for it, as in `nnx.state`.

  Attributes:
    root: The node of the model itself.
    variables: `(path, variable)` pairs in NNX traversal order.
  """

  def __init__(self, model: Any, wrt: filterlib.Filter):
    predicate = filterlib.to_predicate(wrt)
    objects: dict[Path, Any] = {}
    self.variables: list[tuple[Path, nnx.Variable]] = []
    for path, obj in nnx.iter_graph(model, graph=True):
      objects[path] = obj
      if isinstance(obj, nnx.Variable) and predicate(path, obj):
        self.variables.append((path, obj))

    # Link only the nodes that lead to a selected Variable, so that the
    # matcher and the nearest-path hints never see static fields or
    # Variables outside `wrt`.
    self.root = GraphNode((), model)
    self._nodes: dict[Path, GraphNode] = {(): self.root}
    for path, _ in self.variables:
      parent = self.root
      for depth in range(1, len(path) + 1):
        prefix = path[:depth]
        node = self._nodes.get(prefix)
        if node is None:
          node = GraphNode(prefix, objects[prefix])
          self._nodes[prefix] = node
          parent.children[path[depth - 1]] = node
        parent = node

  def node(self, path: Path) -> GraphNode:
    return self._nodes[path]

  def nodes(self) -> collections.abc.Iterable[GraphNode]:
    return self._nodes.values()

  def modules_on(self, path: Path) -> tuple[Any, ...]:
    """Return the graph nodes from the root to the owner of the Variable at `path`."""
    return tuple(self._nodes[path[:depth]].obj for depth in range(len(path)))


def param_info(path: Path, variable: nnx.Variable) -> ParamInfo:
  """Describe `variable` for a rule, without touching its value's data."""
  value = variable.get_value()
  shape = tuple(getattr(value, "shape", ()))
  dtype = getattr(value, "dtype", None)
  try:
    sharding = getattr(value, "sharding", None)
  except Exception:  # noqa: BLE001 - tracers and deleted arrays may raise here.
    sharding = None
  metadata = types.MappingProxyType(variable.get_metadata())
  return ParamInfo(shape, dtype, sharding, path, metadata)


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
