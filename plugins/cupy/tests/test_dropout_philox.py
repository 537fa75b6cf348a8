"""The kernels' keep mask (AttnDropout in kernels/common.cuh) compiled for the host with the
C++ compiler and compared bit for bit with `attnkit.dropout`'s definition, without a GPU: the
Philox rounds, key schedule, counter layout, 16-bit draws and threshold (one element at a
time, as the fp32 kernels ask), and the shared calls of the mma kernels' layouts (row_bits:
forward and dQ; col_bits: dK/dV), run by 32 host threads standing in for a warp's lanes with
``__shfl_sync`` emulated. Marked ``nvcc`` like the other compile checks (a toolchain)."""

from __future__ import annotations

import subprocess

import pytest
import torch
from host_build import build_host, kernel_text

from attnkit.dropout import keep_where, threshold

pytestmark = pytest.mark.nvcc

HOST_PRELUDE = """
#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>
typedef unsigned int u32;
typedef long long i64;
#define ATTN_DEVICE inline
static inline u32 __umulhi(u32 a, u32 b) { return (u32)(((unsigned long long)a * b) >> 32); }
"""

MAIN = """
// A warp's shuffle: every lane posts its value, then reads its source's.
struct Warp {
    std::barrier<> bar{32};
    u32 slot[32];
};
struct HostShfl {
    Warp* w;
    int lane;
    u32 operator()(u32 x, int src) const {
        w->slot[lane] = x;
        w->bar.arrive_and_wait();
        const u32 r = w->slot[src];
        w->bar.arrive_and_wait();
        return r;
    }
};

int main(int argc, char** argv) {
    const long long state[2] = {strtoll(argv[1], 0, 10), strtoll(argv[2], 0, 10)};
    const AttnDropout d = AttnDropout::load(state, (u32)strtoul(argv[3], 0, 10), 1.f);
    const u32 bh = 5;
    const int m0 = 64, n0 = 128, mq0 = 32, wrow = 16;
    // One element at a time: "bh i j" lines on stdin.
    unsigned b; int i, j;
    while (scanf("%u %d %d", &b, &i, &j) == 3)
        printf("e %u %d %d %d\\n", b, i, j, (int)d.keep(b, i, j));
    // row_bits: the forward's layout with one 16-row slab and 8 key groups (16 calls).
    unsigned long long rows[32], cols[32];
    Warp w1, w2;
    std::vector<std::thread> lanes;
    for (int lane = 0; lane < 32; ++lane)
        lanes.emplace_back([&, lane] {
            rows[lane] = d.row_bits<16, 2>(bh, lane, [&](int c, int& i, int& g) {
                i = m0 + wrow + (lane >> 2) + (c & 1) * 8;
                g = (n0 >> 3) + (c >> 1);
            }, HostShfl{&w1, lane});
            cols[lane] = d.col_bits<32, 2>(bh, lane, [&](int c, int& i, int& g) {
                i = mq0 + (c >> 2) * 8 + (lane & 3) * 2 + (c & 1);
                g = ((n0 + wrow) >> 3) + ((c & 3) >> 1);
            }, HostShfl{&w2, lane});
        });
    for (auto& t : lanes) t.join();
    for (int lane = 0; lane < 32; ++lane)
        for (int c = 0; c < 16; ++c)
            for (int e = 0; e < 2; ++e)
                printf("r %u %d %d %d\\n", bh, m0 + wrow + (lane >> 2) + (c & 1) * 8,
                       8 * ((n0 >> 3) + (c >> 1)) + 2 * (lane & 3) + e,
                       (int)((rows[lane] >> (2 * c + e)) & 1));
    for (int lane = 0; lane < 32; ++lane)
        for (int c = 0; c < 32; ++c)
            printf("c %u %d %d %d\\n", bh, mq0 + (c >> 2) * 8 + (lane & 3) * 2 + (c & 1),
                   n0 + wrow + (lane >> 2) + ((c & 3) >> 1) * 8, (int)((cols[lane] >> c) & 1));
    return 0;
}
"""


def _struct_source() -> str:
    return kernel_text("common.cuh", r"^struct AttnDropout \{.*?^\};\n", "struct AttnDropout")


@pytest.fixture(scope="module")
def host_keep(tmp_path_factory):
    return build_host(tmp_path_factory.mktemp("philox"), "philox",
                      HOST_PRELUDE + _struct_source() + MAIN, "-std=c++20", "-O1", "-pthread")


@pytest.mark.parametrize("seed, offset, p", [
    (0, 0, 0.5),
    (-1, -1, 0.1),                             # every seed bit set; offset word 0xffffffff
    (0x123456789ABCDEF, (7 << 32) + 3, 0.25),  # only the offset's low word counts
    (-(2**63), 2**40, 0.9),
])
def test_kernel_keep_mask_is_the_definition(host_keep, seed, offset, p):
    gen = torch.Generator().manual_seed(seed & 0xFFFF)
    n = 2000
    bh, i, j = (torch.randint(0, 2**31, (n,), generator=gen) for _ in range(3))
    bh[:16], i[:16], j[:16] = 0, 0, torch.arange(16)  # both halves of every word
    stdin = "\n".join(f"{a} {b} {c}" for a, b, c in zip(bh.tolist(), i.tolist(), j.tolist()))
    run = subprocess.run([str(host_keep), str(seed), str(offset), str(threshold(p))],
                         input=stdin, capture_output=True, text=True, check=True)
    state = torch.tensor([seed, offset], dtype=torch.int64)
    rows = {"e": [], "r": [], "c": []}
    for line in run.stdout.splitlines():
        kind, *vals = line.split()
        rows[kind].append([int(x) for x in vals])
    assert [len(rows[k]) for k in "erc"] == [n, 32 * 32, 32 * 32]
    for kind, what in (("e", "one element"), ("r", "row_bits (forward, dQ layout)"),
                       ("c", "col_bits (dK/dV layout)")):
        t = torch.tensor(rows[kind])
        want = keep_where(state, p, t[:, 0], t[:, 1], t[:, 2])
        bad = int((t[:, 3].bool() != want).sum())
        assert bad == 0, f"{what}: {bad} of {len(t)} keep decisions differ"
    # the layouts cover distinct elements: a wrong exchange cannot hide in duplicates
    for kind in "rc":
        assert len({tuple(r[:3]) for r in rows[kind]}) == 32 * 32
