"""Context parallelism on torch.distributed: one attention problem whose sequence is
sharded across ranks, computed exactly, forward and backward, with any backend.

- `ring_attention`: K/V passed around the ring (``comm="p2p"``) or all-gathered
  (``comm="allgather"``); partial results merged in float32 (float64 for float64).
- `ulysses_attention`: all-to-all from sequence shards to head shards and back.
- `shard` / `unshard`: cut a whole sequence into this rank's shard and put it back together,
  under the ``"headtail"`` (default, balanced for causal) or ``"contiguous"`` layout.
"""

from .group import CallMismatchError
from .layout import LAYOUTS, shard, unshard
from .ring import COMMS, ring_attention
from .ulysses import ulysses_attention

__all__ = ["COMMS", "LAYOUTS", "CallMismatchError", "ring_attention", "shard",
           "ulysses_attention", "unshard"]
