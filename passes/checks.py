"""Pre-flight checks of the model's state: run before tracing, so bad input fails fast."""

from __future__ import annotations

import torch
from torch import nn

from ..compiler.errors import InputError, ModelStateError

__all__ = ["check_model_state", "check_example_input"]

_STOCHASTIC = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_NORMS = (nn.modules.batchnorm._BatchNorm,)
_HOOKS = {"WeightNorm": "weight_norm", "SpectralNorm": "spectral_norm"}


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
        for hook in getattr(m, "_forward_pre_hooks", {}).values():
            kind = type(hook).__name__
            if kind in ("WeightNorm", "SpectralNorm"):
                problems.append(
                    f"- '{where}' ({type(m).__name__}) uses the hook-based "
                    f"torch.nn.utils.{_HOOKS[kind]}: its weight is recomputed only when the module "
                    "runs, so a bound would read a stale weight. Use "
                    f"torch.nn.utils.parametrizations.{_HOOKS[kind]} instead (read live)."
                )
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    metas = [n for n, t in tensors if t.is_meta]
    if metas:
        shown = ", ".join(f"'{n}'" for n in metas[:5]) + (" ..." if len(metas) > 5 else "")
        problems.append(
            f"- {len(metas)} parameter(s)/buffer(s) are on the meta device ({shown}): they have "
            "no values. Materialise the model first (model.to_empty(device=...) then "
            "load_state_dict, or load_state_dict(..., assign=True))."
        )
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            continue
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
    if example_input.is_meta:
        raise InputError(
            f"example_input is on the meta device (shape {tuple(example_input.shape)}): it has "
            "no values to run through the model. Pass a real tensor on the model's device, e.g. "
            f"torch.zeros({', '.join(map(str, example_input.shape))})."
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
    devices = {t.device for t in params if not t.is_meta}
    if params and devices and example_input.device not in devices:
        raise InputError(
            f"example_input is on {example_input.device} but the model's parameters are on "
            f"{sorted(map(str, devices))}; move one of them (example_input.to(...))."
        )
    if not bool(torch.isfinite(example_input).all()):
        raise InputError(
            "example_input contains NaN or inf values; pass finite values (only its shape "
            "matters, e.g. torch.zeros_like(example_input))"
        )
    return example_input
