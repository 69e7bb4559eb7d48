"""The rule-spec table: one row per group of registry keys, with a small model exercising them.

Each row's model is compiled and checked against empirical lower bounds by one generic checker
(tests/test_rule_specs.py). A test asserts that every key of the default registry has a row.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import curvbound
from curvbound import nn as cnn


@dataclass(frozen=True)
class Spec:
    name: str
    keys: tuple  # registry keys the model must exercise
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    smooth: bool = True


class Fn(nn.Module):
    """Linear → f → Linear, so that each op sits between affine maps as in a real network."""

    def __init__(self, f, d_in=4, d_mid=6, d_out=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Linear(d_in, d_mid)
        self.b = nn.Linear(d_mid, d_out)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.8)
        self.f = f

    def forward(self, x):
        return self.b(self.f(self.a(x)))


class Spatial(nn.Module):
    """Conv → f → flatten → Linear for ops on (C, H, W) or (C, L) tensors."""

    def __init__(self, f, c_in=2, c_mid=4, size=(6, 6), out_features=None, d_out=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        conv = nn.Conv2d if len(size) == 2 else nn.Conv1d
        self.conv = conv(c_in, c_mid, 3, padding=1)
        self.f = f
        with torch.no_grad():
            probe = self.f(self.conv(torch.zeros(1, c_in, *size)))
        self.fc = nn.Linear(probe.numel(), d_out)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.6)

    def forward(self, x):
        return self.fc(torch.flatten(self.f(self.conv(x)), 1))


class Param(nn.Module):
    """An op applied with parameters read through get_attr (functional forms)."""

    def __init__(self, kind: str, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.kind = kind
        if kind == "linear":
            self.w = nn.Parameter(torch.randn(5, 4, generator=g) * 0.7)
        elif kind == "conv1d":
            self.w = nn.Parameter(torch.randn(3, 2, 3, generator=g) * 0.5)
        else:
            self.w = nn.Parameter(torch.randn(3, 2, 3, 3, generator=g) * 0.5)

    def forward(self, x):
        if self.kind == "linear":
            return torch.tanh(F.linear(x, self.w))
        if self.kind == "conv1d":
            return torch.sigmoid(F.conv1d(x, self.w, stride=2, padding=1)).flatten(1)
        return torch.tanh(F.conv2d(x, self.w, stride=1, padding=1, dilation=2)).flatten(1)


class BN(nn.Module):
    def __init__(self, dims: int, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        if dims == 1:
            self.lin, self.bn, self.out = nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)
        else:
            self.lin, self.bn = nn.Conv2d(2, 3, 3, stride=2), nn.BatchNorm2d(3)
            self.out = nn.Linear(3 * 2 * 2, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.7)
            self.bn.running_mean.copy_(torch.randn(self.bn.num_features, generator=g))
            self.bn.running_var.copy_(torch.rand(self.bn.num_features, generator=g) + 0.3)
        self.act = nn.Tanh()

    def forward(self, x):
        return self.out(self.act(self.bn(self.lin(x))).flatten(1))


def _f(fn):
    """Wrap a callable as a module whose forward fx traces through."""

    class Lambda(nn.Module):
        def forward(self, x):
            return fn(x)

    return Lambda()


class Arith(nn.Module):
    """Residual arithmetic: add/sub/neg/mul/div in one smooth net."""

    def __init__(self, op: str, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a, self.b, self.c = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.7)
        self.register_buffer("scale", torch.rand(5, generator=g) + 0.5)
        self.op = op

    def forward(self, x):
        h = torch.tanh(self.a(x))
        r = torch.sigmoid(self.b(h))
        op = self.op
        if op == "add":
            z = h + r
        elif op == "torch.add":
            z = torch.add(h, r, alpha=-2.0)
        elif op == "method.add":
            z = h.add(r)
        elif op == "iadd":
            z = h.clone()
            z += r
        elif op == "sub":
            z = h - 2.0 * r
        elif op == "torch.sub":
            z = torch.sub(h, r)
        elif op == "method.sub":
            z = h.sub(r)
        elif op == "isub":
            z = h.clone()
            z -= r
        elif op == "neg":
            z = -h + torch.neg(r) + r.neg()
        elif op == "mul":
            z = 3.0 * h * self.scale + torch.mul(r, 0.5) + r.mul(2)
        elif op == "imul":
            z = h.clone()
            z *= 2.5
        elif op == "div":
            z = h / 4.0 + torch.div(r, self.scale) + r.div(2.0)
        elif op == "idiv":
            z = h.clone()
            z /= 3.0
        else:
            raise ValueError(op)
        return self.c(torch.tanh(z))


class Shapes(nn.Module):
    """Conv features pushed through every shape op, then a linear read-out."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(100 + 100 + 9, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.flat = nn.Flatten()
        self.ident = nn.Identity()
        self.drop = nn.Dropout(0.3)
        self.drop1, self.drop2 = nn.Dropout1d(0.2), nn.Dropout2d(0.2)
        self.adrop = nn.AlphaDropout(0.1)

    def forward(self, x):
        h = torch.tanh(self.conv(x))  # (B, 4, 5, 5)
        h = self.drop2(self.ident(self.drop(h))).contiguous().clone()
        h = torch.clone(h)
        a = h.permute(0, 2, 3, 1).transpose(1, 2)
        a = torch.transpose(torch.permute(a, (0, 3, 1, 2)), 2, 3)
        a = a.view(a.shape[0], -1).reshape(x.size(0), 4, 25)
        a = torch.reshape(a, (x.shape[0], 100)).unsqueeze(1).squeeze(1)
        a = torch.squeeze(torch.unsqueeze(a, 2), 2)
        b = self.flat(h)
        b = torch.flatten(b.reshape(-1, 4, 5, 5), 1).flatten(1)
        c = h[:, :, 1:3, ::2].mean((2, 3))  # (B, 4)
        c = torch.mean(h, dim=(2, 3)) + c + h.sum(dim=-1).sum(-1) / 25.0
        c = self.drop1(c.unsqueeze(-1)).squeeze(-1)
        c = torch.cat([c, torch.sum(h, 1)[..., 0]], dim=1)  # (B, 4 + 5)
        c = F.dropout(self.adrop(c), 0.5, training=False)
        c = F.dropout1d(c.unsqueeze(-1), 0.1, False).squeeze(-1)
        c = F.alpha_dropout(c, 0.1, False)
        c = F.dropout2d(c.unsqueeze(-1).unsqueeze(-1), 0.1, False).flatten(1)
        z = torch.concat([a, b, c], 1)
        z2 = torch.stack([z[:, :5], z[:, 5:10]], dim=1).flatten(1)
        return self.fc(torch.cat([z, z2[:, :0]], dim=-1))


