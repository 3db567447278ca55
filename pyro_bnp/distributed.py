r"""Scale-out on :mod:`torch.distributed`: data-parallel chains and parallel chains.

Two ways to use several processes (ranks), launched for example with
``torchrun --nproc_per_node=2 script.py`` (gloo on CPU, NCCL on GPU; this module only calls
:mod:`torch.distributed` collectives, it has no communication layer of its own):

* :class:`DataParallel` wraps a kernel (:class:`~pyro_bnp.SGLD`, :class:`~pyro_bnp.SGHMC`) so
  that ``R`` ranks run **one** chain together. Each rank holds a shard of the rows of the
  subsampled plate and draws its own mini-batch from it; one all-reduce per gradient evaluation
  combines the log densities, the gradients and BNP's layer statistics, so every rank takes the
  same step from the same noise and the parameters stay identical on every rank. With ``B`` rows
  per rank the chain is exactly the one-process chain with ``R * B`` rows per update (up to
  floating-point rounding of the sums).
* :func:`run_chains` runs one independent chain per rank and gathers them on rank 0 into the
  ``chain`` dimension of :func:`pyro_bnp.arviz.from_pyro`'s DataTree (R-hat works unchanged).

:func:`sample_to_store` is :func:`pyro_bnp.store.sample_to_store` for a :class:`DataParallel`
kernel: rank 0 streams the draws and writes the checkpoint; every rank resumes from it.

**The estimate and its scaling.** Let rank ``r`` hold ``N_r`` of the ``N`` rows and draw
``B_r`` of them per update. Its potential is evaluated with the likelihood sites of the data plate
scaled by ``c_r = R N_r / S_r``, where ``S_r`` is the plate size its model sees (``S_r = N``
when every rank's model gets the full data, ``S_r = N_r`` when it gets only its shard); with the
plate's own factor ``S_r / B_r`` the likelihood of rank ``r``'s rows is weighted by
``R N_r / B_r``. Rank ``r``'s log density is therefore

.. math::

    \ell_r = \log p(\theta) + R \hat L_r, \qquad
    \hat L_r = \frac{N_r}{B_r} \sum_{i \in \text{batch}_r} \log p(y_i \mid \theta),

where ``L_hat_r`` is unbiased for rank ``r``'s part of the log-likelihood. The all-reduce sums
``ell_r`` and its gradient over the ranks and divides by ``R``:
``(1/R) sum_r ell_r = log p(theta) + sum_r L_hat_r``, an unbiased estimate of the full-data log
joint (the prior counted once). With equal shards (``N_r = N / R``) and full data on every rank,
``c_r = 1`` and nothing is rescaled: each rank's estimate is the usual ``(N / B)``-weighted one.

**The noise** is shared: the chain's generator gets the same seed on every rank (rank 0 draws
it from its global torch generator and broadcasts it), so every rank draws the same ``xi``. The
mini-batches come from a separate, per-rank stream: epoch ``e`` of rank ``r`` is a permutation of
its shard drawn from a generator seeded by ``(chain seed, r, e)``, cut into consecutive slices of
``B_r`` rows (rows left over at the end of an epoch are skipped, as in the one-process kernel).
Its whole state is the count of gradient evaluations, which is the same on every rank, so rank
0's checkpoint describes every rank.

**BNP's layer statistics** are combined in the same all-reduce. Each rank's forward pass
computes its batch mean ``mu_r`` and biased variance ``v_r`` over its ``n_r`` rows (``n_r`` =
rows x spatial positions per channel for a convolution). The ranks sum ``n_r``,
``n_r (mu_r - K)`` and ``n_r (v_r + (mu_r - K)^2)`` with a shift ``K`` that every rank knows
(the running mean before the update, or the pooled batch mean from a first all-reduce when there
is none yet), which gives the pooled mean and biased variance of all ``n = sum_r n_r`` rows
exactly (Chan et al.'s parallel formula, with little cancellation). They are then folded into the
running averages once, with the layer's ``rho``, and the layer's ``batch_size`` becomes the
pooled row count (BNP's ``q^2 = max(in / N, 1)`` sees the pooled batch). RMSprop's second
moments need no communication: they are computed from the all-reduced gradient, hence the same
on every rank, and its per-datum scale uses the full ``N``.

**Drift check.** Every ``check_every`` draws the ranks compare (one small all-reduce) the update
and draw counters, the sum and sum of squares of the parameters, a checksum of the noise
generator's state, the log density and the layer statistics; any difference raises
:class:`DriftError` on every rank.

**Faults.** A collective that fails (a rank died: gloo sees its socket close at once; a rank
hangs: the process group's timeout) raises :class:`RankFailure` naming the update. An exception
inside one rank's gradient evaluation is reported to the others through the same all-reduce, so
every rank stops with an error instead of waiting.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pyro.infer.mcmc.mcmc_kernel import MCMCKernel
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from torch import Tensor

from pyro_bnp.layers import LayerHooks, RunningInputStats
from pyro_bnp.potential import MinibatchPotential

__all__ = [
    "DataParallel",
    "DriftError",
    "RankFailure",
    "ShardedPotential",
    "init_process_group",
    "run_chains",
    "sample_to_store",
    "shard_indices",
    "shard_range",
]

_DATA_MODES = ("full", "shard")
#: gradients with at most this many entries travel in the one float64 buffer (see _reduce)
_PACK_LIMIT = 1 << 16
_PART = re.compile(r"^part-(\d{6})\.nc$")


class RankFailure(RuntimeError):
    """A collective with the other ranks failed, or another rank raised an error.

    Raised instead of hanging: another rank died (its socket closed), did not answer within the
    process group's timeout, or reported an exception of its own through the all-reduce.
    """


class DriftError(RuntimeError):
    """The ranks of a data-parallel chain no longer hold the same chain state."""


# ---------------------------------------------------------------------------------- helpers
def init_process_group(
    backend: str | None = None, timeout_s: float = 60.0, **kwargs: Any
) -> tuple[int, int]:
    """Initialise the default process group from ``torchrun``'s environment; return (rank, R).

    Parameters
    ----------
    backend : str, optional
        ``"gloo"`` or ``"nccl"``; default NCCL when CUDA is available, else gloo.
    timeout_s : float
        Seconds a collective waits for a rank that does not answer before it fails (then
        :class:`RankFailure`); a rank that *dies* is noticed at once by gloo.
    **kwargs
        Passed to :func:`torch.distributed.init_process_group` (``init_method``, ``rank``,
        ``world_size``, ...). Without them the ``env://`` variables are read (``MASTER_ADDR``,
        ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, as ``torchrun`` sets them).
    """
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(
            backend, timeout=datetime.timedelta(seconds=float(timeout_s)), **kwargs
        )
    return dist.get_rank(), dist.get_world_size()


def shard_range(num_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``rank``'s contiguous shard of ``num_rows`` rows.

    The ``R = world_size`` shards are consecutive blocks whose sizes differ by at most one (the
    first ``num_rows % R`` ranks get one row more). Cut a rank's data with it when each rank
    loads only its rows (``DataParallel(..., data="shard")``).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    base, extra = divmod(int(num_rows), int(world_size))
    start = rank * base + min(rank, extra)
    return start, start + base + int(rank < extra)


def shard_indices(
    seed: int, rank: int, shard: tuple[int, int], batch_size: int, evaluation: int
) -> Tensor:
    """Rows that rank ``rank`` feeds its plate at gradient evaluation ``evaluation`` (0-based).

    ``shard = (start, stop)`` are the rank's rows (:func:`shard_range`). Epoch
    ``e = evaluation // m`` (``m = (stop - start) // batch_size`` batches per epoch) is a
    permutation of the shard drawn from a generator seeded by ``(seed, rank, e)``; the batch is
    its slice ``evaluation % m``, offset by ``start``. :class:`ShardedPotential` feeds exactly
    these rows (it caches the epoch's permutation).
    """
    return _epoch_perm(seed, rank, shard, evaluation // _per_epoch(shard, batch_size))[
        _slot(shard, batch_size, evaluation)
    ]


def _per_epoch(shard: tuple[int, int], batch_size: int) -> int:
    return (shard[1] - shard[0]) // batch_size


def _slot(shard: tuple[int, int], batch_size: int, evaluation: int) -> slice:
    at = (evaluation % _per_epoch(shard, batch_size)) * batch_size
    return slice(at, at + batch_size)


def _epoch_perm(seed: int, rank: int, shard: tuple[int, int], epoch: int) -> Tensor:
    g = torch.Generator().manual_seed(_seed_for(seed, rank, epoch))
    return torch.randperm(shard[1] - shard[0], generator=g) + shard[0]


def _seed_for(*parts: int) -> int:
    """Return a 63-bit seed made from integers (stable across processes and Python versions)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _group_info(group: Any) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "pyro_bnp.distributed needs an initialised torch.distributed process group: call "
            "pyro_bnp.distributed.init_process_group() (e.g. under torchrun) first"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def _src0(group: Any) -> int:
    """Return the global rank of the group's rank 0 (what ``src=`` of a broadcast wants)."""
    return 0 if group is None else dist.get_global_rank(group, 0)


def _device_of(group: Any) -> torch.device:
    """Where this backend's buffers live: CUDA for NCCL, the CPU otherwise."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def _collective(what: str, rank: int, world: int) -> Iterator[None]:
    """Turn a failed collective into :class:`RankFailure` with a message that says what to do."""
    try:
        yield
    except RankFailure:
        raise
    except RuntimeError as e:  # gloo/NCCL errors (DistBackendError is a RuntimeError)
        raise RankFailure(
            f"pyro_bnp.distributed: rank {rank} of {world}: {what} failed: another rank died, "
            "was killed or did not answer within the process group's timeout. Every rank stops "
            "here; the run can be resumed from its last checkpoint (pyro_bnp.distributed."
            f"sample_to_store with the same directory). Cause: {str(e)[:400]}"
        ) from e


def _agree(ok: bool, what: str, group: Any) -> None:
    """All ranks learn whether every rank succeeded at ``what``; raise on the others if not."""
    rank, world = _group_info(group)
    flags = torch.zeros(world, dtype=torch.float64, device=_device_of(group))
    flags[rank] = 0.0 if ok else 1.0
    with _collective(what, rank, world):
        dist.all_reduce(flags, group=group)
    bad = [r for r in range(world) if flags[r].item() != 0.0]
    if bad and ok:
        raise RankFailure(
            f"pyro_bnp.distributed: rank {rank}: rank(s) {bad} raised an error in {what} (see "
            "their output); every rank stops"
        )


# ---------------------------------------------------------------------------- the potential
class _ScalePlate(Messenger):
    """Multiply the scale of every sample site inside plate ``name`` by ``factor``."""

    def __init__(self, name: str, factor: float) -> None:
        super().__init__()
        self.name, self.factor = name, float(factor)

    def _pyro_sample(self, msg: Any) -> None:
        if isinstance(msg["fn"], _Subsample):
            return
        if any(f.name == self.name for f in msg["cond_indep_stack"]):
            msg["scale"] = self.factor * msg["scale"]


class ShardedPotential:
    r"""A :class:`~pyro_bnp.potential.MinibatchPotential` for one rank of a data-parallel chain.

    Feeds the plate ``plate`` with mini-batches of this rank's shard and returns the all-reduced
    log density and gradient (the module docstring gives the scaling): ``lp = (1/R) sum_r
    ell_r`` and ``grads = (1/R) sum_r grad(-ell_r)``, with the likelihood of rank ``r``'s rows
    weighted by ``R N_r / B_r``. BNP's layer statistics are pooled over the ranks' batches in
    the same all-reduce. Every other attribute is the wrapped potential's, except
    :attr:`num_data`, which is the full ``N`` (RMSprop's per-datum convention).

    Parameters
    ----------
    inner : MinibatchPotential
        The rank's own potential (made by the kernel's ``setup``).
    plate : str
        The subsampled plate whose rows are sharded.
    seed : int
        The chain's seed (the same on every rank); with the rank it seeds the index stream.
    data : {"full", "shard"}
        ``"full"``: the model's arguments hold all ``N`` rows on every rank (the plate has ``N``
        rows; this rank reads only the rows of its :func:`shard_range`); ``"shard"``: they hold
        only this rank's rows (the plate has ``N_r`` rows) and ``N`` is their sum over ranks.
    group : ProcessGroup, optional
        The ranks of this chain (default: all).
    """

    def __init__(
        self,
        inner: MinibatchPotential,
        plate: str,
        seed: int,
        *,
        data: str = "full",
        group: Any = None,
    ) -> None:
        self.inner, self.plate, self.seed, self.group = inner, plate, int(seed), group
        self.rank, self.world_size = _group_info(group)
        self.device = _device_of(group)
        size, batch = inner.plates[plate]
        counts = torch.tensor([size, -size], dtype=torch.float64, device=self.device)
        with _collective("the plate size exchange at set-up", self.rank, self.world_size):
            if data == "full":
                dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=group)
            else:
                counts = torch.tensor([size, 0.0], dtype=torch.float64, device=self.device)
                dist.all_reduce(counts, group=group)
        if data == "full":
            if counts[0].item() != -counts[1].item():
                raise ValueError(
                    f"DataParallel(data='full'): the plate {plate!r} has different sizes on the "
                    f"ranks (here {size}); give every rank the full data, or use data='shard'"
                )
            total = size
            start, stop = shard_range(size, self.rank, self.world_size)
            self.offset, self.shard_size = start, stop - start
        else:
            total = int(counts[0].item())
            self.offset, self.shard_size = 0, size
        if batch > self.shard_size:
            raise ValueError(
                f"DataParallel: subsample_size[{plate!r}]={batch} rows per rank is larger than "
                f"this rank's shard of {self.shard_size} rows (N = {total}, {self.world_size} "
                "ranks)"
            )
        self.batch_size = batch
        self.total_size = total
        #: this rank's rows ``[start, stop)`` as the model indexes them
        self.shard = (self.offset, self.offset + self.shard_size)
        #: ``c_r = R N_r / S_r``: the factor on the likelihood of this rank's rows
        self.factor = self.world_size * self.shard_size / size
        #: ``N``, the full data count (the wrapped potential's count times ``N / S_r``)
        self.num_data = inner.num_data * total / size
        #: gradient evaluations so far: the whole state of the index stream
        self.evaluations = 0
        self._epoch = -1
        self._perm: Tensor | None = None

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.inner, name)

    # ------------------------------------------------------------------ indices
    def next_indices(
        self,
        perms: dict[str, Tensor],
        pos: dict[str, int],
        generator: torch.Generator | None,
    ) -> dict[str, Tensor]:
        """Return this rank's next mini-batch (``perms`` and ``pos`` are unused).

        Evaluation ``k`` feeds :func:`shard_indices` ``(seed, rank, shard, B_r, k)``; the
        chain's shared generator is not touched, so the noise stays the same on every rank; its
        device is where the indices are returned (the parameters' device).
        """
        shard, b, k = self.shard, self.batch_size, self.evaluations
        epoch = k // _per_epoch(shard, b)
        self.evaluations += 1
        if epoch != self._epoch or self._perm is None:
            perm = _epoch_perm(self.seed, self.rank, shard, epoch)  # drawn on the CPU: the
            # same rows on every device; moved once per epoch to where the chain draws its noise
            self._perm = perm if generator is None else perm.to(generator.device)
            self._epoch = epoch
        return {self.plate: self._perm[_slot(shard, b, k)]}

    # ------------------------------------------------------------------ evaluation
    def __call__(
        self,
        z: Mapping[str, Tensor],
        indices: Mapping[str, Tensor] | None = None,
        *,
        norms: Mapping[str, float] | None = None,
        hooks: LayerHooks | None = None,
        snapshot: list[tuple[Any, ...]] | None = None,
    ) -> tuple[float, dict[str, Tensor]]:
        """All-reduced mini-batch log joint and ``grad U_hat`` (see the class docstring).

        Raises
        ------
        RankFailure
            If a collective fails or another rank raised during its evaluation (this rank's own
            exception is re-raised here unchanged).
        """
        if indices is None:
            indices = self.next_indices({}, {}, None)
        live = [st for _, st in hooks.pairs if not st.frozen] if hooks is not None else []
        for st in live:
            if not isinstance(st, RunningInputStats):
                raise TypeError("DataParallel: layer statistics must be RunningInputStats")
        before = [(st.mean, st.var, st.num_batches, st.rho) for st in live]
        error: BaseException | None = None
        code = 0.0
        lp: float = math.nan
        grads: dict[str, Tensor] = {}
        try:
            # rho = 0 while this rank's forward pass runs: the statistics then hold this rank's
            # batch mean and variance exactly (lerp(old, b, 1) = b, addmv with beta = 0 ignores
            # old), which are pooled over the ranks and folded in with the real rho below.
            for st in live:
                st.rho = 0.0
            scale = (
                _ScalePlate(self.plate, self.factor)
                if self.factor != 1.0
                else contextlib.nullcontext()
            )
            with scale:
                lp, grads = self.inner(z, indices, norms=norms, hooks=hooks, snapshot=snapshot)
            for st, (_, _, n0, _) in zip(live, before, strict=True):
                if st.num_batches > n0 + 1:
                    code = 2.0
        except Exception as e:  # reported to the other ranks, then re-raised here
            error, code = e, 1.0
        finally:
            for st, (_, _, _, rho) in zip(live, before, strict=True):
                st.rho = rho
        lp_out, grads_out, pooled = self._reduce(z, lp, grads, live, before, code)
        if error is not None:
            raise error
        if pooled is not None:
            bad = [r for r, c in enumerate(pooled["codes"]) if c != 0.0]
            if bad:
                if 2.0 in pooled["codes"]:
                    raise ValueError(
                        "DataParallel: a layer with BNP statistics ran more than once in one "
                        "forward pass (a shared layer); its statistics cannot be pooled across "
                        "ranks"
                    )
                raise RankFailure(
                    f"pyro_bnp.distributed: rank {self.rank}: rank(s) {bad} raised an error in "
                    "their gradient evaluation (see their output); every rank stops"
                )
            self._fold(live, before, pooled)
        return lp_out, grads_out

    def _reduce(
        self,
        z: Mapping[str, Tensor],
        lp: float,
        grads: Mapping[str, Tensor],
        live: Sequence[RunningInputStats],
        before: Sequence[tuple[Tensor, Tensor, int, float]],
        code: float,
    ) -> tuple[float, dict[str, Tensor], dict[str, Any] | None]:
        """All-reduce lp, gradients, statistics and error codes; return the averages.

        Small models (at most ``_PACK_LIMIT`` gradient entries) send everything in one float64
        buffer (one latency; float32 gradients are converted exactly and the average is rounded
        back once); larger ones send their gradients in their own dtype (half the bytes of
        float64 for float32), one buffer per dtype, concurrently with the small buffer.
        """
        rank, world = self.rank, self.world_size
        names = sorted(z)
        failed = code == 1.0
        # small float64 buffer: [lp, error codes (R), per live layer: n, S1 (F), S2 (F)]
        shifts = self._shifts(live, before, failed)
        small = [
            torch.tensor([0.0 if failed else lp], dtype=torch.float64),
            torch.zeros(world, dtype=torch.float64),
        ]
        small[1][rank] = code
        for st, (_, _, n0, _), shift in zip(live, before, shifts, strict=True):
            small.extend(self._moments(st, n0, shift, failed))
        head = sum(t.numel() for t in small)
        # gradients: a failed rank sends zeros of the right shapes
        total = sum(z[k].numel() for k in names)
        packed = total <= _PACK_LIMIT and self.device.type == "cpu"
        by_dtype: dict[torch.dtype, list[str]] = {}
        for k in names:
            by_dtype.setdefault(torch.float64 if packed else z[k].dtype, []).append(k)
        flats: dict[torch.dtype, Tensor] = {}
        for dtype, keys in by_dtype.items():
            if failed:
                n = sum(z[k].numel() for k in keys)
                flats[dtype] = torch.zeros(n, dtype=dtype, device=self.device)
            else:
                flats[dtype] = torch.cat([grads[k].reshape(-1).to(dtype) for k in keys]).to(
                    self.device
                )
        if packed:
            buf = torch.cat([*small, *flats.values()])
            reduced = [buf]
        else:
            buf = torch.cat(small).to(self.device)
            reduced = [buf, *flats.values()]
        with _collective(f"the all-reduce of gradient evaluation {self.evaluations}", rank, world):
            works = [dist.all_reduce(t, group=self.group, async_op=True) for t in reduced]
            for w in works:
                w.wait()
        if packed:
            flats = {torch.float64: buf[head:]}
        buf = buf.cpu()
        codes = buf[1 : 1 + world].tolist()
        inv = 1.0 / world
        out: dict[str, Tensor] = {}
        for dtype, keys in by_dtype.items():
            flat = flats[dtype].to(z[keys[0]].device).mul_(inv)
            at = 0
            for k in keys:
                n = z[k].numel()
                out[k] = flat[at : at + n].view(z[k].shape).to(z[k].dtype)
                at += n
        pooled: dict[str, Any] = {"codes": codes, "layers": []}
        at = 1 + world
        for st, shift in zip(live, shifts, strict=True):
            f = st.num_features
            count = float(buf[at].item())
            s1, s2 = buf[at + 1 : at + 1 + f], buf[at + 1 + f : at + 1 + 2 * f]
            pooled["layers"].append((count, s1, s2, shift))
            at += 1 + 2 * f
        return float(buf[0].item()) * inv, out, pooled

    def _shifts(
        self,
        live: Sequence[RunningInputStats],
        before: Sequence[tuple[Tensor, Tensor, int, float]],
        failed: bool,
    ) -> list[Tensor]:
        """Return the shift ``K`` per layer: the running mean, or the pooled batch mean if none yet.

        Identical on every rank (the running means are; the pooled mean is all-reduced).
        """
        first = [i for i, (_, _, n0, _) in enumerate(before) if n0 == 0]
        shifts = [b[0].detach().to(torch.float64).cpu() for b in before]
        if not first:
            return shifts
        parts = []
        for i in first:
            st, n0 = live[i], before[i][2]
            n = 0.0 if failed else self._count(st, n0)
            mean = st.mean.detach().to(torch.float64).cpu() if n > 0 else torch.zeros(0)
            parts.append(torch.tensor([n], dtype=torch.float64))
            parts.append(mean * n if n > 0 else torch.zeros(st.num_features, dtype=torch.float64))
        buf = torch.cat(parts).to(self.device)
        with _collective(
            "the all-reduce of the first layer statistics", self.rank, self.world_size
        ):
            dist.all_reduce(buf, group=self.group)
        buf = buf.cpu()
        at = 0
        for i in first:
            f = live[i].num_features
            n = buf[at].item()
            shifts[i] = (
                buf[at + 1 : at + 1 + f] / n if n > 0 else torch.zeros(f, dtype=torch.float64)
            )
            at += 1 + f
        return shifts

    @staticmethod
    def _count(st: RunningInputStats, n0: int) -> float:
        """Values per feature this rank's forward pass gave ``st`` (0: none, or skipped)."""
        if st.num_batches != n0 + 1:
            return 0.0
        return float(st.batch_size * st.spatial_size)

    def _moments(self, st: RunningInputStats, n0: int, shift: Tensor, failed: bool) -> list[Tensor]:
        """``[n_r], n_r (mu_r - K), n_r (v_r + (mu_r - K)^2)`` of this rank's batch (float64)."""
        f = st.num_features
        n = 0.0 if failed else self._count(st, n0)
        if n == 0.0:
            return [torch.zeros(1, dtype=torch.float64), torch.zeros(2 * f, dtype=torch.float64)]
        d = st.mean.detach().to(torch.float64).cpu() - shift
        # one value per feature: no within-batch variance (the one-row rule is applied to the
        # pooled batch in _fold, if it has a single row)
        within = st.var.detach().to(torch.float64).cpu() if n > 1 else torch.zeros(f).double()
        return [
            torch.tensor([n], dtype=torch.float64),
            torch.cat([d * n, (within + d.square()) * n]),
        ]

    def _fold(
        self,
        live: Sequence[RunningInputStats],
        before: Sequence[tuple[Tensor, Tensor, int, float]],
        pooled: Mapping[str, Any],
    ) -> None:
        r"""Fold the pooled batch statistics into every layer's running averages.

        ``mu = K + S1 / n``, ``v = S2 / n - (S1 / n)^2`` (the biased variance of all ``n``
        values; for ``n = 1`` the one-row rule ``(h - mu_old)^2``), then
        ``mean <- lerp(mean, mu, 1 - rho)``, ``var <- lerp(var, v, 1 - rho)`` (or set to them
        for the first batch with ``init="batch"``), as :meth:`RunningInputStats.observe` does.
        New tensors replace the old ones (a rejected proposal is undone by the kernel's
        snapshot).
        """
        for st, (mean0, var0, n0, rho), (n, s1, s2, shift) in zip(
            live, before, pooled["layers"], strict=True
        ):
            if n <= 0:
                continue  # no rank observed this layer (or every batch was skipped)
            mu = shift + s1 / n
            if n == 1.0:
                var_b = (mu - mean0.detach().to(torch.float64).cpu()).square()
            else:
                var_b = (s2 / n - (s1 / n).square()).clamp_min_(0.0)
            dtype = st.mean.dtype if st.num_batches == n0 + 1 else mean0.dtype
            device = mean0.device
            mu_t = mu.to(dtype=dtype, device=device)
            var_t = var_b.to(dtype=dtype, device=device)
            if n0 > 0 or st.init != "batch":
                w = 1.0 - rho
                old_m = mean0.detach().to(dtype=dtype, device=device)
                old_v = var0.detach().to(dtype=dtype, device=device)
                mu_t, var_t = torch.lerp(old_m, mu_t, w), torch.lerp(old_v, var_t, w)
            spatial = st.spatial_size if st.num_batches == n0 + 1 else 1
            st.mean, st.var = mu_t, var_t
            st.spatial_size = int(spatial)
            st.batch_size = int(round(n / max(spatial, 1)))
            st.num_batches = n0 + 1

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        """Return the index stream's state: the evaluation count, and the layout (checked)."""
        return {
            "evaluations": self.evaluations,
            "world_size": self.world_size,
            "plate": self.plate,
            "total_size": self.total_size,
        }


# ------------------------------------------------------------------------------- the kernel
class DataParallel(MCMCKernel):
    r"""Run one chain of ``kernel`` on all ranks of a process group, data-parallel.

    Every rank builds the same model and kernel and calls this wrapper as it would call the
    kernel (``pyro.infer.MCMC(DataParallel(kernel), ...)``, :func:`sample_to_store`). At
    :meth:`setup` rank 0 draws the chain's seed from its global torch generator and broadcasts it;
    every rank then sets the kernel up under that seed (in a forked RNG: the global generator is
    left alone), so initial values and the noise generator agree, and checks that they do. The
    kernel's potential is replaced by a :class:`ShardedPotential`; the update equations,
    preconditioners, guards and checkpoints are the kernel's own. The resulting chain targets the
    same posterior as the one-process kernel, with ``R * B`` rows per gradient (``B`` the
    kernel's ``subsample_size``, per rank); the module docstring gives every scaling.

    Parameters
    ----------
    kernel : pyro_bnp.SGLD or pyro_bnp.SGHMC
        The kernel, built as usual with ``subsample_size={plate: B}`` (``B`` rows per rank).
    plate : str, optional
        The plate whose rows are sharded; default: the kernel's only fed plate.
    data : {"full", "shard"}
        ``"full"`` (default): every rank's model arguments hold all rows (memory-mapped data
        are read only where indexed); ``"shard"``: each rank was given only its rows, e.g.
        ``x[slice(*shard_range(len(x), rank, R))]``.
    check_every : int or None
        Compare the ranks' chain states every this many draws (:class:`DriftError` if they
        differ); None switches it off.
    group : ProcessGroup, optional
        The ranks of this chain (default: all).

    Raises
    ------
    ValueError
        At :meth:`setup`, if the kernel does not feed exactly the sharded plate (or the model
        subsamples a plate itself), or a rank's batch is larger than its shard.
    """

    def __init__(
        self,
        kernel: Any,
        *,
        plate: str | None = None,
        data: str = "full",
        check_every: int | None = 100,
        group: Any = None,
    ) -> None:
        if data not in _DATA_MODES:
            raise ValueError(f"DataParallel: data must be one of {_DATA_MODES}, got {data!r}")
        if check_every is not None and (
            isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1
        ):
            raise ValueError(
                f"DataParallel: check_every must be a positive int or None, got {check_every!r}"
            )
        for method in ("setup", "sample", "state_dict", "load_state_dict"):
            if not callable(getattr(kernel, method, None)):
                raise ValueError(f"DataParallel: kernel must be a pyro_bnp kernel, got {kernel!r}")
        self.kernel = kernel
        self.plate = plate
        self.data = data
        self.check_every = check_every
        self.group = group
        self._resume: dict[str, Any] | None = None
        self.sharded: ShardedPotential | None = None

    # ------------------------------------------------------------------ delegation
    def __getattr__(self, name: str) -> Any:
        if name == "kernel":
            raise AttributeError(name)
        return getattr(self.kernel, name)

    @property
    def initial_params(self) -> dict[str, Tensor]:
        """The kernel's initial parameters (the same on every rank after :meth:`setup`)."""
        return self.kernel.initial_params

    @initial_params.setter
    def initial_params(self, params: Mapping[str, Tensor] | None) -> None:
        self.kernel.initial_params = params

    @property
    def rank(self) -> int:
        """Rank of this process in the chain's group."""
        return _group_info(self.group)[0]

    @property
    def world_size(self) -> int:
        """Number of ranks ``R`` running the chain."""
        return _group_info(self.group)[1]

    def logging(self) -> Any:
        """Return the kernel's progress bar fields."""
        return self.kernel.logging()

    def diagnostics(self) -> dict[str, Any]:
        """Return the kernel's diagnostics (the same on every rank)."""
        return self.kernel.diagnostics()

    def cleanup(self) -> None:
        """Clean the kernel up (removes its layer hooks)."""
        self.kernel.cleanup()

    def end_warmup(self) -> None:
        """Nothing to do (the kernel freezes its preconditioner itself)."""

    def config(self) -> dict[str, Any]:
        """Return the kernel's settings plus the data-parallel layout."""
        out = dict(self.kernel.config())
        out["data_parallel"] = {"world_size": self.world_size, "data": self.data}
        return out

    # ------------------------------------------------------------------ set-up
    def setup(self, warmup_steps: int, *args: Any, **kwargs: Any) -> None:
        """Set the kernel up on every rank under one seed and shard its plate.

        Raises
        ------
        RankFailure
            If another rank failed in its set-up (this rank's own error is raised unchanged).
        ValueError
            See the class docstring.
        DriftError
            If the ranks' initial states differ (different data, model or ``initial_params``).
        """
        rank, world = _group_info(self.group)
        device = _device_of(self.group)
        resume, self._resume = self._resume, None
        seed = torch.zeros(1, dtype=torch.int64, device=device)
        if rank == 0:
            seed[0] = int(torch.randint(0, 2**62, ()).item())
        with _collective("the seed broadcast at set-up", rank, world):
            dist.broadcast(seed, src=_src0(self.group), group=self.group)
        try:
            if resume is not None:
                self.kernel.load_state_dict(resume)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed.item()))
                self.kernel.setup(warmup_steps, *args, **kwargs)
            pot = self.kernel.potential
            plate = self._check_plates(pot)
        except Exception:
            _agree(False, "set-up", self.group)
            raise
        _agree(True, "set-up", self.group)
        try:  # every rank reaches the one collective in ShardedPotential(...)
            sharded = ShardedPotential(
                pot, plate, self.kernel.chain.rng_seed, data=self.data, group=self.group
            )
            if resume is not None and "distributed" in resume:
                saved = resume["distributed"]
                if saved["world_size"] != world or saved["plate"] != plate:
                    raise ValueError(
                        f"DataParallel: the checkpoint was written by {saved['world_size']} "
                        f"ranks sharding plate {saved['plate']!r}; resume with the same layout "
                        f"(here {world} ranks, plate {plate!r})"
                    )
                sharded.evaluations = int(saved["evaluations"])
        except Exception:
            _agree(False, "set-up", self.group)
            raise
        _agree(True, "set-up", self.group)
        self.kernel.potential = self.sharded = sharded
        self.check("set-up")

    def _check_plates(self, pot: MinibatchPotential) -> str:
        if pot.own_plates:
            raise ValueError(
                f"DataParallel: the model subsamples plate(s) {sorted(pot.own_plates)} itself; "
                "let the kernel feed them (subsample_size={plate: B}) so that the ranks agree"
            )
        fed = sorted(pot.plates)
        plate = self.plate if self.plate is not None else (fed[0] if len(fed) == 1 else None)
        if plate is None or fed != [plate]:
            raise ValueError(
                "DataParallel needs the kernel to feed exactly one plate, the sharded one "
                f"(subsample_size={{plate: B}}); it feeds {fed}"
                + ("" if self.plate is None else f", asked to shard {self.plate!r}")
            )
        return plate

    # ------------------------------------------------------------------ sampling
    def sample(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """Run the kernel's :meth:`~pyro_bnp.SGLD.sample` (collective), then the drift check."""
        if self.sharded is None:
            raise RuntimeError("DataParallel.sample() called before setup()")
        out = self.kernel.sample(params)
        chain = self.kernel.chain
        if self.check_every is not None and chain.draw % self.check_every == 0:
            self.check(f"draw {chain.draw}")
        return out

    def checksum(self) -> Tensor:
        """Return the values the drift check compares (float64; identical on every rank).

        Update and draw counters, index-stream position, the sum and sum of squares of every
        site's value, a checksum of the noise generator's state, the cached log density, and the
        sums of every layer's running mean and variance.
        """
        chain = self.kernel.chain
        values = [float(chain.t), float(chain.draw)]
        values.append(float(self.sharded.evaluations) if self.sharded is not None else 0.0)
        for k in sorted(chain.z):
            v = chain.z[k].detach().to(torch.float64)
            values += [float(v.sum()), float(v.square().sum())]
        state = chain.rng.get_state().to(torch.float64)
        values.append(float((state * torch.arange(1, state.numel() + 1).double()).sum()))
        values.append(float(chain.lp) if chain.started else 0.0)
        hooks = self.kernel.hooks
        for _, st in hooks.pairs if hooks is not None else ():
            values += [float(st.mean.double().sum()), float(st.var.double().sum())]
        return torch.tensor(values, dtype=torch.float64)

    def check(self, where: str = "") -> None:
        """Compare the ranks' chain states now (one all-reduce of a few numbers).

        Raises
        ------
        DriftError
            On every rank, if some rank's state differs from another's.
        """
        rank, world = _group_info(self.group)
        c = self.checksum()
        c = torch.where(torch.isnan(c), torch.full_like(c, math.inf), c)  # nan == nan here
        buf = torch.cat([c, -c]).to(_device_of(self.group))
        with _collective(f"the drift check at {where}", rank, world):
            dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=self.group)
        buf = buf.cpu()
        hi, lo = buf[: len(c)], -buf[len(c) :]
        if not torch.equal(hi, lo):
            which = [int(i) for i in torch.nonzero(hi != lo).reshape(-1)]
            raise DriftError(
                f"pyro_bnp.distributed: rank {rank}: the {world} ranks of the data-parallel "
                f"chain no longer hold the same state at {where} (checksum entries {which} "
                "differ: 0 update, 1 draw, 2 evaluations, then per site sum and sum of squares, "
                "the noise generator, lp, layer statistics). Causes: a model with randomness of "
                "its own, different data or initial values on the ranks, or non-deterministic "
                "kernels on a GPU"
            )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Return the kernel's state plus the index stream's (``"distributed"``); no collective.

        Every rank's state is the same apart from the rank itself, so rank 0's checkpoint
        continues every rank (:meth:`load_state_dict` on each).
        """
        state = dict(self.kernel.state_dict())
        if self.sharded is not None:
            state["distributed"] = self.sharded.state()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict` (applied at the next :meth:`setup`)."""
        if not isinstance(state, Mapping):
            raise ValueError("DataParallel.load_state_dict: not a state_dict")
        self._resume = dict(state)


