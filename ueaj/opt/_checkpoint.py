"""Checkpoints of a model and its optimizer with Orbax, checked against the groups.

A checkpoint is a directory written by `orbax.checkpoint` with two items:

- `arrays`: every array of `nnx.state(model)` and `nnx.state(optimizer)`
  in a flat dict with positional names (`a000000`, `a000001`, ...).
- `table`: JSON with the typed path, shape and dtype of each array, and the
  optimizer's group table (labels, assignments, transforms, members).

Positional names keep Orbax away from our path keys: group labels contain
`/` and `...`, and Orbax would restore the int keys of an `nnx.List` as
strings. The JSON table keeps ints and strings apart, so the key `3` of an
`nnx.List` and the key `'3'` of an `nnx.Dict` both come back as they were.

Orbax is imported when a function here runs, so `ueaj.opt` works without it
(install the `checkpoint` extra).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from flax import nnx

from ueaj.opt._graph import format_path
from ueaj.opt._groups import Groups

#: Version of the `table` item; restore rejects other versions.
FORMAT_VERSION = 1
_ARRAYS = "arrays"
_TABLE = "table"
# How many paths or groups an error message lists.
_LISTED = 20


class CheckpointMismatchError(ValueError):
  """The checkpoint does not fit the model or optimizer it is restored into."""


def group_table(groups: Groups) -> list[dict[str, Any]]:
  """Describe the groups as JSON-compatible rows, one per group, in table order.

  Each row has the group's `label`, `source` (the winning assignment as
  written), `transform` (the optax functions that built it, or `frozen`),
  `members` (`[path, layer]` pairs with typed path entries), and `unit`
  (`[key, index]` as returned by `groups.unit_of`).
  """
  from ueaj.opt._summary import describe_transform

  return [
    {
      "label": group.label,
      "source": group.source,
      "transform": describe_transform(group.transform),
      "members": [[_encode_path(path), layer] for path, layer in group.members],
      "unit": list(groups.unit_of(group.label)),
    }
    for group in groups
  ]


def save(
  directory: str | os.PathLike, model: Any, optimizer: Any = None, *, force: bool = False
) -> None:
  """Write `nnx.state(model)` and `nnx.state(optimizer)` to a new checkpoint directory.

  Args:
    directory: Where to write; Orbax requires an absolute path, so a
      relative one is resolved against the working directory.
    model: The NNX model. All of its state is saved, not only parameters.
    optimizer: An `opt.Optimizer` (its group table is saved too), an
      `nnx.Optimizer`, or None to save the model alone.
    force: Overwrite an existing checkpoint at `directory`.

  Raises:
    TypeError: A path has a key that is neither a str nor an int.
    ValueError: `directory` exists and `force` is False (raised by Orbax).
  """
  ocp = _orbax()
  entries = _entries(model, optimizer)
  arrays = {}
  paths = []
  for position, (path, value) in enumerate(entries):
    array, kind = _to_savable(value)
    arrays[_name(position)] = array
    paths.append(
      {"path": path, "shape": list(np.shape(array)), "dtype": str(array.dtype), "kind": kind}
    )
  table = {
    "format": FORMAT_VERSION,
    "paths": paths,
    "groups": _groups_of(optimizer),
  }
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(
      os.path.abspath(directory),
      args=ocp.args.Composite(
        **{_ARRAYS: ocp.args.StandardSave(arrays), _TABLE: ocp.args.JsonSave(table)}
      ),
      force=force,
    )


def read_table(directory: str | os.PathLike) -> dict[str, Any]:
  """Read a checkpoint's JSON table: format version, array paths and group table."""
  ocp = _orbax()
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    restored = checkpointer.restore(
      os.path.abspath(directory), args=ocp.args.Composite(**{_TABLE: ocp.args.JsonRestore()})
    )
  return restored[_TABLE]


def restore(directory: str | os.PathLike, model: Any, optimizer: Any = None) -> None:
  """Load a checkpoint written by `save` into `model` and `optimizer`, in place.

  Build the model and optimizer as for the run that saved the checkpoint,
  then restore. Every array is checked first, so either all of the state
  is replaced or none of it. Arrays are read with the sharding of the
  arrays they replace.

  Args:
    directory: The checkpoint directory.
    model: The model to load into.
    optimizer: The optimizer to load into, or None for a checkpoint saved
      without one.

  Raises:
    CheckpointMismatchError: The optimizer's groups differ from the saved
      ones (the message lists groups added, removed and changed), or the
      state has paths, shapes or dtypes other than the saved ones.
  """
  ocp = _orbax()
  directory = os.path.abspath(directory)
  table = read_table(directory)
  if table.get("format") != FORMAT_VERSION:
    raise CheckpointMismatchError(
      f"Checkpoint {directory} has table format {table.get('format')!r}; this"
      f" version of ueaj reads format {FORMAT_VERSION}."
    )
  _check_groups(table["groups"], _groups_of(optimizer), directory)

  entries = _entries(model, optimizer)
  _check_paths(table["paths"], entries, directory)

  targets = {}
  for position, ((_, value), saved) in enumerate(zip(entries, table["paths"])):
    array, _ = _to_savable(value)
    sharding = getattr(array, "sharding", None)
    targets[_name(position)] = jax.ShapeDtypeStruct(
      np.shape(array), np.dtype(saved["dtype"]), sharding=sharding
    )
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    restored = checkpointer.restore(
      directory, args=ocp.args.Composite(**{_ARRAYS: ocp.args.StandardRestore(targets)})
    )
  arrays = restored[_ARRAYS]

  variables = _variables(model, optimizer)
  for position, (variable, saved) in enumerate(zip(variables, table["paths"])):
    variable.set_value(_from_saved(arrays[_name(position)], saved["kind"]))


