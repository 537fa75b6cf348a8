// Split-KV ("flash-decoding") forward for few query rows over a long key range.
//
// A decoding step has Sq = 1..16 queries per head and thousands of keys: one block per query
// tile and head (forward.cu) leaves most SMs idle and reads K/V once per query head. Here:
//
// decode_split_kernel (fp16/bf16), grid (splits, B * Hkv, row blocks): one block takes up
//   to 16 of the group * Sq query rows of one kv head (row r = query r / group of head
//   hk * group + r % group), so each K/V byte is read once per kv head, over one contiguous
//   chunk of that head's visible keys. K/V tiles stream through an ST-stage cp.async ring
//   (ST - 1 tiles in flight per block: the kernel is bandwidth-bound). Each warp owns KW =
//   BN / NW keys of every tile and keeps its own online softmax (QK^T and PV on tensor
//   cores, rows padded to 16); the warps are merged through shared memory at the end. It
//   writes a normalized fp32 partial out and a partial lse (log2 units) per (row, split).
// decode_split_f32_kernel: the same split over keys on CUDA cores in fp32 (no tf32); warps
//   own 4 rows each, lanes one key of a 32-key tile; partial lse in natural-log units.
// decode_merge_kernel<T>: one warp per query row combines its splits exactly (weights
//   exp(lse_s - max)) and writes out in q's dtype and lse (natural log). A split that saw no
//   key has lse -inf and weight 0; a row no split saw gets out 0 and lse -inf, never NaN. A
//   split whose lse is NaN (a NaN query row) makes the row's out and lse NaN.
//
// Splits cover keys [key_lo(first query), key_hi(last query)) of their rows only, inside
// [Band::key_first, skb): keys that exist for no query are never read.
//
// PAGED: k and v are page pools (num_pages, Hkv, page_size, D) (k_sb/v_sb their page
// strides, k_ss/v_ss the row stride inside a page) and key j of batch b is row
// j % page_size of page table[b * max_pages + j / page_size], looked up as each tile loads
// (no gather copy): once per tile where pages hold whole tiles, else once per row. The
// entries come from a window of the table row in shared memory (PageMap), filled in one
// coalesced pass ahead of the tiles that need it, so no copy waits on a global table read.
// Only the entries of keys a split reads (j < skb) are read, each checked against the pool as
// the window fills, and each fill level against the row's capacity: a bad one traps before it
// addresses anything (Capabilities.paged_checks).
//
// Partials are laid out (B, Hq, Sq, splits[, D]) so a merge warp reads one row's splits in a
// run. Template parameters as in forward.cu: DP is the head dim rounded up to a bucket
// (columns D..DP-1 are zero in shared memory), BAND the causal/window mask, SOFTCAP the cap,
// PAGED the page-pool addressing above (its arguments, the block table, max_pages, page_size,
// page_shift and num_pages, come last; the contiguous kernels ignore them): for fp16/bf16 one
// of PAGED_* below, for fp32 a flag (rows looked up one by one). Paged kernels take
// PAGE_WINDOW * 4 bytes of shared memory more, after their pipeline's.
#include "common.cuh"

// The fp16/bf16 split kernel's PAGED: contiguous caches, pages looked up per row, or per tile
// (the host picks it where the page size is a multiple of BN and no left window moves a
// split's first key off a multiple of BN, so every tile lies inside one page).
constexpr int PAGED_NONE = 0, PAGED_ROWS = 1, PAGED_WHOLE = 2;

// Block-table entries a paged split block holds in shared memory: a refill (two barriers and
// one global read) every PAGE_WINDOW pages, every 8 tiles at page size 1.
#define PAGE_WINDOW 512

// Query rows per split block, for every dtype (the host's row-block count uses it too).
#define DEC_ROWS 16

// Keys [start, end) of one split of the keys visible to the block's rows. Chunks are whole
// tiles, so only the last tile of a split is partial; splits past the end get no keys.
struct SplitRange {
    int start, end;
    int i_first, i_last;  // queries of the block's first and last row
};

template <int BN, bool BAND>
ATTN_DEVICE SplitRange split_range(const Band& band, int r0, int nrows, int group, int split,
                                   int splits) {
    SplitRange s;
    s.i_first = r0 / group;
    s.i_last = (min(r0 + DEC_ROWS, nrows) - 1) / group;
    const int lo = band.key_lo(s.i_first, BAND), hi = band.key_hi(s.i_last, BAND);
    const int n = max(hi - lo, 0);
    const int chunk = ((n + splits - 1) / splits + BN - 1) / BN * BN;
    s.start = lo + split * chunk;
    s.end = min(s.start + chunk, hi);
    return s;
}

