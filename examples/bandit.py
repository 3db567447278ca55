"""Contextual bandits: Thompson sampling with a BNN reward model sampled by ``pyro_bnp.SGLD``.

Run with ``python examples/bandit.py [--quick] [--out DIR] [--data-dir DIR]
[--problem mushroom|wheel|both] [--seeds K]``. The SGLD paper's bandit settings are not public;
ours follow Riquelme, Tucker & Snoek, "Deep Bayesian Bandits Showdown" (ICLR 2018). The two
problems (mushroom, wheel) and the regret are defined in ``_bandit_problems.py``.

**Reward model.** ``context -> 50 ReLU units -> one mean reward per action`` (a ``PyroModule``,
so BNP sees both ``Linear`` layers); only the played action's reward is observed, with a
Gaussian likelihood of unknown scale ``sigma ~ HalfNormal(1)``. Priors: weights
``N(0, 1 / fan_in)``, biases ``N(0, 1)``. Rewards are divided by 10 before fitting.

**Policies.** ``uniform`` (random actions); ``greedy`` (the same network fitted by
``pyro_bnp.SGLD`` at temperature 0 with the RMSprop preconditioner, i.e. RMSprop gradient
descent on the MAP objective, argmax of the fit); Thompson sampling with the network's
posterior sampled by SGLD under the preconditioners ``identity`` (SGLD), ``rmsprop`` (pSGLD),
``bnp`` (BNP-SGLD) and ``bnp+rmsprop``; and with it sampled by ``pyro_bnp.SGHMC`` with the
identity (``sghmc``) and plain BNP (``bnp-sghmc``), issue 15: friction fixed at ``h alpha = 0.1``
(momentum 0.9 per update), the refit's ``eps = 2 lr / t`` read as the SGLD step size of the same
linear stability (``_common.sghmc_step``), the momentum starting from rest at every refit (a new
kernel), ``lr`` tuned on the same grid and seeds as the SGLD policies.

**Schedule (same gradient budget for every learned policy).** The first ``REFIT_EVERY``
rounds are played at random. Then after every ``REFIT_EVERY`` rounds the model is refitted on
all data seen so far with ``UPDATES`` SGLD updates on mini-batches of ``BATCH`` rows, starting
from the previous refit's last state (a warm chain; a new kernel, hence a new ``setup``, per
refit because the data set grows). Thompson sampling uses one posterior draw per decision: the
next ``REFIT_EVERY`` decisions use the last ``REFIT_EVERY`` states of the chain, ``DRAW_GAP``
updates apart. The step size of a refit on ``t`` observations is ``eps = 2 lr / t`` (``lr`` is
the learning rate on the mean loss, the same convention for every preconditioner); ``lr`` is
chosen per policy and problem from a grid on two separate tuning seeds (``--tune``), see
``LR``. A refit that the kernel stops (``RuntimeError``: too many non-finite updates in a row)
keeps the previous chain state and draws; such failures and the rejected updates are reported.

**Outputs.** A table (final cumulative regret, mean ± sd over seeds; regret per round over the
last quarter of the rounds; rejected updates; failed refits; seconds per run), ``results.json``
(settings, per policy the mean and sd curves and the per-seed final values) and
``bandit_regret.png`` in ``--out``. Full run: 2000 rounds per problem, 3 seeds, wheel
``delta = 0.7``, 12640 gradient updates per learned run; ``--quick``: 100 rounds, 1 seed.
Documented in ``docs/experiments/bandit.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import _bandit_problems as bp
import _common
import matplotlib
import numpy as np
import pyro
import pyro.distributions as dist
import torch
from _common import METHODS, SGHMC_METHODS
from pyro.nn import PyroModule, PyroSample
from torch import nn
from tqdm import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

POLICIES = ["uniform", "greedy", *METHODS, *SGHMC_METHODS]
# policies run only when named with --policies (not tuned: they reuse another policy's lr)
EXTRA_POLICIES = ["bnp-cap"]
SAMPLERS: dict[str, tuple[str, float]] = {  # policy -> (preconditioner, temperature)
    "greedy": ("rmsprop", 0.0),
    "identity": ("identity", 1.0),
    "rmsprop": ("rmsprop", 1.0),
    "bnp": ("bnp", 1.0),
    "bnp+rmsprop": ("bnp+rmsprop", 1.0),
    "bnp-cap": ("bnp-cap", 1.0),  # BNP with the prior cap (the stiff-prior failure below)
    # pyro_bnp.SGHMC with these preconditioners (_common.make_kernel)
    "sghmc": ("identity", 1.0),
    "bnp-sghmc": ("bnp", 1.0),
}
HIDDEN, REWARD_SCALE, DELTA = 50, 10.0, 0.7
REFIT_EVERY, UPDATES, BATCH, DRAW_GAP = 25, 160, 64, 4
FULL_ROUNDS, QUICK_ROUNDS, TUNE_ROUNDS, TUNE_SEEDS = 2000, 100, 600, (1000, 1001)

# lr per problem and policy (eps = 2 lr / t): the smallest mean final regret over TUNE_SEEDS
# (TUNE_ROUNDS rounds) in the grid TUNE_GRID (``python examples/bandit.py --tune``; for the
# wheel's identity and greedy, whose best value was 3e-1 and 3e-4..1e-1, lr = 1 was tried as
# well: it is worse, and identity then fails refits). Seeds of the tuning differ from the runs.
# The SGHMC policies (session 4) were tuned on the part of the grid around their SGLD
# counterpart's value, extended where the best value sat at an end: mushroom sghmc 3e-4..3e-2
# (1e-3), bnp-sghmc 1e-4..1e-2 (1e-4, the end: 1e-4 is below TUNE_GRID, 895 against 908 at
# 3e-4, within noise); wheel sghmc 3e-3..1 (3e-2), bnp-sghmc 1e-3..3e-2 (3e-3).
TUNE_GRID = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]
LR = {
    "mushroom": {
        "greedy": 1e-2,
        "identity": 1e-2,
        "rmsprop": 3e-3,
        "bnp": 1e-3,
        "bnp+rmsprop": 1e-3,
        "bnp-cap": 1e-3,  # plain BNP's, not tuned
        "sghmc": 1e-3,  # SGHMC policies: tuned on TUNE_SEEDS by the same rule (see below)
        "bnp-sghmc": 1e-4,
    },
    "wheel": {
        "greedy": 3e-4,
        "identity": 3e-1,
        "rmsprop": 3e-3,
        "bnp": 1e-2,
        "bnp+rmsprop": 3e-3,
        "bnp-cap": 1e-2,  # plain BNP's, not tuned
        "sghmc": 3e-2,
        "bnp-sghmc": 3e-3,
    },
}
COLORS = {"uniform": "0.6", "greedy": "k", **_common.COLORS, "bnp-cap": "C4"}


class RewardNet(PyroModule):
    """``context -> hidden (ReLU) -> one mean reward per action``; Gaussian likelihood."""

    def __init__(self, d_in: int, n_actions: int, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.fc1 = PyroModule[nn.Linear](d_in, hidden)
        self.fc2 = PyroModule[nn.Linear](hidden, n_actions)
        for layer in (self.fc1, self.fc2):
            out, fan_in = layer.out_features, layer.in_features
            w_sd = 1.0 / math.sqrt(fan_in)
            layer.weight = PyroSample(dist.Normal(0.0, w_sd).expand([out, fan_in]).to_event(2))
            layer.bias = PyroSample(dist.Normal(0.0, 1.0).expand([out]).to_event(1))

    def forward(self, x: torch.Tensor, a: torch.Tensor, r: torch.Tensor) -> None:
        sigma = pyro.sample("sigma", dist.HalfNormal(torch.tensor(1.0)))
        self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias  # noqa: B018
        with pyro.plate("data", x.shape[0]) as idx:
            out = self.fc2(torch.relu(self.fc1(x[idx])))
            mean = out.gather(1, a[idx].unsqueeze(-1)).squeeze(-1)
            pyro.sample("obs", dist.Normal(mean, sigma), obs=r[idx])


def predict(z: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Mean rewards ``[n, K]`` of the network at an unconstrained draw ``z``."""
    h = torch.relu(x @ z["fc1.weight"].T + z["fc1.bias"])
    return h @ z["fc2.weight"].T + z["fc2.bias"]


