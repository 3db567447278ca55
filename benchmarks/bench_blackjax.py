"""Optional contender: BlackJAX's SGLD on bench_step's 10-50-1 MLP, in its own environment.

This project does not depend on JAX. To run it, make a separate environment::

    python3.11 -m venv /tmp/jaxenv
    /tmp/jaxenv/bin/pip install "jax[cpu]" blackjax
    /tmp/jaxenv/bin/python benchmarks/bench_blackjax.py [--quick] [--out FILE]

Same problem as ``bench_step`` / ``bench_compiled``'s ``mlp-10-50-1`` case: tanh MLP 10-50-1,
``N(0, 1)`` priors on every weight, Gaussian likelihood with ``sigma = 0.1``, N = 10,000 rows
of random data, batch 128, step size 1e-7, one CPU thread (XLA flags below). Two contenders:

* ``jit``: ``jax.jit`` of (key split, ``sgld.step``) called once per update from Python, the
  mini-batch gathered inside the jitted function from an index array drawn in Python (numpy),
  as pyro_bnp's kernel draws its indices outside the graph; results are blocked on every update
  (``block_until_ready``);
* ``scan``: ``jax.lax.scan`` over 100 updates per call (the per-update time is the call's time
  over 100).

Prints the per-update medians (us) and writes JSON; compare with
``benchmarks/results/compiled.json`` measured in the same session (not interleaved: they run in
different processes).
"""

from __future__ import annotations

import os

os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import blackjax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

N, BATCH, SIGMA, EPS = 10_000, 128, 0.1, 1e-7


def init_params(key: jax.Array) -> dict[str, jax.Array]:
    """Return the weights of a 10-50-1 MLP (PyTorch's default uniform initialisation)."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    b1, b2 = 1 / np.sqrt(10), 1 / np.sqrt(50)
    return {
        "w1": jax.random.uniform(k1, (50, 10), minval=-b1, maxval=b1),
        "b1": jax.random.uniform(k2, (50,), minval=-b1, maxval=b1),
        "w2": jax.random.uniform(k3, (1, 50), minval=-b2, maxval=b2),
        "b2": jax.random.uniform(k4, (1,), minval=-b2, maxval=b2),
    }


def log_prior(p: dict[str, jax.Array]) -> jax.Array:
    """Return ``sum log N(theta; 0, 1)`` up to a constant."""
    return -0.5 * sum(jnp.sum(v * v) for v in jax.tree_util.tree_leaves(p))


def log_lik(p: dict[str, jax.Array], batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Return the log likelihood of one row (BlackJAX vmaps it over the mini-batch)."""
    x, y = batch
    h = jnp.tanh(p["w1"] @ x + p["b1"])
    mean = (p["w2"] @ h + p["b2"])[0]
    return -0.5 * ((y - mean) / SIGMA) ** 2


def main() -> None:
    """Time both contenders and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/blackjax.json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((N, 10)), dtype=jnp.float32)
    y = jnp.asarray(rng.standard_normal(N), dtype=jnp.float32)
    grad_fn = blackjax.sgmcmc.gradients.grad_estimator(log_prior, log_lik, N)
    sgld = blackjax.sgld(grad_fn)

    @jax.jit
    def one(key: jax.Array, pos: dict, idx: jax.Array) -> tuple[jax.Array, dict]:
        key, sub = jax.random.split(key)  # inside the jitted call: no extra dispatch
        return key, sgld.step(sub, pos, (x[idx], y[idx]), EPS)

    @jax.jit
    def hundred(key: jax.Array, pos: dict, idx: jax.Array) -> dict:
        def body(p: dict, inputs: tuple) -> tuple:
            k, i = inputs
            return sgld.step(k, p, (x[i], y[i]), EPS), None

        keys = jax.random.split(key, idx.shape[0])
        return jax.lax.scan(body, pos, (keys, idx))[0]

    pos = init_params(jax.random.PRNGKey(0))
    key = jax.random.PRNGKey(1)
    rounds = 5 if args.quick else 60
    block = 20 if args.quick else 200
    t0 = time.perf_counter()
    jax.block_until_ready(one(key, pos, jnp.arange(BATCH)))
    compile_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(hundred(key, pos, jnp.zeros((100, BATCH), dtype=jnp.int32)))
    compile_scan = time.perf_counter() - t0
    times: dict[str, list[float]] = {"jit": [], "scan": []}
    perm, at = rng.permutation(N), 0
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(block):
            if at + BATCH > N:
                perm, at = rng.permutation(N), 0
            idx = jnp.asarray(perm[at : at + BATCH])
            at += BATCH
            key, pos = jax.block_until_ready(one(key, pos, idx))
        times["jit"].append((time.perf_counter() - start) / block * 1e6)
        idx100 = jnp.asarray(rng.integers(0, N, (100, BATCH)), dtype=jnp.int32)
        key, sub = jax.random.split(key)
        start = time.perf_counter()
        pos = jax.block_until_ready(hundred(sub, pos, idx100))
        times["scan"].append((time.perf_counter() - start) / 100 * 1e6)
    finite = all(bool(jnp.isfinite(v).all()) for v in jax.tree_util.tree_leaves(pos))
    result = {
        "benchmark": "blackjax",
        "case": "mlp-10-50-1",
        "quick": args.quick,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "nproc": os.cpu_count(),
            "loadavg": list(os.getloadavg()),
        },  # fmt: skip
        "versions": {"jax": jax.__version__, "blackjax": blackjax.__version__},
        "median_us": {k: statistics.median(v) for k, v in times.items()},
        "compile_s": {"jit": compile_one, "scan": compile_scan},
        "finite": finite,
    }
    for k, v in result["median_us"].items():
        print(f"blackjax sgld 10-50-1 {k:>4}: {v:8.1f} us per update")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
