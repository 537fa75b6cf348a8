"""What a benchmark run measures: the grids (cells) and the FLOP / byte formulas.

The standard grid is FlashAttention's, defined here once: a fixed number of tokens
(``batch * seqlen = STANDARD_TOKENS``, 16k), model dim ``STANDARD_MODEL_DIM`` (2048) split
into ``H = 2048 / D`` heads, seqlens 512..16k, head dims 64, 128 and 256, causal and not, fp16 and
bf16, forward / backward / forward+backward. Every grid shape has ``Sq == Sk``, so SDPA's
top-left causal mask and attnkit's bottom-right one are the same mask there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

MODES = ("fwd", "bwd", "fwd_bwd")
#: FLOPs of each mode relative to the forward (FlashAttention's accounting: the backward
#: does 2.5x the forward's matmul work).
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}

DTYPES = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
    "fp64": torch.float64,
}


#: FlashAttention's grid: batch * seqlen tokens per shape, heads * head dim model width.
STANDARD_TOKENS = 16384
STANDARD_MODEL_DIM = 2048
STANDARD_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
STANDARD_HEAD_DIMS = (64, 128, 256)
#: Fields that name the problem a cell or row measured (what two runs are matched on).
IDENTITY = ("backend", "mode", "dtype", "batch", "heads_q", "heads_kv", "seqlen_q", "seqlen_k",
            "head_dim", "causal")


def standard_shape(seqlen: int, head_dim: int, tokens: int = STANDARD_TOKENS,
                   model_dim: int = STANDARD_MODEL_DIM) -> tuple[int, int]:
    """``(batch, heads)`` of a grid shape: ``batch = tokens // seqlen`` (at least 1),
    ``heads = model_dim // head_dim``; a head dim that does not divide the model dim raises."""
    if seqlen <= 0 or head_dim <= 0:
        raise ValueError(f"seqlen and head dim must be positive, got {seqlen} and {head_dim}")
    if model_dim % head_dim:
        raise ValueError(f"model dim {model_dim} is not a multiple of head dim {head_dim}")
    return max(1, tokens // seqlen), model_dim // head_dim


def dtype_name(dtype: torch.dtype) -> str:
    return next(n for n, d in DTYPES.items() if d == dtype)


def attention_flops(batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int,
                    causal: bool, mode: str = "fwd") -> float:
    """The standard FLOP count: ``4 * B * H * Sq * Sk * D`` for the forward (two matmuls of
    ``2 * Sq * Sk * D`` each), halved for causal, times 2.5 for the backward and 3.5 for
    forward+backward. Softmax and masking work is not counted, by convention."""
    if mode not in MODE_FLOP_FACTOR:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    flops = 4.0 * batch * heads * seqlen_q * seqlen_k * head_dim
    if causal:
        flops /= 2
    return flops * MODE_FLOP_FACTOR[mode]


def kv_bytes(batch: int, heads_kv: int, seqlen_k: int, head_dim: int,
             dtype: torch.dtype) -> int:
    """Bytes of K plus V that a decoding step must read: ``2 * B * Hkv * Sk * D * itemsize``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * batch * heads_kv * seqlen_k * head_dim * itemsize


@dataclass(frozen=True)
class Shape:
    """One attention problem of the grid (Sq == Sk, MHA)."""

    batch: int
    heads: int
    seqlen: int
    head_dim: int
    causal: bool
    dtype: str

    def flops(self, mode: str) -> float:
        return attention_flops(self.batch, self.heads, self.seqlen, self.seqlen,
                               self.head_dim, self.causal, mode)


@dataclass(kw_only=True)
class Timing:
    """How each cell is timed (`attnkit.bench.timing`), shared by the grid and decode specs."""

    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_reps: int = 3
    max_reps: int = 200
    #: Cells not started after this many seconds are recorded as skipped (None: no limit).
    time_limit_s: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class GridSpec(Timing):
    """The training-shape grid: ``batch = tokens // seqlen``, ``heads = model_dim // D``."""

    seqlens: tuple[int, ...]
    head_dims: tuple[int, ...]
    causal: tuple[bool, ...]
    dtypes: tuple[str, ...]
    modes: tuple[str, ...]
    tokens: int
    model_dim: int
    #: "bshd": q/k/v are (B, S, H, D) tensors passed as ``.transpose(1, 2)`` (how models hold
    #: them); "bhsd": contiguous (B, H, S, D).
    layout: str = "bshd"
    #: A contender whose call took longer than this at one seqlen is not run at larger ones
    #: of the same dtype / head dim / causal / mode (recorded as skipped, with the time).
    slow_call_s: float = 1.0
    #: Attention dropout probability of every call (0: none); SDPA peers drop too.
    dropout_p: float = 0.0

    def shapes(self) -> list[Shape]:
        out = []
        for dtype in self.dtypes:
            for head_dim in self.head_dims:
                for causal in self.causal:
                    for seqlen in sorted(self.seqlens):
                        batch, heads = standard_shape(seqlen, head_dim, self.tokens,
                                                      self.model_dim)
                        out.append(Shape(batch, heads, seqlen, head_dim, causal, dtype))
        return out


@dataclass
class DecodeSpec(Timing):
    """The decoding grid: one (or a few) query tokens against a full KV cache per length."""

    cache_lens: tuple[int, ...]
    batch: int = 16
    heads_q: int = 32
    heads_kv: int = 8
    head_dim: int = 128
    dtype: str = "bf16"
    seqlen_q: int = 1
    #: Also time each step as the replay of a CUDA graph that captured it (mode
    #: ``decode_graph``), beside the eager call (mode ``decode``).
    graphs: bool = False

    def bytes(self, cache_len: int) -> int:
        return kv_bytes(self.batch, self.heads_kv, cache_len, self.head_dim,
                        DTYPES[self.dtype])


@dataclass
class Row:
    """Who ran what, and what came of it: the fields every result row starts with."""

    backend: str
    kind: str  # "attnkit" or "sdpa"
    mode: str
    dtype: str
    batch: int
    heads_q: int
    heads_kv: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    causal: bool
    status: str = "skipped"
    error: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Timed(Row):
    """A row that is timed (`timing.time_cell` fills ``ms``, ``ms_min`` and ``reps``)."""

    ms: float | None = None
    ms_min: float | None = None
    reps: int | None = None
    notes: list[str] = field(default_factory=list)


def tera_per_s(amount: float, ms: float) -> float:
    """``amount`` (FLOPs or bytes) per second over ``ms`` milliseconds, in units of 1e12."""
    return amount / (ms * 1e-3) / 1e12


@dataclass
class Rated(Timed):
    """A timed row and the work one call does: ``flops`` (compute-bound rows) or ``bytes``
    (memory-bound rows: the KV cache read), with the rate `set_rates` derives from them."""

    flops: float | None = None
    tflops: float | None = None
    bytes: int | None = None
    tbps: float | None = None

    def set_rates(self, ms: float) -> None:
        """``tflops`` and ``tbps`` of the work known, at ``ms`` milliseconds a call."""
        if self.flops is not None:
            self.tflops = tera_per_s(self.flops, ms)
        if self.bytes is not None:
            self.tbps = tera_per_s(self.bytes, ms)


@dataclass
class Cell(Rated):
    """One measurement: a backend on a shape in a mode, and what came of it.

    ``status`` is "ok", "unsupported" (the backend declares it cannot compute this problem;
    ``error`` holds its reasons), "oom", "error" (it raised; ``error`` holds the message) or
    "skipped" (not attempted; ``error`` says why).
    """

    ratio_vs_sdpa_flash: float | None = None
    mem_peak_bytes: int | None = None
    mem_extra_bytes: int | None = None
    max_abs_diff_vs_sdpa: float | None = None


def default_grid(device: str) -> GridSpec:
    """FlashAttention's grid on CUDA; a small fp32 grid that runs in a few minutes on a CPU."""
    if device == "cuda":
        return GridSpec(seqlens=STANDARD_SEQLENS, head_dims=STANDARD_HEAD_DIMS,
                        causal=(False, True), dtypes=("fp16", "bf16"), modes=MODES,
                        tokens=STANDARD_TOKENS, model_dim=STANDARD_MODEL_DIM)
    return GridSpec(seqlens=(256, 512, 1024, 2048), head_dims=(64,), causal=(False, True),
                    dtypes=("fp32",), modes=MODES, tokens=2048, model_dim=512,
                    warmup_ms=20.0, rep_ms=300.0, min_reps=3, max_reps=20, slow_call_s=30.0)


def default_decode(device: str) -> DecodeSpec:
    """The decoding table: B=16, Hq=32, Hkv=8, D=128, bf16, caches of 1k..64k on CUDA; a
    scaled-down fp32 version on a CPU."""
    if device == "cuda":
        return DecodeSpec(cache_lens=(1024, 4096, 16384, 65536))
    return DecodeSpec(cache_lens=(1024, 4096, 16384), batch=4, heads_q=8, heads_kv=2,
                      head_dim=64, dtype="fp32", warmup_ms=20.0, rep_ms=200.0, max_reps=50)
