"""Early convergence of SGLD with and without BNP on a residual network (CIFAR-10 subset).

Run with ``python examples/resnet.py [--quick] [--out DIR] [--data-dir DIR] [--train-size N]
[--epochs E] [--seeds K]``. This is claim (c) of the SGLD paper (BNP improves the early
convergence of SGLD on a residual network), reproduced with our own settings:

* **Network**: ResNet-20 (He et al. 2016, CIFAR variant: a 3x3 conv, 3 stages of 3 basic
  blocks with 16/32/64 channels, global average pooling, a linear layer; option-A shortcuts,
  i.e. strided identity with zero-padded channels, so no extra parameters) with **GroupNorm**
  (8 groups, no affine parameters) instead of BatchNorm: a sampler cannot use BatchNorm's
  dependence on the mini-batch. ``--quick`` uses ResNet-8 (one block per stage).
* **Priors**: every ``Conv2d`` and the final ``Linear`` is a ``PyroModule`` layer whose weight
  and bias are ``PyroSample`` sites: weights ``N(0, 2 / fan_in)`` (He scaling; linear layer
  ``N(0, 1 / fan_in)``), biases ``N(0, 1)``. Categorical likelihood, temperature ``T = 1``.
  The weights are sampled *before* the data plate is entered, and the images are read through
  the plate's indices, so the kernel can subsample.
* **Data**: CIFAR-10 JPEGs read straight from ``<data-dir>/cifar10/cifar10-jpeg.tar.gz`` with
  ``tarfile`` + Pillow (only the images needed: the first ``n / 10`` files of every class),
  cached as ``.npy`` under ``<out>/cache``; class-balanced subsets of the training split
  (``--train-size``), a validation set of further training images for the step-size pilot, and
  of the test split (``--test-size``). Per-channel normalisation with the training subset's
  mean and sd; no augmentation (it would make the likelihood itself random).
* **Methods**: SGLD (``identity``), pSGLD (``rmsprop``), BNP-SGLD (``bnp``) and BNP + RMSprop,
  SGHMC (``sghmc``) and BNP-SGHMC (``bnp-sghmc``: ``pyro_bnp.SGHMC`` with the identity and
  plain BNP, issue 15; friction fixed at ``h alpha = 0.1``, step size given as the SGLD step
  size of the same linear stability, ``_common.sghmc_step``), the same number of gradient
  evaluations (mini-batches of ``--batch-size``, shuffled epochs). ``--methods a,b`` runs a
  subset (a results file of its own).
* **Step sizes**: for every method a small grid is tried in short pilot runs (``--pilot-epochs``
  epochs, one seed); the step size with the lowest validation NLL of the last draw is used.
* **Metrics**: the posterior predictive average (mean softmax over the draws collected so far:
  ``--draws-per-epoch`` draws per epoch after a burn-in of one such interval) on the test
  subset, at the end of every epoch: accuracy, NLL and expected calibration error (15 bins).
  The metrics of the single current draw are recorded too.

``--also METHOD=EPS`` adds runs of a method at another step size (dashed in the figure). It
prints a table and writes ``results.json`` and ``resnet_metrics.png`` (accuracy / NLL / ECE vs
epoch per method) to ``--out`` (default ``out/resnet``). After the first updates of the first
BNP chain it checks that the kernel found every Conv2d and the Linear layer and logs ``q^2``
and the input statistics per layer. Results: ``docs/experiments/resnet.md``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import _common
import matplotlib
import numpy as np
import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from _common import COLORS, LABELS, METHODS, SGHMC_METHODS
from PIL import Image
from pyro import poutine
from pyro.nn import PyroModule, PyroSample
from torch import Tensor, nn
from tqdm import tqdm

import pyro_bnp
from pyro_bnp.layers import describe, find_layers

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
# Step-size grids (our eps = variance of the injected noise, drift (eps/2) grad U_hat with U_hat
# the sum over all N training images), 5x apart, the same for a method with and without BNP.
# BNP divides the conv steps by q^2 s^2 (q^2 = sqrt(H W) = 8..32 here) but multiplies the
# final layer's by 1 / s^2 (pooled features have small variance): eps = 8e-4 already explodes.
_GRID = [1.6e-5, 8e-5, 4e-4]  # SGLD and BNP-SGLD (eps = 2 lr / N for an SGD rate lr)
_RMS_GRID = [8e-8, 4e-7, 2e-6]  # pSGLD and BNP + RMSprop (RMSprop units)
# SGHMC rows: eps is the SGLD step size of the same linear stability (h alpha = 0.1 fixed), the
# grid SGLD's plus one value 5x below (the momentum accumulates mini-batch gradient noise)
_SGHMC_GRID = [3.2e-6, *_GRID]
GRIDS = {
    "identity": _GRID,
    "rmsprop": _RMS_GRID,
    "bnp": _GRID,
    "bnp+rmsprop": _RMS_GRID,
    "sghmc": _SGHMC_GRID,
    "bnp-sghmc": _SGHMC_GRID,
}
QUICK_STEPS = {
    "identity": 1.6e-5,
    "rmsprop": 4e-7,
    "bnp": 3.2e-5,
    "bnp+rmsprop": 4e-7,
    "sghmc": 1.6e-5,
    "bnp-sghmc": 3.2e-5,
}
ALL_METHODS = [*METHODS, *SGHMC_METHODS]  # the default --methods
ECE_BINS = 15
GN_GROUPS = 8
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# ``--also`` also takes ``bnp-cap`` (``_common.EXTRA_PRECONDITIONERS``): plain BNP with the prior
# cap, the fix for plain BNP's instability here (the final layer's prior; see resnet.md)
ALL_LABELS = {**LABELS, "bnp-cap": "BNP cap=1"}
ALL_COLORS = {**COLORS, "bnp-cap": "C4"}


# ----------------------------------------------------------------------------- data


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def load_cifar(
    data_dir: Path, per_class: dict[str, tuple[int, int]], cache_dir: Path | None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Decode class-balanced CIFAR-10 subsets from the JPEG archive (only the files needed).

    ``per_class`` maps a subset name to ``(first, count)``; the split is the name's prefix
    (``train*`` or ``test*``). The subset takes the files ``first .. first + count - 1`` (in
    file-name order) of every class, interleaved by class. Decoded arrays are cached as
    ``.npy`` in ``cache_dir``. Returns ``{name: (uint8 [n, 32, 32, 3], int64 labels [n])}``.
    """
    archive = Path(data_dir) / "cifar10" / "cifar10-jpeg.tar.gz"
    if not archive.exists():
        raise FileNotFoundError(f"CIFAR-10 archive not found: {archive}")
    key = "_".join(f"{k}{a}-{b}" for k, (a, b) in sorted(per_class.items()))
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if cache_dir is not None:
        files = {
            k: (cache_dir / f"{key}_{k}_x.npy", cache_dir / f"{key}_{k}_y.npy") for k in per_class
        }
        if all(fx.exists() and fy.exists() for fx, fy in files.values()):
            return {k: (np.load(fx), np.load(fy)) for k, (fx, fy) in files.items()}
    wanted: dict[str, tuple[str, int, int]] = {}  # member name -> (subset, class, rank)
    with tarfile.open(archive, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")]
        by_dir: dict[tuple[str, str], list[tarfile.TarInfo]] = {}
        for m in members:
            parts = m.name.split("/")  # cifar10/<split>/<class>/NNNN.jpg
            by_dir.setdefault((parts[-3], parts[-2]), []).append(m)
        chosen: list[tarfile.TarInfo] = []
        for subset, (first, count) in per_class.items():
            split = "train" if subset.startswith("train") else "test"
            for c, cls in enumerate(CLASSES):
                files_c = sorted(by_dir[(split, cls)], key=lambda m: m.name)
                if first + count > len(files_c):
                    raise ValueError(f"{subset}: only {len(files_c)} {split} images of {cls}")
                for r, m in enumerate(files_c[first : first + count]):
                    wanted[m.name] = (subset, c, r)
                    chosen.append(m)
        chosen.sort(key=lambda m: m.offset_data)  # forward reads through the gzip stream
        imgs: dict[str, dict[tuple[int, int], np.ndarray]] = {k: {} for k in per_class}
        for m in chosen:
            f = tar.extractfile(m)
            assert f is not None
            subset, c, r = wanted[m.name]
            imgs[subset][(c, r)] = _decode(f.read())
    for subset, (_, count) in per_class.items():
        keys = [(c, r) for r in range(count) for c in range(len(CLASSES))]  # interleaved
        x = np.stack([imgs[subset][k] for k in keys])
        y = np.array([c for c, _ in keys], dtype=np.int64)
        out[subset] = (x, y)
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            np.save(cache_dir / f"{key}_{subset}_x.npy", x)
            np.save(cache_dir / f"{key}_{subset}_y.npy", y)
    return out


def to_tensor(x: np.ndarray, mean: np.ndarray, sd: np.ndarray) -> Tensor:
    """``uint8 [n, 32, 32, 3]`` -> normalised ``float32 [n, 3, 32, 32]``."""
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.as_tensor(sd, dtype=torch.float32).view(1, 3, 1, 1)
    return ((t - m) / s).contiguous()


# ----------------------------------------------------------------------------- model
def bayes_conv(c_in: int, c_out: int, stride: int) -> PyroModule:
    """3x3 ``PyroModule[nn.Conv2d]`` with priors ``w ~ N(0, 2 / fan_in)``, ``b ~ N(0, 1)``."""
    conv = PyroModule[nn.Conv2d](c_in, c_out, 3, stride=stride, padding=1)
    scale = math.sqrt(2.0 / (c_in * 9))
    conv.weight = PyroSample(dist.Normal(0.0, scale).expand([c_out, c_in, 3, 3]).to_event(4))
    conv.bias = PyroSample(dist.Normal(0.0, 1.0).expand([c_out]).to_event(1))
    return conv


class BasicBlock(PyroModule):
    """``relu(GN(conv(relu(GN(conv(x))))) + shortcut(x))``, option-A shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = bayes_conv(c_in, c_out, stride)
        self.gn1 = nn.GroupNorm(GN_GROUPS, c_out, affine=False)
        self.conv2 = bayes_conv(c_out, c_out, 1)
        self.gn2 = nn.GroupNorm(GN_GROUPS, c_out, affine=False)
        self.stride = stride
        self.pad = c_out - c_in

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.gn1(self.conv1(x)))
        out = self.gn2(self.conv2(out))
        if self.stride != 1 or self.pad:
            p = self.pad // 2
            x = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, p, self.pad - p))
        return F.relu(out + x)


class ResNet(PyroModule):
    """Bayesian CIFAR ResNet-(6n+2) with GroupNorm; ``depth=20`` is ResNet-20.

    Every conv and the final linear layer have ``PyroSample`` weight and bias; GroupNorm has no
    parameters. ``forward(x, y)`` samples all weights first, then enters the data plate and
    reads ``x[idx]``, ``y[idx]`` (so the SGLD kernel can subsample the plate).
    """

    def __init__(self, depth: int = 20, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = bayes_conv(3, width, 1)
        self.gn1 = nn.GroupNorm(GN_GROUPS, width, affine=False)
        self.block_names: list[str] = []
        c_in = width
        for stage, c_out in enumerate([width, 2 * width, 4 * width]):
            for j in range(n):
                name = f"stage{stage + 1}_{j}"
                stride = 2 if stage > 0 and j == 0 else 1
                setattr(self, name, BasicBlock(c_in, c_out, stride))
                self.block_names.append(name)
                c_in = c_out
        self.fc = PyroModule[nn.Linear](c_in, num_classes)
        self.fc.weight = PyroSample(
            dist.Normal(0.0, math.sqrt(1.0 / c_in)).expand([num_classes, c_in]).to_event(2)
        )
        self.fc.bias = PyroSample(dist.Normal(0.0, 1.0).expand([num_classes]).to_event(1))

    def bayes_layers(self) -> list[nn.Module]:
        """Return the Conv2d / Linear layers (sampled weights), in module order."""
        return [m for m in self.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

    def logits(self, x: Tensor) -> Tensor:
        """Class logits ``[n, classes]`` of images ``[n, 3, H, W]``."""
        h = F.relu(self.gn1(self.conv1(x)))
        for name in self.block_names:
            h = getattr(self, name)(h)
        return self.fc(h.mean((2, 3)))

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Observe labels ``y`` (or sample them) given images ``x``: the data plate is ``x``."""
        for layer in self.bayes_layers():  # sample every weight here, outside the plate
            layer.weight, layer.bias  # noqa: B018
        with pyro.plate("data", x.shape[0]) as idx:
            logits = self.logits(x[idx])
            pyro.sample("obs", dist.Categorical(logits=logits), obs=None if y is None else y[idx])
        return logits


@torch.no_grad()
def predict_probs(net: ResNet, params: dict[str, Tensor], x: Tensor, chunk: int = 500) -> Tensor:
    """Softmax of the network with weights ``params`` (all sites are unconstrained = real)."""
    out = []
    with poutine.condition(data=params):
        for i in range(0, x.shape[0], chunk):
            out.append(torch.softmax(net.logits(x[i : i + chunk]), -1))
    return torch.cat(out)


# ----------------------------------------------------------------------------- metrics
def expected_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = ECE_BINS) -> float:
    """ECE with ``n_bins`` equal-width confidence bins: ``sum_b n_b / n |acc_b - conf_b|``.

    Confidence is the largest class probability; bin ``b`` holds confidences in
    ``((b - 1) / n_bins, b / n_bins]`` (a confidence of exactly 0 goes into the first bin).
    """
    conf, pred = probs.max(-1)
    correct = (pred == labels).double()
    conf = conf.double()
    bins = torch.clamp(torch.ceil(conf * n_bins).long() - 1, 0, n_bins - 1)
    n = conf.numel()
    ece = 0.0
    for b in range(n_bins):
        sel = bins == b
        k = int(sel.sum())
        if k:
            ece += k / n * abs(float(correct[sel].mean()) - float(conf[sel].mean()))
    return ece


