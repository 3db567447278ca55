"""Choose SGLD's step size by kernel Stein discrepancy on the diabetes data; check it by NUTS.

Run with ``python examples/diabetes_tuning.py --out diabetes_out`` (docs/step_size.md gives
the measured time; ``--quick`` for a test-speed run of under a minute). It

1. loads ``sklearn.datasets.load_diabetes`` (N = 442, d = 10), standardises x and y, and
   defines the Bayesian linear regression ``w ~ N(0, 1)^d``, ``b ~ N(0, 1)``,
   ``sigma ~ HalfNormal(1)``, ``y ~ N(x w + b, sigma)`` inside ``pyro.plate("data", N)``,
2. samples a NUTS reference (1000 warmup + 1000 draws, 2 chains) and computes its KSD at the
   number of draws the tuner uses (the floor an exact sampler reaches),
3. runs :func:`pyro_bnp.tuning.tune_step_size` for SGLD with the preconditioners ``identity``,
   ``rmsprop`` and ``bnp+rmsprop`` (mini-batches of 32) over the default log-spaced grid,
   recording the largest ``sigma`` of every run; the tuner scores by the KSD on standardised
   coordinates (its default) and records the unscaled KSD too,
4. runs each at its chosen step size, and at the step size the unscaled KSD would have chosen
   (the tuner's earlier rule) where that differs, for longer and compares it with NUTS site
   by site:
   ``|mean - NUTS mean| / NUTS sd`` and ``sd / NUTS sd``, against the criterion "within 0.5 sd in
   mean and a factor 1.5 in sd",
5. writes ``OUT/results.json`` and ``OUT/diabetes_tuning.png``.

``bnp+rmsprop`` on this plain-function model has no network layer to precondition: BNP warns
that it acts as RMSprop. The warning is recorded (not raised) and the results say whether its
draws equal RMSprop's.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any
from unittest import mock

import matplotlib
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS
from sklearn.datasets import load_diabetes

import pyro_bnp
from pyro_bnp.tuning import DEFAULT_STEP_SIZES, stein_discrepancy, tune_step_size

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METHODS = ("identity", "rmsprop", "bnp+rmsprop")
LABELS = {"identity": "SGLD", "rmsprop": "pSGLD", "bnp+rmsprop": "BNP+RMSprop"}
MEAN_TOL, SD_FACTOR = 0.5, 1.5  # the criterion

FULL: dict[str, dict[str, Any]] = {
    "nuts": {"warmup": 1000, "samples": 1000, "chains": 2},
    "tune": {"warmup": 500, "samples": 1000, "ksd_draws": 500, "grid": DEFAULT_STEP_SIZES},
    "long": {"warmup": 2000, "samples": 5000, "thin": 5},
}
QUICK: dict[str, dict[str, Any]] = {
    "nuts": {"warmup": 100, "samples": 100, "chains": 1},
    "tune": {"warmup": 100, "samples": 150, "ksd_draws": 100, "grid": (1e-4, 1e-3, 1e-1)},
    "long": {"warmup": 100, "samples": 200, "thin": 1},
}


def load_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Diabetes data, x and y standardised (float32)."""
    x_np, y_np = load_diabetes(return_X_y=True)
    x = torch.tensor(x_np, dtype=torch.float32)
    y = torch.tensor(y_np, dtype=torch.float32)
    return (x - x.mean(0)) / x.std(0), (y - y.mean()) / y.std()


def model(x: torch.Tensor, y: torch.Tensor) -> None:
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0]) as idx:
        pyro.sample("y", dist.Normal(x[idx] @ w + b, sigma), obs=y[idx])


