"""Exceptions raised by curvbound.

Every error names the node, op or input at fault and says what to do about it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CurvboundError",
    "UnsupportedOperationError",
    "MissingRule",
    "TracingError",
    "ModelStateError",
    "InputError",
    "RuleError",
    "NonSmoothError",
    "MethodCoverageError",
    "DiscontinuityError",
    "StaleBoundError",
    "RegistrationError",
    "SerializationError",
    "ResourceError",
]


class CurvboundError(Exception):
    """Base class of every error curvbound raises on purpose."""


@dataclass(frozen=True)
class MissingRule:
    """One node that no registered rule covers."""

    node: str
    op: str
    target: str
    module_path: str | None
    hint: str
    reason: str = "no rule is registered for it"
    #: what users know the node as: module path and type, ``layers.3 (MyAct)``
    label: str = ""

    def describe(self) -> str:
        if self.label:
            head = f"- {self.label} [fx node '{self.node}']: {self.op} {self.target}"
        else:
            where = f" (module path '{self.module_path}')" if self.module_path else ""
            head = f"- node '{self.node}': {self.op} {self.target}{where}"
        return (
            f"{head}: {self.reason}.\n"
            + "\n".join("      " + line for line in self.hint.splitlines())
        )


class UnsupportedOperationError(CurvboundError):
    """Raised before any numeric work when some nodes have no transfer rule.

    ``missing`` lists every uncovered node, not just the first one.
    """

    def __init__(self, missing: list[MissingRule]):
        self.missing = list(missing)
        lines = [
            f"curvbound has no transfer rule for {len(self.missing)} node(s) of this model; "
            "nothing was computed. Register a rule for each (see docs/writing_rules.md):"
        ]
        lines += [m.describe() for m in self.missing]
        super().__init__("\n".join(lines))


class TracingError(CurvboundError):
    """torch.fx could not trace the model."""


class ModelStateError(CurvboundError):
    """The model is in a state whose map is not a fixed function (train mode, NaN weights...)."""


class InputError(CurvboundError):
    """The example input does not fit the model, or the model's input/output is not supported."""


class RuleError(CurvboundError):
    """A transfer rule raised; the original exception is chained and the node is named."""


class NonSmoothError(CurvboundError):
    """A curvature bound was requested explicitly for a model that is not C¹."""


class MethodCoverageError(CurvboundError):
    """The requested method ("paper", "crt") does not cover this graph; the node is named."""


class DiscontinuityError(CurvboundError):
    """An activation's torch implementation switches formulas so far from the smooth function
    that no meaningful bound exists (e.g. ``nn.Softplus(threshold=1)`` jumps by 0.31 and its slope
    by 0.27 at βx = 1); the node and the fix are named."""


class ResourceError(CurvboundError):
    """The compile would need more memory than is available; raised before the work starts,
    naming the layer, the estimate and what to do."""


class StaleBoundError(CurvboundError):
    """The model's structure changed since compile (a submodule replaced, a parameter object
    swapped or reshaped): the compiled bound describes the old model. Call ``bf.recompile()``.

    Changing parameter *values* (optimiser steps, ``load_state_dict``, in-place edits) is not a
    structural change: the bound reads them live.
    """


class RegistrationError(CurvboundError, ValueError):
    """A rule or constant given to the registry is unusable (negative, NaN or infinite
    constants, a value that is not a rule)."""


class SerializationError(CurvboundError):
    """A bound function could not be saved or loaded (unpicklable per-call rules, a saved state
    that does not match the recompiled bound)."""