def metrics(probs: Tensor, labels: Tensor) -> dict[str, float]:
    """Accuracy, NLL (mean, nats) and ECE (15 bins) of predictive probabilities."""
    p_true = probs.gather(1, labels.view(-1, 1)).squeeze(1).double().clamp_min(1e-12)
    return {
        "accuracy": float((probs.argmax(-1) == labels).double().mean()),
        "nll": float(-p_true.log().mean()),
        "ece": expected_calibration_error(probs, labels),
    }


# ----------------------------------------------------------------------------- runs
def check_layers(kernel: pyro_bnp.SGLD | pyro_bnp.SGHMC, net: ResNet, log: Any) -> dict[str, Any]:
    """Check that BNP found every Conv2d and the Linear layer; log q^2 per layer."""
    found = [ref.name for ref in kernel.layers]
    expected_refs, _ = find_layers(net, set(kernel.initial_params))
    expected = [ref.name for ref in expected_refs]
    n_conv = sum(isinstance(m, nn.Conv2d) for m in net.modules())
    ok = found == expected and len(found) == n_conv + 1
    info = describe(kernel.layers)
    log(f"  BNP layers found: {len(found)} ({n_conv} Conv2d + 1 Linear expected): ok={ok}")
    log("  layer                 q^2    N  H*W  mean(mu)  scale min..max")
    rows = {}
    for name, d in info.items():
        q2 = float(d["q2"])
        rows[name] = {
            "q2": q2,
            "mean_mu": float(d["mean"].mean()),
            "scale_min": float(d["scale"].min()),
            "scale_max": float(d["scale"].max()),
        }
        log(
            f"  {name:20s} {q2:6.1f} {d['batch_size']:4d} {d['spatial_size']:4d} "
            f"{rows[name]['mean_mu']:9.3f}  "
            f"{rows[name]['scale_min']:.3f}..{rows[name]['scale_max']:.3f}"
        )
    if not ok:
        raise RuntimeError(f"BNP found layers {found}, expected {expected}")
    return {"ok": ok, "names": found, "describe": rows}