// What one split block works on (grid: split, batch x kv head, row block): its batch, kv
// head, first row, band, key range and number of key tiles.
template <int BN, bool BAND>
struct SplitBlock {
    int split, b, hk, r0, nrows, ntiles;
    Band band;
    SplitRange rg;
    ATTN_DEVICE SplitBlock(const int* seqlens, int Hkv, int group, int Sq, int Sk, int left,
                           int right, int splits) {
        split = blockIdx.x;
        b = blockIdx.y / Hkv;
        hk = blockIdx.y % Hkv;
        r0 = blockIdx.z * DEC_ROWS;
        nrows = group * Sq;
        band = Band::of_batch(seqlens, b, Sk, Sq, left, right);
        rg = split_range<BN, BAND>(band, r0, nrows, group, split, splits);
        ntiles = rg.end > rg.start ? (rg.end - rg.start + BN - 1) / BN : 0;
    }
};

// Where the keys of one batch live in paged pools (PAGED): its block-table row, the page
// size (with its log2 when a power of two, else -1: a shift instead of a division per row),
// the pool's page count, and the window of the row's entries held in shared memory: table
// positions [first, last). `first` and `last` are the same in every thread of a block.
struct PageMap {
    const int* row;  // this batch's block-table row
    int page_size, page_shift, num_pages;
    int* win;  // shared memory, PAGE_WINDOW entries
    int first, last;

    static ATTN_DEVICE PageMap of_batch(const int* table, int b, int max_pages, int page_size,
                                        int page_shift, int num_pages, int* win) {
        PageMap m;
        m.row = table + (i64)b * max_pages;
        m.page_size = page_size;
        m.page_shift = page_shift;
        m.num_pages = num_pages;
        m.win = win;
        m.first = m.last = 0;
        return m;
    }
    ATTN_DEVICE int position(int j) const {
        return page_shift >= 0 ? j >> page_shift : j / page_size;
    }
    // Whether the window holds the entries of keys [n0, n1) (n0 < n1).
    ATTN_DEVICE bool holds(int n0, int n1) const {
        return position(n0) >= first && position(n1 - 1) < last;
    }
    // The window from key n0's entry on, up to key end - 1's (at most PAGE_WINDOW): every
    // thread of the block calls it, between barriers. An entry outside [0, num_pages) traps
    // before it is stored (its thread never reaches the next barrier: nobody reads it).
    ATTN_DEVICE void fill(int n0, int end, int nt) {
        first = position(n0);
        last = min(position(end - 1) + 1, first + PAGE_WINDOW);
        for (int t = first + (int)threadIdx.x; t < last; t += nt) {
            const int e = row[t];
            if (e < 0 || e >= num_pages) __trap();
            win[t - first] = e;
        }
    }
    // Make the window hold keys [n0, n1)'s entries, refilling it up to key end - 1's where
    // it does not (block-uniform: every thread calls it with the same keys).
    ATTN_DEVICE void cover(int n0, int n1, int end, int nt) {
        if (holds(n0, n1)) return;
        __syncthreads();  // no thread still reads the window
        fill(n0, end, nt);
        __syncthreads();
    }
    // Page and row inside it of key j, whose entry the window holds (64-bit offsets: pools
    // may pass 2^31 elements).
    ATTN_DEVICE void locate(int j, i64& page, i64& slot) const {
        const int t = position(j);
        page = win[t - first];
        slot = j - t * page_size;
    }
};

// Batch b's fill level checked against its table row's capacity Sk (paged kernels): a bad one
// traps before any key is addressed.
ATTN_DEVICE void check_fill_level(const int* seqlens, int b, int Sk) {
    const int n = seqlens[b];
    if (n < 0 || n > Sk) __trap();
}

