"""pyro_bnp: Batch Normalization Preconditioning for SGLD in Pyro."""

from pyro_bnp import schedules
from pyro_bnp.bnp import BNP
from pyro_bnp.kernel import SGLD, init_to_median_or_sample
from pyro_bnp.preconditioners import Identity, Preconditioner, RMSprop

__version__ = "0.1.0"

__all__ = [
    "BNP",
    "SGLD",
    "Identity",
    "Preconditioner",
    "RMSprop",
    "__version__",
    "init_to_median_or_sample",
    "schedules",
]