# ------------------------------------------------------------------------------ the store
def sample_to_store(
    kernel: DataParallel,
    directory: str | Path,
    *args: Any,
    num_samples: int,
    warmup_steps: int = 0,
    every: int = 100,
    progress: bool = False,
    load: bool = True,
    **kwargs: Any,
) -> Any:
    """:func:`pyro_bnp.store.sample_to_store` for a data-parallel chain (call it on every rank).

    Rank 0 streams the draws (identical on every rank) to ``directory`` and writes the
    checkpoints; the other ranks write nothing. A run continues from rank 0's checkpoint: rank 0
    reads it and broadcasts it, every rank loads it (the index streams are a function of the
    evaluation count it holds), so killing any rank and starting all of them again continues
    the chain exactly.

    Returns
    -------
    xarray.DataTree or None
        On rank 0 the store read back (if ``load``); None on the other ranks.
    """
    from pyro_bnp import store as core_store

    if not isinstance(kernel, DataParallel):
        raise ValueError("distributed.sample_to_store needs a DataParallel kernel")
    rank, world = _group_info(kernel.group)
    directory = Path(directory)
    saved: list[Any] = [None]
    if rank == 0:
        ckpt = directory / "checkpoint.pt"
        saved[0] = torch.load(ckpt, weights_only=False) if ckpt.exists() else None
    with _collective("the checkpoint broadcast", rank, world):
        dist.broadcast_object_list(saved, src=_src0(kernel.group), group=kernel.group)
    if rank == 0:
        return core_store.sample_to_store(
            kernel,
            directory,
            *args,
            num_samples=num_samples,
            warmup_steps=warmup_steps,
            every=every,
            progress=progress,
            load=load,
            **kwargs,
        )
    # the other ranks: the same calls as the store's loop, without writing anything
    state = saved[0]
    stored, warmup_done = 0, 0
    if state is not None:
        stored, warmup_done = int(state["stored"]), int(state["warmup_done"])
        kernel.load_state_dict(state["kernel"])
    remaining_warmup = max(warmup_steps - warmup_done, 0)
    remaining = max(num_samples - stored, 0)
    if remaining_warmup + remaining > 0:
        kernel.setup(remaining_warmup, *args, **kwargs)
        try:
            params = kernel.initial_params
            for _ in range(remaining_warmup + remaining):
                params = kernel.sample(params)
        finally:
            kernel.cleanup()
    return None


