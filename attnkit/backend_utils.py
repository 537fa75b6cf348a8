"""Plumbing for backend authors: streams, SM counts, launch caches, the split-KV rule and the
arguments exp2 kernels take for the band and the scores.

Nothing here is needed to write a backend (`attnkit.backend.Backend` is the contract); it is
what the kernel backends shipped with attnkit share, kept in one place so their numbers agree.
Measurements behind the constants: docs/tuning.md.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from .spec import AttentionProblem

#: log2(e): exp2 kernels keep scores as ``s * LOG2E`` so that ``exp(s) = exp2(s * LOG2E)``.
LOG2E = 1.4426950408889634
#: ln(2): turns a log2-domain lse back into the natural log the contract returns.
LN2 = 0.6931471805599453


# -- device ---------------------------------------------------------------------------------

def _stream_getter():
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:  # the handle as an int, without building a torch.cuda.Stream
        return raw
    return lambda device_index: torch.cuda.current_stream(device_index).cuda_stream


#: ``current_stream(device_index) -> int``: the handle of PyTorch's current CUDA stream on that
#: device, for launching on it (so kernels order with the surrounding PyTorch work).
current_stream = _stream_getter()


@functools.cache
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached per device index)."""
    if device.type != "cuda":
        raise ValueError(f"sm_count needs a CUDA device; got {device}")
    return _sm_count_of(device.index if device.index is not None
                        else torch.cuda.current_device())


class LaunchCache(dict):
    """A dict of per-call-signature launch state (routes, prepared launches, parameter
    blocks), emptied when it reaches ``max_size`` entries: a decoding or training loop repeats
    a few signatures, and a workload whose shapes never repeat must not grow it without bound.
    Reads are plain ``dict.get``; write with `put`."""

    __slots__ = ("max_size",)

    def __init__(self, max_size: int):
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        super().__init__()
        self.max_size = max_size

    def put(self, key, value):
        """Store ``value`` under ``key`` (emptying the cache first if it is full); returns it."""
        if len(self) >= self.max_size:
            self.clear()
        self[key] = value
        return value


# -- split-KV ("flash-decoding") ------------------------------------------------------------

#: Fewer keys than this per split costs more in partials and launches than it gains.
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 128
#: A split count is good enough once its last wave of programs is this full.
WAVE_EFFICIENCY = 0.9


def visible_span(problem: AttentionProblem) -> int:
    """An upper bound on the keys one query row block sees: Sk, or less under a left window."""
    left, _ = problem.band
    if left is None:
        return problem.seqlen_k
    return min(problem.seqlen_k, left + problem.seqlen_q)