// K and V tiles of keys n0 .. n0 + ROWS - 1 of paged pools into shared memory (row stride
// LDS): one table lookup per row serves both. Rows >= nvalid and columns >= D become 0 unread
// (their table entries are not read either). kh/vh are the pools offset to the kv head.
template <int ROWS, int DP, int LDS, int NT>
ATTN_DEVICE void load_paged_kv_16(u16* sk, u16* sv, const u16* kh, const u16* vh,
                                  const PageMap& pm, int n0, int nvalid, i64 k_sp, i64 k_ss,
                                  i64 k_sd, i64 v_sp, i64 v_ss, i64 v_sd, int D, bool vec,
                                  const u16* ksafe, const u16* vsafe) {
    if (vec) {
        constexpr int CH = DP / 8;
        constexpr int ITERS = (ROWS * CH + NT - 1) / NT;
#pragma unroll
        for (int it = 0; it < ITERS; ++it) {
            const int idx = threadIdx.x + it * NT;
            if ((ROWS * CH) % NT != 0 && idx >= ROWS * CH) break;
            const int r = idx / CH, c = idx % CH;
            const bool ok = r < nvalid && c * 8 < D;
            const u16* ks = ksafe;
            const u16* vs = vsafe;
            if (ok) {
                i64 page, slot;
                pm.locate(n0 + r, page, slot);
                ks = kh + page * k_sp + slot * k_ss + c * 8;
                vs = vh + page * v_sp + slot * v_ss + c * 8;
            }
            cp_async16(smem_u32(sk + r * LDS + c * 8), ks, ok ? 16 : 0);
            cp_async16(smem_u32(sv + r * LDS + c * 8), vs, ok ? 16 : 0);
        }
    } else {
        for (int idx = threadIdx.x; idx < ROWS * DP; idx += NT) {
            const int r = idx / DP, c = idx % DP;
            u16 xk = 0, xv = 0;
            if (r < nvalid && c < D) {
                i64 page, slot;
                pm.locate(n0 + r, page, slot);
                xk = kh[page * k_sp + slot * k_ss + (i64)c * k_sd];
                xv = vh[page * v_sp + slot * v_ss + (i64)c * v_sd];
            }
            sk[r * LDS + c] = xk;
            sv[r * LDS + c] = xv;
        }
    }
}

// The K and V tiles of keys n0 .. n0 + ROWS - 1 of paged pools, by `mode` (PAGED_*): WHOLE
// (the page size a multiple of ROWS and n0 of ROWS: the tile lies inside one page) reads one
// table entry and copies the tile with the contiguous loader; ROWS looks each row's page up
// (load_paged_kv_16). The window holds the entries of the valid rows. Other arguments as
// load_paged_kv_16's.
template <int ROWS, int DP, int LDS, int NT>
ATTN_DEVICE void load_paged_tile_16(u16* sk, u16* sv, const u16* kh, const u16* vh,
                                    const PageMap& pm, int mode, int n0, int nvalid,
                                    i64 k_sp, i64 k_ss, i64 k_sd, i64 v_sp, i64 v_ss, i64 v_sd,
                                    int D, bool vec, const u16* ksafe, const u16* vsafe) {
    if (mode == PAGED_WHOLE) {
        i64 page, slot;
        pm.locate(n0, page, slot);
        load_tile_16<ROWS, DP, LDS, NT>(sk, kh + page * k_sp + slot * k_ss, k_ss, k_sd, nvalid,
                                        D, vec, ksafe);
        load_tile_16<ROWS, DP, LDS, NT>(sv, vh + page * v_sp + slot * v_ss, v_ss, v_sd, nvalid,
                                        D, vec, vsafe);
    } else {
        load_paged_kv_16<ROWS, DP, LDS, NT>(sk, sv, kh, vh, pm, n0, nvalid, k_sp, k_ss, k_sd,
                                            v_sp, v_ss, v_sd, D, vec, ksafe, vsafe);
    }
}

// Offset of partial (row r of the block, split) in the (B, Hq, Sq, splits) partial arrays.
ATTN_DEVICE i64 partial_index(int b, int hk, int row, int group, int Hq, int Sq, int split,
                              int splits) {
    const int i = row / group, h = hk * group + row % group;
    return (((i64)b * Hq + h) * Sq + i) * splits + split;
}

// ---- fp16 / bf16 ------------------------------------------------------------------------

