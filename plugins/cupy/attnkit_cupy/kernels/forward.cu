// Attention forward: out = softmax(scale * q k^T + mask) v and lse, one pass over key tiles.
//
// fwd_kernel (fp16/bf16): one block per (query tile, query head, batch). The query tile sits
// in shared memory; key/value tiles stream through two shared-memory stages filled with
// cp.async, so the next tile loads while this one is multiplied. QK^T and PV run on tensor
// cores (mma.sync m16n8k16, operands fetched with ldmatrix); the online softmax lives in
// registers and out/lse are written once.
//
// fwd_f32_kernel (fp32): the same tiling on CUDA cores, in fp32 throughout (no tf32), so fp32
// inputs are computed to fp32 accuracy.
//
// Template parameters: DP is the head dim rounded up to a multiple of 32 (columns D..DP-1 are
// zero in shared memory), then the tile sizes (below), BAND selects the sliding-window/causal
// mask code (without it only key padding, Sk and seqlens_k, is masked), SOFTCAP the tanh cap,
// FEAT the ATTN_VARLEN / ATTN_DROPOUT bits (common.cuh; 0: neither, the code is the plain
// kernel's). Their arguments come last: cu_q/cu_k (packed offsets), drop_state, the keep
// threshold and 1 / (1 - p); the plain kernel ignores them.
#include "common.cuh"

// Option bits of fwd_kernel (OPT, the fourth element of _compile.FWD_TILES entries).
// FWD_QREG: this warp's Q fragments are read from shared memory once and kept in registers
//   across key tiles (MT * DP / 4 registers: for DP <= 64).
// FWD_LAZY: the accumulator rescale by exp2(m_old - m_new) is skipped for a tile where no row
//   of the warp changed its maximum (the factor would be exactly 1: same result bits).
// FWD_TWO_BARRIERS: the older pipeline: the next tile is issued before waiting for this one,
//   with a barrier before and after the tile's math (kept to A/B the one-barrier pipeline).
#define FWD_QREG 1
#define FWD_LAZY 2
#define FWD_TWO_BARRIERS 4
// Philox calls per lane evaluated side by side for a tile's dropout mask
// (AttnDropout::row_bits): more hold more registers beside the accumulators.
#define FWD_DROP_UNROLL 2

// Tiles (chosen on the host, _compile.FWD_TILES): NW warps, each owning MT slabs of 16 query
// rows (BM = NW * 16 * MT queries per block), BN keys per streamed tile, OPT option bits.
// Shared memory: (BM + 4 * BN) * (DP + 8) * 2 bytes: the Q tile and two stages of K and V,
// rows padded by 16 bytes so ldmatrix reads are free of bank conflicts.
//
// Pipeline (one barrier per key tile): wait for tile it, barrier, then issue tile it + 1 into
// the other stage (the barrier also proves every warp finished tile it - 1, the last reader
// of that stage), then the math of tile it while tile it + 1 lands.
template <typename T, int DP, int NW, int MT, int BN, int OPT, bool BAND, bool SOFTCAP,
          int FEAT>
