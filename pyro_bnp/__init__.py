"""pyro_bnp: Batch Normalization Preconditioning for SGLD in Pyro."""

from pyro_bnp.preconditioners import Identity, Preconditioner, RMSprop

__version__ = "0.1.0"

__all__ = ["Identity", "Preconditioner", "RMSprop", "__version__"]