def choose_splits(programs: int, keys: int, sm_count: int, *, fill: float = 1.0,
                  long_keys: int | None = None, long_fill: float = WAVE_EFFICIENCY) -> int:
    """How many parts a split-KV kernel cuts each key range into.

    ``programs`` is how many thread blocks the kernel has without splitting (e.g. batch x kv
    head), ``keys`` the longest key range one of them reads. No split when the programs
    alone keep ``fill`` of the SMs busy (``fill`` < 1 for kernels whose partial writes and
    merge cost more than a few idle SMs), or when ``keys`` is at least ``long_keys`` and they
    keep ``long_fill`` busy. Otherwise the fewest splits ``s`` that give every SM a program
    (``programs * s >= sm_count``) and whose waves are at least ``WAVE_EFFICIENCY`` full, so
    the last wave does not leave SMs idle. No split gets fewer than ``MIN_KEYS_PER_SPLIT``
    keys, and there are at most ``MAX_SPLITS``.
    """
    programs = max(programs, 1)
    if long_keys is not None and keys >= long_keys:
        fill = long_fill
    most = min(-(-keys // MIN_KEYS_PER_SPLIT), MAX_SPLITS)
    if programs >= fill * sm_count or most <= 1:
        return 1
    fewest = -(-sm_count // programs)
    if fewest >= most:
        return most
    best, best_eff = fewest, 0.0
    for s in range(fewest, most + 1):
        waves = programs * s / sm_count
        eff = waves / -(-waves // 1)
        if eff >= WAVE_EFFICIENCY:
            return s
        if eff > best_eff:
            best, best_eff = s, eff
    return best


class SplitWorkspace(NamedTuple):
    """Where a split-KV launch keeps its fp32 data, in one buffer (one allocation per step):
    the partial outs ``(parts, D)``, the partial lses ``(parts,)``, then the returned lse
    ``(B, Hq, Sq)``, a view that keeps the buffer alive. ``parts = B * Hq * Sq * splits``,
    laid out ``(B, Hq, Sq, splits)`` so that one row's partials are adjacent."""

    parts: int
    head_dim: int
    lse_shape: tuple[int, int, int]
    lse_offset: int  # elements before the returned lse
    numel: int

    @classmethod
    def of(cls, problem: AttentionProblem, splits: int) -> SplitWorkspace:
        B, Hq, Sq, D = problem.batch, problem.heads_q, problem.seqlen_q, problem.head_dim
        parts = B * Hq * Sq * splits
        return cls(parts, D, (B, Hq, Sq), parts * (D + 1), parts * (D + 1) + B * Hq * Sq)

    def allocate(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(work, lse)``: the buffer and the returned lse's view of it."""
        work = torch.empty(self.numel, dtype=torch.float32, device=device)
        _, Hq, Sq = self.lse_shape
        return work, work.as_strided(self.lse_shape, (Hq * Sq, Sq, 1), self.lse_offset)

    def part_pointers(self, work: torch.Tensor) -> tuple[int, int]:
        """Addresses of the partial outs and the partial lses (no tensor views built)."""
        part_out = work.data_ptr()
        return part_out, part_out + self.parts * self.head_dim * 4

    def part_views(self, work: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The partial outs and the partial lses as flat views of ``work``."""
        n = self.parts * self.head_dim
        return work[:n], work[n: n + self.parts]


# -- kernel arguments -----------------------------------------------------------------------

class BandArgs(NamedTuple):
    """`AttentionProblem.band` as kernel arguments: ints for both sides, and whether each
    side bounds anything."""

    left: int
    right: int
    has_left: bool
    has_right: bool

    @property
    def bounded(self) -> bool:
        """Whether any side masks (the kernels' band code is needed)."""
        return self.has_left or self.has_right


def band_args(problem: AttentionProblem, *, unbounded: int | None = None) -> BandArgs:
    """The band of ``problem`` as kernel arguments.

    ``unbounded`` None: an unbounded side is 0 and its ``has_*`` flag False (the kernel skips
    that side). An int: a bound that never masks (Sq + Sk does, for any batch); an unbounded
    side takes it and a bounded one is clamped to it, for kernels that always apply both sides
    and keep the band arithmetic in int32.
    """
    left, right = problem.band
    has_left, has_right = left is not None, right is not None
    if unbounded is None:
        return BandArgs(left if has_left else 0, right if has_right else 0, has_left,
                        has_right)
    return BandArgs(min(left, unbounded) if has_left else unbounded,
                    min(right, unbounded) if has_right else unbounded, has_left, has_right)


class ScoreArgs(NamedTuple):
    """The scale and softcap as kernel arguments. Without a softcap a score is
    ``qk * qk_scale``; with one it is ``tanh(qk * cap_in) * cap_out``."""

    qk_scale: float  # scale, times LOG2E for exp2 kernels
    cap_in: float  # scale / softcap; 1.0 without a softcap (kernels read it only with one)
    cap_out: float  # softcap, times LOG2E for exp2 kernels; 1.0 without a softcap


def score_args(problem: AttentionProblem, *, log2: bool = True) -> ScoreArgs:
    """`ScoreArgs` of ``problem``: in log2 units for kernels that exponentiate with exp2
    (``log2``), else in natural units."""
    unit = LOG2E if log2 else 1.0
    if problem.softcap is None:
        return ScoreArgs(problem.scale * unit, 1.0, 1.0)
    return ScoreArgs(problem.scale * unit, problem.scale / problem.softcap,
                     problem.softcap * unit)


__all__ = [
    "LN2", "LOG2E", "MAX_SPLITS", "MIN_KEYS_PER_SPLIT", "WAVE_EFFICIENCY", "BandArgs",
    "LaunchCache", "ScoreArgs", "SplitWorkspace", "band_args", "choose_splits",
    "current_stream", "score_args", "sm_count", "visible_span",
]