__global__ void __launch_bounds__(NW * 32) fwd_kernel(
    const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
    u16* __restrict__ o, float* __restrict__ lse, const int* __restrict__ seqlens,
    i64 q_sb, i64 q_sh, i64 q_ss, i64 q_sd, i64 k_sb, i64 k_sh, i64 k_ss, i64 k_sd,
    i64 v_sb, i64 v_sh, i64 v_ss, i64 v_sd, i64 o_sb, i64 o_sh, i64 o_ss,
    int Hq, int group, int Sq, int Sk, int D, int left, int right,
    float scale_log2, float cap_in, float cap_out, int vec,
    const int* __restrict__ cu_q, const int* __restrict__ cu_k,
    const i64* __restrict__ drop_state, u32 drop_threshold, float drop_scale) {
    static_assert(DP % 32 == 0 && BN % 16 == 0 && MT >= 1, "bad forward tile");
    using E = Elem<T>;
    constexpr bool QREG = (OPT & FWD_QREG) != 0, LAZY = (OPT & FWD_LAZY) != 0;
    constexpr bool TWO_BARRIERS = (OPT & FWD_TWO_BARRIERS) != 0;
    constexpr bool VARLEN = (FEAT & ATTN_VARLEN) != 0, DROP = (FEAT & ATTN_DROPOUT) != 0;
    constexpr int BM = NW * 16 * MT, LDS = DP + 8, NT = NW * 32;
    constexpr int NTN = BN / 8;  // score n8 tiles per row slab
    constexpr int NTD = DP / 8;  // output n8 tiles per row slab
    constexpr int KD = DP / 16;  // k-steps of Q K^T
    using Rows = RowStream<BN, DP, LDS, NT>;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    u16* sQ = reinterpret_cast<u16*>(smem_raw);
    u16* sK = sQ + BM * LDS;
    u16* sV = sK + 2 * BN * LDS;
    const u32 sQa = smem_u32(sQ), sKa = smem_u32(sK), sVa = smem_u32(sV);
    constexpr u32 STAGE = BN * LDS * 2;  // bytes per K or V stage

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int m0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
    const int hk = h / group;
    const Span span = Span::of<VARLEN>(seqlens, cu_q, cu_k, b, Sq, Sk, left, right);
    const Band band = span.band;
    const int sq = span.sq;
    if (VARLEN && m0 >= sq) return;  // a tile past its sequence's end: nothing to write

    const u16* qg = q + span.q_base<VARLEN>(b, q_sb, q_ss) + h * q_sh;
    const u16* kg = k + span.k_base<VARLEN>(b, k_sb, k_ss) + hk * k_sh;
    const u16* vg = v + span.k_base<VARLEN>(b, v_sb, v_ss) + hk * v_sh;

    // Only key tiles that some query of this block can see are visited.
    const int m1 = min(m0 + BM, sq) - 1;
    const int lo = band.key_lo(m0, BAND), hi = band.key_hi(m1, BAND);
    const int t0 = lo / BN;
    const int ntiles = hi > lo ? (hi + BN - 1) / BN - t0 : 0;

    // K/V tile at key n0 into stage st. FAST (vector loads, RowStream sizes): fixed-stride
    // copies, row-checked only for the last, partial tile; otherwise the general loader.
    // Keys before kfirst exist for no query and are zero-filled unread; only the first tile
    // (FIRST: t0's, which holds key_lo(m0) >= kfirst) can reach below kfirst.
    const int kfirst = band.key_first(BAND);
    const bool col_ok = Rows::col_ok(D);
    auto load_kv = [&](int n0, int st, auto fast, auto first) {
        constexpr bool FIRST = decltype(first)::value;
        if constexpr (decltype(fast)::value) {
            const u32 so = Rows::smem_offset() + st * STAGE;
            const u16* kr = kg + (i64)n0 * k_ss + Rows::global_offset(k_ss);
            const u16* vr = vg + (i64)n0 * v_ss + Rows::global_offset(v_ss);
            if (n0 + BN <= band.skb && (!FIRST || n0 >= kfirst)) {
                Rows::template load_rows<false>(sKa + so, kr, k_ss, col_ok, k, 0);
                Rows::template load_rows<false>(sVa + so, vr, v_ss, col_ok, v, 0);
            } else {
                const int rows = band.skb - n0 - Rows::first_row();
                const int rows_lo = kfirst - n0 - Rows::first_row();
                Rows::template load_rows<true, FIRST>(sKa + so, kr, k_ss, col_ok, k, rows,
                                                      rows_lo);
                Rows::template load_rows<true, FIRST>(sVa + so, vr, v_ss, col_ok, v, rows,
                                                      rows_lo);
            }
        } else {
            load_tile_16<BN, DP, LDS, NT, FIRST>(sK + st * BN * LDS, kg + (i64)n0 * k_ss, k_ss,
                                                 k_sd, band.skb - n0, D, vec, k, kfirst - n0);
            load_tile_16<BN, DP, LDS, NT, FIRST>(sV + st * BN * LDS, vg + (i64)n0 * v_ss, v_ss,
                                                 v_sd, band.skb - n0, D, vec, v, kfirst - n0);
        }
    };

    // Per-lane ldmatrix offsets (bytes): A rows of Q, B rows of K (non-transposed), V rows
    // (transposed); k-steps and n/d tiles add compile-time constants.
    const int wrow = warp * 16 * MT;  // first row of this warp inside the tile
    const u32 q_lane = ((wrow + (lane & 7) + ((lane >> 3) & 1) * 8) * LDS + (lane >> 4) * 8) * 2;
    const u32 k_lane = (((lane & 7) + (lane >> 4) * 8) * LDS + ((lane >> 3) & 1) * 8) * 2;
    const u32 v_lane = (((lane & 7) + ((lane >> 3) & 1) * 8) * LDS + (lane >> 4) * 8) * 2;

    float acc[MT][NTD][4];
    float row_m[MT][2], row_l[MT][2];  // running max (log2 units) and per-thread partial sum
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int d = 0; d < NTD; ++d)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][d][e] = 0.f;
        row_m[mt][0] = row_m[mt][1] = neg_inf();
        row_l[mt][0] = row_l[mt][1] = 0.f;
    }

    // Scores stay in raw units until the exponent: p = exp2(s * mult - m) is one FFMA. mult
    // must be > 0 so the raw maximum is the scaled one; a scale <= 0 is applied up front.
    const bool pos_scale = scale_log2 > 0.f;
    const float mult = SOFTCAP ? cap_out : (pos_scale ? scale_log2 : 1.f);
    const AttnDropout drop =
        DROP ? AttnDropout::load(drop_state, drop_threshold, drop_scale) : AttnDropout{};
    const u32 bh = (u32)(b * Hq + h);

    // The Q tile, then the key tiles. Instantiated once per load path so the general loader's
    // registers never weigh on the vector path's loop.
    auto key_loop = [&](auto fast) {
        u32 qf[QREG ? MT : 1][QREG ? KD : 1][4];  // Q fragments (FWD_QREG)
        if (ntiles > 0) {
            load_tile_16<BM, DP, LDS, NT>(sQ, qg + (i64)m0 * q_ss, q_ss, q_sd, sq - m0, D, vec, q);
            load_kv(t0 * BN, 0, fast, BoolTag<true>{});
            cp_async_commit();
            if (QREG) {
                cp_async_wait<0>();
                __syncthreads();
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int kk = 0; kk < KD; ++kk)
                        ldsm_x4(sQa + q_lane + (mt * 16 * LDS + kk * 16) * 2, qf[mt][kk][0],
                                qf[mt][kk][1], qf[mt][kk][2], qf[mt][kk][3]);
            }
        }

        for (int it = 0; it < ntiles; ++it) {
            const int st = it & 1;
            const int n0 = (t0 + it) * BN;
            if (TWO_BARRIERS) {
                if (it + 1 < ntiles) {
                    load_kv(n0 + BN, st ^ 1, fast, BoolTag<false>{});
                    cp_async_commit();
                    cp_async_wait<1>();
                } else {
                    cp_async_wait<0>();
                }
                __syncthreads();
            } else {
                cp_async_wait<0>();
                __syncthreads();
                if (it + 1 < ntiles) {
                    load_kv(n0 + BN, st ^ 1, fast, BoolTag<false>{});
                    cp_async_commit();
                }
            }
            const u32 cK = sKa + st * STAGE + k_lane;
            const u32 cV = sVa + st * STAGE + v_lane;

            // S = Q K^T for this warp's rows.
            float s[MT][NTN][4];
#pragma unroll
            for (int kk = 0; kk < KD; ++kk) {
                u32 a[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    if (QREG) {
#pragma unroll
                        for (int e = 0; e < 4; ++e) a[mt][e] = qf[mt][kk][e];
                    } else {
                        ldsm_x4(sQa + q_lane + (mt * 16 * LDS + kk * 16) * 2, a[mt][0], a[mt][1],
                                a[mt][2], a[mt][3]);
                    }
                }
#pragma unroll
                for (int np = 0; np < BN / 16; ++np) {
                    u32 b0, b1, b2, b3;
                    ldsm_x4(cK + (np * 16 * LDS + kk * 16) * 2, b0, b1, b2, b3);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        if (kk == 0) {
                            E::mma_zero(s[mt][2 * np], a[mt], b0, b1);
                            E::mma_zero(s[mt][2 * np + 1], a[mt], b2, b3);
                        } else {
                            E::mma(s[mt][2 * np], a[mt], b0, b1);
                            E::mma(s[mt][2 * np + 1], a[mt], b2, b3);
                        }
                    }
                }
            }

            // Capped and masked scores; tiles inside the band skip the mask.
            if (SOFTCAP || !pos_scale) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int n = 0; n < NTN; ++n)
