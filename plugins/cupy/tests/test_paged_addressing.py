"""The paged decode kernel's addressing (PageMap, load_paged_kv_16 and load_paged_tile_16 in
kernels/decode.cu) compiled for the host with the C++ compiler and AddressSanitizer, without a
GPU: every thread of a block fills the table window in turn, then loads its share of a tile
with ``cp.async`` emulated as a copy, and the K/V tiles it leaves in shared memory must be
the rows the block table names (page ``table[j // P]``, row ``j % P``), zeros past the valid
rows and the head dim. The table holds exactly the entries the window needs and the pools
exactly their pages, so reading an entry or a page past them is an ASan error; an entry
outside the pool must trap (``__trap`` is ``abort`` here). Page sizes 1 to 256 (shift and
division), tiles crossing pages, both routes (a lookup per row, per tile inside one page),
16-byte and element loads, a transposed pool layout, a window capped at PAGE_WINDOW; table
and window reads are counted, so each case is known to take its route. Marked ``nvcc`` like
the other compile checks."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from host_build import build_host, kernel_text

pytestmark = pytest.mark.nvcc

ROWS, DP, NT = 64, 64, 128  # a decode tile of 64 keys, head dim bucket 64, 4 warps
LDS = DP + 8

PRELUDE = """
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
typedef unsigned int u32;
typedef unsigned short u16;
typedef long long i64;
#define ATTN_DEVICE inline
using std::max;
using std::min;
struct Dim3 { unsigned x; };
static Dim3 threadIdx;
static long table_reads, window_reads;  // counted by the test's instrumentation
#define __trap() std::abort()
#define __syncthreads() ((void)0)  // the harness runs fill's phases itself
static unsigned char* smem_base;
// Shared memory is one host buffer; a cp.async copies src_bytes and zero-fills the rest.
inline u32 smem_u32(const void* p) { return (u32)((const unsigned char*)p - smem_base); }
inline void cp_async16(u32 dst, const void* src, int src_bytes) {
    std::memset(smem_base + dst, 0, 16);
    if (src_bytes) std::memcpy(smem_base + dst, src, src_bytes);
}
"""

MAIN = """
static std::vector<u16> read_file(const char* path, size_t n) {
    std::vector<u16> v(n);
    FILE* f = std::fopen(path, "rb");
    if (!f || std::fread(v.data(), 2, n, f) != n) {
        std::fprintf(stderr, "cannot read %s\\n", path);
        std::exit(2);
    }
    std::fclose(f);
    return v;
}