// The block's DEC_ROWS query rows into shared memory (row stride LDS); rows >= nrows and
// columns >= D become 0. `vec`: 16-byte cp.async (host-checked alignment), else plain loads.
template <int DP, int LDS, int NT>
ATTN_DEVICE void load_q_rows_16(u16* sm, const u16* qb, i64 q_sh, i64 q_ss, i64 q_sd, int h0,
                                int r0, int nrows, int group, int D, bool vec,
                                const u16* safe) {
    if (vec) {
        constexpr int CH = DP / 8;
        for (int idx = threadIdx.x; idx < DEC_ROWS * CH; idx += NT) {
            const int r = idx / CH, c = idx % CH, row = r0 + r;
            const bool ok = row < nrows && c * 8 < D;
            const u16* src = ok ? qb + (i64)(h0 + row % group) * q_sh + (i64)(row / group) * q_ss
                                      + c * 8
                                : safe;
            cp_async16(smem_u32(sm + r * LDS + c * 8), src, ok ? 16 : 0);
        }
    } else {
        for (int idx = threadIdx.x; idx < DEC_ROWS * DP; idx += NT) {
            const int r = idx / DP, c = idx % DP, row = r0 + r;
            u16 x = 0;
            if (row < nrows && c < D)
                x = qb[(i64)(h0 + row % group) * q_sh + (i64)(row / group) * q_ss + (i64)c * q_sd];
            sm[r * LDS + c] = x;
        }
    }
}

// Shared memory (bytes) of decode_split_kernel: the larger of the Q tile + ST stages of K and
// V (rows padded by 16 bytes for conflict-free ldmatrix), and the end-of-block warp merge
// (each warp's accumulator, its row max and sum, and the merge factors). Mirrored by
// _compile.Variant.geometry.
template <int DP, int NW, int BN, int ST> struct DecCfg {
    static constexpr int LDS = DP + 8;
    static constexpr int LDA = DP + 8;  // fp32 accumulator rows, padded against bank conflicts
    static constexpr int PIPE = (DEC_ROWS + 2 * ST * BN) * LDS * 2;
    static constexpr int MERGE = (NW * DEC_ROWS * LDA + 3 * NW * DEC_ROWS) * 4;
    static constexpr int SMEM = PIPE > MERGE ? PIPE : MERGE;
};