#pragma unroll
                        for (int e = 0; e < 4; ++e)
                            s[mt][n][e] = SOFTCAP ? tanhf(s[mt][n][e] * cap_in)
                                                  : s[mt][n][e] * scale_log2;
            }
            if (!band.tile_full(m0, m1, n0, n0 + BN - 1, BAND)) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int n = 0; n < NTN; ++n)
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            const int i = m0 + wrow + mt * 16 + (lane >> 2) + (e >> 1) * 8;
                            const int j = n0 + n * 8 + (lane & 3) * 2 + (e & 1);
                            if (!band.visible(i, j, BAND)) s[mt][n][e] = neg_inf();
                        }
            }

            // Online softmax: the new row maxima, then the rescale of what was accumulated by
            // alpha = exp2(m_old - m_new), then the probabilities (few values live at once). A
            // row that saw no visible key yet keeps m = -inf and uses 0 in place of m there
            // (alpha = 0, p = 0).
            float alpha[MT][2];
            bool grew = false;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int hf = 0; hf < 2; ++hf) {
                    float mx = neg_inf();
#pragma unroll
                    for (int n = 0; n < NTN; ++n)
                        mx = fmaxf(mx, fmaxf(s[mt][n][2 * hf], s[mt][n][2 * hf + 1]));
                    const float m_old = row_m[mt][hf];
                    const float m_new = fmaxf(m_old, quad_max(mx) * mult);
                    row_m[mt][hf] = m_new;
                    alpha[mt][hf] = fast_exp2(m_old - (m_new == neg_inf() ? 0.f : m_new));
                    grew |= alpha[mt][hf] != 1.f;
                    row_l[mt][hf] *= alpha[mt][hf];
                }
            if (!LAZY || __any_sync(0xffffffffu, grew)) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int d = 0; d < NTD; ++d)
