"""Numbers from bound expressions: sympy constants rounded *up* to float64 (never down)."""

from __future__ import annotations

import math

import sympy

__all__ = ["round_up"]


def round_up(x: sympy.Expr) -> float:
    """The smallest float64 that is ≥ the exact value of a sympy number."""
    exact = sympy.N(x, 40)
    f = float(exact)
    if sympy.Float(f, 40) < exact:
        f = math.nextafter(f, math.inf)
    return f
