"""pyro_bnp: Batch Normalization Preconditioning for SGLD in Pyro."""

from typing import Any

from pyro_bnp import schedules
from pyro_bnp.bnp import BNP
from pyro_bnp.chain import Health
from pyro_bnp.kernel import SGLD, init_to_median_or_sample
from pyro_bnp.names import register_preconditioner
from pyro_bnp.potential import MinibatchPotential
from pyro_bnp.preconditioners import Identity, Preconditioner, RMSprop
from pyro_bnp.sghmc import SGHMC
from pyro_bnp.tuning import stein_discrepancy, tune_step_size

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Import :func:`pyro_bnp.arviz.from_pyro` on first use (ArviZ is slow to import)."""
    if name == "from_pyro":
        from pyro_bnp.arviz import from_pyro

        return from_pyro
    raise AttributeError(f"module 'pyro_bnp' has no attribute {name!r}")


__all__ = [
    "BNP",
    "SGHMC",
    "SGLD",
    "Health",
    "Identity",
    "MinibatchPotential",
    "Preconditioner",
    "RMSprop",
    "__version__",
    "from_pyro",
    "init_to_median_or_sample",
    "register_preconditioner",
    "schedules",
    "stein_discrepancy",
    "tune_step_size",
]