template <typename T, int DP, int NW, int BN, int ST, bool BAND, bool SOFTCAP, int PAGED>
__global__ void __launch_bounds__(NW * 32) decode_split_kernel(
    const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
    float* __restrict__ part_o, float* __restrict__ part_l, const int* __restrict__ seqlens,
    i64 q_sb, i64 q_sh, i64 q_ss, i64 q_sd, i64 k_sb, i64 k_sh, i64 k_ss, i64 k_sd,
    i64 v_sb, i64 v_sh, i64 v_ss, i64 v_sd,
    int Hq, int Hkv, int group, int Sq, int Sk, int D, int left, int right, int splits,
    float scale_log2, float cap_in, float cap_out, int vec,
    const int* __restrict__ table, int max_pages, int page_size, int page_shift, int num_pages) {
    using E = Elem<T>;
    using C = DecCfg<DP, NW, BN, ST>;
    constexpr int LDS = C::LDS, LDA = C::LDA, NT = NW * 32, KW = BN / NW;
    constexpr int NKT = KW / 8;  // score n8 tiles per warp and tile
    constexpr int NTD = DP / 8;  // output n8 tiles
    static_assert(DP % 32 == 0 && KW % 16 == 0 && ST >= 2, "bad decode tile");
    extern __shared__ __align__(16) unsigned char smem_raw[];
    u16* sQ = reinterpret_cast<u16*>(smem_raw);
    u16* sK = sQ + DEC_ROWS * LDS;
    u16* sV = sK + ST * BN * LDS;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const SplitBlock<BN, BAND> blk(seqlens, Hkv, group, Sq, Sk, left, right, splits);
    const int split = blk.split, b = blk.b, hk = blk.hk, r0 = blk.r0, nrows = blk.nrows;
    const int ntiles = blk.ntiles;
    const Band& band = blk.band;
    const SplitRange& rg = blk.rg;

    // Paged: the pools offset to the kv head; pages come from the window as each tile loads,
    // refilled where a tile's entries are not all in it.
    const u16* kg = k + (PAGED ? 0 : b * k_sb) + hk * k_sh;
    const u16* vg = v + (PAGED ? 0 : b * v_sb) + hk * v_sh;
    if (PAGED) check_fill_level(seqlens, b, Sk);
    PageMap pm = PageMap::of_batch(table, b, max_pages, page_size, page_shift, num_pages,
                                   reinterpret_cast<int*>(smem_raw + C::PIPE));
    auto load_kv = [&](int t) {
        const int n0 = rg.start + t * BN, st = t % ST;
        if constexpr (PAGED) {
            pm.cover(n0, min(n0 + BN, rg.end), rg.end, NT);
            load_paged_tile_16<BN, DP, LDS, NT>(sK + st * BN * LDS, sV + st * BN * LDS, kg, vg,
                                                pm, PAGED, n0, rg.end - n0, k_sb,
                                                k_ss, k_sd, v_sb, v_ss, v_sd, D, vec, k, v);
        } else {
            load_tile_16<BN, DP, LDS, NT>(sK + st * BN * LDS, kg + (i64)n0 * k_ss, k_ss, k_sd,
                                          rg.end - n0, D, vec, k);
            load_tile_16<BN, DP, LDS, NT>(sV + st * BN * LDS, vg + (i64)n0 * v_ss, v_ss, v_sd,
                                          rg.end - n0, D, vec, v);
        }
    };
    // Prologue: Q with tile 0 in the first group, then tiles 1..ST-2; one group per slot
    // (empty ones too) so the wait counts below hold for any number of tiles.
    if (ntiles > 0)
        load_q_rows_16<DP, LDS, NT>(sQ, q + b * q_sb, q_sh, q_ss, q_sd, hk * group, r0, nrows,
                                    group, D, vec, q);
#pragma unroll
    for (int t = 0; t < ST - 1; ++t) {
        if (t < ntiles) load_kv(t);
        cp_async_commit();
    }

    // This lane's two rows in the mma fragments, as query indices (for the mask).
    const int qi0 = (r0 + (lane >> 2)) / group, qi1 = (r0 + (lane >> 2) + 8) / group;
    float acc[NTD][4];
#pragma unroll
    for (int d = 0; d < NTD; ++d)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[d][e] = 0.f;
    float row_m[2] = {neg_inf(), neg_inf()}, row_l[2] = {0.f, 0.f};
    const int kw0 = warp * KW;  // this warp's first key inside a tile

    for (int it = 0; it < ntiles; ++it) {
        cp_async_wait<ST - 2>();
        __syncthreads();  // tile `it` visible to all; slot (it - 1) % ST free to refill
        if (it + ST - 1 < ntiles) load_kv(it + ST - 1);
        cp_async_commit();
        const int n0 = rg.start + it * BN;
        const u16* cK = sK + (it % ST) * BN * LDS + kw0 * LDS;
        const u16* cV = sV + (it % ST) * BN * LDS + kw0 * LDS;

        // S = Q K^T over this warp's KW keys.
        float s[NKT][4];
#pragma unroll
        for (int n = 0; n < NKT; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[n][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < DP / 16; ++kk) {
            u32 a[4];
            ldsm_x4(smem_u32(sQ + ((lane & 7) + ((lane >> 3) & 1) * 8) * LDS + kk * 16
                             + (lane >> 4) * 8),
                    a[0], a[1], a[2], a[3]);
#pragma unroll
            for (int np = 0; np < KW / 16; ++np) {
                u32 b0, b1, b2, b3;
                const int r = np * 16 + (lane & 7) + (lane >> 4) * 8;
                ldsm_x4(smem_u32(cK + r * LDS + kk * 16 + ((lane >> 3) & 1) * 8), b0, b1, b2, b3);
                E::mma(s[2 * np], a, b0, b1);
                E::mma(s[2 * np + 1], a, b2, b3);
            }
        }

        // Scores in log2 units, capped; the mask only where the tile is not wholly visible.
        const bool full = n0 + BN <= rg.end
                          && band.tile_full(rg.i_first, rg.i_last, n0, n0 + BN - 1, BAND);
#pragma unroll
        for (int n = 0; n < NKT; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float x = s[n][e];
                x = SOFTCAP ? tanhf(x * cap_in) * cap_out : x * scale_log2;
                if (!full) {
                    const int j = n0 + kw0 + n * 8 + (lane & 3) * 2 + (e & 1);
                    if (j >= rg.end || !band.visible(e < 2 ? qi0 : qi1, j, BAND)) x = neg_inf();
                }
                s[n][e] = x;
            }

        // Online softmax of this warp's rows over its keys.
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            float mx = row_m[hf];
#pragma unroll
            for (int n = 0; n < NKT; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * hf], s[n][2 * hf + 1]));
            mx = quad_max(mx);
            const float mu = mx == neg_inf() ? 0.f : mx;  // a row that saw nothing yet
            const float alpha = fast_exp2(row_m[hf] - mu);
            row_m[hf] = mx;
            float sum = 0.f;
#pragma unroll
            for (int n = 0; n < NKT; ++n) {
                const float p0 = fast_exp2(s[n][2 * hf] - mu);
                const float p1 = fast_exp2(s[n][2 * hf + 1] - mu);
                s[n][2 * hf] = p0;
                s[n][2 * hf + 1] = p1;
                sum += p0 + p1;
            }
            row_l[hf] = row_l[hf] * alpha + sum;
#pragma unroll
            for (int d = 0; d < NTD; ++d) {
                acc[d][2 * hf] *= alpha;
                acc[d][2 * hf + 1] *= alpha;
            }
        }

        // O += P V: the score accumulators are already laid out as mma A fragments.
        mma_p_times_tile<E, KW / 16, DP, LDS>(acc, s, cV, lane);
    }
    cp_async_wait<0>();
    __syncthreads();  // the pipeline's shared memory is reused below

    // Merge the warps: out_row = sum_w f_w acc_w with f_w = 2^(m_w - M) / L, where M is the
    // largest warp max and L = sum_w 2^(m_w - M) l_w. Fixed order: bitwise repeatable.
    float* sAcc = reinterpret_cast<float*>(smem_raw);
    float* sM = sAcc + NW * DEC_ROWS * LDA;
    float* sL = sM + NW * DEC_ROWS;
    float* sF = sL + NW * DEC_ROWS;
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        const int r = (lane >> 2) + hf * 8;
        float* arow = sAcc + (warp * DEC_ROWS + r) * LDA + (lane & 3) * 2;
