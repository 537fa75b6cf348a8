"""The process group a call runs on: rank, size, peers, and the cheap agreement every call
starts with (one all-gather of a few integers), so that a call one rank refuses is refused on
every rank instead of leaving the others waiting."""

from __future__ import annotations

import struct

import torch
import torch.distributed as dist


class CallMismatchError(ValueError):
    """Ranks called with different shapes or options, or some rank refused the call."""


def group_info(group) -> tuple[int, int]:
    """``(rank in group, group size)``; a clear error when torch.distributed is not set up."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "attnkit.distributed needs torch.distributed initialized "
            "(torch.distributed.init_process_group) before the call")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the given process group")
    return rank, dist.get_world_size(group)


def global_rank(group, rank: int) -> int:
    """The global rank of ``rank`` in ``group`` (p2p ops address global ranks)."""
    return rank if group is None else dist.get_global_rank(group, rank)


def comm_device(group, like: torch.Tensor) -> torch.device:
    """Where small control tensors live: NCCL only moves CUDA tensors."""
    if dist.get_backend(group) == "nccl":
        return like.device if like.is_cuda else torch.device("cuda",
                                                             torch.cuda.current_device())
    return torch.device("cpu")


def all_gather(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    """Every rank's ``inp`` concatenated along dim 0 into ``out`` (torch's newer name for
    the collective where it has it; the older one, deprecated there, elsewhere)."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


def reduce_scatter(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    """``inp`` summed over the ranks, this rank's ``dim 0`` slice of it into ``out``."""
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, inp, op=dist.ReduceOp.SUM, group=group)


_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}


def _bits(x: float | None) -> int:
    return -1 if x is None else struct.unpack("<q", struct.pack("<d", float(x)))[0]


def call_signature(tensors: dict, fields: dict) -> tuple[list[int], list[str]]:
    """What must agree across ranks, as integers, and the name of each. The length depends
    only on the keys, so a rank whose inputs are invalid (anything in place of a tensor)
    still takes part with a signature of the same length."""
    names, values = [], []
    for name, t in tensors.items():
        ok = isinstance(t, torch.Tensor) and t.dim() == 4
        names += [f"{name}.shape[{i}]" for i in range(4)] + [f"{name}.dtype"]
        values += (list(t.shape) if ok else [-1] * 4) + [
            _DTYPE_CODES.get(t.dtype, 0) if ok else 0]
    for key, value in fields.items():
        names.append(key)
        values.append(_bits(value) if isinstance(value, float) or value is None
                      else int(value))
    return values, names


def agree(group, device: torch.device, signature: tuple[list[int], list[str]],
          error: BaseException | None) -> None:
    """One all-gather of every rank's signature and verdict. Raises on every rank when any
    rank refused the call (that rank re-raises its own error) or the signatures differ."""
    rank, world = group_info(group)
    values, names = signature
    mine = torch.tensor([[0 if error is None else 1, *values]], dtype=torch.int64,
                        device=device)
    every = mine.new_empty((world, mine.shape[1]))
    all_gather(every, mine, group)
    rows = every.cpu().tolist()
    refused = [r for r, row in enumerate(rows) if row[0]]
    if error is not None:
        raise error
    if refused:
        raise CallMismatchError(f"rank(s) {refused} of the group refused this call (their "
                                "own error says why); no rank ran it")
    differ = [i for i in range(len(names)) if len({row[i + 1] for row in rows}) > 1]
    if differ:
        shown = "; ".join(f"{names[i]}: " + ", ".join(
            f"rank {r}={_show(names[i], row[i + 1])}" for r, row in enumerate(rows))
            for i in differ)
        raise CallMismatchError(
            f"the ranks of the group called with different shapes or options ({shown}); every "
            "rank must pass its shard of one problem, with the same options")


def _show(name: str, value: int):
    if name.endswith("dtype"):
        return next((str(d) for d, c in _DTYPE_CODES.items() if c == value), "other")
    if name in ("scale", "softcap"):
        return None if value == -1 else struct.unpack("<d", struct.pack("<q", value))[0]
    return value