#pragma unroll
                        for (int e = 0; e < 4; ++e) acc[mt][d][e] *= alpha[mt][e >> 1];
            }
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int hf = 0; hf < 2; ++hf) {
                    const float mu = row_m[mt][hf] == neg_inf() ? 0.f : row_m[mt][hf];
                    float sum = 0.f;
#pragma unroll
                    for (int n = 0; n < NTN; ++n) {
                        const float p0 = fast_exp2(fmaf(s[mt][n][2 * hf], mult, -mu));
                        const float p1 = fast_exp2(fmaf(s[mt][n][2 * hf + 1], mult, -mu));
                        s[mt][n][2 * hf] = p0;
                        s[mt][n][2 * hf + 1] = p1;
                        sum += p0 + p1;
                    }
                    row_l[mt][hf] += sum;
                }
            // Dropout after l has summed the probabilities; 1 / (1 - p) is applied to out.
            if constexpr (DROP) {
                // call c = 2 (mt * NTN + n) + hf: row hf of slab mt, 8-key group n
                const unsigned long long kept = drop.row_bits<MT * NTN * 2, FWD_DROP_UNROLL>(
                    bh, lane, [&](int c, int& i, int& g) {
                        const int t = c >> 1, n = t % NTN, mt = t / NTN;
                        i = m0 + wrow + mt * 16 + (lane >> 2) + (c & 1) * 8;
                        g = (n0 >> 3) + n;
                    }, WarpShfl{});
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int n = 0; n < NTN; ++n)
#pragma unroll
                        for (int e = 0; e < 4; ++e)
                            if (!((kept >> ((mt * NTN + n) * 4 + e)) & 1)) s[mt][n][e] = 0.f;
            }

            // O += P V: the score accumulators are already laid out as mma A fragments.
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                u32 a[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    a[mt][0] = E::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                    a[mt][1] = E::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                    a[mt][2] = E::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                    a[mt][3] = E::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
                }
