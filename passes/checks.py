"""Pre-flight checks of the model's state: run before tracing, so bad input fails fast."""

from __future__ import annotations

import torch
from torch import nn

from ..compiler.errors import InputError, ModelStateError

__all__ = ["check_model_state", "check_example_input"]

_STOCHASTIC = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_NORMS = (nn.modules.batchnorm._BatchNorm,)


def check_model_state(model: nn.Module) -> None:
    """Raise :class:`ModelStateError` for train-mode batch norm/dropout and non-finite tensors.

    Every problem is listed, each with the module path and what to do.
    """
    problems: list[str] = []
    for path, m in model.named_modules():
        where = path or "<root>"
        if isinstance(m, _NORMS):
            if m.training:
                problems.append(
                    f"- '{where}' ({type(m).__name__}) is in train mode: it normalises with batch "
                    "statistics, so the model is not a fixed function. Call model.eval() first."
                )
            elif not m.track_running_stats or m.running_var is None:
                problems.append(
                    f"- '{where}' ({type(m).__name__}) has no running statistics "
                    "(track_running_stats=False): it always uses batch statistics, which no "
                    "per-sample bound covers. Use running statistics or remove it."
                )
        if isinstance(m, _STOCHASTIC) and m.training and m.p > 0:
            problems.append(
                f"- '{where}' ({type(m).__name__}) is in train mode: it is random. "
                "Call model.eval()."
            )
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            problems.append(
                f"- '{name}' has {bad} non-finite value(s) (NaN/inf): a bound of such a model is "
                "meaningless. Check the training run or the checkpoint."
            )
    if problems:
        raise ModelStateError(
            "the model cannot be bounded in its current state:\n" + "\n".join(problems)
        )


def check_example_input(model: nn.Module, example_input: object) -> torch.Tensor:
    """The example input must be one floating-point tensor with a batch dimension."""
    if not isinstance(example_input, torch.Tensor):
        raise InputError(
            f"example_input must be a torch.Tensor with a batch dimension, got "
            f"{type(example_input).__name__}. "
            "Example: curvbound.compile(model, torch.zeros(1, 784))"
        )
    if example_input.dim() < 1 or example_input.shape[0] < 1:
        raise InputError(
            f"example_input must have a leading batch dimension of size ≥ 1, got shape "
            f"{tuple(example_input.shape)}; e.g. x[None] for a single sample."
        )
    if not example_input.is_floating_point():
        raise InputError(
            f"example_input must be floating point (got {example_input.dtype}): bounds are "
            "about maps of real vectors."
        )
    params = [p for p in model.parameters() if p.is_floating_point()]
    if params and params[0].dtype != example_input.dtype:
        raise InputError(
            f"example_input has dtype {example_input.dtype} but the model's parameters are "
            f"{params[0].dtype}; convert one of them (e.g. example_input.to({params[0].dtype}))."
        )
    if not bool(torch.isfinite(example_input).all()):
        raise InputError("example_input contains NaN or inf values")
    return example_input