def columns(samples: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pooled constrained draws per coordinate: ``w[0]`` ... ``w[9]``, ``b``, ``sigma``."""
    out = {f"w[{j}]": samples["w"][:, j] for j in range(samples["w"].shape[1])}
    out["b"], out["sigma"] = samples["b"], samples["sigma"]
    return {k: v.double() for k, v in out.items()}


def compare(draws: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    rows = []
    for site, r in ref.items():
        v = draws[site]
        m_ref, s_ref = float(r.mean()), float(r.std())
        rows.append(
            {
                "site": site,
                "nuts_mean": m_ref,
                "nuts_sd": s_ref,
                "mean": float(v.mean()),
                "sd": float(v.std()),
                "mean_error_sd": abs(float(v.mean()) - m_ref) / s_ref,
                "sd_ratio": float(v.std()) / s_ref,
            }
        )
    return rows


def within(rows: list[dict[str, Any]]) -> bool:
    return all(
        r["mean_error_sd"] <= MEAN_TOL and 1 / SD_FACTOR <= r["sd_ratio"] <= SD_FACTOR for r in rows
    )


def json_safe(obj: Any) -> Any:
    """Non-finite floats become None (strict JSON); tuples become lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def sequential_mcmc(kernel: Any, **kwargs: Any) -> MCMC:
    """``MCMC`` with chains one after the other (the example must also run on 1-2 cores)."""
    with mock.patch("torch.multiprocessing.cpu_count", return_value=1), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "num_chains=.* is more than available_cpu")
        return MCMC(kernel, disable_progbar=True, **kwargs)


def sigma_max(mcmc: MCMC) -> dict[str, float]:
    s = mcmc.get_samples()["sigma"]
    return {"sigma_max": float(s.max()), "sigma_mean": float(s.mean())}


def long_run(
    make_kernel: Any,
    step_size: float,
    x: torch.Tensor,
    y: torch.Tensor,
    ref: dict[str, torch.Tensor],
    seed: int,
    settings: dict[str, Any],
) -> dict[str, Any]:
    """Run at ``step_size`` with the long-run settings (seed ``seed + 1``); compare with NUTS."""
    long_cfg, ksd_draws = settings["long"], settings["tune"]["ksd_draws"]
    pyro.set_rng_seed(seed + 1)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mcmc = sequential_mcmc(
            make_kernel(step_size, thin=long_cfg["thin"]),
            num_samples=long_cfg["samples"],
            warmup_steps=long_cfg["warmup"],
        )
        mcmc.run(x, y)
    out: dict[str, Any] = {"seconds": time.perf_counter() - start}
    out["warnings"] = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    out["ksd"] = stein_discrepancy(mcmc, model, (x, y), max_draws=ksd_draws)
    out["ksd_standardized"] = stein_discrepancy(
        mcmc, model, (x, y), max_draws=ksd_draws, standardize=True
    )
    out["sites"] = compare(columns(mcmc.get_samples()), ref)
    out["within_criterion"] = within(out["sites"])
    return out


def report(run: dict[str, Any], step_size: float, ksd_draws: int, nuts: dict[str, Any]) -> None:
    """Print a long run's KSD and its site-by-site comparison with NUTS."""
    print(
        f"long run at {step_size:.3g}: {run['seconds']:.1f} s, KSD at {ksd_draws} "
        f"draws {run['ksd']:.4g} (NUTS {nuts['ksd']:.4g}), standardised "
        f"{run['ksd_standardized']:.4g} (NUTS {nuts['ksd_standardized']:.4g})"
    )
    print(f"{'site':>8} {'|dmean|/sd':>11} {'sd ratio':>9}")
    for r in run["sites"]:
        print(f"{r['site']:>8} {r['mean_error_sd']:>11.3f} {r['sd_ratio']:>9.3f}")
    verdict = "yes" if run["within_criterion"] else "NO"
    print(f"every site within {MEAN_TOL} sd in mean and a factor {SD_FACTOR} in sd: {verdict}")