#pragma unroll
                for (int dp = 0; dp < DP / 16; ++dp) {
                    u32 b0, b1, b2, b3;
                    ldsm_x4_t(cV + (kk * 16 * LDS + dp * 16) * 2, b0, b1, b2, b3);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        E::mma(acc[mt][2 * dp], a[mt], b0, b1);
                        E::mma(acc[mt][2 * dp + 1], a[mt], b2, b3);
                    }
                }
            }
            if (TWO_BARRIERS) __syncthreads();  // this stage is refilled two iterations from now
        }
    };
    if constexpr (Rows::fits) {
        if (vec)
            key_loop(BoolTag<true>{});
        else
            key_loop(BoolTag<false>{});
    } else {
        key_loop(BoolTag<false>{});
    }

    // Epilogue: normalize, write out and lse once. A row that saw no key (l = 0) gives 0 and
    // -inf; a NaN score (a NaN query row) made l NaN, and gives NaN in both.
    const bool pairs = (D & 1) == 0;  // out is allocated by the host: even D = aligned pairs
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const float l = quad_sum(row_l[mt][hf]);
            const int i = m0 + wrow + mt * 16 + (lane >> 2) + hf * 8;
            if (i >= sq) continue;
            const float inv = l == 0.f ? 0.f : (DROP ? drop.scale : 1.f) / l;
            u16* orow = o + span.q_base<VARLEN>(b, o_sb, o_ss) + h * o_sh + (i64)i * o_ss;
#pragma unroll
            for (int d = 0; d < NTD; ++d) {
                const int c = d * 8 + (lane & 3) * 2;
                const float x0 = acc[mt][d][2 * hf] * inv, x1 = acc[mt][d][2 * hf + 1] * inv;
                if (pairs && c + 1 < D) {
                    *reinterpret_cast<u32*>(orow + c) = E::pack(x0, x1);
                } else {
                    if (c < D) orow[c] = E::from_float(x0);
                    if (c + 1 < D) orow[c + 1] = E::from_float(x1);
                }
            }
            if ((lane & 3) == 0)
                lse[span.stat<VARLEN>(b, h, Hq, Sq) + i] =
                    l == 0.f ? neg_inf() : (row_m[mt][hf] + log2f(l)) * ATTN_LN2;
        }
}

// ---- fp32 ---------------------------------------------------------------------------------

template <int DP> struct F32Cfg {
    static constexpr int NW = 4;
    static constexpr int R = 4;           // query rows per warp
    static constexpr int BM = NW * R;     // queries per block
    static constexpr int BN = 32;         // keys per tile: one per lane
    static constexpr int LDK = DP + 1;    // odd stride: lane j reading row j is conflict-free
    static constexpr int SMEM = (BM * DP + 2 * BN * LDK) * 4;
};

// Strided fp32 rows [0, ROWS) x [0, DP) into shared memory (zeros outside nvalid x D).
template <int ROWS, int DP, int LD, int NT>
ATTN_DEVICE void load_tile_f32(float* sm, const float* g, i64 s_row, i64 s_col, int nvalid,
                               int D) {
    for (int idx = threadIdx.x; idx < ROWS * DP; idx += NT) {
        const int r = idx / DP, c = idx % DP;
        sm[r * LD + c] = (r < nvalid && c < D) ? g[(i64)r * s_row + (i64)c * s_col] : 0.f;
    }
}

