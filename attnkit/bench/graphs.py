"""One call captured in a CUDA graph, as serving engines replay a decoding step: what is left
of the step's time is the kernels, not Python or launches."""

from __future__ import annotations

from collections.abc import Callable

import torch


def capture(fn: Callable[[], torch.Tensor], device: torch.device,
            warmup: int = 3) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """``(graph, out)``: ``fn``'s launches recorded in ``graph``, whose replays write ``out``.

    ``fn`` runs ``warmup`` times on a side stream first (compilation, autotuning and
    allocations stay outside the graph, as ``torch.cuda.graph`` asks). A backend that
    synchronizes with the host or allocates outside the graph's pool fails here, which is
    what a serving engine would see."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
