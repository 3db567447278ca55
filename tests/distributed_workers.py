"""Worker processes of tests/test_distributed.py: one process per rank, gloo on the CPU.

``python tests/distributed_workers.py MODE OUT [ARGS...]`` with ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` in the environment (:func:`launch` sets them). Rank 0 writes
its results under ``OUT``. Also importable: :func:`launch` and the one-process references.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroSample
from torch import nn

HERE = Path(__file__).resolve().parent
PRECONDITIONERS = ("identity", "rmsprop", "bnp")


# ------------------------------------------------------------------------------- launching
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(world: int, *args: object, port: int | None = None) -> list[subprocess.Popen[str]]:
    """Start ``world`` rank processes of this script (not waited for)."""
    port = free_port() if port is None else port
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(HERE / "distributed_workers.py"), *map(str, args)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=HERE.parent,
            )
        )
    return procs


def wait(procs: list[subprocess.Popen[str]], timeout: float) -> list[tuple[int, str, str]]:
    """Wait for every process (killing all at the deadline); return (rc, stdout, stderr)."""
    deadline = time.monotonic() + timeout
    out = []
    for p in procs:
        try:
            so, se = p.communicate(timeout=max(deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            so, se = p.communicate()
            se += "\n[killed by the test: timeout]"
        out.append((p.returncode, so, se))
    return out


def launch(world: int, *args: object, timeout: float) -> list[tuple[int, str, str]]:
    """Run ``world`` ranks to the end; assert that every one succeeded."""
    results = wait(start(world, *args), timeout)
    for rank, (rc, _, se) in enumerate(results):
        assert rc == 0, f"rank {rank} exited with {rc}:\n{se[-4000:]}"
    return results


# ---------------------------------------------------------------------------------- models
class TinyBNN(PyroModule):
    """3-6-1 tanh network with a fixed noise scale (float64 when the default dtype is)."""

    def __init__(self) -> None:
        super().__init__()
        dt = torch.get_default_dtype()
        zero, one = torch.tensor(0.0, dtype=dt), torch.tensor(1.0, dtype=dt)
        self.fc1 = PyroModule[nn.Linear](3, 6)
        self.fc1.weight = PyroSample(dist.Normal(zero, one).expand([6, 3]).to_event(2))
        self.fc1.bias = PyroSample(dist.Normal(zero, one).expand([6]).to_event(1))
        self.fc2 = PyroModule[nn.Linear](6, 1)
        self.fc2.weight = PyroSample(dist.Normal(zero, one).expand([1, 6]).to_event(2))
        self.fc2.bias = PyroSample(dist.Normal(zero, one).expand([1]).to_event(1))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias  # noqa: B018
        with pyro.plate("data", x.shape[0]) as idx:
            mean = self.fc2(torch.tanh(self.fc1(x[idx]))).squeeze(-1)
            pyro.sample("obs", dist.Normal(mean, 0.3), obs=None if y is None else y[idx])


def bnn_data(n: int = 240, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    dt = torch.get_default_dtype()
    g = torch.Generator().manual_seed(seed)
    x = (
        torch.tensor([2.0, -1.0, 0.5])
        + torch.tensor([3.0, 0.3, 1.0]) * torch.randn(n, 3, generator=g)
    ).to(dt)
    y = (torch.sin(x[:, 0]) + 0.5 * x[:, 1] + 0.3 * torch.randn(n, generator=g).to(dt)).to(dt)
    return x, y


def equivalence_kernel(name: str, batch: int, sampler: str = "sgld") -> Any:
    """The kernel of the equivalence test for one preconditioner (float64 models)."""
    from pyro_bnp import SGHMC, SGLD, RMSprop

    if name == "bnp":
        model, pre, eps = TinyBNN(), "bnp", 2e-4
    else:
        from sgld_models import conjugate_linreg

        model = conjugate_linreg
        pre = RMSprop() if name == "rmsprop" else "identity"
        eps = 2e-6 if name == "rmsprop" else 1e-4
    if sampler == "sghmc":
        return SGHMC(model, step_size=eps**0.5, friction=0.1 / eps**0.5, preconditioner=pre,
                     subsample_size={"data": batch}, health=None)  # fmt: skip
    # health=None: its warnings would be errors in the test process (the chain is the same)
    return SGLD(
        model, step_size=eps, preconditioner=pre, subsample_size={"data": batch}, health=None
    )


def equivalence_data(name: str) -> tuple[Any, ...]:
    if name == "bnp":
        return bnn_data()
    from sgld_models import badly_scaled_features

    x, y = badly_scaled_features(240, scales=[0.5, 2.0, 8.0], means=[1.0, -2.0, 3.0])
    return x, y, 10.0, 1.0


class UnionPotential:
    """One-process reference: feeds the union of every rank's batch (``R * B`` rows)."""

    def __init__(self, inner: Any, seed: int, world: int, batch: int) -> None:
        self.inner, self.seed, self.world, self.batch = inner, seed, world, batch
        self.evaluations = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def next_indices(self, perms: Any, pos: Any, generator: Any) -> dict[str, torch.Tensor]:
        from pyro_bnp.distributed import shard_indices, shard_range

        n = self.inner.plates["data"][0]
        k, self.evaluations = self.evaluations, self.evaluations + 1
        rows = [
            shard_indices(self.seed, r, shard_range(n, r, self.world), self.batch, k)
            for r in range(self.world)
        ]
        return {"data": torch.cat(rows)}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)


