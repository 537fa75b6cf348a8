"""attnkit-torch-blocked: FlashAttention-2 written with PyTorch tensor operations on blocks.

`blocked` holds the algorithm (readable forward and backward functions), `backend` the attnkit
`Backend` around it, `plugin` the hook that registers it as ``torch-blocked``.
"""

from .backend import TorchBlockedBackend
from .blocked import BlockSizes, WorkCount, blocked_backward, blocked_forward

__version__ = "0.1.0"

__all__ = ["BlockSizes", "TorchBlockedBackend", "WorkCount", "blocked_backward",
           "blocked_forward"]
