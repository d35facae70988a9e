"""Assign optax optimizers to parts of Flax NNX models with NumPy-style keys.

>>> import optax
>>> from flax import nnx
>>> from ueaj import opt
>>> mgr = opt.OptimizerManager()
>>> mgr[...] = optax.adamw(3e-4)
>>> mgr[..., 'bias'] = optax.adam(3e-4)
"""

from ueaj.opt._checkpoint import CheckpointMismatchError, group_table, read_table, restore, save
from ueaj.opt._errors import (
  MissingLabelError,
  RuleError,
  StructureMismatchError,
  UnassignedVariablesError,
  UnmatchedPatternError,
)
from ueaj.opt._graph import ParamInfo
from ueaj.opt._groups import Assignment, Group, Groups
from ueaj.opt._keys import batch
from ueaj.opt._manager import OptimizerManager
from ueaj.opt._optimizer import Optimizer
from ueaj.opt._precision import PrecisionState, check_dtype_stability, precision
from ueaj.opt._render import Rendering, RenderWarning, render, render_html, render_text
from ueaj.opt._summary import Explanation, Summary, describe_transform, explain, summary
from ueaj.opt._transform import LABEL_KEY

__all__ = [
  "Assignment",
  "CheckpointMismatchError",
  "Explanation",
  "Group",
  "Groups",
  "LABEL_KEY",
  "MissingLabelError",
  "Optimizer",
  "OptimizerManager",
  "ParamInfo",
  "PrecisionState",
  "RenderWarning",
  "Rendering",
  "RuleError",
  "StructureMismatchError",
  "Summary",
  "UnassignedVariablesError",
  "UnmatchedPatternError",
  "batch",
  "check_dtype_stability",
  "describe_transform",
  "explain",
  "group_table",
  "read_table",
  "precision",
  "render",
  "render_html",
  "render_text",
  "restore",
  "save",
  "summary",
]
