"""Serving a batch of requests from one page pool, the way paged-attention engines do, on
attnkit's paged KV-cache API.

- One pool of fixed-size pages per cache (K and V) and a free list; each request owns a row
  of the block table, and a page is handed out only when a request's next token needs one.
- Prefix sharing: the requests start with one system prompt. Its keys/values are computed
  once; its full pages are shared by every request (their table rows point at the same
  pages), and its last, partly filled page is copied per request before anyone appends to
  it (copy-on-write), so no request writes into a page another one reads.
- Each request's own prompt is prefilled in one call with several query tokens (bottom-right
  causal), then every request decodes one token per step, all in one batched call that
  appends into the pages and attends.
- Every attention output is checked against recomputing attention from scratch over the
  request's whole token sequence with ``attnkit.attention`` (no cache).

Run: ``python examples/paged_serving.py [--backend NAME] [--page-size N]`` (CPU, seconds).
"""

from __future__ import annotations

import argparse

import torch

import attnkit


class Model:
    """One attention layer's projections, enough to make queries, keys and values of tokens
    and to pick the next token from an attention output."""

    def __init__(self, vocab=64, d_model=64, heads=4, kv_heads=2, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, d_model // heads
        self.embed = torch.randn(vocab, d_model, generator=g)
        self.wq = torch.randn(d_model, d_model, generator=g) / d_model ** 0.5
        self.wk = torch.randn(d_model, kv_heads * self.head_dim, generator=g) / d_model ** 0.5
        self.wv = torch.randn(d_model, kv_heads * self.head_dim, generator=g) / d_model ** 0.5
        self.out = torch.randn(d_model, vocab, generator=g)

    def qkv(self, tokens: torch.Tensor):
        """``(B, S)`` tokens -> q ``(B, H, S, Dh)``, k, v ``(B, Hkv, S, Dh)``."""
        x = self.embed[tokens]
        B, S, _ = x.shape

        def heads(t, n):
            return t.view(B, S, n, self.head_dim).transpose(1, 2).contiguous()

        return (heads(x @ self.wq, self.heads), heads(x @ self.wk, self.kv_heads),
                heads(x @ self.wv, self.kv_heads))

    def next_token(self, out: torch.Tensor) -> torch.Tensor:
        """Greedy pick from the last position's attention output ``(B, H, S, Dh)``."""
        last = out[:, :, -1].reshape(out.shape[0], -1)
        return (last @ self.out).argmax(-1)


class PagePool:
    """Page pools for K and V, a free list, and a block table row per request."""

    def __init__(self, n_pages, page_size, kv_heads, head_dim, max_pages, n_requests):
        self.page_size = page_size
        shape = (n_pages, kv_heads, page_size, head_dim)
        self.k, self.v = torch.zeros(shape), torch.zeros(shape)
        self.free = list(range(n_pages - 1, -1, -1))
        self.table = torch.full((n_requests, max_pages), -1, dtype=torch.int32)

    def ensure(self, request: int, length: int) -> None:
        """Give ``request`` pages for positions ``< length``."""
        for j in range(-(-length // self.page_size)):
            if self.table[request, j] < 0:
                self.table[request, j] = self.free.pop()

    def copy_page(self, src: int) -> int:
        page = self.free.pop()
        self.k[page], self.v[page] = self.k[src], self.v[src]
        return page


def main(backend=None, page_size=4, steps=6, verbose=True) -> float:
    model = Model()
    gen = torch.Generator().manual_seed(1)
    system = torch.randint(0, 64, (1, 10), generator=gen)
    prompts = [torch.randint(0, 64, (1, n), generator=gen) for n in (1, 7, 3, 12)]
    R, P = len(prompts), page_size
    longest = system.shape[1] + max(p.shape[1] for p in prompts) + steps
    pool = PagePool(n_pages=R * (-(-longest // P) + 1), page_size=P, kv_heads=model.kv_heads,
                    head_dim=model.head_dim, max_pages=-(-longest // P) + 1, n_requests=R)
    history = [system.clone() for _ in range(R)]  # every request's tokens, for the check
    worst = 0.0

    def check(r, out_rows):
        """``out_rows`` (Hq, S, Dh): attention of the last S tokens of request r."""
        nonlocal worst
        q, k, v = model.qkv(history[r])
        full = attnkit.attention(q, k, v, causal=True, backend="reference")
        worst = max(worst, (out_rows - full[0, :, -out_rows.shape[1]:]).abs().max().item())

    with torch.no_grad():
        # The system prompt: written once into request 0's pages, then shared.
        n_sys = system.shape[1]
        q, k, v = model.qkv(system)
        pool.ensure(0, n_sys)
        zero = torch.zeros(1, dtype=torch.int32)
        out = attnkit.attention_with_kvcache(q, pool.k, pool.v, zero, k, v,
                                             block_table=pool.table[:1], backend=backend)
        check(0, out[0])
        full_pages, partial = divmod(n_sys, P)
        for r in range(1, R):
            pool.table[r, :full_pages] = pool.table[0, :full_pages]  # shared, read only
            if partial:  # copy-on-write: the page this request will append into
                pool.table[r, full_pages] = pool.copy_page(int(pool.table[0, full_pages]))
        # Each request's own prompt: one call with several queries, bottom-right causal.
        lens = torch.full((R,), n_sys, dtype=torch.int32)
        tokens = torch.zeros(R, dtype=torch.long)
        for r, prompt in enumerate(prompts):
            q, k, v = model.qkv(prompt)
            pool.ensure(r, int(lens[r]) + prompt.shape[1])
            out = attnkit.attention_with_kvcache(q, pool.k, pool.v, lens[r:r + 1], k, v,
                                                 block_table=pool.table[r:r + 1],
                                                 backend=backend)
            history[r] = torch.cat([history[r], prompt], 1)
            check(r, out[0])
            lens[r] += prompt.shape[1]
            tokens[r] = model.next_token(out)[0]
        # Decoding: one batched call per step appends every request's token and attends.
        for _ in range(steps):
            for r in range(R):
                pool.ensure(r, int(lens[r]) + 1)
                history[r] = torch.cat([history[r], tokens[r].view(1, 1)], 1)
            q, k, v = model.qkv(tokens.view(R, 1))
            out = attnkit.attention_with_kvcache(q, pool.k, pool.v, lens, k, v,
                                                 block_table=pool.table, backend=backend)
            for r in range(R):
                check(r, out[r])
            lens += 1
            tokens = model.next_token(out)
    used = len(pool.k) - len(pool.free)
    if verbose:
        print(f"{R} requests, page size {P}: {used} pages used of {len(pool.k)} (the "
              f"{full_pages} full pages of the {n_sys}-token system prompt stored once); "
              f"largest difference from recomputation {worst:.2e}")
    return worst


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None)
    parser.add_argument("--page-size", type=int, default=4)
    args = parser.parse_args()
    worst = main(args.backend, args.page_size)
    if worst > 1e-4:
        raise SystemExit(f"paged attention differs from recomputation by {worst:.2e}")
