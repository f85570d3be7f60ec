"""Training losses of the first-stage autoencoders (see :mod:`ldm.modules.losses.reconstruction`)."""
from ldm.modules.losses.reconstruction import ReconstructionKLLoss

__all__ = ["ReconstructionKLLoss"]