def make_rounds(problem: str, n: int, seed: int, data_dir: Path) -> bp.Rounds:
    rng = np.random.default_rng(seed)
    if problem == "wheel":
        return bp.wheel_rounds(n, DELTA, rng)
    x, poisonous = bp.load_mushroom(data_dir)
    return bp.mushroom_rounds(x, poisonous, n, rng)


def refit(net, policy, lr, x, a, r, z):
    """One refit: a new kernel on the data so far, warm-started at ``z``; returns draws."""
    pre, temperature = SAMPLERS[policy]
    t = x.shape[0]
    kernel = _common.make_kernel(  # SGLD, or SGHMC for the SGHMC policies
        policy,
        net,
        2.0 * lr / t,
        pre=_common.preconditioner(pre),
        subsample_size={"data": min(BATCH, t)},
        temperature=temperature,
    )
    if z is not None:
        kernel.initial_params = z
    kernel.setup(UPDATES, x, a, r)  # every update is "warmup": nothing is frozen or recorded
    cur = dict(kernel.initial_params)
    keep = 1 if temperature == 0 else REFIT_EVERY
    draws = []
    failed = False
    try:
        for u in range(UPDATES):
            cur = kernel.sample(cur)
            left = UPDATES - 1 - u
            if left % DRAW_GAP == 0 and left // DRAW_GAP < keep:
                draws.append(cur)
    except RuntimeError:
        failed = True
    rejected = kernel.diagnostics()["warmup_divergences"]
    kernel.cleanup()
    return (None, None, rejected, True) if failed else (cur, draws, rejected, False)