def reference_run(name: str, batch: int, world: int, steps: int, sampler: str = "sgld") -> Any:
    """The one-process chain with ``world * batch`` rows on the ranks' indices."""
    pyro.set_rng_seed(0)
    kernel = equivalence_kernel(name, world * batch, sampler)
    seed = int(torch.randint(0, 2**62, ()).item())  # what DataParallel's rank 0 draws
    args = equivalence_data(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kernel.setup(0, *args)
    kernel.potential = UnionPotential(kernel.potential, kernel.chain.rng_seed, world, batch)
    return trajectory(kernel, steps)


def trajectory(kernel: Any, steps: int) -> dict[str, Any]:
    params = kernel.initial_params
    zs, lps = [], []
    for _ in range(steps):
        params = kernel.sample(params)
        zs.append(torch.cat([params[k].reshape(-1) for k in sorted(params)]).clone())
        lps.append(kernel.chain.lp)
    out: dict[str, Any] = {"z": torch.stack(zs), "lp": torch.tensor(lps, dtype=torch.float64)}
    hooks = kernel.hooks
    if hooks is not None:
        out["stats"] = [(st.mean.clone(), st.var.clone(), st.batch_size) for _, st in hooks.pairs]
    return out


# ---------------------------------------------------------------------------------- modes
def mode_equivalence(out: Path, steps: str, batch: str, samplers: str = "sgld") -> None:
    from pyro_bnp.distributed import DataParallel, shard_range

    torch.set_default_dtype(torch.float64)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    results = {}
    for sampler in samplers.split(","):
        for name in PRECONDITIONERS if sampler == "sgld" else ("identity",):
            pyro.set_rng_seed(0)
            data = "shard" if sampler == "shard" else "full"
            kernel = DataParallel(
                equivalence_kernel(name, int(batch), "sgld" if data == "shard" else sampler),
                check_every=50,
                data=data,
            )
            args = equivalence_data(name)
            if data == "shard":  # this rank's rows only
                rows = slice(*shard_range(len(args[0]), rank, world))
                args = (args[0][rows], args[1][rows], *args[2:])
            kernel.setup(0, *args)
            results[f"{sampler}-{name}"] = trajectory(kernel, int(steps))
    if int(os.environ["RANK"]) == 0:
        torch.save(results, out / "equivalence.pt")


def mode_posterior(out: Path, num_samples: str, warmup: str) -> None:
    from sgld_models import badly_scaled_features, conjugate_linreg

    from pyro_bnp import SGLD
    from pyro_bnp.distributed import DataParallel

    x, y = badly_scaled_features(2000, scales=[0.7, 1.0, 1.4], means=[0.5, -0.5, 0.3])
    world = int(os.environ["WORLD_SIZE"])
    pyro.set_rng_seed(20261122)
    kernel = DataParallel(
        SGLD(
            conjugate_linreg,
            step_size=2e-5,
            preconditioner="identity",
            subsample_size={"data": 100 // world},
        )  # fmt: skip
    )
    kernel.setup(int(warmup), x, y, 10.0, 1.0)
    params = kernel.initial_params
    draws = []
    for i in range(int(warmup) + int(num_samples)):
        params = kernel.sample(params)
        if i >= int(warmup):
            draws.append(torch.cat([params["b"].reshape(1), params["w"]]))
    if int(os.environ["RANK"]) == 0:
        torch.save(torch.stack(draws)[None], out / "posterior.pt")


def mode_chains(out: Path, num_samples: str, store: str) -> None:
    from sgld_models import linreg, make_linreg_data

    from pyro_bnp import SGLD
    from pyro_bnp.distributed import run_chains

    x, y = make_linreg_data(300)
    pyro.set_rng_seed(3)
    kernel = SGLD(linreg, step_size=5e-4, preconditioner="identity", subsample_size={"data": 30})
    tree = run_chains(
        kernel,
        x,
        y,
        num_samples=int(num_samples),
        warmup_steps=100,
        directory=(out / "stores") if store == "store" else None,
        every=50,
    )
    if int(os.environ["RANK"]) == 0:
        tree.to_netcdf(out / "chains.nc")


def mode_store(out: Path, num_samples: str) -> None:
    from reliability_models import data, make_kernel

    from pyro_bnp.distributed import DataParallel, sample_to_store

    x, y = data()
    pyro.set_rng_seed(0)
    kernel = DataParallel(make_kernel(), check_every=20)
    sample_to_store(
        kernel, out, x, y, num_samples=int(num_samples), warmup_steps=20, every=10, load=False
    )
    print(f"rank {os.environ['RANK']} done", flush=True)


def mode_faults(out: Path) -> None:
    """Three faults in one launch; every rank records what it raised in ``faults-<rank>.json``.

    * drift: rank 1 nudges a parameter by 1e-5 -> DriftError on both at the next check;
    * error: rank 1 raises at its 5th gradient evaluation -> its own error there, RankFailure
      naming rank 1 on rank 0;
    * set-up: rank 1's data hold a NaN -> its ValueError there, RankFailure on rank 0.
    """
    import json

    from reliability_models import data, make_kernel

    from pyro_bnp.distributed import DataParallel

    rank = int(os.environ["RANK"])
    seen: dict[str, str] = {}
    x, y = data()
    kernel = DataParallel(make_kernel(), check_every=5)
    kernel.setup(0, x, y)
    params = kernel.initial_params
    try:
        for i in range(40):
            params = kernel.sample(params)
            if rank == 1 and i == 7:
                with torch.no_grad():
                    kernel.chain.z["fc1.bias"][0] += 1e-5
    except Exception as e:
        seen["drift"] = f"{type(e).__name__}: {e}"
    kernel.cleanup()

    kernel = DataParallel(make_kernel())
    kernel.setup(0, x, y)
    if rank == 1:
        inner = kernel.sharded.inner
        calls = {"n": 0}

        def broken(*args: Any, **kwargs: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 5:
                raise ZeroDivisionError("a bug in rank 1's model")
            return inner(*args, **kwargs)

        kernel.sharded.inner = _Callable(inner, broken)
    params = kernel.initial_params
    try:
        for _ in range(20):
            params = kernel.sample(params)
    except Exception as e:
        seen["error"] = f"{type(e).__name__}: {e}"
    kernel.cleanup()

    bad_x = x.clone()
    if rank == 1:
        bad_x[3, 1] = math.nan
    try:
        DataParallel(make_kernel()).setup(0, bad_x, y)
    except Exception as e:
        seen["setup"] = f"{type(e).__name__}: {e}"
    (out / f"faults-{rank}.json").write_text(json.dumps(seen))


class _Callable:
    def __init__(self, inner: Any, fn: Any) -> None:
        self.inner, self.fn = inner, fn

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def mode_suite(out: Path, steps: str, draws: str) -> None:
    """The default tests' launch: equivalence, faults and parallel chains in one start-up."""
    mode_equivalence(out, steps, "20", "sgld,sghmc,shard")
    torch.set_default_dtype(torch.float32)
    mode_faults(out)
    mode_chains(out, draws, "mcmc")


MODES = {
    "suite": mode_suite,
    "equivalence": mode_equivalence,
    "posterior": mode_posterior,
    "chains": mode_chains,
    "store": mode_store,
    "faults": mode_faults,
}

if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE))
    from pyro_bnp.distributed import init_process_group

    init_process_group("gloo", timeout_s=60.0)
    out_dir = Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        MODES[sys.argv[1]](out_dir, *sys.argv[3:])
    finally:
        import torch.distributed as tdist

        if tdist.is_initialized():
            tdist.destroy_process_group()
