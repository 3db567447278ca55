"""The ResNet example: its network, its calibration metric and a quick end-to-end run."""

from __future__ import annotations

import json
import math

import pyro
import pytest
import torch
from _run import METHODS, ROOT, load_example, run_example
from torch import nn

from pyro_bnp.layers import find_layers

ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10" / "cifar10-jpeg.tar.gz"


@pytest.fixture(scope="module")
def ex():
    return load_example("resnet")


def _calibrated(confidences, n_per_group=100, num_classes=10):
    """Predictions whose accuracy equals their confidence exactly in every group."""
    probs, labels = [], []
    for c in confidences:
        row = torch.full((num_classes,), (1.0 - c) / (num_classes - 1), dtype=torch.float64)
        row[0] = c
        n_correct = round(c * n_per_group)
        probs.append(row.expand(n_per_group, num_classes))
        labels.append(torch.tensor([0] * n_correct + [1] * (n_per_group - n_correct)))
    return torch.cat(probs), torch.cat(labels)


def test_ece_of_calibrated_predictions_is_zero(ex):
    probs, labels = _calibrated([0.2, 0.5, 0.8, 1.0])
    assert ex.expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)


def test_ece_of_miscalibrated_predictions_matches_closed_form(ex):
    # group A: 100 predictions at confidence 0.9, 60 right (gap 0.3);
    # group B: 300 at confidence 0.3, 150 right (gap 0.2): ECE = 0.25 * 0.3 + 0.75 * 0.2
    pa, _ = _calibrated([0.9], n_per_group=100)
    la = torch.tensor([0] * 60 + [1] * 40)
    pb, _ = _calibrated([0.3], n_per_group=300)
    lb = torch.tensor([0] * 150 + [1] * 150)
    probs, labels = torch.cat([pa, pb]), torch.cat([la, lb])
    assert ex.expected_calibration_error(probs, labels) == pytest.approx(0.225, abs=1e-12)
    assert ex.expected_calibration_error(pa, la) == pytest.approx(0.3, abs=1e-12)
    m = ex.metrics(probs.float(), labels)
    assert m["accuracy"] == pytest.approx(210 / 400)
    nll = -(60 * math.log(0.9) + 40 * math.log(0.1 / 9) + 150 * math.log(0.3))
    nll -= 150 * math.log(0.7 / 9)
    assert m["nll"] == pytest.approx(nll / 400, rel=1e-5)


@pytest.mark.parametrize("depth", [8, 20])
def test_resnet_shapes_and_bnp_layers(ex, depth):
    pyro.set_rng_seed(0)
    net = ex.ResNet(depth=depth, width=16)
    x = torch.randn(6, 3, 32, 32)
    y = torch.randint(0, 10, (6,))
    tr = pyro.poutine.trace(net).get_trace(x, y)
    logits = tr.nodes["_RETURN"]["value"]
    assert logits.shape == (6, 10)
    latent = {
        name
        for name, site in tr.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and name != "data"
    }
    n_conv = sum(isinstance(m, nn.Conv2d) for m in net.modules())
    assert n_conv == depth - 1  # conv1 + 2 per block; the 20th layer of ResNet-20 is fc
    assert len(latent) == 2 * (n_conv + 1)  # weight and bias of every conv and of fc
    for name in latent:  # sampled before the data plate: global latent variables
        assert not tr.nodes[name]["cond_indep_stack"], name
    assert tr.nodes["obs"]["value"].shape == (6,)
    layers, _ = find_layers(net, latent)
    convs = [r for r in layers if r.kind == "conv"]
    assert len(convs) == n_conv and len(layers) == n_conv + 1
    assert {r.weight for r in layers} | {r.bias for r in layers} == latent
    # block output shapes: 16 x 32 x 32 -> 32 x 16 x 16 -> 64 x 8 x 8
    h = torch.randn(2, 16, 32, 32)
    with pyro.poutine.condition(data={k: tr.nodes[k]["value"] for k in latent}):
        for name, shape in zip(
            [net.block_names[0], net.block_names[len(net.block_names) // 3]],
            [(2, 16, 32, 32), (2, 32, 16, 16)],
            strict=True,
        ):
            h = getattr(net, name)(h)
            assert h.shape == shape


@pytest.mark.skipif(not ARCHIVE.exists(), reason=f"CIFAR-10 archive not found at {ARCHIVE}")
def test_resnet_quick(tmp_path):
    data_dir = ARCHIVE.parents[1]
    run_example("resnet", "--quick", "--out", tmp_path, "--data-dir", data_dir, timeout=120)
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["runs"]) == METHODS | {"sghmc", "bnp-sghmc"}  # SGHMC rows: issue 15
    for m in ("sghmc", "bnp-sghmc"):
        h, alpha = results["config"]["sghmc"]["h_friction"][m]
        assert h * alpha == pytest.approx(0.1)
    for method, runs in results["runs"].items():
        assert runs and runs[0]["failed"] is None, method
        hist = runs[0]["history"]
        assert len(hist) == results["config"]["epochs"]
        for rec in hist:
            for key in ("accuracy", "nll", "ece"):
                assert math.isfinite(rec[key]), (method, key)
            assert 0.0 <= rec["accuracy"] <= 1.0 and 0.0 <= rec["ece"] <= 1.0
    check = results["runs"]["bnp"][0]["layer_check"]
    assert check["ok"] and len(check["names"]) == 8  # ResNet-8: 7 convs + fc
    assert all(d["q2"] >= 1.0 for d in check["describe"].values())
    png = tmp_path / "resnet_metrics.png"
    assert png.exists() and png.stat().st_size > 10_000

    # --extra-only adds runs (here the capped BNP) to this results.json, keeping the rest
    common = ("--quick", "--out", tmp_path, "--data-dir", data_dir)
    run_example("resnet", *common, "--extra-only", "--also", "bnp-cap=1e-4", timeout=120)
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["runs"] == results["runs"] and again["pilot"] == results["pilot"]
    (extra,) = again["extra_runs"]["bnp-cap@1.0e-04"]
    assert extra["failed"] is None and len(extra["history"]) == results["config"]["epochs"]
    assert "bnp-cap@1.0e-04" in again["summary"] and len(again["log"]) > len(results["log"])


def test_extra_only_refuses_another_protocol(ex, tmp_path):
    import argparse

    cfg = {"depth": 8, "width": 16, "batch_size": 50, "draws_per_epoch": 2}
    old = {**cfg, "train_size": 200, "test_size": 200, "epochs": 2, "seeds": 1}
    path = tmp_path / "results.json"
    with pytest.raises(SystemExit, match="no earlier run"):
        ex._previous_results(path, argparse.Namespace(epochs=2, seeds=1), cfg, 200, 200)
    path.write_text(json.dumps({"config": old, "runs": {}}))
    same = ex._previous_results(path, argparse.Namespace(epochs=2, seeds=1), cfg, 200, 200)
    assert same["config"] == old
    with pytest.raises(SystemExit, match="epochs"):
        ex._previous_results(path, argparse.Namespace(epochs=3, seeds=1), cfg, 200, 200)
