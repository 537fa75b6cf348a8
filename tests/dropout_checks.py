"""Checks shared by the dense and packed dropout tests."""

import contextlib
import dataclasses

import torch
import torch.utils.checkpoint

from attnkit.reference_backend import ReferenceBackend
from attnkit.registry import registry


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


@contextlib.contextmanager
def reference_without_dropout(name: str):
    """The reference registered as ``name`` (selectable by name only) with
    ``Capabilities.dropout`` off, for the block."""

    class NoDropout(ReferenceBackend):
        capabilities = dataclasses.replace(ReferenceBackend.capabilities, dropout=False)

    NoDropout.name = name
    registry.register(NoDropout(), priority=None)
    try:
        yield
    finally:
        registry.unregister(name)