#pragma unroll
        for (int d = 0; d < NTD; ++d) {
            arow[d * 8] = acc[d][2 * hf];
            arow[d * 8 + 1] = acc[d][2 * hf + 1];
        }
        const float l = quad_sum(row_l[hf]);
        if ((lane & 3) == 0) {
            sM[warp * DEC_ROWS + r] = row_m[hf];
            sL[warp * DEC_ROWS + r] = l;
        }
    }
    __syncthreads();
    if (threadIdx.x < DEC_ROWS) {
        const int r = threadIdx.x;
        float mx = neg_inf();
#pragma unroll
        for (int w = 0; w < NW; ++w) mx = fmaxf(mx, sM[w * DEC_ROWS + r]);
        const float mu = mx == neg_inf() ? 0.f : mx;
        float l = 0.f;
#pragma unroll
        for (int w = 0; w < NW; ++w) l += exp2f(sM[w * DEC_ROWS + r] - mu) * sL[w * DEC_ROWS + r];
        const float inv = l == 0.f ? 0.f : 1.f / l;  // l NaN (a NaN row): NaN out and lse
#pragma unroll
        for (int w = 0; w < NW; ++w) sF[w * DEC_ROWS + r] = exp2f(sM[w * DEC_ROWS + r] - mu) * inv;
        if (r0 + r < nrows)
            part_l[partial_index(b, hk, r0 + r, group, Hq, Sq, split, splits)] =
                l == 0.f ? neg_inf() : mx + log2f(l);
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < DEC_ROWS * DP; idx += NT) {
        const int r = idx / DP, c = idx % DP;
        if (c >= D || r0 + r >= nrows) continue;
        float x = 0.f;
#pragma unroll
        for (int w = 0; w < NW; ++w)
            x = fmaf(sF[w * DEC_ROWS + r], sAcc[(w * DEC_ROWS + r) * LDA + c], x);
        part_o[partial_index(b, hk, r0 + r, group, Hq, Sq, split, splits) * D + c] = x;
    }
}

// ---- fp32 ---------------------------------------------------------------------------------

// NW warps of R rows (NW * R = DEC_ROWS), BN = 32 keys per tile (one per lane), ST stages;
// odd K row stride so lane j reading key row j is free of bank conflicts.
template <int DP> struct DecF32Cfg {
    static constexpr int NW = 4, R = DEC_ROWS / NW, BN = 32, ST = 2;
    static constexpr int LDK = DP + 1;
    static constexpr int SMEM = (DEC_ROWS * DP + ST * BN * (LDK + DP)) * 4;
};