def act(m):
    return lambda: Fn(m)


class Branches(nn.Module):
    """Merges followed by affine maps, where the distribute pass and the general block apply:
    ``kind`` = "residual" (out(z + G σ(W z))), "residual_sigma" (out(z − σ(W z))), "concat"
    (out(cat(σ(A x), B x))), "self_concat" (out(cat(σ(Ax), σ(Ax)))), "slice" (a slice between two
    dense layers), "conv_residual" (a convolutional skip connection)."""

    def __init__(self, kind: str, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.kind = kind
        if kind == "conv_residual":
            self.w = nn.Conv2d(2, 3, 3, padding=1)
            self.g = nn.Conv2d(3, 2, 3, padding=1)
            self.out = nn.Linear(2 * 3 * 3, 3)
        elif kind == "slice":
            self.w, self.g, self.out = nn.Linear(3, 8), nn.Linear(5, 6), nn.Linear(6, 3)
        else:
            self.w, self.g = nn.Linear(3, 6), nn.Linear(6 if kind != "concat" else 3, 3)
            width = {"concat": 9, "self_concat": 12}.get(kind, 3)
            self.out = nn.Linear(width, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 1.2)

    def forward(self, x):
        k = self.kind
        if k == "residual":
            return self.out(x + self.g(torch.tanh(self.w(x))))
        if k == "residual_sigma":
            return self.out(x - F.softplus(self.w(x))[:, :3])
        if k == "concat":
            return self.out(torch.cat([torch.tanh(self.w(x)), self.g(x)], dim=1))
        if k == "self_concat":
            a = torch.sigmoid(self.w(x))
            return self.out(torch.cat([a, a], dim=1))
        if k == "slice":
            return self.out(torch.tanh(self.g(torch.tanh(self.w(x))[:, 2:7])))
        h = x + self.g(torch.tanh(self.w(x)))
        return self.out(h.flatten(1))


SPECS: list[Spec] = [
    # -- activations: module, torch function, functional and method forms --------------------
    Spec("tanh", (nn.Tanh, torch.tanh, "tanh"),
         lambda: Fn(nn.Sequential(nn.Tanh(), _f(torch.tanh), _f(F.tanh), _f(lambda x: x.tanh()))),
         (4,)),
    Spec("sigmoid", (nn.Sigmoid, torch.sigmoid, "sigmoid"),
         lambda: Fn(nn.Sequential(nn.Sigmoid(), _f(torch.sigmoid), _f(F.sigmoid),
                                  _f(lambda x: x.sigmoid()))), (4,)),
    Spec("softplus", (nn.Softplus, F.softplus),
         lambda: Fn(nn.Sequential(nn.Softplus(beta=3.0), _f(lambda x: F.softplus(x, beta=0.5)))),
         (4,)),
    # torch's softplus switches to x at βx > threshold: small thresholds put the switch among the
    # pre-activations; the checker adds pairs straddling it (Bounds.error must cover the jump)
    Spec("softplus_threshold", (nn.Softplus, F.softplus),
         lambda: Fn(nn.Sequential(nn.Softplus(beta=2.0, threshold=5.0),
                                  _f(lambda x: F.softplus(x, 1.0, 6.0)))),
         (4,)),
    Spec("centered_softplus", (curvbound.CenteredSoftplus,),
         act(curvbound.CenteredSoftplus(beta=2.0)), (4,)),
    Spec("leaky_softplus", (cnn.LeakySoftplus,),
         lambda: Fn(nn.Sequential(cnn.LeakySoftplus(0.2, beta=2.0), cnn.LeakySoftplus(-1.5))),
         (4,)),
    Spec("smooth_clamp", (cnn.SmoothClamp,), act(cnn.SmoothClamp(-0.5, 0.7, beta=3.0)), (4,)),
    Spec("silu", (nn.SiLU, F.silu), lambda: Fn(nn.Sequential(nn.SiLU(), _f(F.silu))), (4,)),
    Spec("gelu", (nn.GELU, F.gelu),
         lambda: Fn(nn.Sequential(nn.GELU(), nn.GELU(approximate="tanh"),
                                  _f(lambda x: F.gelu(x, approximate="tanh")))), (4,)),
    Spec("elu", (nn.ELU, F.elu), lambda: Fn(nn.Sequential(nn.ELU(), _f(F.elu))), (4,)),
    Spec("celu", (nn.CELU, F.celu),
         lambda: Fn(nn.Sequential(nn.CELU(alpha=0.5), _f(lambda x: F.celu(x, 2.0)))), (4,)),
    Spec("mish", (nn.Mish, F.mish), lambda: Fn(nn.Sequential(nn.Mish(), _f(F.mish))), (4,)),
    Spec("logsigmoid", (nn.LogSigmoid, F.logsigmoid),
         lambda: Fn(nn.Sequential(nn.LogSigmoid(), _f(F.logsigmoid))), (4,)),
    # -- Lipschitz only --------------------------------------------------------------------------
    Spec("relu", (nn.ReLU, F.relu, torch.relu, "relu"),
         lambda: Fn(nn.Sequential(nn.ReLU(), _f(F.relu), _f(torch.relu), _f(lambda x: x.relu()))),
         (4,), smooth=False),
    Spec("leaky_relu", (nn.LeakyReLU, F.leaky_relu),
         lambda: Fn(nn.Sequential(nn.LeakyReLU(-1.5), _f(lambda x: F.leaky_relu(x, 0.2)))),
         (4,), smooth=False),
    Spec("elu_alpha", (nn.ELU,), act(nn.ELU(alpha=2.0)), (4,), smooth=False),
    Spec("hardtanh", (nn.Hardtanh, F.hardtanh, F.relu6),
         lambda: Fn(nn.Sequential(nn.Hardtanh(-0.5, 0.7), nn.ReLU6(), _f(F.hardtanh),
                                  _f(F.relu6))), (4,), smooth=False),
    Spec("max_pool2d", (nn.MaxPool2d, F.max_pool2d),
         lambda: Spatial(nn.Sequential(nn.MaxPool2d(3, stride=1),
                                       _f(lambda x: F.max_pool2d(x, 2)))),
         (2, 6, 6), smooth=False),
    Spec("max_pool1d", (nn.MaxPool1d, F.max_pool1d),
         lambda: Spatial(nn.Sequential(nn.MaxPool1d(2, stride=1, dilation=2),
                                       _f(lambda x: F.max_pool1d(x, 2))), size=(9,)),
         (2, 9), smooth=False),
    # -- affine --------------------------------------------------------------------------------
    Spec("linear", (nn.Linear,), act(nn.Tanh()), (4,)),
    Spec("F.linear", (F.linear,), lambda: Param("linear"), (4,)),
    Spec("conv2d", (nn.Conv2d,),
         lambda: Spatial(nn.Sequential(
             nn.Softplus(),
             nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2, groups=2),
             nn.Tanh(),
         )), (2, 6, 6)),
    Spec("conv1d", (nn.Conv1d,),
         lambda: Spatial(nn.Sequential(nn.Tanh(), nn.Conv1d(4, 6, 2, stride=2, groups=2)),
                         size=(8,)), (2, 8)),
    Spec("F.conv2d", (F.conv2d,), lambda: Param("conv2d"), (2, 5, 5)),
    Spec("F.conv1d", (F.conv1d,), lambda: Param("conv1d"), (2, 7)),
    Spec("batch_norm1d", (nn.BatchNorm1d,), lambda: BN(1), (4,)),
    Spec("batch_norm2d", (nn.BatchNorm2d,), lambda: BN(2), (2, 6, 6)),
    Spec("avg_pool2d", (nn.AvgPool2d, F.avg_pool2d),
         lambda: Spatial(nn.Sequential(nn.Tanh(), nn.AvgPool2d(3, stride=1, padding=1),
                                       _f(lambda x: F.avg_pool2d(x, 2)))), (2, 6, 6)),
    Spec("avg_pool1d", (nn.AvgPool1d, F.avg_pool1d),
         lambda: Spatial(nn.Sequential(nn.Tanh(), nn.AvgPool1d(2, count_include_pad=False,
                                                                padding=1),
                                       _f(lambda x: F.avg_pool1d(x, 3, 2))), size=(9,)),
         (2, 9)),
    Spec("adaptive_avg_pool2d", (nn.AdaptiveAvgPool2d, F.adaptive_avg_pool2d),
         lambda: Spatial(nn.Sequential(nn.Sigmoid(), nn.AdaptiveAvgPool2d((4, 3)),
                                       _f(lambda x: F.adaptive_avg_pool2d(x, 2)))), (2, 7, 7)),
    Spec("adaptive_avg_pool1d", (nn.AdaptiveAvgPool1d, F.adaptive_avg_pool1d),
         lambda: Spatial(nn.Sequential(nn.Sigmoid(), nn.AdaptiveAvgPool1d(4),
                                       _f(lambda x: F.adaptive_avg_pool1d(x, 3))), size=(7,)),
         (2, 7)),
    # -- curvbound.nn layers --------------------------------------------------------------------
    Spec("sll_linear", (cnn.SLLLinear,),
         lambda: Fn(nn.Sequential(cnn.SLLLinear(6, activation="tanh"),
                                  cnn.SLLLinear(6, 4, activation="softplus", beta=2.0))), (4,)),
    Spec("sll_conv2d", (cnn.SLLConv2d,),
         lambda: Spatial(nn.Sequential(cnn.SLLConv2d(4, activation="centered_softplus"),
                                       cnn.SLLConv2d(4, 5, inner_channels=2)), size=(5, 5)),
         (2, 5, 5)),
    Spec("normalized_linear", (cnn.NormalizedLinear,),
         lambda: Fn(nn.Sequential(nn.Tanh(), cnn.NormalizedLinear(6, 6), nn.Tanh(),
                                  cnn.NormalizedLinear(6, 6, normalize="frobenius"))), (4,)),
    Spec("pad_channels", (cnn.PadChannels,),
         lambda: Spatial(nn.Sequential(cnn.PadChannels(6), nn.Tanh())), (2, 6, 6)),
    # -- arithmetic ----------------------------------------------------------------------------
    Spec("add", (operator.add,), lambda: Arith("add"), (4,)),
    Spec("torch.add", (torch.add,), lambda: Arith("torch.add"), (4,)),
    Spec("method add", ("add",), lambda: Arith("method.add"), (4,)),
    Spec("iadd", (operator.add,), lambda: Arith("iadd"), (4,)),
    Spec("sub", (operator.sub,), lambda: Arith("sub"), (4,)),
    Spec("torch.sub", (torch.sub,), lambda: Arith("torch.sub"), (4,)),
    Spec("method sub", ("sub",), lambda: Arith("method.sub"), (4,)),
    Spec("isub", (operator.sub,), lambda: Arith("isub"), (4,)),
    Spec("neg", (operator.neg, torch.neg, "neg"), lambda: Arith("neg"), (4,)),
    Spec("mul", (operator.mul, torch.mul, "mul"), lambda: Arith("mul"), (4,)),
    Spec("imul", (operator.mul,), lambda: Arith("imul"), (4,)),
    Spec("div", (operator.truediv, torch.div, "div"), lambda: Arith("div"), (4,)),
    Spec("idiv", (operator.truediv,), lambda: Arith("idiv"), (4,)),
    # -- shapes, reductions, selection, concatenation ---------------------------------------------
    Spec("shapes", (
        nn.Flatten, torch.flatten, "flatten", "view", "reshape", torch.reshape, "permute",
        torch.permute, "transpose", torch.transpose, "unsqueeze", torch.unsqueeze, "squeeze",
        torch.squeeze, "contiguous", "clone", torch.clone, nn.Identity, nn.Dropout, nn.Dropout1d,
        nn.Dropout2d, nn.AlphaDropout, F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout,
        operator.getitem, torch.cat, torch.concat, torch.stack, torch.mean, "mean", torch.sum,
        "sum",
    ), lambda: Shapes(), (2, 5, 5)),
    # -- merges followed by affine maps (passes/distribute.py, passes/residual.py) ---------------
    Spec("residual block", (operator.add,), lambda: Branches("residual"), (3,)),
    Spec("residual σ", (operator.sub, operator.getitem), lambda: Branches("residual_sigma"),
         (3,)),
    Spec("concat → linear", (torch.cat,), lambda: Branches("concat"), (3,)),
    Spec("self concat → linear", (torch.cat,), lambda: Branches("self_concat"), (3,)),
    Spec("slice between layers", (operator.getitem,), lambda: Branches("slice"), (3,)),
    Spec("conv residual", (operator.add, nn.Conv2d), lambda: Branches("conv_residual"),
         (2, 3, 3)),
]
