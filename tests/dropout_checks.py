"""Checks shared by the dense and packed dropout tests."""

import torch
import torch.utils.checkpoint


def assert_checkpoint_regenerates(f, q, k, v, seed: int = 2) -> None:
    """Gradients of ``f(q, k, v)`` recomputed under activation checkpointing equal the plain
    ones bit for bit: the recomputation draws the same keep mask."""
    torch.manual_seed(seed)
    plain = torch.autograd.grad(f(q, k, v).square().sum(), (q, k, v))
    torch.manual_seed(seed)
    ckpt = torch.autograd.grad(torch.utils.checkpoint.checkpoint(
        f, q, k, v, use_reentrant=False).square().sum(), (q, k, v))
    for a, b in zip(plain, ckpt):
        assert torch.equal(a, b)