def _orbax() -> Any:
  try:
    import orbax.checkpoint as ocp
  except ImportError as error:
    raise ImportError(
      "ueaj.opt checkpoints need orbax-checkpoint: pip install 'ueaj[checkpoint]'"
      " or pip install 'orbax-checkpoint>=0.12.8'."
    ) from error
  return ocp


def _name(position: int) -> str:
  return f"a{position:06d}"


def _states(model: Any, optimizer: Any) -> list[tuple[str, Any]]:
  states = [("model", nnx.state(model))]
  if optimizer is not None:
    states.append(("optimizer", nnx.state(optimizer)))
  return states


def _entries(model: Any, optimizer: Any) -> list[tuple[list[Any], Any]]:
  """Return `(typed path, value)` of every Variable, the model's first."""
  entries = []
  for root, state in _states(model, optimizer):
    for path, variable in nnx.to_flat_state(state):
      entries.append(([root, *_encode_path(path)], variable.get_value()))
  return entries


def _variables(model: Any, optimizer: Any) -> list[nnx.Variable]:
  """Return the Variables in the order of `_entries`."""
  return [
    variable
    for _, state in _states(model, optimizer)
    for _, variable in nnx.to_flat_state(state)
  ]


def _encode_path(path: tuple) -> list[Any]:
  for key in path:
    if isinstance(key, bool) or not isinstance(key, (str, int)):
      raise TypeError(
        f"Cannot save the path {format_path(path)!r}: its key {key!r} is a"
        f" {type(key).__name__}; checkpoints support str and int keys."
      )
  return list(path)


def _to_savable(value: Any) -> tuple[Any, str]:
  """Return an array Orbax can write, and how to turn it back (`array` or `key:<impl>`)."""
  if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(value), f"key:{jax.random.key_impl(value)}"
  if isinstance(value, (jax.Array, np.ndarray)):
    return value, "array"
  return np.asarray(value), "array"


def _from_saved(array: Any, kind: str) -> Any:
  if kind.startswith("key:"):
    return jax.random.wrap_key_data(array, impl=kind[len("key:"):])
  return array


def _groups_of(optimizer: Any) -> list[dict[str, Any]] | None:
  groups = getattr(optimizer, "groups", None)
  return group_table(groups) if isinstance(groups, Groups) else None


def _check_groups(
  saved: list[dict[str, Any]] | None, current: list[dict[str, Any]] | None, directory: str
) -> None:
  if saved == current:
    return
  if saved is None or current is None:
    which = "without" if saved is None else "with"
    raise CheckpointMismatchError(
      f"Checkpoint {directory} was saved {which} an opt.Optimizer group table,"
      f" but it is restored {'into' if current is not None else 'without'} one."
      " Restore into the same kind of optimizer that was saved."
    )

  saved_by_label = {row["label"]: row for row in saved}
  current_by_label = {row["label"]: row for row in current}
  added = [label for label in current_by_label if label not in saved_by_label]
  removed = [label for label in saved_by_label if label not in current_by_label]
  changed = []
  for label, row in current_by_label.items():
    old = saved_by_label.get(label)
    if old is None or old == row:
      continue
    fields = [field for field in row if row[field] != old.get(field)]
    changed.append(f"{label} ({', '.join(fields)})")

  lines = [f"The optimizer's groups differ from those saved in {directory}:"]
  for name, labels in (("added", added), ("removed", removed), ("changed", changed)):
    if labels:
      lines.append(f"  {name}: {', '.join(labels[:_LISTED])}" + (" ..." if len(labels) > _LISTED else ""))
  if len(lines) == 1:
    lines.append("  the same groups in a different order")
  lines.append(
    "Build the optimizer from the configuration that was saved, or restore"
    " the model alone and start the optimizer anew."
  )
  raise CheckpointMismatchError("\n".join(lines))


def _check_paths(
  saved: list[dict[str, Any]], entries: list[tuple[list[Any], Any]], directory: str
) -> None:
  saved_paths = [tuple(row["path"]) for row in saved]
  current_paths = [tuple(path) for path, _ in entries]
  if saved_paths != current_paths:
    saved_set = set(saved_paths)
    current_set = set(current_paths)
    missing = [path for path in current_paths if path not in saved_set]
    extra = [path for path in saved_paths if path not in current_set]
    lines = [f"The state does not match checkpoint {directory}:"]
    if missing:
      lines.append(f"  {len(missing)} path(s) not in the checkpoint: {_list_paths(missing)}")
    if extra:
      lines.append(f"  {len(extra)} saved path(s) not in the state: {_list_paths(extra)}")
    if not missing and not extra:
      lines.append("  the same paths in a different order")
    raise CheckpointMismatchError("\n".join(lines))
  for row, (path, value) in zip(saved, entries):
    array, kind = _to_savable(value)
    if list(np.shape(array)) != row["shape"] or str(array.dtype) != row["dtype"] or kind != row["kind"]:
      raise CheckpointMismatchError(
        f"{_format(path)}: checkpoint {directory} has shape {tuple(row['shape'])}"
        f" and dtype {row['dtype']} ({row['kind']}), the state has shape"
        f" {tuple(np.shape(array))} and dtype {array.dtype} ({kind})."
      )


def _format(path: tuple | list) -> str:
  return "/".join(repr(key) if isinstance(key, str) and key.isdigit() else str(key) for key in path)


def _list_paths(paths: list[tuple]) -> str:
  listed = ", ".join(_format(path) for path in paths[:_LISTED])
  return listed + (" ..." if len(paths) > _LISTED else "")
