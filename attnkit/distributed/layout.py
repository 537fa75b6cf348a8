"""How a sequence is cut into per-rank shards, and the helpers that cut and reassemble it.

``"headtail"`` cuts the sequence into ``2P`` equal chunks and gives rank ``r`` chunks ``r``
and ``2P - 1 - r``, in that order (PyTorch's head-tail load balancer for context parallelism
does the same, so its ``context_parallel_unshard`` and data loaders built for it agree):
under causal masking every rank then has the same amount of work. ``"contiguous"`` gives rank
``r`` the ``r``-th of ``P`` equal pieces.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..spec import describe_tensor
from .group import group_info

LAYOUTS = ("headtail", "contiguous")


def check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def chunks_per_rank(layout: str) -> int:
    return 2 if layout == "headtail" else 1


def storage_order(world: int, layout: str) -> list[int]:
    """The global chunk indices in the order the ranks' shards hold them, rank 0 first."""
    if layout == "headtail":
        return [c for r in range(world) for c in (r, 2 * world - 1 - r)]
    return list(range(world))


def rank_chunks(rank: int, world: int, local_len: int, layout: str) -> list[tuple[int, int]]:
    """``(global start, length)`` of each chunk that rank ``rank`` holds, in storage order;
    the chunks lie one after another in the rank's shard."""
    n = chunks_per_rank(layout)
    c = local_len // n
    return [(g * c, c) for g in storage_order(world, layout)[rank * n:(rank + 1) * n]]


def _reorder_chunks(x: torch.Tensor, dim: int, order: list[int]) -> torch.Tensor:
    """``x`` with its ``dim`` cut into ``len(order)`` equal chunks, chunk ``i`` of the result
    being chunk ``order[i]`` of ``x`` (one gather; differentiable)."""
    n = len(order)
    if order == list(range(n)):
        return x
    dim = dim % x.dim()
    shape = list(x.shape)
    y = x.unflatten(dim, (n, shape[dim] // n))
    index = torch.tensor(order, device=x.device)
    return y.index_select(dim, index).flatten(dim, dim + 1)


def storage_to_global(x: torch.Tensor, dim: int, world: int, layout: str) -> torch.Tensor:
    """The whole sequence in storage order (the ranks' shards concatenated) -> global order."""
    order = storage_order(world, layout)
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return _reorder_chunks(x, dim, inverse)


def global_to_storage(x: torch.Tensor, dim: int, world: int, layout: str) -> torch.Tensor:
    """The whole sequence in global order -> storage order (the ranks' shards concatenated)."""
    return _reorder_chunks(x, dim, storage_order(world, layout))


def check_divisible(name: str, x: torch.Tensor, dim: int, world: int, layout: str,
                    local: bool) -> None:
    """Refuse a sequence length the layout cannot cut into equal chunks."""
    n = chunks_per_rank(layout) * (1 if local else world)
    if x.shape[dim] % n:
        what = "local shard length" if local else "sequence length"
        raise ValueError(
            f"{describe_tensor(name, x)}: the {what} {x.shape[dim]} (dim {dim}) must be "
            f"divisible by {n} under layout={layout!r} with {world} ranks"
            + (" (two chunks per rank)" if layout == "headtail" else ""))


def check_local_shards(method: str, q: torch.Tensor, k: torch.Tensor, world: int,
                       layout: str) -> None:
    """Refuse local q and k shards of different lengths, or a length the layout cannot cut."""
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"{method} shards queries and keys alike: {describe_tensor('q', q)} and "
            f"{describe_tensor('k', k)} must have the same local sequence length")
    check_divisible("q", q, 2, world, layout, local=True)


def shard(x: torch.Tensor, group=None, seq_dim: int = 2, layout: str = "headtail"
          ) -> torch.Tensor:
    """This rank's shard of the whole sequence ``x`` (the same on every rank), cut along
    ``seq_dim``: a contiguous copy. The length must be divisible by ``2P`` under
    ``"headtail"``, by ``P`` under ``"contiguous"``. No communication."""
    check_layout(layout)
    rank, world = group_info(group)
    seq_dim = seq_dim % x.dim()
    check_divisible("x", x, seq_dim, world, layout, local=False)
    n = chunks_per_rank(layout)
    c = x.shape[seq_dim] // (n * world)
    pieces = [x.narrow(seq_dim, start, length)
              for start, length in rank_chunks(rank, world, n * c, layout)]
    return torch.cat(pieces, dim=seq_dim)


def unshard(x: torch.Tensor, group=None, seq_dim: int = 2, layout: str = "headtail"
            ) -> torch.Tensor:
    """The whole sequence from every rank's shard ``x`` (one all-gather; every rank gets it).
    Not differentiable: for checking and logging, not for a training graph."""
    check_layout(layout)
    _, world = group_info(group)
    seq_dim = seq_dim % x.dim()
    check_divisible("x", x, seq_dim, world, layout, local=True)
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return storage_to_global(torch.cat(parts, dim=seq_dim), seq_dim, world, layout)
