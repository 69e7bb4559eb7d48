"""Pre-flight checks of the model's state: run before tracing, so bad input fails fast."""

from __future__ import annotations

import torch
from torch import nn

from ..compiler.errors import InputError, ModelStateError, ResourceError

__all__ = ["check_model_state", "check_example_input", "check_resources", "available_memory",
           "working_memory"]

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


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` (CUDA: free device memory; CPU:
    ``MemAvailable`` of /proc/meminfo), None where unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def working_memory(weight: torch.Tensor, norms: str) -> int:
    """Bytes the compile allocates at once for one dense weight beyond the weight itself: in
    estimate mode one scaled copy (the row-scaled norm ‖diag(r)W‖ reads diag(r)·W); certified,
    float64 copies (the matrix, its row-scaled and absolute values) and the smaller Gram matrix."""
    n = weight.numel()
    if norms == "estimate":
        return n * weight.element_size()
    small = min(weight.shape[0], weight[0].numel()) if weight.dim() >= 2 else 1
    return 3 * 8 * n + 8 * small * small


def check_resources(model: nn.Module, norms: str, available: int | None = None) -> None:
    """Raise :class:`ResourceError` before any numeric work when the largest dense layer's
    :func:`working_memory` exceeds the memory still available (``available`` bytes, default
    :func:`available_memory` of the layer's device).

    >>> try:
    ...     check_resources(nn.Linear(1000, 1000), "estimate", available=10**6)
    ... except ResourceError as e:
    ...     print(str(e)[:80])
    compiling layer 'weight' (1000×1000 float32, 4.0 MB) with norms='estimate' needs
    """
    worst: tuple[int, str, torch.Tensor] | None = None
    for name, p in model.named_parameters():
        if p.dim() < 2 or not p.is_floating_point():
            continue
        need = working_memory(p, norms)
        if worst is None or need > worst[0]:
            worst = (need, name, p)
    if worst is None:
        return
    need, name, p = worst
    free = available if available is not None else available_memory(p.device)
    if free is None or need <= free:
        return
    shape = "×".join(str(s) for s in p.shape)
    raise ResourceError(
        f"compiling layer '{name.removesuffix('.weight') or name}' ({shape} "
        f"{str(p.dtype).removeprefix('torch.')}, {_mb(p.numel() * p.element_size())}) with "
        f"norms={norms!r} needs about {_mb(need)} of working memory at once, but only "
        f"{_mb(free)} are available on {p.device}. Free memory, run on a larger machine, or "
        "bound a smaller model."
    )


def _mb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