def run_chain(
    method: str,
    step_size: float,
    seed: int,
    data: dict[str, Tensor],
    eval_x: Tensor,
    eval_y: Tensor,
    cfg: dict[str, Any],
    epochs: float,
    desc: str,
    log: Any,
    check: bool = False,
) -> dict[str, Any]:
    """One chain of ``epochs`` epochs; metrics of the predictive average at every epoch end."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)  # same initial weights and mini-batch order for every method
    net = ResNet(cfg["depth"], cfg["width"])
    b = cfg["batch_size"]
    n = data["x"].shape[0]
    per_epoch = n // b
    # SGLD, or SGHMC at the SGLD step size of the same linear stability (_common.make_kernel)
    kernel = _common.make_kernel(method, net, step_size, subsample_size={"data": b})
    kernel.setup(0, data["x"], data["y"])
    z = kernel.initial_params
    total = max(1, round(epochs * per_epoch))
    every = max(1, per_epoch // cfg["draws_per_epoch"])
    sum_probs = torch.zeros(eval_x.shape[0], 10, dtype=torch.float64)
    n_draws = 0
    history: list[dict[str, Any]] = []
    layer_check = None
    failed = None
    t0 = time.perf_counter()
    t_eval = 0.0
    bar = tqdm(range(1, total + 1), desc=desc, leave=False, file=sys.stderr, mininterval=2)
    for t in bar:
        try:
            z = kernel.sample(z)
        except RuntimeError as err:
            failed = f"update {t}: {err}"
            log(f"  {desc}: stopped: {failed}")
            break
        if check and t == min(3, total):
            layer_check = check_layers(kernel, net, log)
        end_epoch = t % per_epoch == 0 or t == total
        if (t % every == 0 and t >= every) or end_epoch:
            te = time.perf_counter()
            probs = predict_probs(net, z, eval_x).double()
            if t % every == 0:
                sum_probs += probs
                n_draws += 1
            if end_epoch:
                avg = sum_probs / n_draws if n_draws else probs
                rec = {
                    "epoch": t / per_epoch,
                    "updates": t,
                    "draws": n_draws,
                    **metrics(avg.float(), eval_y),
                    "last_draw": metrics(probs.float(), eval_y),
                }
                history.append(rec)
                bar.set_postfix(acc=f"{rec['accuracy']:.3f}", nll=f"{rec['nll']:.3f}")
            t_eval += time.perf_counter() - te
    bar.close()
    elapsed = time.perf_counter() - t0
    diag = kernel.diagnostics()
    kernel.cleanup()
    return {
        "method": method,
        "step_size": step_size,
        "seed": seed,
        "history": history,
        "failed": failed,
        "updates": total,
        "seconds": elapsed,
        "seconds_eval": t_eval,
        "seconds_per_update": (elapsed - t_eval) / max(1, total),
        "divergences": len(diag["divergences"]),
        "layer_check": layer_check,
    }


def summarise(runs: list[dict[str, Any]], key: str, epochs: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and spread (min..max half-range) over seeds of ``key`` per epoch (NaN if missing)."""
    vals = np.full((len(runs), epochs), np.nan)
    for i, r in enumerate(runs):
        for rec in r["history"]:
            e = int(round(rec["epoch"])) - 1
            if 0 <= e < epochs and abs(rec["epoch"] - round(rec["epoch"])) < 1e-9:
                vals[i, e] = rec[key]
    return vals.mean(0), (vals.max(0) - vals.min(0)) / 2


