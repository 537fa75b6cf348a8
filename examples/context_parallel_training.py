"""A few training steps of a tiny causal language model whose sequence is sharded over ranks
with `attnkit.distributed`, checked against the same model trained on the whole sequence.

Each rank holds its shard of the tokens (``attnkit.distributed.shard``, head-tail layout by
default), runs the model on it (everything but attention is per token; attention is
`ring_attention` or `ulysses_attention`), and sums its shard's loss; the parameter gradients
are summed over the ranks. Every rank also trains a copy of the model on the whole sequence
with `attnkit.attention`, and at every step the loss and every gradient must agree.

Run: ``python examples/context_parallel_training.py [--world 4] [--method p2p|allgather|
ulysses] [--layout headtail|contiguous] [--steps 3] [--backend NAME]``: spawns the ranks
itself (gloo on the CPU; NCCL, one GPU per rank, when there are enough GPUs), or runs under
``torchrun --nproc-per-node P examples/context_parallel_training.py``.
"""

from __future__ import annotations

import argparse
import copy
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import attnkit
from attnkit.distributed import ring_attention, shard, ulysses_attention


class TinyLM(torch.nn.Module):
    """Embedding, one causal attention block with GQA, an MLP, a language-model head."""

    def __init__(self, vocab=64, dim=32, heads=4, kv_heads=2, max_len=256):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.embed = torch.nn.Embedding(vocab, dim)
        self.position = torch.nn.Embedding(max_len, dim)
        self.q = torch.nn.Linear(dim, dim)
        self.kv = torch.nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.o = torch.nn.Linear(dim, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(),
                                       torch.nn.Linear(4 * dim, dim))
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, tokens, positions, attend):
        """``tokens``/``positions`` ``(B, S)``: a whole sequence or a shard of one;
        ``attend(q, k, v)`` on ``(B, H, S, D)`` tensors."""
        x = self.embed(tokens) + self.position(positions)
        B, S, _ = x.shape
        q = self.q(x).view(B, S, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(B, S, 2, self.kv_heads, self.head_dim).unbind(2)
        a = attend(q, k.transpose(1, 2), v.transpose(1, 2))  # (B, H, S, D), read transposed
        x = x + self.o(a.transpose(1, 2).reshape(B, S, -1))
        x = x + self.mlp(x)
        return self.head(x)


def train(rank, world, args):
    device = torch.device(f"cuda:{rank}" if args.nccl else "cpu")
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    torch.manual_seed(0)  # the same model and data on every rank
    sharded = TinyLM().to(device, dtype)
    whole = copy.deepcopy(sharded)
    gen = torch.Generator().manual_seed(1)
    S = 2 * world * args.chunk
    data = torch.randint(0, 64, (2, S + 1), generator=gen).to(device)
    inputs, targets = data[:, :-1], data[:, 1:]
    positions = torch.arange(S, device=device).expand(2, S)
    mine = {name: shard(t, seq_dim=1, layout=args.layout)
            for name, t in (("inputs", inputs), ("targets", targets), ("positions", positions))}

    def ring(q, k, v):
        if args.method == "ulysses":
            return ulysses_attention(q, k, v, causal=True, layout=args.layout,
                                     backend=args.backend)
        return ring_attention(q, k, v, causal=True, layout=args.layout, comm=args.method,
                              backend=args.backend)

    opt_sharded = torch.optim.SGD(sharded.parameters(), lr=0.1)
    opt_whole = torch.optim.SGD(whole.parameters(), lr=0.1)
    tolerance = 1e-10 if dtype == torch.float64 else 2e-4
    for step in range(args.steps):
        # the whole sequence, on every rank
        opt_whole.zero_grad()
        logits = whole(inputs, positions, lambda q, k, v: attnkit.attention(
            q, k, v, causal=True, backend=args.backend))
        loss_whole = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
        (loss_whole / targets.numel()).backward()
        # this rank's shard; the loss and the gradients summed over the ranks
        opt_sharded.zero_grad()
        logits = sharded(mine["inputs"], mine["positions"], ring)
        loss = F.cross_entropy(logits.flatten(0, 1), mine["targets"].flatten(),
                               reduction="sum")
        (loss / targets.numel()).backward()
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        for p in sharded.parameters():
            dist.all_reduce(p.grad)
        worst = max(((p.grad - w.grad).abs().max() / w.grad.abs().max().clamp_min(1e-30)).item()
                    for p, w in zip(sharded.parameters(), whole.parameters()))
        loss_diff = abs(loss.item() - loss_whole.item()) / abs(loss_whole.item())
        if rank == 0:
            print(f"step {step}: loss {loss.item() / targets.numel():.6f} (whole sequence "
                  f"{loss_whole.item() / targets.numel():.6f}, relative difference "
                  f"{loss_diff:.1e}); largest relative gradient difference {worst:.1e}")
        if not (loss_diff <= tolerance and worst <= tolerance):
            raise SystemExit(f"rank {rank} step {step}: the sharded run differs from the whole "
                             f"sequence (loss {loss_diff:.3e}, gradients {worst:.3e})")
        opt_sharded.step()
        opt_whole.step()


def _worker(rank, world, port, args):
    backend = "nccl" if args.nccl else "gloo"
    if args.nccl:
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        train(rank, world, args)
    finally:
        dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2, help="ranks to spawn (default 2)")
    parser.add_argument("--method", choices=("p2p", "allgather", "ulysses"), default="p2p")
    parser.add_argument("--layout", choices=("headtail", "contiguous"), default="headtail")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=8, help="tokens per chunk (2P chunks)")
    parser.add_argument("--backend", help="the attnkit backend (default: the best available)")
    args = parser.parse_args()
    if "WORLD_SIZE" in os.environ:  # under torchrun
        args.nccl = torch.cuda.is_available()
        rank = int(os.environ["RANK"])
        if args.nccl:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        dist.init_process_group("nccl" if args.nccl else "gloo")
        try:
            train(rank, dist.get_world_size(), args)
        finally:
            dist.destroy_process_group()
        return
    args.nccl = torch.cuda.is_available() and torch.cuda.device_count() >= args.world
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(args.world, port, args), nprocs=args.world)


if __name__ == "__main__":
    main()
