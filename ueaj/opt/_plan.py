"""Planning: which leaves, or layers of leaves, each optax transform receives.

A unit is one entry of the top-level `optax.partition`: usually one group,
or several per-layer groups of a stack that run as one vectorized update. A
piece is what a unit takes from one parameter leaf: the whole leaf, or some
of its layers along the stack axis (a copy, unless the unit takes all
layers in order).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Hashable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ueaj.opt import _vectorize
from ueaj.opt._graph import Stack
from ueaj.opt._groups import Group, Groups, Label
from ueaj.opt._keys import Path


@dataclasses.dataclass(frozen=True, slots=True)
class Piece:
  """The part of one parameter leaf that a unit receives.

  Attributes:
    position: Index of the leaf in the parameters' path order.
    layers: The layers taken along `axis`, increasing, or None for the
      whole leaf.
    axis: The stack's layer axis (unused for whole leaves).
  """

  position: int
  layers: tuple[int, ...] | None
  axis: int = 0

  def take(self, leaf: Any) -> Any:
    """Cut this piece out of `leaf`."""
    if self.layers is None:
      return leaf
    first, last = self.layers[0], self.layers[-1]
    if self.layers == tuple(range(first, last + 1)):
      return jax.lax.slice_in_dim(leaf, first, last + 1, axis=self.axis)
    return jnp.take(leaf, np.asarray(self.layers), axis=self.axis)


@dataclasses.dataclass(frozen=True)
class Unit:
  """One transform of the top-level partition and the pieces it receives.

  Attributes:
    key: The unit's key in the optimizer state: the group label, or for a
      vectorized unit `<first label>~<last label>`.
    transform: The transform applied to the pieces.
    pieces: The pieces in the order the transform receives them.
    labels: The groups the unit runs; for a vectorized unit in layer order,
      which is also their order along the state's leading axis.
  """

  key: str
  transform: optax.GradientTransformation
  pieces: tuple[Piece, ...]
  labels: tuple[str, ...]

  @property
  def vectorized(self) -> bool:
    return len(self.labels) > 1


def plan_units(
  groups: Groups,
  labels: dict[Path, Label],
  shapes: dict[Path, tuple[int, ...]],
  dtypes: dict[Path, Any],
) -> list[Unit]:
  """Plan the units for parameters with the given labels.

  Args:
    groups: The resolved groups, for their transforms.
    labels: The label of every parameter path, per layer for stacked
      Variables, in the parameters' order.
    shapes: The shape of every parameter path.
    dtypes: The dtype of every parameter path.

  Returns:
    The units, each group in exactly one unit.
  """
  paths = list(labels)
  positions = {path: position for position, path in enumerate(paths)}
  stacks: dict[Path, Stack] = groups.stacks

  # Members of each group per leaf position: None for the whole leaf, or
  # the list of its layers.
  members: dict[str, dict[int, list[int] | None]] = {label: {} for label in groups.labels}
  for path, label in labels.items():
    position = positions[path]
    if isinstance(label, tuple):
      for layer, layer_label in enumerate(label):
        members[layer_label].setdefault(position, []).append(layer)
    else:
      members[label][position] = None

  def transform_of(group: Group) -> optax.GradientTransformation:
    return optax.set_to_zero() if group.frozen else group.transform

  def piece(position: int, layers: list[int] | None) -> Piece:
    if layers is None:
      return Piece(position, None)
    stack = stacks[paths[position]]
    if sorted(layers) == list(range(stack.length)):
      return Piece(position, None)
    return Piece(position, tuple(sorted(layers)), stack.axis)

  # Per-layer groups: one layer of the same leaves each, same assignment
  # and a transform of the same structure. Those can run as one update.
  families: dict[Hashable, list[tuple[int, Group]]] = {}
  for group in groups:
    layer = _single_layer(members[group.label])
    if layer is None:
      continue
    key = (
      group.assignment,
      tuple(members[group.label]),
      _vectorize.skeleton(transform_of(group)),
    )
    families.setdefault(key, []).append((layer, group))

  units: list[Unit] = []
  placed: set[str] = set()
  used_keys = set(groups.labels)
  for (_, leaf_positions, _), family in families.items():
    if len(family) < 2:
      continue
    family.sort(key=lambda item: item[0])
    layers = [layer for layer, _ in family]
    pieces = tuple(piece(position, layers) for position in leaf_positions)
    axes = [stacks[paths[position]].axis for position in leaf_positions]
    transform = _vectorize.vectorized([transform_of(group) for _, group in family], axes)
    if transform is None or not _traces(transform, pieces, labels, shapes, dtypes):
      continue
    key = f"{family[0][1].label}~{family[-1][1].label}"
    while key in used_keys:
      key += "~"
    used_keys.add(key)
    family_labels = tuple(group.label for _, group in family)
    units.append(Unit(key, transform, pieces, family_labels))
    placed.update(family_labels)

  for group in groups:
    if group.label in placed:
      continue
    pieces = tuple(piece(position, layers) for position, layers in members[group.label].items())
    units.append(Unit(group.label, transform_of(group), pieces, (group.label,)))
  return units


def _single_layer(members: dict[int, list[int] | None]) -> int | None:
  """Return the layer if a group contains exactly one layer of stacked leaves."""
  layers = set()
  for member_layers in members.values():
    if member_layers is None or len(member_layers) != 1:
      return None
    layers.add(member_layers[0])
  return layers.pop() if len(layers) == 1 else None


def _traces(
  transform: optax.GradientTransformation,
  pieces: tuple[Piece, ...],
  labels: dict[Path, Label],
  shapes: dict[Path, tuple[int, ...]],
  dtypes: dict[Path, Any],
) -> bool:
  """Check, without computing, that a vectorized transform traces."""
  paths = list(labels)
  specs = []
  for piece in pieces:
    shape = list(shapes[paths[piece.position]])
    if piece.layers is not None:
      shape[piece.axis] = len(piece.layers)
    specs.append(jax.ShapeDtypeStruct(tuple(shape), dtypes[paths[piece.position]]))
  specs = tuple(specs)
  try:
    state = jax.eval_shape(transform.init, specs)
    jax.eval_shape(transform.update, specs, state, specs)
  except Exception:  # noqa: BLE001 - any failure means: run the layers one by one.
    return False
  return True