def report(results: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """Table (predictive average at epoch 1, the middle and the last epoch) and its numbers."""
    epochs = results["config"]["epochs"]
    steps = results["config"]["step_sizes"]
    marks = sorted({1, max(1, epochs // 2), epochs})
    header = f"{'method':22s} {'eps':>8s} " + " ".join(
        f"{'acc@' + str(e):>8s} {'nll@' + str(e):>8s} {'ece@' + str(e):>8s}" for e in marks
    )
    rows = [(LABELS[m], m, steps[m], results["runs"][m]) for m in results["runs"]]
    for name, runs in results.get("extra_runs", {}).items():
        method, eps = name.split("@")
        rows.append((f"{ALL_LABELS[method]} (extra)", name, float(eps), runs))
    table = [header]
    summary: dict[str, Any] = {}
    for label, key_name, eps, runs in rows:
        line = f"{label:22s} {eps:8.1e} "
        summary[key_name] = {}
        for e in marks:
            cells = []
            for key in ("accuracy", "nll", "ece"):
                m, s = summarise(runs, key, epochs)
                summary[key_name][f"{key}@{e}"] = [float(m[e - 1]), float(s[e - 1])]
                cells.append(f"{m[e - 1]:8.3f}")
            line += " ".join(cells) + " "
        table.append(line.rstrip())
    return table, summary


def plot(results: dict[str, Any], path: Path) -> None:
    """Accuracy / NLL / ECE of the predictive average vs epoch, one line per method."""
    epochs = results["config"]["epochs"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    x = np.arange(1, epochs + 1)
    curves = [(LABELS[m], COLORS[m], "o-", results["runs"][m]) for m in results["runs"]]
    for name, runs in results.get("extra_runs", {}).items():
        method, eps = name.split("@")
        curves.append((f"{ALL_LABELS[method]} eps={eps}", ALL_COLORS[method], "s--", runs))
    for label, color, style, runs in curves:
        for ax, key in zip(axes, ["accuracy", "nll", "ece"], strict=True):
            m, s = summarise(runs, key, epochs)
            ax.plot(x, m, style, label=label, ms=3, color=color)
            if len(runs) > 1:
                ax.fill_between(x, m - s, m + s, color=color, alpha=0.15)
    for ax, title in zip(axes, ["test accuracy", "test NLL", "test ECE (15 bins)"], strict=True):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[1].set_ylim(top=min(axes[1].get_ylim()[1], 2.6))  # a diverged chain's NLL is off-scale
    cfg = results["config"]
    fig.suptitle(
        f"ResNet-{cfg['depth']} (GroupNorm), CIFAR-10 JPEG subset: {cfg['train_size']} train / "
        f"{cfg['test_size']} test, posterior predictive average",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _main_runs(
    args: argparse.Namespace,
    sets: dict[str, Any],
    data: dict[str, Tensor],
    x_test: Tensor,
    y_test: Tensor,
    mean: Any,
    sd: Any,
    cfg: dict[str, Any],
    log: Any,
) -> dict[str, Any]:
    """Run the step-size pilot and the chains of the ``--methods``; return the results."""
    methods = args.methods
    pilot: dict[str, Any] = {}
    steps: dict[str, float] = {}
    if args.no_pilot:
        src = QUICK_STEPS if args.quick else {m: GRIDS[m][len(GRIDS[m]) // 2] for m in methods}
        steps = {m: src[m] for m in methods}
    else:
        x_val, y_val = (
            to_tensor(sets["train_val"][0], mean, sd),
            torch.from_numpy(sets["train_val"][1]),
        )
        log(f"pilot: {args.pilot_epochs} epoch(s) per step size, {len(y_val)} validation images")
        for method in methods:
            pilot[method] = []
            for eps in GRIDS[method]:
                r = run_chain(
                    method, eps, 1000, data, x_val, y_val, cfg, args.pilot_epochs,
                    f"pilot {LABELS[method]} {eps:.1e}", log,
                )  # fmt: skip
                last = r["history"][-1]["last_draw"] if r["history"] else None
                score = math.inf if (r["failed"] or last is None) else last["nll"]
                if not math.isfinite(score):
                    score = math.inf
                pilot[method].append(
                    {"step_size": eps, "val_nll": score if math.isfinite(score) else None,
                     "val_last_draw": last, "failed": r["failed"],
                     "seconds_per_update": r["seconds_per_update"]}
                )  # fmt: skip
                log(
                    f"  pilot {LABELS[method]:12s} eps={eps:.1e}: val NLL {score:.3f}, "
                    f"acc {last['accuracy'] if last else float('nan'):.3f}, "
                    f"{r['seconds_per_update']:.2f} s/update"
                )
            best = min(
                pilot[method], key=lambda d: math.inf if d["val_nll"] is None else d["val_nll"]
            )
            steps[method] = best["step_size"]
        log("chosen step sizes: " + ", ".join(f"{LABELS[m]} {steps[m]:.1e}" for m in methods))
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    checked = False
    bnp_row = "bnp" if "bnp" in methods else "bnp-sghmc"  # the chain whose layers are checked
    for seed in range(args.seeds):
        for method in methods:
            check = method == bnp_row and not checked
            r = run_chain(
                method, steps[method], seed, data, x_test, y_test, cfg, args.epochs,
                f"{LABELS[method]} seed {seed}", log, check=check,
            )  # fmt: skip
            checked = checked or check
            runs[method].append(r)
            h = r["history"][-1] if r["history"] else {}
            log(
                f"{LABELS[method]:12s} seed {seed}: acc {h.get('accuracy', float('nan')):.3f} "
                f"NLL {h.get('nll', float('nan')):.3f} ECE {h.get('ece', float('nan')):.3f} "
                f"({r['seconds']:.0f} s, {r['seconds_per_update']:.2f} s/update, "
                f"{r['divergences']} rejected)"
            )
    results: dict[str, Any] = {
        "config": {
            **cfg,
            "train_size": len(data["y"]),
            "test_size": len(y_test),
            "val_size": 0 if args.no_pilot else args.val_size,
            "epochs": args.epochs,
            "seeds": args.seeds,
            "pilot_epochs": None if args.no_pilot else args.pilot_epochs,
            "grids": {m: GRIDS[m] for m in methods},
            "sghmc": {
                "methods": {m: SGHMC_METHODS[m] for m in methods if m in SGHMC_METHODS},
                "momentum_decay_h_alpha": _common.MOMENTUM_DECAY,
                "eps": "SGLD step size of the same linear stability, eps = 2 h^2 / (2 - h alpha)",
                "h_friction": {
                    m: _common.sghmc_step(steps[m]) for m in methods if m in SGHMC_METHODS
                },
            },
            "step_sizes": steps,
            "gn_groups": GN_GROUPS,
            "ece_bins": ECE_BINS,
            "priors": "conv w ~ N(0, 2/fan_in), linear w ~ N(0, 1/fan_in), biases N(0, 1)",
            "temperature": 1.0,
            "augmentation": None,
            "threads": torch.get_num_threads(),
            "quick": args.quick,
        },
        "pilot": pilot,
        "runs": runs,
    }
    return results


def _previous_results(
    path: Path, args: argparse.Namespace, cfg: dict[str, Any], n_train: int, n_test: int
) -> dict[str, Any]:
    """Load an earlier run's ``results.json`` for ``--extra-only``; refuse another protocol."""
    if not path.exists():
        raise SystemExit(f"--extra-only: no earlier run at {path}")
    results: dict[str, Any] = json.loads(path.read_text())
    old = results["config"]
    mine = {**cfg, "train_size": n_train, "test_size": n_test, "epochs": args.epochs,
            "seeds": args.seeds}  # fmt: skip
    differ = {k: (old.get(k), v) for k, v in mine.items() if old.get(k) != v}
    if differ:
        raise SystemExit(f"--extra-only: {path} was made with other settings (old, new): {differ}")
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny run for tests (< 60 s)")
    p.add_argument("--out", type=Path, default=Path("out/resnet"))
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    p.add_argument("--cache-dir", type=Path, default=None, help="default: <out>/cache")
    p.add_argument("--train-size", type=int, default=5000)
    p.add_argument("--val-size", type=int, default=1000, help="pilot validation images")
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--draws-per-epoch", type=int, default=2)
    p.add_argument("--pilot-epochs", type=float, default=1.0)
    p.add_argument("--no-pilot", action="store_true", help="use the middle of each grid")
    p.add_argument(
        "--methods",
        default=",".join(ALL_METHODS),
        help="comma-separated samplers (default: all six; e.g. sghmc,bnp-sghmc)",
    )
    p.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="METHOD=EPS",
        help="extra runs of METHOD at step size EPS (all seeds), e.g. bnp=3.2e-5; METHOD is "
        "one of the four samplers or bnp-cap (BNP(prior_cap=1.0))",
    )
    p.add_argument(
        "--extra-only",
        action="store_true",
        help="run only the --also runs and add them to the existing <out>/results.json "
        "(same data, seeds, epochs and protocol)",
    )
    p.add_argument(
        "--threads", type=int, default=1, help="2 threads on 2 busy cores was 10x slower"
    )
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    if not args.methods or sorted(set(args.methods) - set(ALL_METHODS)):
        p.error(f"--methods: choose from {ALL_METHODS}, got {args.methods}")
    if args.quick:
        args.train_size, args.val_size, args.test_size = 200, 0, 200
        args.epochs, args.seeds, args.batch_size = 2, 1, 50
        args.depth, args.draws_per_epoch, args.no_pilot = 8, 2, True
    for spec in args.also:
        method, _, eps_text = spec.partition("=")
        try:
            ok = (method in ALL_METHODS or method == "bnp-cap") and float(eps_text) > 0
        except ValueError:
            ok = False
        if not ok:
            known = [*ALL_METHODS, "bnp-cap"]
            p.error(f"--also expects METHOD=EPS with METHOD in {known}, got {spec!r}")
    for name in ("train_size", "test_size", "val_size"):
        if getattr(args, name) % 10:
            p.error(f"--{name.replace('_', '-')} must be a multiple of 10 (class-balanced)")
    torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def log(msg: str) -> None:
        lines.append(msg)
        tqdm.write(msg)

    t_start = time.perf_counter()
    per_class = {"train": (0, args.train_size // 10), "test": (0, args.test_size // 10)}
    if args.val_size and not args.no_pilot:
        per_class["train_val"] = (args.train_size // 10, args.val_size // 10)
    t0 = time.perf_counter()
    sets = load_cifar(args.data_dir, per_class, args.cache_dir or out / "cache")
    t_data = time.perf_counter() - t0
    xtr = sets["train"][0]
    mean = xtr.reshape(-1, 3).mean(0) / 255.0
    sd = xtr.reshape(-1, 3).std(0) / 255.0
    data = {"x": to_tensor(xtr, mean, sd), "y": torch.from_numpy(sets["train"][1])}
    x_test, y_test = to_tensor(sets["test"][0], mean, sd), torch.from_numpy(sets["test"][1])
    log(
        f"data: {len(data['y'])} train / {len(y_test)} test images, decoded or loaded in "
        f"{t_data:.1f} s; ResNet-{args.depth}, width {args.width}, batch {args.batch_size}, "
        f"{args.epochs} epochs x {len(data['y']) // args.batch_size} updates, "
        f"{args.seeds} seed(s), {torch.get_num_threads()} threads"
    )
    cfg = {
        "depth": args.depth,
        "width": args.width,
        "batch_size": args.batch_size,
        "draws_per_epoch": args.draws_per_epoch,
    }
    if args.extra_only:
        results = _previous_results(out / "results.json", args, cfg, len(data["y"]), len(y_test))
        log(f"--extra-only: adding {args.also} to {out / 'results.json'}")
    else:
        results = _main_runs(args, sets, data, x_test, y_test, mean, sd, cfg, log)
    results.setdefault("extra_runs", {})
    for spec in args.also:
        method, eps_text = spec.split("=")
        eps = float(eps_text)
        extra: list[dict[str, Any]] = []
        results["extra_runs"][f"{method}@{eps:.1e}"] = extra  # a rerun replaces, never appends
        for seed in range(args.seeds):
            r = run_chain(
                method, eps, seed, data, x_test, y_test, cfg, args.epochs,
                f"{ALL_LABELS[method]} eps={eps:.1e} seed {seed}", log,
            )  # fmt: skip
            extra.append(r)
    table, results["summary"] = report(results)
    seconds = time.perf_counter() - t_start
    log("\n".join(table))
    log(f"total time {seconds:.0f} s")
    if args.extra_only:  # keep the earlier run's log and time
        results["seconds_total"] = results.get("seconds_total", 0.0) + seconds
        results["log"] = [*results.get("log", []), *lines]
    else:
        results["seconds_total"], results["log"] = seconds, lines
    with open(out / "results.json", "w") as f:
        json.dump(results, f, indent=1, allow_nan=True)
    plot(results, out / "resnet_metrics.png")
    return results


if __name__ == "__main__":
    main()
