"""Soundness of the generated arithmetic: explicit rounding factors and per-node certified flags.

The generated bound function evaluates every node's expression in float64 from its inputs'
values, the quantities (certified norms: already upper bounds) and numeric constants (printed
rounded *up*, :func:`~curvbound.compiler.codegen.round_up`). What is left is the rounding of the
float64 operations themselves. For an expression built from nonnegative numbers with ``+``, ``×``,
integer powers, ``√``, ``min`` and ``max``, every operation is monotone, so if each operand is
computed with v̂ ≥ v·(1 − u)^e (u = 2⁻⁵³), then

- a sum of k terms:  v̂ ≥ v·(1 − u)^(max e + k − 1)  (each addition rounds once),
- a product of k factors:  v̂ ≥ v·(1 − u)^(Σ e + k − 1),
- xⁿ (n ≥ 1):  v̂ ≥ v·(1 − u)^(n·e + n + 1)  (libm's pow is within 1 ulp; n − 1 products),
- √x:  v̂ ≥ v·(1 − u)^(e/2 + 1)  (√ is correctly rounded),
- min, max: exact (their constants are float64 tensors of the rounded-up values).

:func:`rounding_exponent` computes that exponent E for a node's *whole* computation (its inputs'
exponents substituted), and the bound function multiplies the node's value by
``1 + 2(E + 2)u ≥ (1 − u)^−(E+1)`` (one more rounding for the multiplication itself), so the
reported number is ≥ the exact value of the expression at the certified quantities. E is about
a few per layer, so the factor is ~1 + 1e-14 for a deep network: invisible, but not assumed.

Expressions outside that class (a negative coefficient, a division by a quantity, exp/log, a
fractional power other than √, whose printed exponent is rounded) are not monotone in their inputs
or not covered by the analysis, so an upper bound on each input need not bound the result; such
nodes (and everything downstream) are reported as not certified.

>>> import sympy
>>> a, b = sympy.symbols("a b", nonnegative=True)
>>> rounding_exponent(3 * a * b**2 + sympy.sqrt(a), {})
6.0
>>> rounding_exponent(a - b, {}) is None
True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import sympy

from ..runtime.certified import UNIT_ROUNDOFF, rounding_factor
from ..runtime.norms import Quantity

__all__ = [
    "UNIT_ROUNDOFF",
    "rounding_exponent",
    "rounding_factor",
    "certify_nodes",
    "error_factors",
]

def rounding_exponent(expr: sympy.Expr, inputs: Mapping[sympy.Symbol, float]) -> float | None:
    """Exponent E with computed ≥ exact·(1 − u)^E for the float64 evaluation of ``expr``.

    ``inputs`` maps symbols whose values were themselves computed (``L_<node>``, ``M_<node>``) to
    their exponents; other symbols (quantities) count as exact. Returns None when ``expr`` is not
    a monotone expression of nonnegative terms (see the module docstring).
    """
    if expr.is_Symbol:
        return float(inputs.get(expr, 0.0))
    if expr.is_number:
        if expr is sympy.oo or expr.is_nonnegative:
            return 0.0
        return None  # a negative constant: not monotone
    if expr.is_Add or expr.is_Mul:
        parts = [rounding_exponent(a, inputs) for a in expr.args]
        if any(p is None for p in parts):
            return None
        extra = len(parts) - 1
        if expr.is_Add:
            return max(parts) + extra
        return sum(parts) + extra
    if expr.is_Pow:
        base, ex = expr.args
        e = rounding_exponent(base, inputs)
        if e is None or not ex.is_number or not ex.is_positive:
            return None
        if ex == sympy.Rational(1, 2):
            return e / 2 + 1
        if ex.is_Integer:
            n = int(ex)
            return n * e + n + 1
        return None  # codegen rounds a fractional exponent up: x**p then shrinks for x < 1
    if isinstance(expr, (sympy.Min, sympy.Max)):
        parts = [rounding_exponent(a, inputs) for a in expr.args]
        return None if any(p is None for p in parts) else max(parts)
    return None


def certify_nodes(
    infos: Iterable, quantities: Mapping[str, Quantity], mode: str
) -> tuple[dict[str, bool], dict[str, tuple[float, float]], dict[str, str]]:
    """Per node: certified flag, (L, M) rounding factors, and a note on its certificate.

    ``infos`` are the :class:`~curvbound.compiler.assemble.NodeBound` records in topological
    order, ``quantities`` the bound function's quantities by name. A node is certified exactly
    when ``mode == "certified"``, every quantity in its own expressions is certified, its
    expressions are monotone (:func:`rounding_exponent`), and every node it reads is certified.
    Notes (certified mode only) say why a node is not certified, or which looser fallback bound
    one of its certified norms had to use (e.g. submultiplicativity for a merged chain too
    large to materialise).
    """
    cert: dict[str, bool] = {}
    factors: dict[str, tuple[float, float]] = {}
    why: dict[str, str] = {}
    exps: dict[sympy.Symbol, float] = {}
    for nb in infos:
        reasons = []
        if mode != "certified":
            reasons.append("norms are estimated")
        bad = [q for q in nb.quantities if not getattr(quantities.get(q), "certified", False)]
        if bad and mode == "certified":
            notes = [getattr(quantities.get(q), "note", "") for q in bad]
            reasons.append("; ".join(n or f"{q} is not certified" for q, n in zip(bad, notes)))
        upstream = [r for r in nb.refs if not cert.get(r, False)]
        if upstream and mode == "certified":
            reasons.append(f"reads uncertified {', '.join(upstream)}")
        pair = []
        for prefix, expr in (("L_", nb.lipschitz), ("M_", nb.curvature)):
            e = rounding_exponent(expr, exps)
            if e is None:
                reasons.append(f"{prefix}{nb.name} is not monotone in its inputs")
                e = 0.0
            exps[sympy.Symbol(f"{prefix}{nb.name}", nonnegative=True)] = e
            pair.append(rounding_factor(e))
        factors[nb.name] = (pair[0], pair[1])
        cert[nb.name] = not reasons
        if mode == "certified":
            if reasons:
                why[nb.name] = "NOT CERTIFIED: " + "; ".join(reasons)
            else:
                info = [quantities[q].note for q in nb.quantities if quantities[q].note]
                if info:
                    why[nb.name] = "certified with a looser bound: " + "; ".join(info)
    return cert, factors, why


def error_factors(infos: Iterable) -> tuple[dict[str, float], list[str]]:
    """Rounding factors of the implementation errors (``NodeBound.error``), as for the bounds:
    per node with a nonzero error, a factor ≥ (1 − u)^−(E+1); and the nodes whose error
    expression is not monotone (their error is then not certified)."""
    exps: dict[sympy.Symbol, float] = {}
    factors: dict[str, float] = {}
    bad: list[str] = []
    for nb in infos:
        err = getattr(nb, "error", 0)
        if err == 0:
            continue
        e = rounding_exponent(err, exps)
        if e is None:
            bad.append(nb.name)
            e = 0.0
        exps[sympy.Symbol(f"E_{nb.name}", nonnegative=True)] = e
        factors[nb.name] = rounding_factor(e)
    return factors, bad