def run_policy(policy: str, rounds: bp.Rounds, seed: int, lr: float | None) -> dict:
    """Play all rounds with one policy; cumulative regret and the sampler's fault counts."""
    start = time.perf_counter()
    rng = np.random.default_rng(seed + 7919)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    n, k = rounds.means.shape
    x_all = torch.as_tensor(rounds.contexts)
    r_all = torch.as_tensor(rounds.rewards / REWARD_SCALE, dtype=torch.float32)
    actions = np.zeros(n, dtype=np.int64)
    net = None if policy == "uniform" else RewardNet(x_all.shape[1], k)
    z, draws = None, []
    rejected = failures = updates = 0
    t = 0
    while t < n:
        end = min(t + REFIT_EVERY, n)
        if not draws:
            actions[t:end] = rng.integers(0, k, size=end - t)
        else:
            with torch.no_grad():
                for i in range(t, end):
                    actions[i] = int(predict(draws[(i - t) % len(draws)], x_all[i]).argmax())
        t = end
        if net is None or t >= n:
            continue
        a = torch.as_tensor(actions[:t])
        r = r_all[:t].gather(1, a.unsqueeze(-1)).squeeze(-1)
        new_z, new_draws, rej, failed = refit(net, policy, lr, x_all[:t], a, r, z)
        rejected += rej
        failures += failed
        updates += UPDATES
        if not failed:
            z, draws = new_z, new_draws
    return {
        "cum_regret": np.cumsum(bp.regret(rounds.means, actions)),
        "rejected_updates": rejected,
        "failed_refits": failures,
        "gradient_updates": updates,
        "seconds": time.perf_counter() - start,
    }


def summarize(runs: list[dict], n: int) -> dict:
    curves = np.stack([r["cum_regret"] for r in runs])
    final = curves[:, -1]
    tail = n - n // 4  # regret per round over the last quarter of the rounds
    late = (curves[:, -1] - curves[:, tail - 1]) / (n - tail)
    return {
        "final_mean": float(final.mean()),
        "final_sd": float(final.std(ddof=1)) if len(runs) > 1 else 0.0,
        "final_per_seed": final.tolist(),
        "late_per_round_mean": float(late.mean()),
        "rejected_updates": int(sum(r["rejected_updates"] for r in runs)),
        "failed_refits": int(sum(r["failed_refits"] for r in runs)),
        "gradient_updates_per_run": int(runs[0]["gradient_updates"]),
        "seconds_per_run": float(np.mean([r["seconds"] for r in runs])),
        "cum_regret_mean": np.round(curves.mean(0), 3).tolist(),
        "cum_regret_sd": np.round(
            curves.std(0, ddof=1) if len(runs) > 1 else 0 * curves[0], 3
        ).tolist(),
    }