def plot(results: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    n = results["settings"]["tune"]["ksd_draws"]
    for ax, key, nuts_key, title in (
        (axes[0], "ksd", "ksd_standardized", f"standardised KSD, the score ({n} draws)"),
        (axes[1], "ksd_unscaled", "ksd", f"unscaled KSD, the earlier score ({n} draws)"),
    ):
        top = 1.0
        for i, name in enumerate(METHODS):
            rows = results["methods"][name]["tuning"]
            ok = [(r["step_size"], r[key]) for r in rows if r[key] is not None]
            top = max([top] + [k for _, k in ok])
            if ok:
                style = "--" if name == "bnp+rmsprop" else "-"
                ax.plot(*zip(*ok, strict=True), style, marker="o", ms=4, label=LABELS[name],
                        color=f"C{i}")  # fmt: skip
            pick = results["methods"][name]["step_size"] if key == "ksd" else None
            if key != "ksd":
                pick = results["methods"][name].get("unscaled_pick", {}).get("step_size")
            if pick is not None:
                value = [k for e, k in ok if e == pick]
                if value:
                    ax.plot([pick], value, "*", ms=14, color=f"C{i}", mfc="none")
        low = min([results["nuts"][nuts_key]] + [
            r[key] for m in METHODS for r in results["methods"][m]["tuning"] if r[key] is not None
        ])  # fmt: skip
        top = min(top * 2, low * 1e3)  # the runaway runs (KSD up to 1e27) leave the plot
        for i, name in enumerate(METHODS):
            rows = results["methods"][name]["tuning"]
            bad = [r["step_size"] for r in rows if r[key] is None]
            if bad:
                ax.plot(bad, [top] * len(bad), "x", color=f"C{i}")
        ax.set_ylim(low / 2, top * 1.5)
        ax.axhline(results["nuts"][nuts_key], color="k", ls=":", label="NUTS (same n)")
        ax.set(xscale="log", yscale="log", xlabel="step size",
               ylabel="KSD (x: failed / divergent, *: pick)")  # fmt: skip
        ax.set_title(title)
        ax.legend(fontsize=8)
    axes = axes[1:]
    sites = [r["site"] for r in results["methods"][METHODS[0]]["sites"]]
    width = 0.8 / len(METHODS)
    for i, name in enumerate(METHODS):
        rows = results["methods"][name]["sites"]
        pos = [j + (i - 1) * width for j in range(len(sites))]
        axes[1].bar(
            pos, [r["mean_error_sd"] for r in rows], width, label=LABELS[name], color=f"C{i}"
        )
        axes[2].bar(pos, [r["sd_ratio"] for r in rows], width, label=LABELS[name], color=f"C{i}")
    axes[1].axhline(MEAN_TOL, color="k", ls=":")
    axes[1].set(ylabel="|mean - NUTS mean| / NUTS sd", title="long run at the chosen step size")
    axes[2].axhline(SD_FACTOR, color="k", ls=":")
    axes[2].axhline(1 / SD_FACTOR, color="k", ls=":")
    axes[2].axhline(1.0, color="0.6", lw=0.8)
    axes[2].set(ylabel="sd / NUTS sd", title="long run at the chosen step size")
    for ax in axes[1:]:
        ax.set_xticks(range(len(sites)))
        ax.set_xticklabels(sites, rotation=60, fontsize=8)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="diabetes_out", help="output directory")
    parser.add_argument("--quick", action="store_true", help="tiny settings (a test-speed run)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    settings = QUICK if args.quick else FULL
    x, y = load_data()
    ksd_draws = settings["tune"]["ksd_draws"]
    results: dict[str, Any] = {
        "settings": {**settings, "batch": args.batch, "seed": args.seed, "quick": args.quick},
        "methods": {},
    }

    # ---- NUTS reference
    pyro.set_rng_seed(args.seed)
    nuts_cfg = settings["nuts"]
    start = time.perf_counter()
    nuts = sequential_mcmc(
        NUTS(model),
        num_samples=nuts_cfg["samples"],
        warmup_steps=nuts_cfg["warmup"],
        num_chains=nuts_cfg["chains"],
    )
    nuts.run(x, y)
    nuts_seconds = time.perf_counter() - start
    ref = columns(nuts.get_samples())
    nuts_ksd = stein_discrepancy(nuts, model, (x, y), max_draws=ksd_draws)
    results["nuts"] = {
        "seconds": nuts_seconds,
        "ksd": nuts_ksd,
        "ksd_standardized": stein_discrepancy(
            nuts, model, (x, y), max_draws=ksd_draws, standardize=True
        ),
        "mean": {k: float(v.mean()) for k, v in ref.items()},
        "sd": {k: float(v.std()) for k, v in ref.items()},
    }
    print(
        f"NUTS: {nuts_seconds:.1f} s, KSD at {ksd_draws} draws {nuts_ksd:.4g}, standardised "
        f"{results['nuts']['ksd_standardized']:.4g}"
    )

    # ---- tuning and a longer run per preconditioner
    tune_cfg = settings["tune"]
    for name in METHODS:

        def make_kernel(eps: float, name: str = name, thin: int = 1) -> pyro_bnp.SGLD:
            return pyro_bnp.SGLD(
                model,
                eps,
                subsample_size={"data": args.batch},
                preconditioner=name,
                thin=thin,
            )

        start = time.perf_counter()
        tuned = tune_step_size(
            make_kernel,
            (x, y),
            step_sizes=tune_cfg["grid"],
            num_samples=tune_cfg["samples"],
            warmup_steps=tune_cfg["warmup"],
            ksd_draws=ksd_draws,
            record=sigma_max,
            progress=False,
            seed=args.seed,
        )
        tune_seconds = time.perf_counter() - start
        print(f"\n== {LABELS[name]} ({name}): tuning {tune_seconds:.1f} s")
        print(tuned)
        method: dict[str, Any] = {
            "tuning": tuned.table,
            "tuning_seconds": tune_seconds,
            "step_size": tuned.step_size,
            "tuning_ksd": tuned.ksd,
        }
        results["methods"][name] = method
        if not math.isfinite(tuned.step_size):
            method["skipped"] = "every run of the grid failed"
            continue
        method.update(long_run(make_kernel, tuned.step_size, x, y, ref, args.seed, settings))
        report(method, tuned.step_size, ksd_draws, results["nuts"])
        # the step size of the smallest unscaled KSD (the earlier rule), for comparison
        ok = [r for r in tuned.table if r["status"] == "ok"]
        old = min(ok, key=lambda r: (r["ksd_unscaled"], -r["step_size"]))["step_size"]
        method["unscaled_pick"] = {"step_size": old}
        print(f"the unscaled KSD would choose {old:.3g}")
        if old != tuned.step_size:
            method["unscaled_pick"].update(
                long_run(make_kernel, old, x, y, ref, args.seed, settings)
            )
            report(method["unscaled_pick"], old, ksd_draws, results["nuts"])

    # ---- BNP+RMSprop on a plain-function model: RMSprop, with a warning
    bnp, rms = results["methods"]["bnp+rmsprop"], results["methods"]["rmsprop"]
    notes = [w for row in bnp["tuning"] for w in row["warnings"] if "acts as RMSprop" in w]
    bnp["note"] = (
        "plain-function model without network layers: BNP warned that it acts as RMSprop"
        if notes
        else "no 'acts as RMSprop' warning was recorded"
    )
    bnp["same_as_rmsprop"] = [r["ksd"] for r in bnp["tuning"]] == [r["ksd"] for r in rms["tuning"]]
    print(f"\nbnp+rmsprop: {bnp['note']}; same KSD as rmsprop at every step size: "
          f"{bnp['same_as_rmsprop']}")  # fmt: skip

    safe = json_safe(results)
    (out / "results.json").write_text(json.dumps(safe, indent=1))
    plot(safe, out / "diabetes_tuning.png")
    print(f"wrote {out / 'results.json'} and {out / 'diabetes_tuning.png'}")


if __name__ == "__main__":
    main()
