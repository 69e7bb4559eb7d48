"""INTERIM activation constants (the lead's stop-gap so the package imports; the full module with
sympy derivations and verified interval enclosures replaces this file)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import sympy
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Smoothness"]


@dataclass(frozen=True)
class Smoothness:
    name: str
    slope: sympy.Expr
    curvature: sympy.Expr
    slope_range: tuple[sympy.Expr, sympy.Expr]
    exact: bool
    method: str
    fn: Callable[[Tensor], Tensor]
    d1: Callable[[Tensor], Tensor]
    d2: Callable[[Tensor], Tensor] | None
    smooth: bool


R = sympy.Rational


@lru_cache
def tanh() -> Smoothness:
    return Smoothness("tanh", sympy.Integer(1), 4 * sympy.sqrt(3) / 9, (sympy.Integer(0), sympy.Integer(1)), True, "exact", torch.tanh, lambda z: 1 - torch.tanh(z) ** 2, lambda z: -2 * torch.tanh(z) * (1 - torch.tanh(z) ** 2), True)


@lru_cache
def sigmoid() -> Smoothness:
    return Smoothness("sigmoid", R(1, 4), sympy.sqrt(3) / 18, (sympy.Integer(0), R(1, 4)), True, "exact", torch.sigmoid, lambda z: torch.sigmoid(z) * (1 - torch.sigmoid(z)), None, True)


@lru_cache
def softplus(beta: float = 1.0) -> Smoothness:
    b = sympy.Rational(beta)
    return Smoothness(f"softplus(beta={beta:g})", sympy.Integer(1), b / 4, (sympy.Integer(0), sympy.Integer(1)), True, "exact", lambda z: F.softplus(z, beta), lambda z: torch.sigmoid(beta * z), None, True)


@lru_cache
def centered_softplus(beta: float = 1.0) -> Smoothness:
    s = softplus(beta)
    return Smoothness(f"centered_softplus(beta={beta:g})", s.slope, s.curvature, s.slope_range, True, "exact", lambda z: F.softplus(z, beta) - math.log(2) / beta, s.d1, None, True)


def _num(name, slope, curv, lo, hi, fn):
    return Smoothness(name, R(slope), R(curv), (R(lo), R(hi)), False, "interim upper bounds", fn, None, None, True)


@lru_cache
def silu() -> Smoothness:
    return _num("silu", "1.1", "0.5001", "-0.1", "1.1", F.silu)


@lru_cache
def gelu(approximate: str = "none") -> Smoothness:
    return _num(f"gelu({approximate})", "1.13", "0.798", "-0.13", "1.13", lambda z: F.gelu(z, approximate=approximate))


@lru_cache
def mish() -> Smoothness:
    return _num("mish", "1.09", "0.645", "-0.113", "1.09", F.mish)


@lru_cache
def logsigmoid() -> Smoothness:
    return Smoothness("logsigmoid", sympy.Integer(1), R(1, 4), (sympy.Integer(0), sympy.Integer(1)), True, "exact", F.logsigmoid, None, None, True)


@lru_cache
def elu(alpha: float = 1.0) -> Smoothness:
    smooth = alpha == 1.0
    return Smoothness(f"elu(alpha={alpha:g})", sympy.Max(1, sympy.Rational(alpha)), sympy.Integer(1) if smooth else sympy.oo, (sympy.Integer(0), sympy.Max(1, sympy.Rational(alpha))), True, "exact", lambda z: F.elu(z, alpha), None, None, smooth)


@lru_cache
def celu(alpha: float = 1.0) -> Smoothness:
    return Smoothness(f"celu(alpha={alpha:g})", sympy.Integer(1), 1 / sympy.Rational(alpha), (sympy.Integer(0), sympy.Integer(1)), True, "exact", lambda z: F.celu(z, alpha), None, None, True)


@lru_cache
def relu() -> Smoothness:
    return Smoothness("relu", sympy.Integer(1), sympy.oo, (sympy.Integer(0), sympy.Integer(1)), True, "exact", F.relu, None, None, False)


@lru_cache
def leaky_relu(negative_slope: float = 0.01) -> Smoothness:
    a = sympy.Rational(negative_slope)
    return Smoothness("leaky_relu", sympy.Max(1, abs(a)), sympy.oo, (sympy.Min(a, 1), sympy.Max(a, 1)), True, "exact", lambda z: F.leaky_relu(z, negative_slope), None, None, False)


@lru_cache
def hardtanh(min_val: float = -1.0, max_val: float = 1.0) -> Smoothness:
    return Smoothness("hardtanh", sympy.Integer(1), sympy.oo, (sympy.Integer(0), sympy.Integer(1)), True, "exact", lambda z: F.hardtanh(z, min_val, max_val), None, None, False)