# ---------------------------------------------------------------------- parallel chains
def _read_parts(directory: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Draws and per-draw statistics of a store's part files (one chain)."""
    import xarray as xr

    parts = sorted(p for p in directory.iterdir() if _PART.match(p.name))
    if not parts:
        raise ValueError(f"no draws stored in {directory}")
    datasets = []
    for p in parts:
        with xr.open_dataset(p, engine="h5netcdf") as ds:
            datasets.append(ds.load())
    ds = xr.concat(datasets, dim="draw", data_vars="minimal", coords="minimal", compat="override")
    samples: dict[str, np.ndarray] = {}
    stats: dict[str, Any] = {}
    for name, var in ds.data_vars.items():
        key = str(name)
        if key.startswith("sample_stats__"):
            stats[key[len("sample_stats__") :]] = var.values.tolist()
        else:
            samples[key] = var.values
    if "diverging" in stats:
        stats["diverging"] = [bool(d) for d in stats["diverging"]]
        stats["divergences"] = [i for i, d in enumerate(stats["diverging"]) if d]
    return samples, stats


def run_chains(
    kernel: Any,
    *args: Any,
    num_samples: int,
    warmup_steps: int = 0,
    directory: str | Path | None = None,
    every: int = 100,
    group: Any = None,
    progress: bool = False,
    export: bool = True,
    **kwargs: Any,
) -> Any:
    """Run one chain per rank and gather them on rank 0 (call it on every rank).

    Rank 0 draws a base seed from its global torch generator and broadcasts it; rank ``r``'s
    chain is set up under a seed derived from ``(base, r)`` (in a forked RNG), so the chains
    differ and the run is reproducible from rank 0's seed. With ``directory`` each rank streams
    its chain to its own store ``directory/chain-<r>`` (:func:`pyro_bnp.store.sample_to_store`:
    checkpoints, exact resume of every chain); without, it runs :class:`pyro.infer.MCMC`.

    Parameters
    ----------
    kernel : pyro_bnp.SGLD or pyro_bnp.SGHMC
        This rank's kernel (one chain).
    *args, **kwargs
        The model's arguments.
    num_samples, warmup_steps : int
        Per chain.
    directory : str or Path, optional
        Where the per-rank stores go (a shared file system is not needed: each rank reads its
        own store back and sends the draws to rank 0).
    every : int
        Draws per flush and checkpoint of the stores.
    group : ProcessGroup, optional
        The ranks (default: all).
    progress : bool
        Show each rank's progress bar.
    export : bool
        On rank 0, build the DataTree (with the pointwise log-likelihood on the full data);
        False returns the gathered ``(samples, diagnostics)`` instead.

    Returns
    -------
    xarray.DataTree, tuple or None
        On rank 0: :func:`pyro_bnp.arviz.from_pyro` of the gathered chains (the ``chain``
        dimension has one entry per rank, in rank order), or ``(samples, diagnostics)`` with
        samples shaped ``(chain, draw, ...)`` (constrained) if not ``export``. None on the
        other ranks.

    Raises
    ------
    RankFailure
        If another rank failed (this rank's own error is raised unchanged).
    """
    from pyro.infer import MCMC

    from pyro_bnp import store as core_store

    rank, world = _group_info(group)
    device = _device_of(group)
    base = torch.zeros(1, dtype=torch.int64, device=device)
    if rank == 0:
        base[0] = int(torch.randint(0, 2**62, ()).item())
    with _collective("the seed broadcast", rank, world):
        dist.broadcast(base, src=_src0(group), group=group)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed_for(int(base.item()), rank))
            if directory is not None:
                path = Path(directory) / f"chain-{rank}"
                core_store.sample_to_store(
                    kernel,
                    path,
                    *args,
                    num_samples=num_samples,
                    warmup_steps=warmup_steps,
                    every=every,
                    progress=progress,
                    load=False,
                    **kwargs,
                )
                samples, diag = _read_parts(path)
            else:
                mcmc = MCMC(
                    kernel,
                    num_samples=num_samples,
                    warmup_steps=warmup_steps,
                    disable_progbar=not progress,
                )
                mcmc.run(*args, **kwargs)
                drawn = mcmc.get_samples(group_by_chain=True)
                samples = {k: v[0].detach().cpu().numpy() for k, v in drawn.items()}
                diag = kernel.diagnostics()
    except Exception:
        _agree(False, "its chain", group)
        raise
    _agree(True, "its chain", group)
    gathered: list[Any] = [None] * world if rank == 0 else []
    with _collective("the gather of the chains", rank, world):
        dist.gather_object(
            (samples, diag), gathered if rank == 0 else None, dst=_src0(group), group=group
        )
    if rank != 0:
        return None
    length = min(len(next(iter(s.values()))) for s, _ in gathered)
    stacked = {k: np.stack([s[k][:length] for s, _ in gathered]) for k in gathered[0][0]}
    diagnostics = [_trim(d, length) for _, d in gathered]
    if not export:
        return stacked, diagnostics
    from pyro_bnp.arviz import from_pyro

    model: Callable[..., Any] | None = getattr(kernel, "model", None)
    return from_pyro(
        samples=stacked,
        diagnostics=diagnostics,
        model=model,
        model_args=args,
        model_kwargs=kwargs,
    )


def _trim(diag: Mapping[str, Any], length: int) -> dict[str, Any]:
    """Per-draw lists cut to ``length`` draws (chains of a resumed run may differ by a flush)."""
    out = dict(diag)
    for key in ("lp", "step_size", "grad_norm", "diverging"):
        if key in out and isinstance(out[key], list):
            out[key] = out[key][:length]
    if "diverging" in out:
        out["divergences"] = [i for i, d in enumerate(out["diverging"]) if d]
    return out
