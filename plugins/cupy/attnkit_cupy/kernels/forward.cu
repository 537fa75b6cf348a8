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
// mask code (without it only key padding, Sk and seqlens_k, is masked), SOFTCAP the tanh cap.
#include "common.cuh"

// Tiles (chosen on the host, _compile.FWD_TILES): NW warps, each owning MT slabs of 16 query
// rows (BM = NW * 16 * MT queries per block), BN keys per streamed tile. Shared memory:
// (BM + 4 * BN) * (DP + 8) * 2 bytes: the Q tile and two stages of K and V, rows padded by 16
// bytes so ldmatrix reads are free of bank conflicts.
template <typename T, int DP, int NW, int MT, int BN, bool BAND, bool SOFTCAP>
__global__ void __launch_bounds__(NW * 32) fwd_kernel(
    const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
    u16* __restrict__ o, float* __restrict__ lse, const int* __restrict__ seqlens,
    i64 q_sb, i64 q_sh, i64 q_ss, i64 q_sd, i64 k_sb, i64 k_sh, i64 k_ss, i64 k_sd,
    i64 v_sb, i64 v_sh, i64 v_ss, i64 v_sd, i64 o_sb, i64 o_sh, i64 o_ss,
    int Hq, int group, int Sq, int Sk, int D, int left, int right,
    float scale_log2, float cap_in, float cap_out, int vec) {
    static_assert(DP % 32 == 0 && BN % 16 == 0 && MT >= 1, "bad forward tile");
    using E = Elem<T>;
    constexpr int BM = NW * 16 * MT, LDS = DP + 8, NT = NW * 32;
    constexpr int NTN = BN / 8;  // score n8 tiles per row slab
    constexpr int NTD = DP / 8;  // output n8 tiles per row slab
    extern __shared__ __align__(16) unsigned char smem_raw[];
    u16* sQ = reinterpret_cast<u16*>(smem_raw);
    u16* sK = sQ + BM * LDS;
    u16* sV = sK + 2 * BN * LDS;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int m0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
    const int hk = h / group;
    const Band band = Band::of_batch(seqlens, b, Sk, Sq, left, right);

    const u16* qg = q + b * q_sb + h * q_sh;
    const u16* kg = k + b * k_sb + hk * k_sh;
    const u16* vg = v + b * v_sb + hk * v_sh;

    // Only key tiles that some query of this block can see are visited.
    const int m1 = min(m0 + BM, Sq) - 1;
    const int lo = band.key_lo(m0, BAND), hi = band.key_hi(m1, BAND);
    const int t0 = lo / BN;
    const int ntiles = hi > lo ? (hi + BN - 1) / BN - t0 : 0;

    if (ntiles > 0) {
        load_tile_16<BM, DP, LDS, NT>(sQ, qg + (i64)m0 * q_ss, q_ss, q_sd, Sq - m0, D, vec, q);
        const int n0 = t0 * BN;
        load_tile_16<BN, DP, LDS, NT>(sK, kg + (i64)n0 * k_ss, k_ss, k_sd, band.skb - n0,
                                      D, vec, k);
        load_tile_16<BN, DP, LDS, NT>(sV, vg + (i64)n0 * v_ss, v_ss, v_sd, band.skb - n0,
                                      D, vec, v);
        cp_async_commit();
    }

    float acc[MT][NTD][4];
    float row_m[MT][2], row_l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int d = 0; d < NTD; ++d)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][d][e] = 0.f;
        row_m[mt][0] = row_m[mt][1] = neg_inf();
        row_l[mt][0] = row_l[mt][1] = 0.f;
    }
    const int wrow = warp * 16 * MT;  // first row of this warp inside the tile

    for (int it = 0; it < ntiles; ++it) {
        const int st = it & 1;
        const int n0 = (t0 + it) * BN;
        if (it + 1 < ntiles) {
            const int n0n = n0 + BN;
            load_tile_16<BN, DP, LDS, NT>(sK + (st ^ 1) * BN * LDS, kg + (i64)n0n * k_ss, k_ss,
                                          k_sd, band.skb - n0n, D, vec, k);
            load_tile_16<BN, DP, LDS, NT>(sV + (st ^ 1) * BN * LDS, vg + (i64)n0n * v_ss, v_ss,
                                          v_sd, band.skb - n0n, D, vec, v);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const u16* cK = sK + st * BN * LDS;
        const u16* cV = sV + st * BN * LDS;

        // S = Q K^T for this warp's rows.
        float s[MT][NTN][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int n = 0; n < NTN; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[mt][n][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < DP / 16; ++kk) {
            u32 a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const int r = wrow + mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                ldsm_x4(smem_u32(sQ + r * LDS + kk * 16 + (lane >> 4) * 8), a[mt][0], a[mt][1],
                        a[mt][2], a[mt][3]);
            }
#pragma unroll
            for (int np = 0; np < BN / 16; ++np) {
                u32 b0, b1, b2, b3;
                const int r = np * 16 + (lane & 7) + (lane >> 4) * 8;
                ldsm_x4(smem_u32(cK + r * LDS + kk * 16 + ((lane >> 3) & 1) * 8), b0, b1, b2, b3);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    E::mma(s[mt][2 * np], a[mt], b0, b1);
                    E::mma(s[mt][2 * np + 1], a[mt], b2, b3);
                }
            }
        }

        // Scores in log2 units, capped and masked; tiles inside the band skip the mask.
        const bool full = band.tile_full(m0, m1, n0, n0 + BN - 1, BAND);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int n = 0; n < NTN; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float x = s[mt][n][e];
                    x = SOFTCAP ? tanhf(x * cap_in) * cap_out : x * scale_log2;
                    if (!full) {
                        const int i = m0 + wrow + mt * 16 + (lane >> 2) + (e >> 1) * 8;
                        const int j = n0 + n * 8 + (lane & 3) * 2 + (e & 1);
                        if (!band.visible(i, j, BAND)) x = neg_inf();
                    }
                    s[mt][n][e] = x;
                }

        // Online softmax: rescale what was accumulated when the running max grows.
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                float mx = row_m[mt][hf];
#pragma unroll
                for (int n = 0; n < NTN; ++n)
                    mx = fmaxf(mx, fmaxf(s[mt][n][2 * hf], s[mt][n][2 * hf + 1]));
                mx = quad_max(mx);
                const float mu = mx == neg_inf() ? 0.f : mx;  // a row that saw nothing yet
                const float alpha = fast_exp2(row_m[mt][hf] - mu);
                row_m[mt][hf] = mx;
                float sum = 0.f;