template <int DP, bool BAND, bool SOFTCAP, int FEAT>
__global__ void __launch_bounds__(128) fwd_f32_kernel(
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    float* __restrict__ o, float* __restrict__ lse, const int* __restrict__ seqlens,
    i64 q_sb, i64 q_sh, i64 q_ss, i64 q_sd, i64 k_sb, i64 k_sh, i64 k_ss, i64 k_sd,
    i64 v_sb, i64 v_sh, i64 v_ss, i64 v_sd, i64 o_sb, i64 o_sh, i64 o_ss,
    int Hq, int group, int Sq, int Sk, int D, int left, int right,
    float scale, float cap_in, float softcap, int unused,
    const int* __restrict__ cu_q, const int* __restrict__ cu_k,
    const i64* __restrict__ drop_state, u32 drop_threshold, float drop_scale) {
    using C = F32Cfg<DP>;
    constexpr int R = C::R, BM = C::BM, BN = C::BN, LDK = C::LDK, DPL = DP / 32, NT = C::NW * 32;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float* sQ = reinterpret_cast<float*>(smem_raw);
    float* sK = sQ + BM * DP;
    float* sV = sK + BN * LDK;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int m0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
    const int hk = h / group;
    constexpr bool VARLEN = (FEAT & ATTN_VARLEN) != 0, DROP = (FEAT & ATTN_DROPOUT) != 0;
    const Span span = Span::of<VARLEN>(seqlens, cu_q, cu_k, b, Sq, Sk, left, right);
    const Band band = span.band;
    const int sq = span.sq;
    if (VARLEN && m0 >= sq) return;  // a tile past its sequence's end: nothing to write
    const float* kg = k + span.k_base<VARLEN>(b, k_sb, k_ss) + hk * k_sh;
    const float* vg = v + span.k_base<VARLEN>(b, v_sb, v_ss) + hk * v_sh;
    const AttnDropout drop =
        DROP ? AttnDropout::load(drop_state, drop_threshold, drop_scale) : AttnDropout{};
    const u32 bh = (u32)(b * Hq + h);

    load_tile_f32<BM, DP, DP, NT>(
        sQ, q + span.q_base<VARLEN>(b, q_sb, q_ss) + h * q_sh + (i64)m0 * q_ss, q_ss,
        q_sd, sq - m0, D);
    const int m1 = min(m0 + BM, sq) - 1;
    const int lo = band.key_lo(m0, BAND), hi = band.key_hi(m1, BAND);
    const int kfirst = band.key_first(BAND);

    float acc[R][DPL], row_m[R], row_l[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        row_m[r] = neg_inf();
        row_l[r] = 0.f;
#pragma unroll
        for (int c = 0; c < DPL; ++c) acc[r][c] = 0.f;
    }

    for (int n0 = (lo / BN) * BN; n0 < hi; n0 += BN) {
        __syncthreads();
        load_tile_f32<BN, DP, LDK, NT>(sK, kg + (i64)n0 * k_ss, k_ss, k_sd, band.skb - n0, D);
        load_tile_f32<BN, DP, DP, NT>(sV, vg + (i64)n0 * v_ss, v_ss, v_sd, band.skb - n0, D);
        // Keys before kfirst exist for no query (the first tile only): their scores are masked
        // by selection, their V rows must not meet P = 0 as NaN or inf. sV's rows are dense and
        // each float is zeroed by the thread that loaded it: no barrier in between.
        if (BAND && n0 < kfirst) zero_f32<NT>(sV, (kfirst - n0) * DP);
        __syncthreads();
        float s[R];
        f32_row_scores<R, DP, LDK>(s, sQ, sK, warp, lane);
        const int j = n0 + lane;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int i = m0 + warp * R + r;
            float x = SOFTCAP ? tanhf(s[r] * cap_in) * softcap : s[r] * scale;
            if (!band.visible(i, j, BAND)) x = neg_inf();
            if constexpr (DROP)
                f32_softmax_pv<BN, DP, true>(x, row_m[r], row_l[r], acc[r], sV, lane,
                                             drop.keep(bh, i, j));
            else
                f32_softmax_pv<BN, DP>(x, row_m[r], row_l[r], acc[r], sV, lane);
        }
    }

#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int i = m0 + warp * R + r;
        const float l = warp_sum(row_l[r]);
        if (i >= sq) continue;
        // l NaN (a NaN row): NaN out and lse
        const float inv = l == 0.f ? 0.f : (DROP ? drop.scale : 1.f) / l;
        float* orow = o + span.q_base<VARLEN>(b, o_sb, o_ss) + h * o_sh + (i64)i * o_ss;
#pragma unroll
        for (int c = 0; c < DPL; ++c)
            if (lane + 32 * c < D) orow[lane + 32 * c] = acc[r][c] * inv;
        if (lane == 0)
            lse[span.stat<VARLEN>(b, h, Hq, Sq) + i] = l == 0.f ? neg_inf() : row_m[r] + logf(l);
    }
}
