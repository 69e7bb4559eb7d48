"""Nothing silently wrong (issue 10) and a bound function you can keep (issue 14).

Each test is one case a user met: a correct result, or a library error that names what is
wrong and what to do, raised before heavy work where the input allows it.
"""

from __future__ import annotations

import ast
import copy
import io
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvbound
from curvbound.compiler.trace import unwrap_model

torch.set_num_threads(1)


def spectral(w: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(w.detach().double(), 2))


def linear_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).eval()


def smooth_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).eval()


def chain_norm(net: nn.Sequential) -> float:
    """Independent value of the certified L of a purely linear Sequential: ‖W2 W1‖₂."""
    return spectral(net[1].weight.double() @ net[0].weight.double())


class Counting(nn.Module):
    """Counts forward calls: an error raised 'before any work' leaves calls == 0."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.body(x)


class MyAct(nn.Module):
    def forward(self, x):
        return torch.tanh(x)


# -- user constants and rule results (item 2) ---------------------------------------------------
@pytest.mark.parametrize(
    "slope, curvature, what",
    [(-1.0, 0.5, "slope .* negative"), (1.0, -0.5, "curvature .* negative"),
     (float("nan"), 0.5, "NaN"), (1.0, float("nan"), "NaN"), (float("inf"), 0.5, "infinite")],
)
def test_activation_constants_are_checked_at_registration(slope, curvature, what):
    reg = curvbound.Registry()
    with pytest.raises(curvbound.RegistrationError, match=what):
        curvbound.activation(MyAct, slope=slope, curvature=curvature, registry=reg)
    with pytest.raises(curvbound.RegistrationError, match=what):
        curvbound.rules.elementwise(slope=slope, curvature=curvature)
    assert not reg.has(MyAct)


def test_infinite_curvature_is_a_valid_constant():
    reg = curvbound.Registry()
    curvbound.activation(MyAct, slope=1.0, curvature=float("inf"), registry=reg)
    net = nn.Sequential(nn.Linear(3, 3), MyAct()).eval()
    bf = curvbound.compile(net, torch.zeros(1, 3), rules=reg, norms="certified")
    assert math.isinf(float(bf().curvature)) and bf.nonsmooth_nodes == ["1 (MyAct)"]


def test_rule_returning_negative_or_nan_bound_names_rule_and_node():
    def negative(node, ctx):
        return curvbound.Transfer(-2 * ctx.L(ctx.input()), ctx.M(ctx.input()))

    def nan_record(node, ctx):
        return curvbound.rules.elementwise(
            smoothness=lambda n, c: type("R", (), {"slope": float("nan"), "curvature": 1.0})()
        )(node, ctx)

    net = nn.Sequential(nn.Linear(3, 3), MyAct()).eval()
    with pytest.raises(curvbound.RuleError, match=r"negative.*1 \(MyAct\)"):
        curvbound.compile(net, torch.zeros(1, 3), rules={MyAct: negative})
    with pytest.raises(curvbound.RuleError, match=r"nan_record.*1 \(MyAct\).*NaN"):
        curvbound.compile(net, torch.zeros(1, 3), rules={MyAct: nan_record})


def test_rule_returning_a_float_names_rule_and_node():
    def floaty(node, ctx):
        return 1.0

    net = nn.Sequential(nn.Linear(3, 3), MyAct()).eval()
    with pytest.raises(curvbound.RuleError, match=r"floaty returned float.*1 \(MyAct\).*Transfer"):
        curvbound.compile(net, torch.zeros(1, 3), rules={MyAct: floaty})


def test_rules_mapping_with_a_string_is_refused():
    net = nn.Sequential(nn.Linear(3, 3), MyAct()).eval()
    with pytest.raises(curvbound.RegistrationError, match=r"MyAct is str 'not a rule'"):
        curvbound.compile(net, torch.zeros(1, 3), rules={MyAct: "not a rule"})


# -- stale models (item 3) ----------------------------------------------------------------------
def test_replaced_submodule_is_detected_and_recompile_fixes_it():
    net = linear_net()
    bf = curvbound.compile(net, torch.zeros(1, 4), norms="certified")
    net[1] = nn.Linear(3, 2)
    with torch.no_grad():
        net[1].weight.mul_(10)
    match = r"(?s)submodule '1' was replaced.*recompile"
    with pytest.raises(curvbound.StaleBoundError, match=match):
        bf()
    assert bf.recompile() is bf
    assert float(bf().lipschitz) == pytest.approx(chain_norm(net), rel=1e-6)
    assert float(bf().lipschitz) >= chain_norm(net)


def test_swapped_parameter_is_detected():
    net = linear_net()
    bf = curvbound.compile(net, torch.zeros(1, 4), norms="certified")
    net[0].weight = nn.Parameter(net[0].weight.detach() * 2)
    with pytest.raises(curvbound.StaleBoundError, match=r"parameter '0.weight' was replaced"):
        bf()


def test_weight_value_changes_stay_live():
    net = linear_net()
    bf = curvbound.compile(net, torch.zeros(1, 4), norms="certified")
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    net(torch.randn(8, 4)).square().sum().backward()
    opt.step()
    with torch.no_grad():
        net[0].weight[0, 0] += 1.0
    net.load_state_dict({k: v * 1.5 for k, v in net.state_dict().items()})
    assert float(bf().lipschitz) == pytest.approx(chain_norm(net), rel=1e-6)


def test_nan_weight_after_compile_names_the_parameter():
    for norms in ("certified", "estimate"):
        net = smooth_net()
        bf = curvbound.compile(net, torch.zeros(1, 3), norms=norms)
        with torch.no_grad():
            net[2].weight[0, 1] = float("nan")
        with pytest.raises(curvbound.ModelStateError, match=r"'2.weight' \(1 non-finite\)"):
            bf()


def test_scalar_parameter_factor_is_read_live():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.a = nn.Linear(3, 3), nn.Parameter(torch.tensor(2.0))

        def forward(self, x):
            return self.lin(x) * self.a

    net = Scaled().eval()
    bf = curvbound.compile(net, torch.zeros(1, 3), norms="certified")
    with torch.no_grad():
        net.a.fill_(5.0)
    assert float(bf().lipschitz) == pytest.approx(5 * spectral(net.lin.weight), rel=1e-6)


# -- copies, pickling, devices (item 4, issue 14) -----------------------------------------------
def test_deepcopy_bounds_its_own_model():
    net = linear_net()
    bf = curvbound.compile(net, torch.zeros(1, 4), norms="certified")
    before = float(bf().lipschitz)
    bf2 = copy.deepcopy(bf)
    assert bf2.model is not net and bf2.model[0].weight is not net[0].weight
    with torch.no_grad():
        bf2.model[0].weight.mul_(3)
    assert float(bf2().lipschitz) == pytest.approx(chain_norm(bf2.model), rel=1e-6)
    assert float(bf2().lipschitz) == pytest.approx(3 * before, rel=1e-6)
    assert float(bf().lipschitz) == before  # the original is untouched
    with torch.no_grad():
        net[1].weight.mul_(2)
    assert float(bf2().lipschitz) == pytest.approx(3 * before, rel=1e-6)


def test_deepcopy_of_a_holder_shares_the_copied_model():
    net = linear_net()
    holder = {"model": net, "bf": curvbound.compile(net, torch.zeros(1, 4), norms="certified")}
    twin = copy.deepcopy(holder)
    assert twin["bf"].model is twin["model"]


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_pickle_round_trip_tracks_its_own_model(how):
    net = smooth_net()
    bf = curvbound.compile(net, torch.zeros(1, 3))  # estimate: the state is power iteration
    if how == "pickle":
        bf2 = pickle.loads(pickle.dumps(bf))
    else:
        buf = io.BytesIO()
        torch.save(bf, buf)
        buf.seek(0)
        bf2 = torch.load(buf, weights_only=False)
    assert torch.equal(bf2().lipschitz, bf().lipschitz)  # same power-iteration state
    for (k, v), (k2, v2) in zip(bf.state_dict().items(), bf2.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    with torch.no_grad():
        bf2.model[0].weight.mul_(4)
    bf2.refresh()
    assert float(bf2().lipschitz) > 3 * float(bf().lipschitz)
    lin = curvbound.compile(linear_net(), torch.zeros(1, 4), norms="certified")
    lin2 = pickle.loads(pickle.dumps(lin))
    with torch.no_grad():
        lin2.model[1].weight.mul_(2)
    assert float(lin2().lipschitz) == pytest.approx(chain_norm(lin2.model), rel=1e-6)


def test_pickle_with_module_level_and_elementwise_rules():
    net = nn.Sequential(nn.Linear(3, 3), MyAct()).eval()
    rule = curvbound.rules.elementwise(slope=1, curvature=0.8)
    bf = curvbound.compile(net, torch.zeros(1, 3), rules={MyAct: rule}, norms="certified")
    bf2 = pickle.loads(pickle.dumps(bf))
    assert float(bf2().curvature) == pytest.approx(float(bf().curvature))


def test_pickle_with_a_lambda_rule_says_what_to_do():
    net = nn.Sequential(nn.Linear(3, 3), MyAct()).eval()
    rule = curvbound.rules.elementwise(slope=1, curvature=0.8)
    bf = curvbound.compile(net, torch.zeros(1, 3), rules={MyAct: lambda n, c: rule(n, c)})
    with pytest.raises(curvbound.SerializationError, match="module level"):
        pickle.dumps(bf)


def test_save_load_pair_keeps_state_and_checks_structure(tmp_path):
    net = smooth_net()
    bf = curvbound.compile(net, torch.zeros(1, 3))
    path = tmp_path / "bound.pt"
    curvbound.save(bf, path)
    bf2 = curvbound.load(path, net)
    assert torch.equal(bf2().lipschitz, bf().lipschitz)
    other = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(curvbound.SerializationError, match="does not fit"):
        curvbound.load(path, other.eval())
    buf = io.BytesIO()
    torch.save({"x": 1}, buf)
    buf.seek(0)
    with pytest.raises(curvbound.SerializationError, match="not a file written by"):
        curvbound.load(buf, net)


def test_to_moves_the_model_and_the_state():
    net = linear_net()
    bf = curvbound.compile(net, torch.zeros(1, 4), norms="certified")
    bf.to(torch.float64)
    assert net[0].weight.dtype == torch.float64
    assert all(b.dtype == torch.float64 for b in bf.buffers())
    assert float(bf().lipschitz) == pytest.approx(chain_norm(net), rel=1e-6)
    assert float(bf().lipschitz) >= chain_norm(net)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_cuda():
    net = smooth_net()
    bf = curvbound.compile(net, torch.zeros(1, 3), norms="certified")
    cpu = float(bf().lipschitz)
    bf.to("cuda")
    assert net[0].weight.is_cuda and all(b.is_cuda for b in bf.buffers())
    assert float(bf().lipschitz) == pytest.approx(cpu, rel=1e-9)
    est = curvbound.compile(net, torch.zeros(1, 3, device="cuda"))
    assert est().lipschitz.is_cuda


# -- wrapped models -----------------------------------------------------------------------------
def test_wrapped_models_are_unwrapped():
    net = linear_net()
    assert unwrap_model(nn.DataParallel(net)) is net
    assert unwrap_model(torch.compile(net)) is net
    for wrapped in (torch.compile(net), nn.DataParallel(net)):
        bf = curvbound.compile(wrapped, torch.zeros(1, 4), norms="certified")
        assert bf.model is net
        assert float(bf().lipschitz) == pytest.approx(chain_norm(net), rel=1e-6)


def test_distributed_data_parallel_is_unwrapped(single_process_group):
    net = linear_net()
    ddp = nn.parallel.DistributedDataParallel(net)
    assert unwrap_model(ddp) is net
    bf = curvbound.compile(ddp, torch.zeros(1, 4), norms="certified")
    assert bf.model is net
    assert float(bf().lipschitz) == pytest.approx(chain_norm(net), rel=1e-6)


# -- inputs -------------------------------------------------------------------------------------
def test_two_input_model_gives_input_error_naming_the_input():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x, context):
            return self.lin(x) + context

    with pytest.raises(curvbound.InputError, match=r"(?s)2 inputs \(x, context\).*Wrapped"):
        curvbound.compile(Two().eval(), torch.zeros(1, 3))

    class WithDefault(Two):
        def forward(self, x, scale=2.0):
            return self.lin(x) * scale

    bf = curvbound.compile(WithDefault().eval(), torch.zeros(1, 3), norms="certified")
    assert float(bf().lipschitz) == pytest.approx(2 * spectral(bf.model.lin.weight), rel=1e-6)


def test_meta_device_input_and_model():
    with pytest.raises(curvbound.InputError, match="meta device.*torch.zeros"):
        curvbound.compile(smooth_net(), torch.zeros(1, 3, device="meta"))
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    with pytest.raises(curvbound.ModelStateError, match="meta device.*to_empty"):
        curvbound.compile(meta.eval(), torch.zeros(1, 3))


def test_dict_output_message_names_the_keys():
    class Dict(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return {"logits": self.lin(x)}

    with pytest.raises(curvbound.InputError, match=r"dict with keys 'logits'.*\['logits'\]"):
        curvbound.compile(Dict().eval(), torch.zeros(1, 3))


def test_anchored_bounds_with_wrong_shape():
    bf = curvbound.compile(smooth_net(), torch.zeros(1, 3), anchored=True)
    with pytest.raises(curvbound.InputError, match=r"shape \(2, 5\).*\(B, 3\)"):
        curvbound.anchored_bounds(bf, torch.zeros(2, 5))


@pytest.mark.parametrize("bad", [0, 2])
def test_certify_nan_sample_named_before_work(bad):
    model = Counting().eval()
    x = torch.randn(4, 3)
    x[bad, 1] = float("nan")
    with pytest.raises(curvbound.InputError, match=f"first at index {bad}"):
        curvbound.certify(model, x)
    assert model.calls == 0


def test_certify_checks_lengths_before_work():
    model = Counting().eval()
    with pytest.raises(curvbound.InputError, match=r"shape \(4,\), got \(3,\)"):
        curvbound.certify(model, torch.zeros(4, 3), torch.zeros(3, dtype=torch.long))
    assert model.calls == 0


# -- weights computed in forward ----------------------------------------------------------------
def test_weight_normalised_in_forward_is_supported_and_live():
    class WeightNorm(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.v, self.g = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.ones(4, 1))

        def weight(self):
            return self.g * self.v / self.v.norm(dim=1, keepdim=True)

        def forward(self, x):
            return torch.tanh(F.linear(x, self.g * self.v / self.v.norm(dim=1, keepdim=True)))

    net = WeightNorm().eval()
    bf = curvbound.compile(net, torch.zeros(1, 3), norms="certified")
    assert float(bf().lipschitz) == pytest.approx(spectral(net.weight()), rel=1e-6)
    with torch.no_grad():
        net.g.mul_(torch.tensor([[3.0], [1.0], [0.5], [2.0]]))
    assert float(bf().lipschitz) == pytest.approx(spectral(net.weight()), rel=1e-6)


def test_random_weight_in_forward_is_refused_with_reason():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 3))

        def forward(self, x):
            return F.linear(x, self.w + torch.randn_like(self.w))

    with pytest.raises(curvbound.UnsupportedOperationError, match="random draw"):
        curvbound.compile(Noisy().eval(), torch.zeros(1, 3))


def test_parametrized_weight_norm_and_hook_weight_norm():
    net = nn.Sequential(nn.Linear(3, 3), nn.Tanh()).eval()
    nn.utils.parametrizations.weight_norm(net[0])
    bf = curvbound.compile(net, torch.zeros(1, 3), norms="certified")
    with torch.no_grad():
        net[0].parametrizations.weight.original0.mul_(2)  # g
    assert float(bf().lipschitz) == pytest.approx(spectral(net[0].weight), rel=1e-6)
    old = nn.Sequential(nn.Linear(3, 3), nn.Tanh()).eval()
    with pytest.warns(FutureWarning):
        nn.utils.weight_norm(old[0])
    with pytest.raises(curvbound.ModelStateError, match=r"'0' \(Linear\).*parametrizations"):
        curvbound.compile(old, torch.zeros(1, 3))


# -- messages that name module paths and give valid stubs ---------------------------------------
def _stub(message: str, marker: str) -> str:
    lines = message.splitlines()
    start = next(i for i, line in enumerate(lines) if marker in line)
    body = []
    for line in lines[start + 1:]:
        if line.startswith("- "):
            break
        body.append(line[6:])
    return "\n".join(body)


def _stub_target(stub: str):
    """The object the stub's decorator registers for (its imports run, the rule is not)."""
    scope: dict = {}
    for line in stub.splitlines():
        if line.startswith("import "):
            exec(line, scope)
    deco = next(line for line in stub.splitlines() if line.startswith("@curvbound.rule("))
    return eval(deco[len("@curvbound.rule("):-1], scope)


