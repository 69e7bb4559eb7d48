"""Experiments: the smallest one runs end to end, its outputs are what the docs promise, and the
tables of docs/experiments.md are the ones the stored JSON records give."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import curvbound
from curvbound.apps import data
from curvbound.apps import experiments as E

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "docs" / "experiments"


def test_every_experiment_builds_and_compiles():
    for name, exp in E.EXPERIMENTS.items():
        model = E.build(name)
        shape = (1, 1, 28, 28) if exp.dataset == "mnist" else (1, 3, 32, 32)
        out = model(torch.rand(shape))
        assert out.shape == (1, 10), name
        assert math.isfinite(float(curvbound.compile(model, torch.zeros(shape))().curvature))


def test_build_is_deterministic_and_checks_names():
    a, b = E.build("mnist-3f", seed=1), E.build("mnist-3f", seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ValueError, match="unknown experiment 'mnist-9f'; choose one of"):
        E.build("mnist-9f")


def test_augmentation_is_a_crop_of_the_padded_image_or_its_mirror():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 8, 8)
    out = E._augment(x, g)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(16):
        found = any(
            torch.equal(out[i], padded[i, :, r:r + 8, c:c + 8])
            or torch.equal(out[i], padded[i, :, r:r + 8, c:c + 8].flip(-1))
            for r in range(9) for c in range(9)
        )
        assert found


@pytest.mark.skipif(not data.has_dataset("mnist"), reason="MNIST not found (../shared/data)")
def test_smallest_experiment_end_to_end(tmp_path):
    torch.manual_seed(0)
    rec = E.run("mnist-3f", epochs=1, out=tmp_path, train_limit=2000, test_limit=200,
                progress=False)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"mnist-3f.json", "mnist-3f.pt"} <= files
    stored = json.loads((tmp_path / "mnist-3f.json").read_text())
    assert stored == json.loads(json.dumps(rec))
    for key in ("experiment", "dataset", "epochs", "seed", "train_seconds", "clean_accuracy",
                "eps", "certified_accuracy", "attack_upper", "bounds", "version"):
        assert key in rec
    # the record states the run's own settings: the epochs that ran, one log entry each
    assert rec["epochs"] == rec["training"]["epochs"] == len(rec["training"]["log"]) == 1
    assert rec["best_of"] == ["lipschitz", "curvature", "anchored", "combined"]
    ca = rec["certified_accuracy"]
    assert set(ca) == {"lipschitz", "curvature", "anchored", "best"}
    for i, _ in enumerate(rec["eps"]):
        # best is the best of all certificates; nothing exceeds clean accuracy or the attack bound
        assert ca["best"][i] >= max(ca["lipschitz"][i], ca["curvature"][i], ca["anchored"][i])
        assert ca["best"][i] <= rec["attack_upper"][i] <= rec["clean_accuracy"]
    model = E.build("mnist-3f")
    model.load_state_dict(torch.load(tmp_path / "mnist-3f.pt")["state_dict"])
    x, y = data.load_mnist("test", limit=200)
    acc = float((model(x).argmax(1) == y).double().mean())
    assert acc == pytest.approx(rec["clean_accuracy"])


def _records():
    return [json.loads(p.read_text()) for p in sorted(RECORDS.glob("*.json"))]


def test_docs_tables_come_from_the_stored_records():
    records = _records()
    if not records:
        pytest.skip("no stored experiment records yet")
    doc = (ROOT / "docs" / "experiments.md").read_text()
    for dataset in ("mnist", "cifar10"):
        part = [r for r in records if r["dataset"] == dataset]
        if part:
            assert E.records_table(part) in doc, f"docs/experiments.md: stale {dataset} table"
    for r in records:
        assert r["epochs"] == r["training"]["epochs"] == len(r["training"]["log"]), r["experiment"]
    longer = [json.loads(p.read_text()) for p in sorted((RECORDS / "longer").glob("*.json"))]
    if longer:
        assert E.records_table(longer) in doc, "docs/experiments.md: stale table of longer runs"
        for r in longer:  # a longer run of an experiment whose shorter run is recorded
            assert r["experiment"] in {s["experiment"] for s in records}
            short = next(s for s in records if s["experiment"] == r["experiment"])
            assert r["epochs"] > short["epochs"]


def test_the_public_module_re_exports_the_application():
    import curvbound.experiments as public

    assert public.build is E.build and public.run is E.run and public.EXPERIMENTS is E.EXPERIMENTS
