"""Long runs that survive interruption: draws streamed to disk, checkpoints, exact resume.

A store is a directory:

``part-000000.nc``, ``part-000001.nc``, ...
    Each flush writes one small netCDF file with the next ``every`` post-warmup draws
    (constrained values, one variable per site, plus the sampler statistics ``lp``,
    ``step_size``, ``grad_norm``, ``diverging``). Files are written to a temporary name and
    renamed, so a crash leaves only complete files.
``checkpoint.pt``
    Written (atomically) at the start, after every flush and every ``every`` warmup draws: the
    kernel's :meth:`~pyro_bnp.SGLD.state_dict` plus how many draws and files are stored. It
    always describes a whole number of draws: an interrupt inside an update (or between an
    update and the recording of its draw) flushes the buffered draws without a checkpoint, and
    the resume redoes them from the last checkpoint (tested with Ctrl-C at 20 random moments).

A crash, ``Ctrl-C`` or ``SIGKILL`` therefore loses at most the draws since the last flush.
:func:`sample_to_store` starts a run or continues it from the checkpoint (the continued run
gives exactly the draws of an uninterrupted one); :func:`load_store` reads the store back as
the same :class:`xarray.DataTree` that :func:`pyro_bnp.arviz.from_pyro` builds.

The loop runs the kernel protocol directly (``setup``, ``sample``, ``cleanup``), not through
:class:`pyro.infer.MCMC`, which keeps every draw in memory: memory stays flat as the run grows.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

__all__ = ["DrawStore", "load_store", "sample_to_store"]

_PART = re.compile(r"^part-(\d{6})\.nc$")
_STATS = ("lp", "step_size", "grad_norm", "diverging")


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _parts(directory: Path) -> list[Path]:
    found = [p for p in directory.iterdir() if _PART.match(p.name)]
    return sorted(found)


class DrawStore:
    """A ``hook_fn(kernel, params, stage, i)`` that streams draws and checkpoints to a directory.

    Usable with :class:`pyro.infer.MCMC` (single chain) or with :func:`sample_to_store`.

    Parameters
    ----------
    directory : str or Path
        The store (created if needed).
    every : int
        Draws per flush: at most this many draws are lost by a crash.
    sites : sequence of str, optional
        Sites to store (default: all latent sites).
    checkpoint : bool
        Also write the kernel's state after every flush (needs a kernel with ``state_dict``).
    first_part : int
        Index of the next part file (for a continued run).
    stored : int
        Draws already in the store (for a continued run).
    warmup_done : int
        Warmup draws already done (for a continued run).
    """

    def __init__(
        self,
        directory: str | Path,
        every: int = 100,
        sites: Sequence[str] | None = None,
        checkpoint: bool = True,
        first_part: int = 0,
        stored: int = 0,
        warmup_done: int = 0,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.every = every
        self.sites = None if sites is None else list(sites)
        self.checkpoint = checkpoint
        self.next_part = first_part
        self.stored = stored
        self.warmup_done = warmup_done
        self._draws: list[dict[str, np.ndarray]] = []
        self._stats: list[dict[str, Any]] = []
        self._kernel: Any = None

    def __call__(self, kernel: Any, params: Mapping[str, torch.Tensor], stage: str, i: int) -> None:
        """Record one draw; flush every ``every`` draws."""
        self._kernel = kernel
        if stage.startswith("Warmup"):
            self.warmup_done += 1
            if self.checkpoint and self.warmup_done % self.every == 0:
                self._write_checkpoint()
            return
        transforms = getattr(kernel, "transforms", None) or {}
        names = self.sites if self.sites is not None else sorted(params)
        draw = {}
        for name in names:
            value = params[name].detach()
            if name in transforms:
                value = transforms[name].inv(value)
            draw[name] = value.cpu().numpy().copy()
        self._draws.append(draw)
        stats = kernel.last_draw_stats() if hasattr(kernel, "last_draw_stats") else {}
        self._stats.append({k: stats[k] for k in _STATS if k in stats})
        if len(self._draws) >= self.every:
            self.flush()

    def flush(self, checkpoint: bool = True) -> None:
        """Write the buffered draws as the next part file, then the checkpoint.

        ``checkpoint=False`` writes the draws only: for a kernel stopped in the middle of an
        update, whose state belongs to no whole draw (a resume drops such part files and redoes
        them from the last checkpoint, so it stays exact).
        """
        if self._draws:
            data: dict[str, Any] = {}
            for name in self._draws[0]:
                arr = np.stack([d[name] for d in self._draws])
                dims = ["draw"] + [f"{name}_dim_{j}" for j in range(arr.ndim - 1)]
                data[name] = (dims, arr)
            for key in _STATS:
                if self._stats and all(key in s for s in self._stats):
                    data[f"sample_stats/{key}"] = (
                        ["draw"],
                        np.array([s[key] for s in self._stats]),
                    )
            first = self.stored
            ds = xr.Dataset(
                {k.replace("/", "__"): v for k, v in data.items()},
                coords={"draw": np.arange(first, first + len(self._draws))},
            )
            path = self.directory / f"part-{self.next_part:06d}.nc"
            tmp = path.with_name(path.name + ".tmp")
            ds.to_netcdf(tmp, engine="h5netcdf")
            os.replace(tmp, path)
            self.next_part += 1
            self.stored += len(self._draws)
            self._draws, self._stats = [], []
        if self.checkpoint and checkpoint:
            self._write_checkpoint()

    def start(self, kernel: Any) -> None:
        """Checkpoint a kernel that is set up and has not sampled (the chain's first state)."""
        self._kernel = kernel
        if self.checkpoint:
            self._write_checkpoint()

    def _write_checkpoint(self) -> None:
        kernel = self._kernel
        if kernel is None or not hasattr(kernel, "state_dict"):
            return
        _atomic_torch_save(
            {
                "kernel": kernel.state_dict(),
                "stored": self.stored,
                "next_part": self.next_part,
                "warmup_done": self.warmup_done,
            },
            self.directory / "checkpoint.pt",
        )


def sample_to_store(
    kernel: Any,
    directory: str | Path,
    *args: Any,
    num_samples: int,
    warmup_steps: int = 0,
    every: int = 100,
    resume: bool = True,
    progress: bool = True,
    load: bool = True,
    **kwargs: Any,
) -> xr.DataTree | None:
    """Run (or continue) one chain of ``kernel``, streaming its draws to ``directory``.

    Parameters
    ----------
    kernel : pyro_bnp.SGLD
        The kernel (any kernel with ``state_dict``/``load_state_dict`` and
        ``last_draw_stats`` works).
    directory : str or Path
        The store. If it holds a checkpoint and ``resume`` is true, the run continues from it:
        part files written after the checkpoint are dropped, and the remaining warmup and
        post-warmup draws are run, so the store ends with exactly the draws of an uninterrupted
        run with the same seed.
    *args, **kwargs
        The model's arguments.
    num_samples, warmup_steps : int
        Totals for the whole run (not what remains).
    every : int
        Draws per flush and checkpoint.
    resume : bool
        Continue from an existing checkpoint (default); ``False`` refuses a non-empty store.
    progress : bool
        Show a progress bar.
    load : bool
        Return the finished store read back with :func:`load_store` (memory grows with the
        number of draws); ``False`` returns None and keeps memory flat.

    Returns
    -------
    xarray.DataTree or None
        :func:`load_store` of the finished store (posterior, sample_stats, log_likelihood,
        observed_data), if ``load``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ckpt_path = directory / "checkpoint.pt"
    saved: dict[str, Any] | None = None
    if ckpt_path.exists() or _parts(directory):
        if not resume:
            raise ValueError(f"{directory} already holds a run; pass resume=True to continue it")
        if ckpt_path.exists():
            saved = torch.load(ckpt_path, weights_only=False)
    stored, next_part, warmup_done = 0, 0, 0
    if saved is not None:
        stored, next_part, warmup_done = saved["stored"], saved["next_part"], saved["warmup_done"]
        kernel.load_state_dict(saved["kernel"])
    for part in _parts(directory):  # written after the checkpoint, or before any: redo them
        if int(_PART.match(part.name).group(1)) >= next_part:  # type: ignore[union-attr]
            part.unlink()
    remaining_warmup = max(warmup_steps - warmup_done, 0)
    remaining = max(num_samples - stored, 0)
    store = DrawStore(
        directory, every=every, first_part=next_part, stored=stored, warmup_done=warmup_done
    )
    if remaining_warmup + remaining > 0:
        kernel.setup(remaining_warmup, *args, **kwargs)
        if saved is None:  # the chain's start (its seed, initial point), for an early interrupt
            store.start(kernel)
        # Checkpoints hold whole draws only: ``whole`` is false from the moment an update
        # starts until its draw is recorded, and an interrupt (Ctrl-C, an exception) in that
        # window writes the buffered draws without a checkpoint.
        whole = True
        try:
            params = kernel.initial_params
            bar = tqdm(
                total=remaining_warmup + remaining, disable=not progress, desc=type(kernel).__name__
            )
            for i in range(remaining_warmup + remaining):
                warm = i < remaining_warmup
                whole = False
                params = kernel.sample(params)
                store(kernel, params, "Warmup" if warm else "Sample", i)
                whole = True
                bar.update()
                if not warm and i % 50 == 0:
                    bar.set_postfix(kernel.logging(), refresh=False)
            bar.close()
        finally:
            store.flush(checkpoint=whole)
            kernel.cleanup()
    if not load:
        return None
    model = getattr(kernel, "model", None)
    return load_store(directory, model=model, model_args=args, model_kwargs=kwargs)


def load_store(
    directory: str | Path,
    *,
    model: Callable[..., Any] | None = None,
    model_args: Sequence[Any] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    **from_pyro_kwargs: Any,
) -> xr.DataTree:
    """Read a store as an ArviZ ``DataTree`` (one chain), as :func:`~pyro_bnp.arviz.from_pyro`.

    With ``model`` (and its arguments) the ``log_likelihood`` and ``observed_data`` groups are
    computed on the full data as well; further keyword arguments go to ``from_pyro``.

    Raises
    ------
    ValueError
        If the directory holds no draws.
    """
    from pyro_bnp.arviz import from_pyro

    directory = Path(directory)
    parts = _parts(directory) if directory.exists() else []
    if not parts:
        raise ValueError(f"no draws stored in {directory}")
    datasets = [xr.open_dataset(p, engine="h5netcdf").load() for p in parts]
    for ds in datasets:
        ds.close()
    ds = xr.concat(datasets, dim="draw", data_vars="minimal", coords="minimal", compat="override")
    samples = {}
    stats: dict[str, list[Any]] = {}
    for name, var in ds.data_vars.items():
        key = str(name)
        if key.startswith("sample_stats__"):
            stats[key[len("sample_stats__") :]] = var.values.tolist()
        else:
            samples[key] = var.values[None]  # (chain=1, draw, *shape)
    if "diverging" in stats:
        stats["diverging"] = [bool(d) for d in stats["diverging"]]
        stats["divergences"] = [i for i, d in enumerate(stats["diverging"]) if d]
    has_model = model is not None
    from_pyro_kwargs.setdefault("log_likelihood", has_model)
    from_pyro_kwargs.setdefault("observed_data", has_model)
    return from_pyro(
        samples=samples,
        diagnostics=[stats] if stats else None,
        model=model,
        model_args=model_args,
        model_kwargs=model_kwargs,
        **from_pyro_kwargs,
    )