def test_registration_stub_is_valid_python_inside_sequential():
    net = nn.Sequential(nn.Linear(3, 3), nn.PReLU()).eval()
    with pytest.raises(curvbound.UnsupportedOperationError) as info:
        curvbound.compile(net, torch.zeros(1, 3))
    msg = str(info.value)
    assert "1 (PReLU)" in msg
    stub = _stub(msg, "1 (PReLU)")
    ast.parse(stub)
    assert "def prelu_rule(node, ctx):" in stub
    assert _stub_target(stub) is nn.PReLU
    assert "@curvbound.rule(torch.nn.modules.activation.PReLU)" in stub


def test_sort_and_topk_are_named_not_getattr():
    class Sorts(nn.Module):
        def forward(self, x):
            return torch.sort(x).values + torch.topk(x, 3).values

    net = nn.Sequential(nn.Linear(3, 3), Sorts()).eval()
    with pytest.raises(curvbound.UnsupportedOperationError) as info:
        curvbound.compile(net, torch.zeros(1, 3))
    msg = str(info.value)
    assert "2 node(s)" in msg and "getattr" not in msg
    assert "@curvbound.rule(torch.sort)" in msg and "@curvbound.rule(torch.topk)" in msg
    for marker, target in (("sort()", torch.sort), ("topk()", torch.topk)):
        ast.parse(_stub(msg, marker))
        assert _stub_target(_stub(msg, marker)) is target


def test_declined_product_hint_warns_about_every_product():
    class Square(nn.Module):
        def forward(self, x):
            return x * x

    net = nn.Sequential(nn.Linear(3, 3), Square()).eval()
    with pytest.raises(curvbound.UnsupportedOperationError, match=r"EVERY operator.mul") as info:
        curvbound.compile(net, torch.zeros(1, 3))
    assert "mul() in 1 (Square)" in str(info.value)


def test_nonsmooth_nodes_name_module_paths_and_types():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Sequential(nn.Linear(3, 3), nn.ReLU())

        def forward(self, x):
            return F.relu(self.linear(x))

    bf = curvbound.compile(Block().eval(), torch.zeros(1, 3))
    assert bf.nonsmooth_nodes == ["linear.1 (ReLU)", "relu()"]


def test_errors_doc():
    """docs/errors.md: every example runs and prints what the page shows."""
    import doctest
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
    result = doctest.testfile(
        str(path), module_relative=False, optionflags=doctest.ELLIPSIS
    )
    assert result.attempted > 5 and result.failed == 0