#pragma unroll
                for (int n = 0; n < NTN; ++n) {
                    const float p0 = fast_exp2(s[mt][n][2 * hf] - mu);
                    const float p1 = fast_exp2(s[mt][n][2 * hf + 1] - mu);
                    s[mt][n][2 * hf] = p0;
                    s[mt][n][2 * hf + 1] = p1;
                    sum += p0 + p1;
                }
                row_l[mt][hf] = row_l[mt][hf] * alpha + sum;  // per-thread partial of the row
#pragma unroll
                for (int d = 0; d < NTD; ++d) {
                    acc[mt][d][2 * hf] *= alpha;
                    acc[mt][d][2 * hf + 1] *= alpha;
                }
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
                const int r = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                ldsm_x4_t(smem_u32(cV + r * LDS + dp * 16 + (lane >> 4) * 8), b0, b1, b2, b3);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    E::mma(acc[mt][2 * dp], a[mt], b0, b1);
                    E::mma(acc[mt][2 * dp + 1], a[mt], b2, b3);
                }
            }
        }
        __syncthreads();  // this stage is refilled two iterations from now
    }

    // Epilogue: normalize, write out and lse once. A row that saw no key gives 0 and -inf.
    const bool pairs = (D & 1) == 0;  // out is allocated by the host: even D = aligned pairs
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const float l = quad_sum(row_l[mt][hf]);
            const int i = m0 + wrow + mt * 16 + (lane >> 2) + hf * 8;
            if (i >= Sq) continue;
            const float inv = l > 0.f ? 1.f / l : 0.f;
            u16* orow = o + b * o_sb + h * o_sh + (i64)i * o_ss;
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
                lse[((i64)b * Hq + h) * Sq + i] =
                    l > 0.f ? (row_m[mt][hf] + log2f(l)) * ATTN_LN2 : neg_inf();
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

template <int DP, bool BAND, bool SOFTCAP>
__global__ void __launch_bounds__(128) fwd_f32_kernel(
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    float* __restrict__ o, float* __restrict__ lse, const int* __restrict__ seqlens,
    i64 q_sb, i64 q_sh, i64 q_ss, i64 q_sd, i64 k_sb, i64 k_sh, i64 k_ss, i64 k_sd,
    i64 v_sb, i64 v_sh, i64 v_ss, i64 v_sd, i64 o_sb, i64 o_sh, i64 o_ss,
    int Hq, int group, int Sq, int Sk, int D, int left, int right,
    float scale, float cap_in, float softcap, int unused) {
    using C = F32Cfg<DP>;
    constexpr int R = C::R, BM = C::BM, BN = C::BN, LDK = C::LDK, DPL = DP / 32, NT = C::NW * 32;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float* sQ = reinterpret_cast<float*>(smem_raw);
    float* sK = sQ + BM * DP;
    float* sV = sK + BN * LDK;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int m0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
    const int hk = h / group;
    const Band band = Band::of_batch(seqlens, b, Sk, Sq, left, right);
    const float* kg = k + b * k_sb + hk * k_sh;
    const float* vg = v + b * v_sb + hk * v_sh;

    load_tile_f32<BM, DP, DP, NT>(sQ, q + b * q_sb + h * q_sh + (i64)m0 * q_ss, q_ss, q_sd,
                                  Sq - m0, D);
    const int m1 = min(m0 + BM, Sq) - 1;
    const int lo = band.key_lo(m0, BAND), hi = band.key_hi(m1, BAND);

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
        __syncthreads();
        float s[R];
#pragma unroll
        for (int r = 0; r < R; ++r) s[r] = 0.f;
#pragma unroll 8
        for (int d = 0; d < DP; ++d) {
            const float kv = sK[lane * LDK + d];
#pragma unroll
            for (int r = 0; r < R; ++r) s[r] = fmaf(sQ[(warp * R + r) * DP + d], kv, s[r]);
        }
        const int j = n0 + lane;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int i = m0 + warp * R + r;
            float x = SOFTCAP ? tanhf(s[r] * cap_in) * softcap : s[r] * scale;
            if (!band.visible(i, j, BAND)) x = neg_inf();
            f32_softmax_pv<BN, DP>(x, row_m[r], row_l[r], acc[r], sV, lane);
        }
    }

#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int i = m0 + warp * R + r;
        const float l = warp_sum(row_l[r]);
        if (i >= Sq) continue;
        const float inv = l > 0.f ? 1.f / l : 0.f;
        float* orow = o + b * o_sb + h * o_sh + (i64)i * o_ss;
#pragma unroll
        for (int c = 0; c < DPL; ++c)
            if (lane + 32 * c < D) orow[lane + 32 * c] = acc[r][c] * inv;
        if (lane == 0) lse[((i64)b * Hq + h) * Sq + i] = l > 0.f ? row_m[r] + logf(l) : neg_inf();
    }
}