template <int DP, bool BAND, bool SOFTCAP, bool PAGED>
__global__ void __launch_bounds__(128) decode_split_f32_kernel(
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    float* __restrict__ part_o, float* __restrict__ part_l, const int* __restrict__ seqlens,
    i64 q_sb, i64 q_sh, i64 q_ss, i64 q_sd, i64 k_sb, i64 k_sh, i64 k_ss, i64 k_sd,
    i64 v_sb, i64 v_sh, i64 v_ss, i64 v_sd,
    int Hq, int Hkv, int group, int Sq, int Sk, int D, int left, int right, int splits,
    float scale, float cap_in, float softcap, int unused,
    const int* __restrict__ table, int max_pages, int page_size, int page_shift, int num_pages) {
    using C = DecF32Cfg<DP>;
    constexpr int R = C::R, BN = C::BN, ST = C::ST, LDK = C::LDK, DPL = DP / 32;
    constexpr int NT = C::NW * 32;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float* sQ = reinterpret_cast<float*>(smem_raw);
    float* sK = sQ + DEC_ROWS * DP;
    float* sV = sK + ST * BN * LDK;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const SplitBlock<BN, BAND> blk(seqlens, Hkv, group, Sq, Sk, left, right, splits);
    const int split = blk.split, b = blk.b, hk = blk.hk, r0 = blk.r0, nrows = blk.nrows;
    const int ntiles = blk.ntiles;
    const Band& band = blk.band;
    const SplitRange& rg = blk.rg;

    // Paged: the pools offset to the kv head; a row's page comes from the window per load.
    const float* kg = k + (PAGED ? 0 : b * k_sb) + hk * k_sh;
    const float* vg = v + (PAGED ? 0 : b * v_sb) + hk * v_sh;
    if (PAGED) check_fill_level(seqlens, b, Sk);
    PageMap pm = PageMap::of_batch(table, b, max_pages, page_size, page_shift, num_pages,
                                   reinterpret_cast<int*>(smem_raw + C::SMEM));
    // 4-byte cp.async works for any stride; rows past the split's end and columns >= D are 0
    // (and, paged, their table entries unread).
    auto load_kv = [&](int t) {
        const int n0 = rg.start + t * BN, st = t % ST;
        if (PAGED) pm.cover(n0, min(n0 + BN, rg.end), rg.end, NT);
        float* dk = sK + st * BN * LDK;
        float* dv = sV + st * BN * DP;
        for (int idx = threadIdx.x; idx < BN * DP; idx += NT) {
            const int r = idx / DP, c = idx % DP;
            const bool ok = n0 + r < rg.end && c < D;
            const float* ks = k;
            const float* vs = v;
            if (ok) {
                i64 krow, vrow;
                if constexpr (PAGED) {
                    i64 page, slot;
                    pm.locate(n0 + r, page, slot);
                    krow = page * k_sb + slot * k_ss;
                    vrow = page * v_sb + slot * v_ss;
                } else {
                    krow = (i64)(n0 + r) * k_ss;
                    vrow = (i64)(n0 + r) * v_ss;
                }
                ks = kg + krow + (i64)c * k_sd;
                vs = vg + vrow + (i64)c * v_sd;
            }
            cp_async4(smem_u32(dk + r * LDK + c), ks, ok ? 4 : 0);
            cp_async4(smem_u32(dv + r * DP + c), vs, ok ? 4 : 0);
        }
    };
    {
        const float* qb = q + b * q_sb;
        for (int idx = threadIdx.x; idx < DEC_ROWS * DP; idx += NT) {
            const int r = idx / DP, c = idx % DP, row = r0 + r;
            sQ[idx] = (row < nrows && c < D)
                          ? qb[(i64)(hk * group + row % group) * q_sh + (i64)(row / group) * q_ss
                               + (i64)c * q_sd]
                          : 0.f;
        }
    }
#pragma unroll
    for (int t = 0; t < ST - 1; ++t) {
        if (t < ntiles) load_kv(t);
        cp_async_commit();
    }

    float acc[R][DPL], row_m[R], row_l[R];
    int qi[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        row_m[r] = neg_inf();
        row_l[r] = 0.f;
        qi[r] = (r0 + warp * R + r) / group;
#pragma unroll
        for (int c = 0; c < DPL; ++c) acc[r][c] = 0.f;
    }
    const bool active = r0 + warp * R < nrows;  // warp-uniform: padded rows do no work

    for (int it = 0; it < ntiles; ++it) {
        cp_async_wait<ST - 2>();
        __syncthreads();
        if (it + ST - 1 < ntiles) load_kv(it + ST - 1);
        cp_async_commit();
        if (!active) continue;
        const float* cK = sK + (it % ST) * BN * LDK;
        const float* cV = sV + (it % ST) * BN * DP;
        float s[R];
        f32_row_scores<R, DP, LDK>(s, sQ, cK, warp, lane);
        const int j = rg.start + it * BN + lane;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            float x = SOFTCAP ? tanhf(s[r] * cap_in) * softcap : s[r] * scale;
            if (j >= rg.end || !band.visible(qi[r], j, BAND)) x = neg_inf();
            f32_softmax_pv<BN, DP>(x, row_m[r], row_l[r], acc[r], cV, lane);
        }
    }
    cp_async_wait<0>();

