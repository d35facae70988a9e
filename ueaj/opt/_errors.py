"""Exceptions raised when a configuration does not fit a model."""

from __future__ import annotations


class UnmatchedPatternError(ValueError):
  """A required pattern selects no Variable of the model (often a typo)."""


class UnassignedVariablesError(ValueError):
  """Some Variables have no group and there is no default `mgr[...]`."""


class RuleError(ValueError):
  """A function rule raised or returned something other than a transform or None."""


class StructureMismatchError(ValueError):
  """A state passed to the transform differs from the parameters it was built for."""


class MissingLabelError(ValueError):
  """A Variable that the optimizer updates carries no `opt_group` label."""
