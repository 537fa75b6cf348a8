"""The attnkit `Backend` around `blocked_forward` / `blocked_backward`."""

from __future__ import annotations

import torch

from attnkit.backend import Backend, Capabilities

from .blocked import BlockSizes, blocked_backward, blocked_forward


class TorchBlockedBackend(Backend):
    """FlashAttention-2 in PyTorch ops; runs wherever torch does.

    Block sizes: ``block_q``/``block_k`` here, else the ``ATTNKIT_TORCH_BLOCKED_BLOCKS`` env
    var (``"BQxBK"``), else per device and problem size (`blocked.default_block_sizes`).
    """

    name = "torch-blocked"
    description = ("FlashAttention-2 (online softmax over blocks) in PyTorch ops; "
                   "O(S) memory, any device")
    capabilities = Capabilities(
        devices=frozenset({"cpu", "cuda", "mps", "xpu"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
        head_dim_min=1,
        head_dim_max=256,
        causal=True, gqa=True, window=True, seqlens_k=True, softcap=True, lse=True,
        backward=True,
        # Tiles are visited in a fixed order and accumulated without atomics.
        deterministic=True,
        lse_grad=True,
    )

    def __init__(self, block_q: int | None = None, block_k: int | None = None):
        if (block_q is None) != (block_k is None):
            raise ValueError("give both block_q and block_k, or neither")
        self.blocks = None if block_q is None else BlockSizes(block_q, block_k)

    def _options(self, problem, seqlens_k):
        return dict(scale=problem.scale, band=problem.band, seqlens_k=seqlens_k,
                    softcap=problem.softcap, blocks=self.blocks)

    def forward(self, problem, q, k, v, seqlens_k):
        return blocked_forward(q, k, v, **self._options(problem, seqlens_k))

    def backward(self, problem, q, k, v, out, lse, dout, seqlens_k, dlse=None):
        return blocked_backward(q, k, v, out, lse, dout, dlse=dlse,
                                **self._options(problem, seqlens_k))