def plot(results: dict, path: Path) -> None:
    """Cumulative regret (mean ± sd over seeds) per policy, one panel per problem.

    Linear axes, cut at 1.3 times the largest final regret of the learned policies (the
    uniform baseline leaves the frame; the legend gives every final value).
    """
    problems = list(results)
    fig, axes = plt.subplots(1, len(problems), figsize=(5.2 * len(problems), 3.8), squeeze=False)
    for ax, problem in zip(axes[0], problems, strict=True):
        top = 0.0
        for policy, s in results[problem].items():
            mean, sd = np.array(s["cum_regret_mean"]), np.array(s["cum_regret_sd"])
            rounds = np.arange(1, len(mean) + 1)
            label = f"{policy} ({mean[-1]:.0f})"
            ax.plot(rounds, mean, color=COLORS[policy], label=label, lw=1.5)
            ax.fill_between(rounds, mean - sd, mean + sd, color=COLORS[policy], alpha=0.15, lw=0)
            if policy != "uniform":
                top = max(top, mean[-1] + sd[-1])
        title = problem if problem == "mushroom" else f"wheel (delta={DELTA})"
        ax.set(title=title, xlabel="round", ylabel="cumulative regret (mean ± sd)")
        ax.set_ylim(0, 1.3 * top if top > 0 else None)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", title="policy (final)", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def tune(problems: list[str], policies: list[str], data_dir: Path, grid: list[float]) -> None:
    """Print the mean final regret of every lr in ``grid`` on TUNE_SEEDS (how LR was chosen)."""
    jobs = [(p, pol, lr) for p in problems for pol in policies for lr in grid]
    print(f"{'problem':9} {'policy':12} {'lr':>7} {'regret':>8} {'rejected':>8} {'failed':>6}")
    for problem, policy, lr in tqdm(jobs, desc="tune", file=sys.stderr):
        runs = [
            run_policy(policy, make_rounds(problem, TUNE_ROUNDS, s, data_dir), s, lr)
            for s in TUNE_SEEDS
        ]
        regret = np.mean([r["cum_regret"][-1] for r in runs])
        rejected = sum(r["rejected_updates"] for r in runs)
        failed = sum(r["failed_refits"] for r in runs)
        tqdm.write(f"{problem:9} {policy:12} {lr:7.0e} {regret:8.1f} {rejected:8d} {failed:6d}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ROUNDS} rounds, 1 seed")
    parser.add_argument("--out", default="out/bandit", help="output directory")
    parser.add_argument(
        "--data-dir",
        default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"),
        help="directory with mushroom/agaricus.txt.{train,test}",
    )
    parser.add_argument("--problem", choices=["mushroom", "wheel", "both"], default="both")
    parser.add_argument("--seeds", type=int, default=None, help="seeds (default 3; quick: 1)")
    parser.add_argument("--rounds", type=int, default=None, help=f"default {FULL_ROUNDS}")
    parser.add_argument("--tune", action="store_true", help="run the lr grid instead")
    parser.add_argument(
        "--grid", default=None, help="comma-separated lr values for --tune (default TUNE_GRID)"
    )
    parser.add_argument(
        "--policies",
        default=None,
        help="comma-separated policies (default: the standard ones; also "
        + ",".join(EXTRA_POLICIES)
        + ")",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    data_dir = Path(args.data_dir)
    problems = ["mushroom", "wheel"] if args.problem == "both" else [args.problem]
    known = [*POLICIES, *EXTRA_POLICIES]
    chosen = args.policies.split(",") if args.policies else None
    if chosen and sorted(set(chosen) - set(known)):
        parser.error(f"--policies: unknown {sorted(set(chosen) - set(known))}; choose from {known}")
    if args.tune:
        grid = [float(v) for v in args.grid.split(",")] if args.grid else TUNE_GRID
        policies = [p for p in (chosen or SAMPLERS) if p in SAMPLERS]
        tune(problems, policies, data_dir, grid)
        return
    policies = chosen or POLICIES
    n = args.rounds or (QUICK_ROUNDS if args.quick else FULL_ROUNDS)
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    jobs = [(p, s, pol) for p in problems for s in seeds for pol in policies]
    raw: dict[str, dict[str, list[dict]]] = {p: {pol: [] for pol in policies} for p in problems}
    rounds_cache: dict[tuple[str, int], bp.Rounds] = {}
    bar = tqdm(jobs, desc="runs", file=sys.stderr)
    for problem, seed, policy in bar:
        bar.set_postfix_str(f"{problem} seed {seed} {policy}")
        key = (problem, seed)
        if key not in rounds_cache:
            rounds_cache[key] = make_rounds(problem, n, seed, data_dir)
        lr = LR[problem].get(policy)
        raw[problem][policy].append(run_policy(policy, rounds_cache[key], seed, lr))
    elapsed = time.perf_counter() - start

    results = {p: {pol: summarize(raw[p][pol], n) for pol in policies} for p in problems}
    print(f"\n{len(seeds)} seed(s), {n} rounds; cumulative regret at the last round (mean ± sd)")
    header = (
        f"{'problem':9} {'policy':12} {'lr':>7} {'cum. regret':>17} {'late/round':>10} "
        f"{'rejected':>8} {'failed':>6} {'s/run':>6}"
    )
    print(header)
    for p in problems:
        for pol in policies:
            s = results[p][pol]
            lr = LR[p].get(pol)
            lr_txt = "-" if lr is None else f"{lr:.0e}"
            print(
                f"{p:9} {pol:12} {lr_txt:>7} {s['final_mean']:9.1f} ± {s['final_sd']:6.1f} "
                f"{s['late_per_round_mean']:10.3f} {s['rejected_updates']:8d} "
                f"{s['failed_refits']:6d} {s['seconds_per_run']:6.1f}"
            )
    config = {
        "rounds": n,
        "seeds": seeds,
        "delta": DELTA,
        "hidden": HIDDEN,
        "reward_scale": REWARD_SCALE,
        "refit_every": REFIT_EVERY,
        "updates_per_refit": UPDATES,
        "batch": BATCH,
        "draw_gap": DRAW_GAP,
        "lr": LR,
        "seconds": elapsed,
    }
    (out / "results.json").write_text(json.dumps({"config": config, "results": results}))
    plot(results, out / "bandit_regret.png")
    print(f"\n{len(jobs)} runs in {elapsed:.1f} s; wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
