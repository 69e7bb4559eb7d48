"""``method="paper"``: the paper's Algorithm 1 (theory §3–§5), for sequential networks.

For f = W_K σ(W_{K−1} σ(⋯ σ(W_0 x + b_0) ⋯) + b_{K−1}) + b_K (each W_k a merged linear chain:
Linear, Conv, flatten, batch norm...), with every norm a quantity of the compiled bound function:

1. LipLT prefix constants (theory §4): m_0 = ‖W_0‖,
   m_i = Σ_{j<i} (Π|c|)·d·‖W_i⋯W_{i−j}‖·m_{i−j−1} + (Π|c|)·‖W_i⋯W_0‖, for the pre-activations;
   L(σ_k) = sup|σ'|·m_k. All products of consecutive weights are quantities of one segment and
   advance in one batched power iteration (certified norms with ``norms="certified"``).
2. Inner layers by the row-norm rule (d):
   M(σ_k) = sup|σ''|·‖diag(r)W_k‖·L(σ_{k−1})² + sup|σ'|·M(z_k), M(z_k) = ‖W_k‖·M(σ_{k−1}).
3. The final block x ↦ W_K σ(W_{K−1} x + b) by the vectorised-Jacobian bound (c):
   M = sup|σ''|·‖W_{K−1}‖·‖Â‖·L(σ_{K−2})² + L_F·M(σ_{K−2}),
   ‖Â‖² = λ_max((W_KᵀW_K) ∘ (W_{K−1}W_{K−1}ᵀ)), with the loop-transformed
   L_F = |c|·‖W_K W_{K−1}‖ + d·‖W_K‖‖W_{K−1}‖ (= ½(‖W_K W_{K−1}‖ + ‖W_K‖‖W_{K−1}‖) for tanh).
4. ``bf()`` reports the constants of the vector map: L = m_K and M from step 3; the paper's
   certificate multiplies both by √2 for a margin (``bf.margins()`` folds each margin instead).

Steps 1–2 happen in the per-node rules (``ctx.method == "paper"``, see
:mod:`curvbound.passes.lipschitz_lt` and :func:`curvbound.rules.elementwise_transfer`); step 3 here.

>>> import torch, curvbound
>>> _ = torch.manual_seed(0)
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8),
...                           torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
>>> x = torch.zeros(1, 4, dtype=torch.float64)
>>> for method in ("naive", "paper", "compositional"):
...     print(method, curvbound.compile(net, x, method=method, norms="certified")())
naive Bounds(lipschitz=0.691655, curvature=1.08042, certified)
paper Bounds(lipschitz=0.415375, curvature=0.46081, certified)
compositional Bounds(lipschitz=0.415375, curvature=0.427258, certified)
>>> relu = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
>>> curvbound.compile(relu, torch.zeros(1, 4), method="paper")
Traceback (most recent call last):
...
curvbound.compiler.errors.MethodCoverageError: method='paper': activation 1 (ReLU) ... is not C¹
(σ' is discontinuous), so its curvature is infinite. Use method='compositional', ...
"""

from __future__ import annotations

from ..compiler.context import RuleContext, Transfer
from ..compiler.errors import MethodCoverageError
from ..compiler.naming import node_label
from ..runtime.products import HADAMARD_HIDDEN_LIMIT, PRODUCT_ENTRY_LIMIT
from .lipschitz_lt import final_block, segment_of
from .sequential import Layer

__all__ = ["paper_output"]


def paper_output(ctx: RuleContext, layers: list[Layer], rules: dict) -> Transfer:
    """The output node's transfer under Algorithm 1 (``layers`` from ``sequential_path``)."""
    out = ctx.node
    t = ctx.transfer(out)
    if len(layers) == 1:  # a linear map: L = ‖W‖, M = 0
        return t
    for layer in layers:
        found = segment_of(ctx, layer.affine)
        if found is None or found[0].start.op != "placeholder":
            raise MethodCoverageError(
                f"method='paper': the LipLT chain breaks at {node_label(layer.affine)} "
                f"(fx node '{layer.affine.name}', rule {rules.get(layer.affine)}): its linear map "
                "has no norm quantity of the chain. "
                "Use method='compositional'."
            )
    final = final_block(ctx, t)
    if final is None:
        raise MethodCoverageError(
            f"method='paper': the final block at {node_label(out)} (fx node '{out.name}') is too "
            "large for the "
            f"vectorised-Jacobian bound (it needs single-layer G and W, hidden width ≤ "
            f"{HADAMARD_HIDDEN_LIMIT}, G and W with at most {PRODUCT_ENTRY_LIMIT} entries). "
            "Use method='compositional'."
        )
    return final