int main(int argc, char** argv) {
    // P shift num_pages n0 nvalid D vec hk k_sp k_sh k_ss k_sd v_sp v_sh v_ss v_sd pool_elems
    // n_entries mode end kfile vfile tablefile outfile
    i64 a[20];
    for (int i = 0; i < 20; ++i) a[i] = std::strtoll(argv[1 + i], 0, 10);
    const int P = (int)a[0], shift = (int)a[1], num_pages = (int)a[2], n0 = (int)a[3];
    const int nvalid = (int)a[4], D = (int)a[5], vec = (int)a[6], hk = (int)a[7];
    const i64 k_sp = a[8], k_sh = a[9], k_ss = a[10], k_sd = a[11];
    const i64 v_sp = a[12], v_sh = a[13], v_ss = a[14], v_sd = a[15];
    const size_t pool_elems = (size_t)a[16], n_entries = (size_t)a[17];
    const int mode = (int)a[18];  // PAGED_ROWS or PAGED_WHOLE
    const int end = (int)a[19];  // the split's end: the window fills up to its entry
    std::vector<u16> k = read_file(argv[21], pool_elems), v = read_file(argv[22], pool_elems);
    std::vector<int> table(n_entries);  // exactly the entries the window needs
    {
        FILE* f = std::fopen(argv[23], "rb");
        if (!f || std::fread(table.data(), 4, n_entries, f) != n_entries) return 2;
        std::fclose(f);
    }
    std::vector<unsigned char> smem(2 * ROWS * LDS * 2, 0xAB);  // garbage before the load
    smem_base = smem.data();
    u16* sk = (u16*)smem.data();
    u16* sv = sk + ROWS * LDS;
    std::vector<int> win(PAGE_WINDOW, -7);  // garbage before the fill
    PageMap pm = PageMap::of_batch(table.data(), 0, (int)n_entries, P, shift, num_pages,
                                   win.data());
    if (pm.holds(n0, n0 + nvalid)) return 3;  // an empty window holds nothing
    for (unsigned t = 0; t < NT; ++t) {  // each thread's share of the fill, between barriers
        threadIdx.x = t;
        PageMap mine = pm;
        mine.fill(n0, end, NT);
        if (t == NT - 1) pm = mine;
    }
    if (!pm.holds(n0, n0 + nvalid)) return 4;
    for (unsigned t = 0; t < NT; ++t) {
        threadIdx.x = t;
        load_paged_tile_16<ROWS, DP, LDS, NT>(sk, sv, k.data() + hk * k_sh,
                                              v.data() + hk * v_sh, pm, mode, n0, nvalid, k_sp,
                                              k_ss, k_sd, v_sp, v_ss, v_sd, D, vec != 0,
                                              k.data(), v.data());
    }
    std::printf("%ld %ld\\n", table_reads, window_reads);
    FILE* f = std::fopen(argv[24], "wb");
    std::fwrite(smem.data(), 1, smem.size(), f);
    std::fclose(f);
    return 0;
}
"""


def _extract(pattern: str, what: str) -> str:
    return kernel_text("decode.cu", pattern, what)


def _counted(page_map: str) -> str:
    """PageMap with its table reads (the fill) and window reads (locate) counted."""
    for read, counter in (("const int e = row[t];", "table_reads"),
                          ("page = win[t - first];", "window_reads")):
        assert page_map.count(read) == 1, f"PageMap's {read!r} moved: update the test"
        page_map = page_map.replace(read, f"++{counter}; {read}")
    return page_map


@pytest.fixture(scope="module")
def host_loader(tmp_path_factory):
    body = (kernel_text("common.cuh", r"^template <int ROWS, int DP, int LDS, int NT, bool LO = "
                        r"false>\nATTN_DEVICE void load_tile_16\(.*?^\}\n", "load_tile_16")
            + _extract(r"^constexpr int PAGED_NONE = .*?;\n", "the PAGED_* modes")
            + _extract(r"^#define PAGE_WINDOW \d+\n", "PAGE_WINDOW")
            + _counted(_extract(r"^struct PageMap \{.*?^\};\n", "struct PageMap"))
            + _extract(r"^template <int ROWS, int DP, int LDS, int NT>\n"
                       r"ATTN_DEVICE void load_paged_kv_16\(.*?^\}\n", "load_paged_kv_16")
            + _extract(r"^template <int ROWS, int DP, int LDS, int NT>\n"
                       r"ATTN_DEVICE void load_paged_tile_16\(.*?^\}\n", "load_paged_tile_16"))
    consts = f"constexpr int ROWS = {ROWS}, DP = {DP}, LDS = {LDS}, NT = {NT};\n"
    return build_host(tmp_path_factory.mktemp("paged"), "paged", PRELUDE + body + consts + MAIN,
                      "-std=c++17", "-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer")


# (page size, first key of the tile, valid rows, head dim, 16-byte loads, pool layout)
CASES = [
    (1, 3, 64, 64, True, "nhpd"),
    (5, 7, 50, 64, True, "nhpd"),
    (5, 0, 64, 40, False, "nphd"),
    (16, 40, 64, 64, True, "nhpd"),
    (16, 8, 9, 56, True, "nphd"),
    (64, 64, 64, 64, True, "nhpd"),
    (64, 100, 64, 64, False, "nhpd"),
    (256, 192, 30, 64, True, "nhpd"),
    (3, 1, 64, 24, False, "nhpd"),
    (128, 128, 64, 64, True, "nphd"),
    (256, 0, 64, 40, False, "nhpd"),
    (64, 0, 10, 64, True, "nphd"),
    (16, 48, 64, 64, True, "nhpd"),
    (32, 32, 40, 64, True, "nphd"),
    (16, 0, 9, 56, False, "nhpd"),
    (48, 16, 64, 40, True, "nhpd"),
    (32, 0, 17, 64, False, "nphd"),
]
MODES = {"rows": 1, "whole": 2}  # PAGED_* of decode.cu
# Each case row by row, and through one lookup per tile where its tile lies inside a page.
LOADS = ([(*c, "rows") for c in CASES]
         + [(*c, "whole") for c in CASES if c[0] % ROWS == 0 and c[1] % ROWS == 0])


def _run(host_loader, tmp_path, P, n0, nvalid, D, vec, layout, route, table, num_pages,
         end=None, seed=0):
    """The loader over ``table`` (the window filled up to key ``end - 1``'s entry, default
    the tile's last): its process, and the pools it read (N, H, P, D) as views."""
    Hkv, hk, rng = 2, 1, np.random.default_rng(seed)
    Dpad = D + 8  # a row stride beyond D (multiple of 8: 16-byte loads stay aligned)
    shape = (num_pages, P, Hkv, Dpad) if layout == "nphd" else (num_pages, Hkv, P, Dpad)
    k, v = (rng.integers(1, 0xFFFF, size=shape, dtype=np.uint16) for _ in range(2))
    kv = [x.transpose(0, 2, 1, 3) if layout == "nphd" else x for x in (k, v)]  # (N, H, P, D)
    strides = [s // 2 for s in kv[0].strides]  # elements, (page, head, row, column)
    files = []
    for name, arr in (("k", k), ("v", v), ("t", np.asarray(table, dtype=np.int32))):
        path = tmp_path / name
        np.ascontiguousarray(arr).tofile(path)
        files.append(str(path))
    shift = P.bit_length() - 1 if P & (P - 1) == 0 else -1
    args = [P, shift, num_pages, n0, nvalid, D, int(vec), hk, *strides, *strides, k.size,
            len(table), MODES[route], n0 + nvalid if end is None else end, *files,
            str(tmp_path / "smem")]
    run = subprocess.run([str(host_loader), *map(str, args)], capture_output=True, text=True)
    return run, kv, hk


@pytest.mark.parametrize("case", LOADS, ids=lambda c: f"P{c[0]}-n{c[1]}-v{c[2]}-D{c[3]}-"
                         f"{'vec' if c[4] else 'scalar'}-{c[5]}-{c[6]}")
def test_paged_tile_load_reads_the_tables_rows(host_loader, tmp_path, case):
    P, n0, nvalid, D, vec, layout, route = case
    rng = np.random.default_rng(P * 1000 + n0)
    needed = -(-(n0 + nvalid) // P)  # entries of keys 0 .. n0 + nvalid - 1
    num_pages = needed + 3
    table = rng.permutation(num_pages)[:needed].astype(np.int32)
    run, kv, hk = _run(host_loader, tmp_path, *case, table, num_pages, seed=P * 1000 + n0)
    assert run.returncode == 0, run.stderr[-4000:]
    # Table reads: the window's entries, once each over the block. Window reads over the
    # block's threads: one each (whole), one per copy of a valid row, shared by K and V (rows).
    copies = nvalid * (-(-D // 8) if vec else D)
    want = (needed - n0 // P, {"whole": NT, "rows": copies}[route])
    assert tuple(map(int, run.stdout.split())) == want, (route, run.stdout, want)
    smem = np.fromfile(tmp_path / "smem", dtype=np.uint16).reshape(2, ROWS, LDS)
    for which, pool, tile in (("K", kv[0], smem[0]), ("V", kv[1], smem[1])):
        want = np.zeros((ROWS, DP), dtype=np.uint16)
        for r in range(nvalid):
            j = n0 + r
            want[r, :D] = pool[table[j // P], hk, j % P, :D]
        got = tile[:, :DP]
        bad = np.argwhere(got != want)
        assert bad.size == 0, (f"{which} tile differs at (row, column) {bad[:5].tolist()}: "
                               f"got {got[tuple(bad[0])]}, want {want[tuple(bad[0])]}")


def test_the_window_stops_at_page_window_entries(host_loader, tmp_path):
    """A split whose keys need more entries than the window holds fills PAGE_WINDOW of them
    (the table ends there: one more read would be an ASan error) and loads its tile."""
    window = int(kernel_text("decode.cu", r"^#define PAGE_WINDOW (\d+)$", "PAGE_WINDOW")
                 .split()[-1])
    P, n0 = 1, 70
    table = np.arange(n0 + window, dtype=np.int32)[::-1].copy()
    run, _, _ = _run(host_loader, tmp_path, P, n0, 64, 64, True, "nhpd", "rows", table,
                     len(table), end=n0 + 10 * window)
    assert run.returncode == 0, run.stderr[-4000:]
    assert int(run.stdout.split()[0]) == window


@pytest.mark.parametrize("entry", [-1, 9])
def test_an_entry_outside_the_pool_traps_before_any_copy(host_loader, tmp_path, entry):
    """The check can fail: an entry a key needs below 0 or at the pool's page count stops the
    fill (``__trap``: an abort on the host) before a tile is loaded."""
    P, n0, nvalid, D, num_pages = 16, 0, 40, 64, 9
    table = np.array([3, entry, 5], dtype=np.int32)
    run, _, _ = _run(host_loader, tmp_path, P, n0, nvalid, D, True, "nhpd", "rows", table,
                     num_pages)
    assert run.returncode != 0 and not (tmp_path / "smem").exists()
    run, _, _ = _run(host_loader, tmp_path, P, n0, nvalid, D, True, "nhpd", "rows",
                     np.array([3, 4, 5], dtype=np.int32), num_pages)
    assert run.returncode == 0, run.stderr[-4000:]


def test_an_entry_past_the_needed_ones_would_be_caught(host_loader, tmp_path):
    """The check can fail: a table one entry short of what the valid rows need makes the
    fill read past it, and ASan stops the run."""
    table = np.arange(2, dtype=np.int32)  # keys 32..39 need a third entry
    run, _, _ = _run(host_loader, tmp_path, 16, 0, 40, 64, True, "nhpd", "rows", table, 4)
    assert run.returncode != 0 and "heap-buffer-overflow" in run.stderr
