"""Random architectures and random single ops for the soundness fuzzer.

Shared by ``tests/test_fuzz.py`` (hypothesis drives the random choices) and
``benchmarks/fuzz.py`` (plain seeds, thousands of cases). Everything is drawn from a
``random.Random``; hypothesis supplies one through ``st.randoms()`` so that failures shrink.

An architecture is a list of :class:`Step` records interpreted by :class:`FuzzNet.forward`, which
``torch.fx`` unrolls: the plan is static, so the traced graph holds exactly the ops drawn (modules
and functional forms, residual adds, concatenations, chains of linear maps without activations
between them, batch norms before and after convolutions, scalings, pooling, slicing, reductions).

>>> import random
>>> case = random_case(random.Random(3))
>>> case.model(torch.zeros(2, *case.input_shape, dtype=torch.float64)).shape[0]
2
>>> print(case.describe())
input (48,)
  h[:, 37:39]
  h / const(2,)
  Sigmoid()
  BatchNorm1d(2, eps=0.001, momentum=0.1, affine=True, bias=True, track_running_stats=True)
  Sigmoid()
  scale left 0.1
  h[:, 0:1]
  h * const(1,)
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from curvbound.nn import CenteredSoftplus, SLLConv2d, SLLLinear

__all__ = [
    "ACTIVATIONS",
    "FuzzCase",
    "FuzzNet",
    "OpCase",
    "Step",
    "attained_sup",
    "check_case",
    "exact_linear_norm",
    "random_case",
    "random_op_case",
]

Shape = tuple[int, ...]

# Every smooth activation with a rule, as (name, module factory, functional form or None). torch's
# softplus switches to the identity at βz > threshold: small thresholds (5 is about the smallest
# the rule accepts) put the switch where pre-activations are, and check_case then checks the
# bounds' error term on pairs straddling it. The thresholds are fixed by β, so that the random
# draws (and every recorded case) stay what they were before thresholds were added.
_THRESHOLDS = {0.5: 20.0, 1.0: 5.0, 2.0: 8.0, 5.0: 12.0}


def _softplus(beta: float) -> nn.Softplus:
    return nn.Softplus(beta=beta, threshold=_THRESHOLDS[beta])


ACTIVATIONS: list[tuple[str, Callable[[random.Random], nn.Module], Callable | None]] = [
    ("tanh", lambda r: nn.Tanh(), torch.tanh),
    ("tanh_method", lambda r: nn.Tanh(), lambda h: h.tanh()),
    ("sigmoid", lambda r: nn.Sigmoid(), torch.sigmoid),
    ("sigmoid_method", lambda r: nn.Sigmoid(), lambda h: h.sigmoid()),
    ("softplus", lambda r: _softplus(r.choice([0.5, 1.0, 2.0, 5.0])), None),
    ("softplus_fn", lambda r: nn.Softplus(), lambda h: F.softplus(h, 3.0, 6.0)),
    ("centered_softplus", lambda r: CenteredSoftplus(beta=r.choice([1.0, 1.5, 4.0])), None),
    ("silu", lambda r: nn.SiLU(), F.silu),
    ("gelu", lambda r: nn.GELU(), F.gelu),
    ("gelu_tanh", lambda r: nn.GELU(approximate="tanh"), None),
    ("elu", lambda r: nn.ELU(alpha=1.0), F.elu),
    ("celu", lambda r: nn.CELU(alpha=r.choice([0.5, 1.0, 2.0])), None),
    ("mish", lambda r: nn.Mish(), F.mish),
    ("logsigmoid", lambda r: nn.LogSigmoid(), F.logsigmoid),
]
_ACT = {name: (make, fn) for name, make, fn in ACTIVATIONS}

PADDING_MODES = ("zeros", "circular", "reflect", "replicate")


@dataclass
class Step:
    """One step of a plan: ``kind`` selects the code in :meth:`FuzzNet.forward`; ``modules``
    are its submodules; ``args`` its static arguments; ``text`` a one-line description."""

    kind: str
    modules: list[nn.Module] = field(default_factory=list)
    args: dict[str, Any] = field(default_factory=dict)
    text: str = ""


class FuzzNet(nn.Module):
    """A model that runs a static plan of :class:`Step` records (see the module docstring)."""

    def __init__(self, steps: list[Step]):
        super().__init__()
        self.steps = steps
        self.blocks = nn.ModuleList(nn.ModuleList(s.modules) for s in steps)
        for i, s in enumerate(steps):
            for name, value in s.args.items():
                if isinstance(value, torch.Tensor):
                    self.register_buffer(f"c{i}_{name}", value)

    def _const(self, i: int, name: str) -> torch.Tensor:
        return getattr(self, f"c{i}_{name}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, (step, mods) in enumerate(zip(self.steps, self.blocks)):
            h = self._run(i, step, mods, h)
        return h

    def _run(self, i: int, step: Step, mods: nn.ModuleList, h: torch.Tensor) -> torch.Tensor:
        kind, a = step.kind, step.args
        if kind == "module":  # Linear, Conv, BatchNorm, pooling, activation modules, Flatten
            return mods[0](h)
        if kind == "act_fn":
            return _ACT[a["name"]][1](h)
        if kind == "scale":
            c = a["c"]
            form = a["form"]
            if form == "left":
                return c * h
            if form == "right":
                return h * c
            if form == "div":
                return h / c
            return -h
        if kind == "tensor_scale":
            t = self._const(i, "t")
            return h / t if a["div"] else h * t
        if kind == "residual":
            r = h
            for m in mods:
                r = m(r)
            if a["op"] == "sub":
                return h - r
            if a["op"] == "alpha":
                return torch.add(h, r, alpha=a["alpha"])
            return h + r
        if kind == "concat":
            n1 = a["n1"]
            b1, b2 = h, h
            for m in list(mods)[:n1]:
                b1 = m(b1)
            for m in list(mods)[n1:]:
                b2 = m(b2)
            return torch.cat([b1, b2], dim=1)
        if kind == "slice":
            lo, hi = a["lo"], a["hi"]
            return h[:, lo:hi]
        if kind == "reduce":
            dims = a["dims"]
            return h.mean(dim=dims) if a["mean"] else h.sum(dim=dims)
        if kind == "flatten":
            return h.flatten(1)
        if kind == "unflatten":
            return h.view(h.shape[0], *a["shape"])
        if kind == "transpose":
            return h.transpose(1, 2).contiguous().transpose(1, 2)
        raise ValueError(f"unknown step kind {kind}")


@dataclass
class FuzzCase:
    """A random model (float64, eval mode), its input shape and its plan."""

    model: FuzzNet
    input_shape: Shape
    steps: list[Step]

    def describe(self) -> str:
        return "\n".join([f"input {self.input_shape}"] + [f"  {s.text}" for s in self.steps])


# --------------------------------------------------------------------------- building blocks


def _randomize_bn(bn: nn.modules.batchnorm._BatchNorm, rng: random.Random) -> None:
    c = bn.num_features
    g = torch.Generator().manual_seed(rng.getrandbits(31))
    with torch.no_grad():
        bn.running_mean.copy_(0.3 * torch.randn(c, generator=g, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(c, generator=g, dtype=torch.float64) * 2.7 + 0.3)
        if bn.affine:
            sign = torch.where(torch.rand(c, generator=g) < 0.2, -1.0, 1.0).double()
            bn.weight.copy_(sign * (torch.rand(c, generator=g, dtype=torch.float64) + 0.5))
            bn.bias.copy_(0.1 * torch.randn(c, generator=g, dtype=torch.float64))


def _init(module: nn.Module, rng: random.Random, gain: float) -> nn.Module:
    """Reinitialise weights from ``rng`` (deterministic), N(0, gain²/fan_in)."""
    g = torch.Generator().manual_seed(rng.getrandbits(31))
    with torch.no_grad():
        w = getattr(module, "weight", None)
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            fan_in = w[0].numel()
            w.copy_(torch.randn(w.shape, generator=g, dtype=w.dtype) * gain / math.sqrt(fan_in))
            if module.bias is not None:
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=g))
    return module


def _activation(rng: random.Random) -> tuple[Step, str]:
    name, make, fn = rng.choice(ACTIVATIONS)
    if fn is not None and rng.random() < 0.5:
        return Step("act_fn", args={"name": name}, text=f"{name} (functional)"), name
    m = make(rng)
    return Step("module", [m], text=repr(m)), name


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _conv_out(n: int, lo: int, hi: int, d: int, k: int, s: int) -> int:
    return (n + lo + hi - d * (k - 1) - 1) // s + 1


def _random_conv(
    rng: random.Random, shape: Shape, c_out: int | None = None, keep_size: bool = False
) -> tuple[nn.Module, Shape] | None:
    """A Conv1d/Conv2d on ``shape`` = (C, *spatial) with random stride, padding (ints or
    strings), dilation, groups and padding mode; None if no valid draw was found."""
    c_in, spatial = shape[0], shape[1:]
    nd = len(spatial)
    for _ in range(20):
        co = c_out or rng.randint(1, 6)
        groups = rng.choice([g for g in _divisors(math.gcd(c_in, co))])
        k = tuple(rng.randint(1, 4) for _ in range(nd))
        d = tuple(rng.choice([1, 1, 2]) for _ in range(nd))
        s = (1,) * nd if keep_size else tuple(rng.choice([1, 1, 2, 3]) for _ in range(nd))
        mode = rng.choice(PADDING_MODES)
        r = rng.random()
        if keep_size or (r < 0.2 and all(v == 1 for v in s)):
            padding: Any = "same"
            totals = [dd * (kk - 1) for kk, dd in zip(k, d)]
            pads = [(t // 2, t - t // 2) for t in totals]
        elif r < 0.3:
            padding, pads = "valid", [(0, 0)] * nd
        else:
            p = tuple(rng.randint(0, 2) for _ in range(nd))
            padding, pads = (p if nd > 1 else p[0]), [(v, v) for v in p]
        if mode == "reflect" and any(max(lo, hi) >= n for (lo, hi), n in zip(pads, spatial)):
            continue
        if mode == "circular" and any(max(lo, hi) > n for (lo, hi), n in zip(pads, spatial)):
            continue
        out = tuple(_conv_out(n, lo, hi, dd, kk, ss) for n, (lo, hi), dd, kk, ss
                    in zip(spatial, pads, d, k, s))
        if min(out) < 1:
            continue
        conv_cls = nn.Conv1d if nd == 1 else nn.Conv2d
        conv = conv_cls(c_in, co, k, stride=s, padding=padding, dilation=d, groups=groups,
                        bias=rng.random() < 0.7, padding_mode=mode).double()
        return conv, (co, *out)
    return None


def _random_pool(rng: random.Random, shape: Shape) -> tuple[Step, Shape] | None:
    spatial, nd = shape[1:], len(shape) - 1
    if rng.random() < 0.35:
        size = tuple(rng.randint(1, n) for n in spatial)
        cls = nn.AdaptiveAvgPool1d if nd == 1 else nn.AdaptiveAvgPool2d
        m = cls(size[0] if nd == 1 else size)
        return Step("module", [m], text=repr(m)), (shape[0], *size)
    for _ in range(10):
        k = rng.randint(1, 3)
        s = rng.randint(1, 3)
        p = rng.randint(0, k // 2)
        ceil = rng.random() < 0.3
        cip = rng.random() < 0.7
        outs = []
        for n in spatial:
            span = n + 2 * p - k + (s - 1 if ceil else 0)
            m = span // s + 1
            if ceil and (m - 1) * s >= n + p:
                m -= 1
            outs.append(m)
        if min(outs) < 1 or any(n + 2 * p < k for n in spatial):
            continue
        cls = nn.AvgPool1d if nd == 1 else nn.AvgPool2d
        m = cls(k, stride=s, padding=p, ceil_mode=ceil, count_include_pad=cip)
        return Step("module", [m], text=repr(m)), (shape[0], *outs)
    return None


def _bn(rng: random.Random, shape: Shape) -> Step:
    cls = nn.BatchNorm1d if len(shape) <= 2 else nn.BatchNorm2d
    bn = cls(shape[0], eps=rng.choice([1e-5, 1e-3]), affine=rng.random() < 0.85).double()
    _randomize_bn(bn, rng)
    return Step("module", [bn.eval()], text=repr(bn))


def _linear(rng: random.Random, d_in: int, d_out: int, gain: float) -> nn.Linear:
    lin = nn.Linear(d_in, d_out, bias=rng.random() < 0.8).double()
    return _init(lin, rng, gain)


# --------------------------------------------------------------------------- architectures


def _sll(rng: random.Random, shape: Shape, gain: float) -> Step | None:
    """A random SLL layer (curvbound.nn) for vectors or images, deterministic weights and q."""
    act = rng.choice(["tanh", "softplus", "centered_softplus"])
    beta = rng.choice([0.5, 1.0, 3.0])
    if len(shape) == 1:
        layer: nn.Module = SLLLinear(shape[0], rng.randint(1, 24), activation=act, beta=beta)
    elif len(shape) == 3:
        layer = SLLConv2d(shape[0], rng.choice([1, 3, 5]), rng.randint(1, 5), activation=act,
                          beta=beta)
    else:
        return None
    g = torch.Generator().manual_seed(rng.getrandbits(31))
    with torch.no_grad():
        for name, p in layer.named_parameters():
            scale = 1.0 if name == "log_q" else gain
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return Step("module", [layer.double()], text=repr(layer))


def random_case(
    rng: random.Random,
    *,
    max_depth: int = 8,
    max_width: int = 64,
    gain: float | None = None,
    sll: float = 0.0,
) -> FuzzCase:
    """A random smooth architecture of depth 1..``max_depth`` (see the module docstring).

    ``sll``: the probability that a step is an SLL layer of :mod:`curvbound.nn` (0 leaves the
    random stream, hence every case of a seed, as it was before SLL layers existed)."""
    gain = gain if gain is not None else rng.choice([0.5, 1.0, 1.5, 2.5])
    kind = rng.choice(["vector", "vector", "signal", "image"])
    if kind == "vector":
        shape: Shape = (rng.randint(1, max_width),)
    elif kind == "signal":
        shape = (rng.randint(1, 4), rng.randint(1, 16))
    else:
        shape = (rng.randint(1, 3), rng.randint(1, 8), rng.randint(1, 8))
    input_shape = shape
    steps: list[Step] = []
    depth = rng.randint(1, max_depth)
    width = lambda: rng.randint(1, max_width)  # noqa: E731
    layers = 0
    while layers < depth:
        layers += 1
        spatial = len(shape) > 1
        if sll and rng.random() < sll:
            made = _sll(rng, shape, gain)
            if made is not None:
                steps.append(made)
                continue
        if not spatial:
            choice = rng.choice(["linear", "linear", "act", "act", "residual", "concat", "chain",
                                 "bn", "scale", "tensor_scale", "slice", "unflatten"])
        else:
            choice = rng.choice(["conv", "conv", "act", "act", "bn", "pool", "residual",
                                 "concat", "chain", "bn_conv", "scale", "slice", "reduce",
                                 "flatten", "transpose"])
        if choice == "linear":
            d = width()
            lin = _linear(rng, shape[0], d, gain)
            steps.append(Step("module", [lin], text=repr(lin)))
            shape = (d,)
            if rng.random() < 0.7:
                steps.append(_activation(rng)[0])
        elif choice == "act":
            steps.append(_activation(rng)[0])
        elif choice == "chain":  # linear maps with nothing (or only a scaling/BN) in between
            if spatial:
                made = _random_conv(rng, shape)
                if made is None:
                    continue
                conv, shape = made
                steps.append(Step("module", [_init(conv, rng, gain)], text=repr(conv)))
                if rng.random() < 0.5:
                    steps.append(_bn(rng, shape))
                pooled = _random_pool(rng, shape) if rng.random() < 0.4 else None
                if pooled is not None:
                    steps.append(pooled[0])
                    shape = pooled[1]
                made = _random_conv(rng, shape)
                if made is not None:
                    conv, shape = made
                    steps.append(Step("module", [_init(conv, rng, gain)], text=repr(conv)))
            else:
                d1, d2 = width(), width()
                a = _linear(rng, shape[0], d1, gain)
                b = _linear(rng, d1, d2, gain)
                steps.append(Step("module", [a], text=repr(a)))
                if rng.random() < 0.4:
                    c = rng.choice([-2.0, -0.5, 0.3, 3.0])
                    steps.append(Step("scale", args={"c": c, "form": "left"}, text=f"{c} * h"))
                steps.append(Step("module", [b], text=repr(b)))
                shape = (d2,)
            if rng.random() < 0.6:
                steps.append(_activation(rng)[0])
        elif choice == "bn":
            steps.append(_bn(rng, shape))
        elif choice == "bn_conv":
            steps.append(_bn(rng, shape))
            made = _random_conv(rng, shape)
            if made is None:
                continue
            conv, shape = made
            steps.append(Step("module", [_init(conv, rng, gain)], text=repr(conv)))
        elif choice == "conv":
            made = _random_conv(rng, shape)
            if made is None:
                continue
            conv, shape = made
            steps.append(Step("module", [_init(conv, rng, gain)], text=repr(conv)))
            if rng.random() < 0.3:
                steps.append(_bn(rng, shape))
            if rng.random() < 0.7:
                steps.append(_activation(rng)[0])
        elif choice == "pool":
            pooled = _random_pool(rng, shape)
            if pooled is None:
                continue
            steps.append(pooled[0])
            shape = pooled[1]
        elif choice == "residual":
            if spatial:
                made = _random_conv(rng, shape, c_out=shape[0], keep_size=True)
                made2 = _random_conv(rng, shape, c_out=shape[0], keep_size=True)
                if made is None or made2 is None:
                    continue
                inner = [_init(made[0], rng, gain), _activation_module(rng),
                         _init(made2[0], rng, gain)]
            else:
                hid = width()
                inner = [_linear(rng, shape[0], hid, gain), _activation_module(rng),
                         _linear(rng, hid, shape[0], gain)]
            op = rng.choice(["add", "add", "sub", "alpha"])
            alpha = rng.choice([-1.5, 0.5, 2.0])
            text = f"residual h {op} [{', '.join(type(m).__name__ for m in inner)}]"
            steps.append(Step("residual", inner, {"op": op, "alpha": alpha}, text))
        elif choice == "concat":
            if spatial:
                m1 = _random_conv(rng, shape, keep_size=True)
                m2 = _random_conv(rng, shape, keep_size=True)
                if m1 is None or m2 is None:
                    continue
                b1 = [_init(m1[0], rng, gain), _activation_module(rng)]
                b2 = [_init(m2[0], rng, gain)]
                shape = (m1[1][0] + m2[1][0], *shape[1:])
            else:
                d1, d2 = width(), width()
                b1 = [_linear(rng, shape[0], d1, gain), _activation_module(rng)]
                b2 = [_linear(rng, shape[0], d2, gain)]
                if rng.random() < 0.5:
                    b2.append(_activation_module(rng))
                shape = (d1 + d2,)
            text = f"cat([{', '.join(type(m).__name__ for m in b1)}], " \
                   f"[{', '.join(type(m).__name__ for m in b2)}])"
            steps.append(Step("concat", b1 + b2, {"n1": len(b1)}, text))
        elif choice == "scale":
            c = rng.choice([-3.0, -1.0, -0.25, 0.1, 0.5, 2.0, 4.0])
            form = rng.choice(["left", "right", "div", "neg"])
            steps.append(Step("scale", args={"c": c, "form": form}, text=f"scale {form} {c}"))
        elif choice == "tensor_scale":
            g = torch.Generator().manual_seed(rng.getrandbits(31))
            t = (torch.rand(shape, generator=g, dtype=torch.float64) + 0.25) * rng.choice([-1, 1])
            div = rng.random() < 0.4
            steps.append(Step("tensor_scale", args={"t": t, "div": div},
                              text=f"h {'/' if div else '*'} const{tuple(t.shape)}"))
        elif choice == "slice":
            n = shape[0]
            lo = rng.randint(0, n - 1)
            hi = rng.randint(lo + 1, n)
            steps.append(Step("slice", args={"lo": lo, "hi": hi}, text=f"h[:, {lo}:{hi}]"))
            shape = (hi - lo, *shape[1:])
        elif choice == "reduce":
            dims = tuple(range(2, len(shape) + 1))
            dims = dims if len(dims) > 1 or rng.random() < 0.5 else dims[0]
            mean = rng.random() < 0.6
            steps.append(Step("reduce", args={"dims": dims, "mean": mean},
                              text=f"{'mean' if mean else 'sum'}(dim={dims})"))
            shape = (shape[0],)
        elif choice == "flatten":
            steps.append(Step("flatten", text="flatten(1)"))
            shape = (math.prod(shape),)
        elif choice == "transpose":
            if len(shape) == 3:
                steps.append(Step("transpose", text="transpose(1, 2) twice"))
        elif choice == "unflatten":
            d = shape[0]
            c = rng.choice(_divisors(d))
            text = f"view({c}, {d // c})"
            steps.append(Step("unflatten", args={"shape": (c, d // c)}, text=text))
            shape = (c, d // c)
    if len(shape) > 1 and rng.random() < 0.8:
        steps.append(Step("flatten", text="flatten(1)"))
        shape = (math.prod(shape),)
    if len(shape) == 1 and rng.random() < 0.6:
        lin = _linear(rng, shape[0], rng.randint(1, 5), gain)
        steps.append(Step("module", [lin], text=repr(lin)))
    if not steps:
        steps.append(_activation(rng)[0])
    model = FuzzNet(steps).double().eval()
    return FuzzCase(model, input_shape, steps)


def _activation_module(rng: random.Random) -> nn.Module:
    name, make, _ = rng.choice(ACTIVATIONS)
    return make(rng)


# --------------------------------------------------------------------------- single ops


@dataclass
class OpCase:
    """One op in isolation: ``model`` maps ``input_shape``; ``linear`` says it is a linear map
    (then its Lipschitz constant is the exact spectral norm of its Jacobian)."""

    model: nn.Module
    input_shape: Shape
    linear: bool
    text: str
    affine: nn.Module | None = None  # for "affine → activation" cases: the affine part
    act: Callable[[torch.Tensor], torch.Tensor] | None = None  # ... and the activation


class _Lambda(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], text: str):
        super().__init__()
        self.fn, self.text = fn, text

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def random_op_case(rng: random.Random, kind: str | None = None) -> OpCase:
    """One random op (``kind`` in ``OP_KINDS``) with random shapes and parameters."""
    kind = kind or rng.choice(OP_KINDS)
    nd = rng.choice([1, 2])
    shape: Shape = (rng.randint(1, 4), *(rng.randint(1, 9) for _ in range(nd)))
    if kind == "conv":
        made = None
        while made is None:
            made = _random_conv(rng, shape)
            if made is None:
                shape = (shape[0], *(n + 2 for n in shape[1:]))
        conv = _init(made[0], rng, rng.choice([0.5, 1.0, 3.0]))
        return OpCase(nn.Sequential(conv).eval(), shape, True, repr(conv))
    if kind == "bn_conv":
        made = None
        while made is None:
            made = _random_conv(rng, shape)
            if made is None:
                shape = (shape[0], *(n + 2 for n in shape[1:]))
        conv = _init(made[0], rng, 1.0)
        bn1, bn2 = _bn(rng, shape).modules[0], _bn(rng, made[1]).modules[0]
        model = nn.Sequential(bn1, conv, bn2).eval()
        return OpCase(model, shape, True, f"BN → {conv!r} → BN")
    if kind == "pool":
        pooled = None
        while pooled is None:
            pooled = _random_pool(rng, shape)
            shape = (shape[0], *(n + 1 for n in shape[1:])) if pooled is None else shape
        return OpCase(nn.Sequential(pooled[0].modules[0]).eval(), shape, True, pooled[0].text)
    if kind == "bn":
        shp = rng.choice([(shape[0],), shape[:2], (shape[0], *shape[1:], 1)[:3]])
        step = _bn(rng, shp)
        return OpCase(nn.Sequential(step.modules[0]).eval(), shp, True, step.text)
    if kind == "linear":
        d_in, d_out = rng.randint(1, 64), rng.randint(1, 64)
        lin = _linear(rng, d_in, d_out, rng.choice([0.5, 1.0, 4.0]))
        return OpCase(nn.Sequential(lin).eval(), (d_in,), True, repr(lin))
    if kind == "linear_chain":
        d0, d1, d2 = rng.randint(1, 40), rng.randint(1, 40), rng.randint(1, 40)
        a, b = _linear(rng, d0, d1, 1.0), _linear(rng, d1, d2, 1.0)
        c = rng.choice([-2.0, 0.5, 3.0])
        model = nn.Sequential(a, _Lambda(lambda h: c * h, f"{c}*h"), b).eval()
        return OpCase(model, (d0,), True, f"{a!r} → {c}·h → {b!r}")
    if kind == "scale":
        c = rng.choice([-4.0, -0.5, 0.25, 3.0])
        form = rng.choice(["mul", "div", "neg"])
        fn = {"mul": lambda h: h * c, "div": lambda h: h / c, "neg": lambda h: -h}[form]
        return OpCase(_Lambda(fn, form), shape, True, f"{form} {c}")
    if kind == "reduce":
        dims = tuple(range(2, len(shape) + 1))
        mean = rng.random() < 0.5
        fn = (lambda h: h.mean(dim=dims)) if mean else (lambda h: h.sum(dim=dims))
        return OpCase(_Lambda(fn, "reduce"), shape, True, f"{'mean' if mean else 'sum'}{dims}")
    if kind == "slice":
        n = shape[0]
        lo = rng.randint(0, n - 1)
        hi = rng.randint(lo + 1, n)
        return OpCase(_Lambda(lambda h: h[:, lo:hi], "slice"), shape, True, f"h[:, {lo}:{hi}]")
    if kind == "activation":
        name, make, fn = rng.choice(ACTIVATIONS)
        d = rng.randint(1, 16)
        lin = _linear(rng, d, rng.randint(1, 16), rng.choice([1.0, 3.0]))
        act = make(rng) if fn is None or rng.random() < 0.5 else _Lambda(fn, name)
        model = nn.Sequential(lin, act).eval()
        return OpCase(model, (d,), False, f"{lin!r} → {name}", lin, act)
    if kind == "conv_act":
        made = None
        while made is None:
            made = _random_conv(rng, shape)
            if made is None:
                shape = (shape[0], *(n + 2 for n in shape[1:]))
        conv = _init(made[0], rng, rng.choice([1.0, 3.0]))
        act = _activation_module(rng)
        model = nn.Sequential(conv, act).eval()
        return OpCase(model, shape, False, f"{conv!r} → {act!r}", conv, act)
    if kind in ("add", "cat"):
        d = rng.randint(1, 24)
        a, b = _linear(rng, d, rng.randint(1, 24), 1.0), None
        b = _linear(rng, d, a.out_features if kind == "add" else rng.randint(1, 24), 1.0)
        alpha = rng.choice([-2.0, -1.0, 0.5, 1.0])

        class Branches(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = a, b

            def forward(self, x):
                if kind == "add":
                    return torch.add(self.a(x), self.b(x), alpha=alpha)
                return torch.cat([self.a(x), self.b(x)], dim=1)

        return OpCase(Branches().eval(), (d,), True, f"{kind}({a!r}, {b!r}, alpha={alpha})")
    if kind == "reshape":
        form = rng.choice(["flatten", "permute", "transpose", "view"])
        fn = {
            "flatten": lambda h: h.flatten(1),
            "permute": lambda h: h.permute(0, *reversed(range(1, len(shape) + 1))),
            "transpose": lambda h: h.transpose(1, -1),
            "view": lambda h: h.reshape(h.shape[0], -1, 1),
        }[form]
        return OpCase(_Lambda(fn, form), shape, True, form)
    raise ValueError(f"unknown op kind {kind!r}")


OP_KINDS = ["conv", "bn_conv", "pool", "bn", "linear", "linear_chain", "scale", "reduce", "slice",
            "add", "cat", "reshape", "activation", "conv_act"]


def attained_sup(fn: Callable[[torch.Tensor], torch.Tensor], order: int) -> float:
    """max |σ^(order)(t)| over a fine grid of t in [-12, 12] (float64 autograd): a value attained
    by σ^(order), hence ≤ the supremum (a *lower* bound on the activation constant)."""
    t = torch.linspace(-12.0, 12.0, 48001, dtype=torch.float64, requires_grad=True)
    y = fn(t)
    for _ in range(order):
        (y,) = torch.autograd.grad(y.sum(), t, create_graph=True)
    return float(y.detach().abs().max())


def exact_linear_norm(model: nn.Module, input_shape: Shape) -> tuple[float, torch.Tensor]:
    """‖A‖₂ of an affine model x ↦ A x + b from its float64 matrix A (column j: model(e_j) −
    model(0)), and A itself (out_numel, in_numel): an independent check of certified norms."""
    n = math.prod(input_shape)
    model = model.double()
    with torch.no_grad():
        base = model(torch.zeros(1, *input_shape, dtype=torch.float64)).reshape(1, -1)
        eye = torch.eye(n, dtype=torch.float64).reshape(n, *input_shape)
        J = (model(eye).reshape(n, -1) - base).T
    return (float(torch.linalg.svdvals(J)[0]) if J.numel() else 0.0), J


# --------------------------------------------------------------------------- the check


@dataclass
class CaseResult:
    """Outcome of :func:`check_case`: the bounds, the empirical lower bounds and any violations."""

    bounds: dict[tuple[str, str], tuple[float, float]]
    lip_lower: float
    curv_lower: float
    violations: list[str]
    certified: bool
    #: Bounds.error per (method, norms): nonzero with torch's switching softplus
    errors: dict[tuple[str, str], float] = field(default_factory=dict)
    #: pairs straddling a formula switch that the check used (0 without switches)
    straddling: int = 0

    def ratios(self) -> tuple[float, float]:
        """certified compositional bound / empirical lower bound, for L and M (nan if 0)."""
        L, M = self.bounds["compositional", "certified"]
        rl = L / self.lip_lower if self.lip_lower > 0 else math.nan
        rm = M / self.curv_lower if self.curv_lower > 0 else math.nan
        return rl, rm


def check_case(
    model: nn.Module,
    input_shape: Shape,
    *,
    samples: int = 4,
    steps: int = 8,
    methods: tuple[str, ...] = ("naive", "compositional"),
    seed: int = 0,
    rtol: float = 1e-6,
    atol: float = 1e-12,
    refresh_steps: int | None = None,
) -> CaseResult:
    """Compile ``model`` with every method and both norm modes and check soundness.

    Violations: a certified bound below an empirical lower bound (gradient ascent, float64), an
    estimate above the certified bound (power iteration approaches from below), a certified
    compile whose ``Bounds.certified`` is False. Tolerances: ``rtol`` relative plus ``atol``
    (float64 rounding of the empirical ratios, not of the bounds). Estimates run power iteration
    to convergence, or ``refresh_steps`` steps (every iterate is ≤ the norm, so the comparison
    with the certified bound holds at any step).

    With torch's switching activations (softplus's threshold; ``Bounds.error`` ε > 0) L and M are
    the smooth twin's constants, so the gradient-ascent lower bounds run on ``bf.smooth_twin()``,
    and torch's own function is checked on pairs straddling every switch
    (``straddling_pairs``): ‖f(x) − f(y)‖ ≤ L‖x − y‖ + 2ε and ‖f(y) − F(y)‖ ≤ ε there. Without
    the error term those pairs fail (they are a few ulps apart across a jump).
    """
    import curvbound
    from curvbound.apps.empirical import (
        curvature_lower_bound,
        lipschitz_lower_bound,
        straddling_pairs,
    )

    x = torch.zeros(1, *input_shape, dtype=torch.float64)
    bounds: dict[tuple[str, str], tuple[float, float]] = {}
    errors: dict[tuple[str, str], float] = {}
    violations: list[str] = []
    certified = True
    twin = None
    for method in methods:
        for norms in ("estimate", "certified"):
            converge = norms == "estimate" and refresh_steps is None
            bf = curvbound.compile(model, x, method=method, norms=norms, refresh=converge)
            out = bf(refresh=refresh_steps or 0) if norms == "estimate" else bf()
            bounds[method, norms] = (float(out.lipschitz.detach()), float(out.curvature.detach()))
            errors[method, norms] = float(out.error)
            if norms == "certified" and not out.certified:
                certified = False
                violations.append(f"{method}: norms='certified' gave Bounds.certified=False")
            if out.error > 0 and twin is None:
                twin = bf.smooth_twin(torch.float64).eval()
    target = model if twin is None else twin
    lip = lipschitz_lower_bound(target, input_shape, samples=samples, steps=steps, seed=seed)
    curv = curvature_lower_bound(target, input_shape, samples=samples, steps=steps, seed=seed)
    for method in methods:
        lc, mc = bounds[method, "certified"]
        le, me = bounds[method, "estimate"]
        if lip > lc * (1 + rtol) + atol:
            violations.append(f"{method}: certified L={lc!r} < empirical {lip!r}")
        if curv > mc * (1 + rtol) + atol:
            violations.append(f"{method}: certified M={mc!r} < empirical {curv!r}")
        if le > lc * (1 + 1e-9) or me > mc * (1 + 1e-9):
            violations.append(f"{method}: estimate ({le!r}, {me!r}) > certified ({lc!r}, {mc!r})")
        if errors[method, "estimate"] > errors[method, "certified"] * (1 + 1e-9):
            violations.append(f"{method}: estimated error > certified error")
    straddling = 0
    if twin is not None:
        real = copy.deepcopy(model).double().eval()
        xs, ys = straddling_pairs(real, input_shape, samples=2 * samples, seed=seed)
        straddling = len(xs)
        with torch.no_grad():
            fx_, fy = real(xs).flatten(1), real(ys).flatten(1)
            jump = (fx_ - fy).norm(dim=1)
            dev = (fy - twin(ys).flatten(1)).norm(dim=1)
        dist = (xs - ys).flatten(1).norm(dim=1)
        scale = fy.norm(dim=1) + fx_.norm(dim=1)
        for method in methods:
            lc, _ = bounds[method, "certified"]
            eps = errors[method, "certified"]
            allowed = lc * dist + 2 * eps
            if bool((jump > allowed * (1 + rtol) + atol + 1e-14 * scale).any()):
                worst = float((jump - allowed).max())
                violations.append(
                    f"{method}: ‖f(x) − f(y)‖ > L‖x − y‖ + 2·error by {worst!r} on pairs "
                    f"straddling a switch (error={eps!r})"
                )
            if bool((dev > eps * (1 + rtol) + atol + 1e-14 * scale).any()):
                violations.append(
                    f"{method}: ‖f − smooth twin‖ = {float(dev.max())!r} > error {eps!r}"
                )
    return CaseResult(bounds, lip, curv, violations, certified, errors, straddling)
