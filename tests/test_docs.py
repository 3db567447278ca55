"""The documentation: the tutorials' code runs as written, and ``mkdocs build --strict`` passes.

The tutorials' ```` ```python ```` blocks are extracted from the markdown and executed in order in
one namespace, as a reader pasting them into one session would (with smaller sizes where a
tutorial says so, by string replacement, and ``matplotlib``'s Agg backend). Pytest's
``filterwarnings = error`` applies: a tutorial must not warn, except where its own code handles
an expected warning explicitly.

The build test runs ``mkdocs build --strict`` (the site's ``validation`` settings make every
unresolved link, anchor or image an error) into a temporary directory and checks that every
public name of the package has an entry in the API reference. It is skipped when the ``docs``
tools (mkdocs, mkdocs-material, mkdocstrings-python) are not installed.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TUTORIALS = DOCS / "tutorials"

# one API page per module: docs/api/<name>.md documents pyro_bnp.<name>
API_MODULES = [
    "arviz",
    "bnp",
    "chain",
    "compiled",
    "diagnostics",
    "distributed",
    "integrators",
    "kernel",
    "layers",
    "names",
    "potential",
    "preconditioners",
    "schedules",
    "sghmc",
    "store",
    "tuning",
]

_BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```[ \t]*$", flags=re.S | re.M)


def python_blocks(path: Path) -> list[str]:
    """The ```` ```python ```` blocks of a markdown file, in order."""
    blocks = _BLOCK.findall(path.read_text(encoding="utf-8"))
    assert blocks, f"{path} has no python code blocks"
    return blocks


def run_markdown(
    path: Path, replacements: dict[str, str], cwd: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    """Execute the python blocks of ``path`` in one namespace (in ``cwd``); return it.

    Each key of ``replacements`` must occur exactly once in the blocks (so that a renamed
    setting in the tutorial fails here instead of silently running the full size).
    """
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = python_blocks(path)
    for old, new in replacements.items():
        count = sum(b.count(old) for b in blocks)
        assert count == 1, f"{path.name}: {old!r} occurs {count} times, expected once"
        blocks = [b.replace(old, new) for b in blocks]
    monkeypatch.chdir(cwd)
    namespace: dict[str, Any] = {"__name__": f"docs_{path.stem}"}
    # Pyro runs chains in processes when it sees a spare core per chain; one after the other
    # is cheaper for these small runs and the same on every machine (the tutorials handle
    # Pyro's warning that it does so)
    with mock.patch("torch.multiprocessing.cpu_count", return_value=1):
        try:
            for i, block in enumerate(blocks):
                exec(compile(block, f"{path.name} (python block {i + 1})", "exec"), namespace)
        finally:
            plt.close("all")
    return namespace


@pytest.fixture
def one_thread():
    """The tutorials set one torch thread; restore the test session's count afterwards."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_index_quickstart(tmp_path, monkeypatch, one_thread):
    ns = run_markdown(
        DOCS / "index.md",
        {"num_samples=500, warmup_steps=500": "num_samples=60, warmup_steps=60"},
        tmp_path,
        monkeypatch,
    )
    posterior = ns["idata"]["posterior"]
    assert posterior["w"].shape == (1, 60, 5)
    assert "log_likelihood" in ns["idata"].children


def test_tutorial_regression(tmp_path, monkeypatch, one_thread):
    # the full size (about 15 s): shorter chains do not mix (R-hat of sigma 1.3 at 300 + 300)
    start = time.perf_counter()
    ns = run_markdown(TUTORIALS / "regression.md", {}, tmp_path, monkeypatch)
    idata = ns["idata"]
    assert dict(idata["posterior"].sizes)["chain"] == 2
    assert dict(idata["posterior"].sizes)["draw"] == 500
    assert set(idata.children) >= {"posterior", "sample_stats", "log_likelihood"}
    # the data's noise sd is 0.15: a fitted network finds about that
    sigma = float(idata["posterior"]["sigma"].mean())
    assert 0.1 < sigma < 0.3, sigma
    assert float(ns["rhat"]["sigma"]) < 1.1
    assert (tmp_path / "bnn_regression_ppc.png").stat().st_size > 10_000
    print(f"regression tutorial: {time.perf_counter() - start:.1f} s, sigma {sigma:.3f}")


def test_tutorial_classification(tmp_path, monkeypatch, one_thread):
    # the full size: the page quotes this run's numbers (accuracy 0.976, NLL 0.119)
    start = time.perf_counter()
    ns = run_markdown(TUTORIALS / "classification.md", {}, tmp_path, monkeypatch)
    assert ns["accuracy"] > 0.95, ns["accuracy"]
    assert ns["nll"] < 0.2, ns["nll"]
    assert ns["accuracy"] >= ns["draw_accuracy"]
    assert ns["nll"] <= ns["draw_nll"]
    assert ns["idata"]["log_likelihood"]["obs"].shape == (2, 300, ns["num_train"])
    assert ns["loo"].elpd < 0
    per_image = ns["loo"].elpd / ns["num_train"]
    print(
        f"classification tutorial: {time.perf_counter() - start:.1f} s, accuracy "
        f"{ns['accuracy']:.3f}, NLL {ns['nll']:.3f}, elpd/image {per_image:.3f}"
    )


def test_bandit_tutorial_matches_the_script():
    """The bandit tutorial quotes ``examples/bandit.py``: its command line options exist."""
    text = (TUTORIALS / "bandit.md").read_text(encoding="utf-8")
    script = (ROOT / "examples" / "bandit.py").read_text(encoding="utf-8")
    used = set(re.findall(r"python examples/bandit\.py[^\n]*", text))
    assert used
    for line in used:
        for option in re.findall(r"(--[a-z][a-z-]*)", line):
            assert f'"{option}"' in script, f"the tutorial uses {option}: not in bandit.py"
    for name in ("def refit(", "def predict(", "class RewardNet(", "kernel.initial_params = z"):
        assert name in script, f"the tutorial quotes {name!r}, not found in bandit.py"


# ---------------------------------------------------------------------------- the site


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """``mkdocs build --strict`` into a temporary directory (once per module)."""
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (the docs extra)")
    pytest.importorskip("material", reason="mkdocs-material is not installed (the docs extra)")
    pytest.importorskip(
        "mkdocstrings_handlers.python",
        reason="mkdocstrings-python is not installed (the docs extra)",
    )
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stderr[-6000:]}"
    return out


def test_mkdocs_build_strict(site):
    for page in ("index.html", "usage/index.html", "tutorials/regression/index.html"):
        assert (site / page).is_file(), page
    # the experiment pages' figures are copied and referenced relative to the page
    html = (site / "experiments" / "bandit" / "index.html").read_text(encoding="utf-8")
    assert 'src="../../figures/bandit_regret.png"' in html
    assert (site / "figures" / "bandit_regret.png").is_file()


def _public_names(module: ModuleType) -> set[str]:
    """``__all__``, and the classes and functions the module defines without a leading ``_``."""
    names = set(getattr(module, "__all__", ()))
    for name, value in vars(module).items():
        if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(value) or inspect.isfunction(value):
            names.add(name)
    return names


def _ids(page: Path) -> set[str]:
    return set(re.findall(r'id="([^"]+)"', page.read_text(encoding="utf-8")))


@pytest.mark.parametrize("name", API_MODULES)
def test_api_page_documents_every_public_name(site, name):
    module = importlib.import_module(f"pyro_bnp.{name}")
    ids = _ids(site / "api" / name / "index.html")
    assert f"pyro_bnp.{name}" in ids
    missing = sorted(n for n in _public_names(module) if f"pyro_bnp.{name}.{n}" not in ids)
    assert not missing, f"docs/api/{name}.md: no entry for {missing}"


def test_api_top_level_names(site):
    import pyro_bnp

    ids = _ids(site / "api" / "pyro_bnp" / "index.html")
    names = set(pyro_bnp.__all__) - {"__version__", "schedules"}  # schedules: its own page
    missing = sorted(n for n in names if f"pyro_bnp.{n}" not in ids)
    assert not missing, f"docs/api/pyro_bnp.md: no entry for {missing}"
    modules = {p.stem for p in (DOCS / "api").glob("*.md")} - {"index", "pyro_bnp"}
    assert modules == set(API_MODULES), "update API_MODULES and the nav of mkdocs.yml"
