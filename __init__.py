"""curvbound: provable Lipschitz and curvature bounds for PyTorch models.

(The full pipeline walk-through with real output is filled in below.)
"""

from .compiler import errors as errors
from .compiler.compile import compile
from .compiler.context import RuleContext, Transfer
from .compiler.errors import (
    CurvboundError,
    InputError,
    ModelStateError,
    NonSmoothError,
    RuleError,
    TracingError,
    UnsupportedOperationError,
)
from .compiler.registry import DEFAULT_REGISTRY, Registry, rule
from .passes import rules
from .runtime import operators
from .runtime.bound_function import BoundFunction, Bounds
from .runtime.layers import CenteredSoftplus

__all__ = [
    "compile",
    "rule",
    "activation",
    "rules",
    "operators",
    "Registry",
    "DEFAULT_REGISTRY",
    "BoundFunction",
    "Bounds",
    "RuleContext",
    "Transfer",
    "CenteredSoftplus",
    "CurvboundError",
    "UnsupportedOperationError",
    "TracingError",
    "ModelStateError",
    "InputError",
    "RuleError",
    "NonSmoothError",
    "errors",
]


def activation(*targets, slope, curvature, registry: Registry | None = None):
    """Register an elementwise activation in one line from sup|σ'| and sup|σ''|.

    Example:
        >>> import torch, curvbound
        >>> class Swish(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x * torch.sigmoid(x)
        >>> _ = curvbound.activation(Swish, slope=1.0999, curvature=0.5)
    """
    return rule(*targets, registry=registry)(rules.elementwise(slope=slope, curvature=curvature))