#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int row = r0 + warp * R + r;
        const float l = warp_sum(row_l[r]);
        if (row >= nrows) continue;
        const i64 p = partial_index(b, hk, row, group, Hq, Sq, split, splits);
        const float inv = l == 0.f ? 0.f : 1.f / l;  // l NaN (a NaN row): NaN out and lse
#pragma unroll
        for (int c = 0; c < DPL; ++c)
            if (lane + 32 * c < D) part_o[p * D + lane + 32 * c] = acc[r][c] * inv;
        if (lane == 0) part_l[p] = l == 0.f ? neg_inf() : row_m[r] + logf(l);
    }
}

// ---- merge --------------------------------------------------------------------------------

// Output element and partial-lse units per dtype: fp16/bf16 partials are in log2 units.
template <typename T> struct MergeOut {
    typedef u16 type;
    static constexpr bool LOG2 = true;
    static ATTN_DEVICE u16 cvt(float x) { return Elem<T>::from_float(x); }
};
template <> struct MergeOut<float> {
    typedef float type;
    static constexpr bool LOG2 = false;
    static ATTN_DEVICE float cvt(float x) { return x; }
};

// One warp per query row (row = (b * Hq + h) * Sq + i), 4 rows per block. out has a unit
// column stride (allocated by the host).
template <typename T>
__global__ void __launch_bounds__(128) decode_merge_kernel(
    const float* __restrict__ part_o, const float* __restrict__ part_l,
    typename MergeOut<T>::type* __restrict__ o, float* __restrict__ lse,
    i64 o_sb, i64 o_sh, i64 o_ss, int Hq, int Sq, int D, int splits, i64 nrows) {
    using M = MergeOut<T>;
    const int lane = threadIdx.x & 31;
    const i64 row = (i64)blockIdx.x * 4 + (threadIdx.x >> 5);
    if (row >= nrows) return;
    const float* pl = part_l + row * splits;
    const float* po = part_o + row * splits * D;
    float mx = neg_inf();
    for (int s = lane; s < splits; s += 32) mx = fmaxf(mx, pl[s]);
    mx = warp_max(mx);
    const float mu = mx == neg_inf() ? 0.f : mx;
    float total = 0.f;
    for (int s = lane; s < splits; s += 32) total += M::LOG2 ? exp2f(pl[s] - mu) : expf(pl[s] - mu);
    total = warp_sum(total);
    const float inv = total == 0.f ? 0.f : 1.f / total;  // a NaN part: total NaN, NaN out

    const int i = (int)(row % Sq), h = (int)((row / Sq) % Hq);
    const i64 b = row / ((i64)Sq * Hq);
    typename M::type* orow = o + b * o_sb + h * o_sh + (i64)i * o_ss;
    for (int c = lane; c < D; c += 32) {
        float x = 0.f;
        for (int s = 0; s < splits; ++s) {
            const float w = M::LOG2 ? exp2f(pl[s] - mu) : expf(pl[s] - mu);
            if (w != 0.f) x = fmaf(w, po[(i64)s * D + c], x);  // empty splits weigh nothing
        }
        orow[c] = M::cvt(x * inv);
    }
    if (lane == 0)
        lse[row] = total == 0.f ? neg_inf()
                                : (M::LOG2 ? (mx + log2f(total)) * ATTN_LN2 : mx + logf(total));
}
