"""Run or import the example scripts of ``examples/`` from the tests."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
# the four samplers every comparison example runs (SGLD, pSGLD, BNP-SGLD, BNP + RMSprop)
METHODS = {"identity", "rmsprop", "bnp", "bnp+rmsprop"}


# ``timeout`` is a hang guard, never a speed test: the run may take this many times its stated
# allowance (a loaded 2-core machine ran the suite 6x slower than an idle one) and at least 10 min.
HANG_FACTOR, HANG_MIN_S = 8.0, 600.0


def run_example(name: str, *args: object, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``python examples/NAME.py ARGS`` from the repository root; fail on a non-zero exit.

    ``timeout`` (seconds on an idle machine) only guards against a hang; see ``HANG_FACTOR``.
    """
    cmd = [sys.executable, str(EXAMPLES / f"{name}.py"), *map(str, args)]
    limit = max(HANG_MIN_S, HANG_FACTOR * timeout)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def load_example(name: str) -> ModuleType:
    """Import ``examples/NAME.py`` as module ``NAME_example``.

    ``examples/`` goes on ``sys.path`` first, so that the script's own imports of its siblings
    (``_common``, ``bnn``, ...) resolve as they do when it runs as ``python examples/NAME.py``.
    """
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"{name}_example", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
