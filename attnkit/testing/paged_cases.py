"""Paged KV-cache cases: page pools and block tables built from contiguous caches, so each
paged result can be checked against the reference over the same keys laid out in order.

A `PagedCase` fills each sequence to its own level (empty, shorter than a page, ending one
short of a page boundary so the append crosses it, full), lays its pages out in order,
shuffled through the pool, or with a prefix of pages shared by several sequences, and
poisons every slot of the pool that holds no key with NaN: a backend that reads one into a
result fails the accuracy check.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from attnkit.testing.cases import DTYPE_NAMES, heads_id, unique
from attnkit.testing.decode_cases import CacheCase, cache_case_id, decode_dtypes, rand

PAGE_SIZES = (1, 5, 16, 64, 256)
#: An entry past the pages a sequence needs: never read, so it may be anything.
UNUSED_ENTRY = -1
GARBAGE_ENTRY = 1 << 30


@dataclass(frozen=True, kw_only=True)
class PagedCase(CacheCase):
    page_size: int = 16
    #: The longest fill level before the append.
    max_len: int = 40
    #: "ordered" (pages in sequence order), "shuffled" (a random permutation of the pool) or
    #: "shared" (sequences 0..2 share their first pages, the rest shuffled).
    pages: str = "shuffled"
    #: "nhpd": pools (num_pages, Hkv, page_size, D); "nphd": (num_pages, page_size, Hkv, D)
    #: buffers passed as ``.transpose(1, 2)``.
    layout: str = "nhpd"

    @property
    def id(self) -> str:
        return cache_case_id(self, [
            DTYPE_NAMES[self.dtype], f"page{self.page_size}", self.pages,
            heads_id(self),
            f"len{self.max_len}new{self.s_new}q{self.seqlen_q}d{self.head_dim}"], "nhpd")

    @property
    def shared_pages(self) -> int:
        """Pages at the front of sequences 0..2 that they share (0 unless "shared")."""
        return self.max_len // 2 // self.page_size if self.pages == "shared" else 0

    def fill_levels(self, gen: torch.Generator) -> list[int]:
        P, top = self.page_size, self.max_len
        if self.pages == "shared":
            lo = self.shared_pages * P  # sharers hold at least the shared pages, full
            rest = torch.randint(lo, top + 1, (self.batch,), generator=gen).tolist()
            fixed = [top, lo, None, 0]
            return [fixed[b] if b < 4 and fixed[b] is not None else rest[b]
                    for b in range(self.batch)]
        rest = torch.randint(0, top + 1, (self.batch,), generator=gen).tolist()
        # Empty; one short of a page boundary (shorter than a page); full.
        fixed = [0, min(P - 1, top), top]
        return [fixed[b] if b < 3 else rest[b] for b in range(self.batch)]

    def make_inputs(self, device, gen: torch.Generator) -> PagedInputs:
        B, Hq, Hkv, D, P = self.batch, self.heads_q, self.heads_kv, self.head_dim, self.page_size
        levels = self.fill_levels(gen)
        need = [-(-(L + self.s_new) // P) for L in levels]
        cap = max(need + [1]) + 1  # one entry more than any sequence needs
        longest = cap * P
        kc = rand((B, Hkv, longest, D), self.dtype, "cpu", gen)
        vc = rand((B, Hkv, longest, D), self.dtype, "cpu", gen)
        sp = self.shared_pages
        sharers = [b for b in range(min(B, 3)) if levels[b] >= sp * P] if sp else []
        for b in sharers[1:]:  # shared pages hold the same keys for every sharer
            kc[b, :, :sp * P] = kc[sharers[0], :, :sp * P]
            vc[b, :, :sp * P] = vc[sharers[0], :, :sp * P]
        # Logical pages: each sequence's own, with the sharers' first `sp` pages one set.
        owner = []  # (b, page j) per distinct page
        table_logical = [[None] * n for n in need]
        for b in range(B):
            for j in range(need[b]):
                if b in sharers[1:] and j < sp:
                    table_logical[b][j] = table_logical[sharers[0]][j]
                    continue
                table_logical[b][j] = len(owner)
                owner.append((b, j))
        spare = 3
        n_pages = len(owner) + spare
        order = (torch.arange(n_pages) if self.pages == "ordered"
                 else torch.randperm(n_pages, generator=gen))
        table = torch.full((B, cap), UNUSED_ENTRY, dtype=torch.int32)
        for b in range(B):
            for j in range(need[b]):
                table[b, j] = int(order[table_logical[b][j]])
        if B > 1:
            table[1, cap - 1] = GARBAGE_ENTRY  # past what sequence 1 needs: never read
        shape = (n_pages, P, Hkv, D) if self.layout == "nphd" else (n_pages, Hkv, P, D)
        pools = []
        for src in (kc, vc):
            pool = torch.full(shape, float("nan"), dtype=self.dtype)
            pool = pool.transpose(1, 2) if self.layout == "nphd" else pool
            for b, L in enumerate(levels):
                for p in range(L):
                    pool[int(table[b, p // P]), :, p % P] = src[b, :, p]
            pools.append(pool.to(device))
        q = rand((B, Hq, self.seqlen_q, D), self.dtype, device, gen)
        k_new = v_new = None
        if self.s_new:
            k_new = rand((B, Hkv, self.s_new, D), self.dtype, device, gen)
            v_new = rand((B, Hkv, self.s_new, D), self.dtype, device, gen)
        return PagedInputs(q, pools[0], pools[1], table.to(device), levels, k_new, v_new,
                           kc, vc)


@dataclass
class PagedInputs:
    q: torch.Tensor
    k_pages: torch.Tensor
    v_pages: torch.Tensor
    block_table: torch.Tensor
    levels: list[int]
    k_new: torch.Tensor | None
    v_new: torch.Tensor | None
    #: The same keys/values contiguous (B, Hkv, capacity, D) on the CPU, before the append.
    k_contig: torch.Tensor
    v_contig: torch.Tensor

    def expected_after_append(self):
        """``(k_pages, v_pages, k_contig, v_contig)`` as they must be after the append:
        only the appended slots changed."""
        kp, vp = self.k_pages.clone(), self.v_pages.clone()
        kc, vc = self.k_contig.clone(), self.v_contig.clone()
        if self.k_new is None:
            return kp, vp, kc, vc
        P = kp.shape[2]
        table = self.block_table.cpu()
        for b, L in enumerate(self.levels):
            for i in range(self.k_new.shape[2]):
                p = L + i
                page = int(table[b, p // P])
                kp[page, :, p % P] = self.k_new[b, :, i]
                vp[page, :, p % P] = self.v_new[b, :, i]
                kc[b, :, p] = self.k_new[b, :, i].cpu()
                vc[b, :, p] = self.v_new[b, :, i].cpu()
        return kp, vp, kc, vc


def spoil_table(table: torch.Tensor, lens: torch.Tensor, defect: str, num_pages: int,
                fill: int = -1) -> None:
    """Write one defect a paged call must refuse into a block table of two sequences and its
    fill levels, in place: "negative" (an entry sequence 0 needs is -1), "outside" (an entry
    sequence 1 needs is ``num_pages``, past the pool), "same_slot" (sequence 1 takes sequence
    0's pages and level, so both append to one slot) or "negative_fill" (level ``fill``)."""
    if defect == "negative":
        table[0, 1] = -1
    elif defect == "outside":
        table[1, 0] = num_pages
    elif defect == "same_slot":
        table[1] = table[0]
        lens[1] = lens[0]
    elif defect == "negative_fill":
        lens[1] = fill
    else:
        raise ValueError(f"unknown block table defect {defect!r}")


def small_paged_inputs(caps, device, page_size: int = 4):
    """``q, (k_pages, v_pages), table, lens, (k_new, v_new)``: two sequences of 6 and 3 keys
    in a pool of 6 pages (each needs 2 after one append; the third entry is -1), in the first
    dtype and a head dim ``caps`` (a backend's `Capabilities`) allow."""
    dt = next(d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
              if d in caps.dtypes)
    D = max(caps.head_dim_min, min(32, caps.head_dim_max))
    gen = torch.Generator().manual_seed(3)
    pools = [rand((6, 1, page_size, D), dt, device, gen) for _ in range(2)]
    table = torch.tensor([[4, 1, -1], [0, 5, -1]], dtype=torch.int32, device=device)
    lens = torch.tensor([6, 3], dtype=torch.int32, device=device)
    q = rand((2, 1, 1, D), dt, device, gen)
    new = [rand((2, 1, 1, D), dt, device, gen) for _ in range(2)]
    return q, pools, table, lens, new


def spoil_small_table(table, lens, defect: str, num_pages: int):
    """``(table, lens)`` of `small_paged_inputs` with one defect a call must refuse, with or
    without its one-token append: `spoil_table`'s ("negative_fill": level -1), or
    "too_few" (sequence 0 holds 9 keys, its row 2 pages of 4)."""
    if defect == "too_few":
        lens[0] = 9
        return table[:, :2].contiguous(), lens
    spoil_table(table, lens, defect, num_pages)
    return table, lens


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bits as integers (NaN poison compares equal to itself)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def paged_cases(caps, quick: bool = False) -> list[PagedCase]:
    """Every page size of `PAGE_SIZES` with appends crossing page boundaries, shuffled and
    shared pages; then GQA/MQA, several queries, attending without appending, non-causal,
    window, softcap, a transposed pool layout, each dtype, and a long cache split-KV kernels
    split. A backend without ``paged`` gets a few cases, checked to be refused."""
    dts = decode_dtypes(caps, quick)
    hd = 64 if caps.head_dim_min <= 64 <= caps.head_dim_max else caps.head_dim_min
    if quick:
        hd = 32 if caps.head_dim_min <= 32 <= caps.head_dim_max else hd
    base = PagedCase(dtype=dts[0], head_dim=hd)
    if not caps.paged:
        return [base, replace(base, page_size=5, s_new=3, seqlen_q=3)]
    cases = []
    for P in PAGE_SIZES:
        top = max(2 * P + 3, 40) if not quick else max(2 * P + 1, 20)
        cases.append(replace(base, page_size=P, max_len=top, s_new=3, seqlen_q=3))
        if not quick or P in (1, 16, 256):
            cases.append(replace(base, page_size=P, max_len=top, pages="shared"))
    small = replace(base, page_size=5, max_len=30)
    cases += [
        replace(small, pages="ordered", s_new=2, seqlen_q=2),
        replace(small, heads_q=8, heads_kv=1, s_new=2, seqlen_q=2),
        replace(small, heads_q=2, heads_kv=2),
        replace(small, s_new=6, seqlen_q=6, tag="chunk"),
        replace(small, s_new=0, seqlen_q=3),
        replace(small, s_new=2, seqlen_q=2, causal=False),
        replace(small, window=(8, 0), s_new=2, seqlen_q=2),
        replace(small, softcap=10.0),
        replace(small, layout="nphd", s_new=3, seqlen_q=3, pages="shared"),
    ]
    cases += [replace(small, dtype=d) for d in dts[1:]]
    long = 300 if quick else 700
    cases.append(replace(base, page_size=16, batch=2, heads_q=4, heads_kv=1, max_len=long,
                         tag="long"))
    if not quick:
        cases.append(replace(base, page_size=64, batch=3, heads_q=8, heads_kv=2,
                             max_len=long, s_new=4, seqlen_q=4, window=(200, 0),
                             pages="shared", tag="long"))
    return unique(cases)
