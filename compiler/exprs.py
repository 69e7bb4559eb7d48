"""Numbers from bound expressions: sympy constants rounded *up* to float64 (never down)."""

from __future__ import annotations

import functools
import math

import sympy

__all__ = ["round_up", "LazyMin", "smin"]


@functools.lru_cache(maxsize=4096)
def round_up(x: sympy.Expr) -> float:
    """The smallest float64 that is ≥ the exact value of a sympy number (memoised: the same
    constants, e.g. an activation's sup|σ''|, are rounded once per layer otherwise)."""
    exact = sympy.N(x, 40)
    f = float(exact)
    if sympy.Float(f, 40) < exact:
        f = math.nextafter(f, math.inf)
    return f


class LazyMin(sympy.Min):
    """``sympy.Min`` that does not compare its arguments, also when rebuilt by ``xreplace`` or
    ``sympy.cse``: each argument is a valid bound, and sympy's pairwise comparisons of symbolic
    bounds are slow (they dominated code generation on deep networks) without deciding anything.
    Printed, rounded and differentiated as ``Min``.

    >>> a, b = sympy.symbols("a b", nonnegative=True)
    >>> m = LazyMin(a**2, a**2 * b)
    >>> isinstance(m, sympy.Min), m.args
    (True, (a**2, a**2*b))
    """

    def __new__(cls, *args, **assumptions):
        args = tuple(dict.fromkeys(sympy.sympify(a) for a in args))
        if all(a.is_number for a in args):
            return sympy.Min(*args)
        assumptions["evaluate"] = False
        return super().__new__(cls, *args, **assumptions)


def smin(*args: sympy.Expr) -> sympy.Expr:
    """min of bounds (a :class:`LazyMin`, or the argument itself when there is one)."""
    unique = list(dict.fromkeys(args))
    return unique[0] if len(unique) == 1 else LazyMin(*unique)
