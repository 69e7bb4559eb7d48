"""Transfer rules, one file per family; importing this package registers them all.

Public combinators (``curvbound.rules``): :func:`elementwise`, :func:`identity`,
:func:`elementwise_transfer`, :func:`scaled`; the context method ``ctx.linear`` covers linear
layers.
"""

from . import activations, linear, shape  # noqa: F401  (registration side effect)
from .base import elementwise, elementwise_transfer, identity, number, register, scaled

__all__ = ["elementwise", "elementwise_transfer", "identity", "number", "register", "scaled"]
