// Attention backward, deterministic (no atomics), from the saved out and lse:
//
//   delta = rowsum(dO * O) - dlse                             bwd_delta_kernel
//   P = exp(S - lse), dP = dO V^T, dS = P * (dP - delta)      recomputed per tile
//   dQ = scale * dS K                                         bwd_dq_kernel: one block per
//                                                              (query tile, head, batch)
//   dV = P^T dO, dK = scale * dS^T Q                          bwd_dkdv_kernel: one block per
//                                                              (key tile, kv head, batch)
//
// dQ and dK/dV are owned by separate kernels, so every output element is summed by one thread
// in a fixed order. The dK/dV block of a kv head walks the query tiles of every query head
// of its GQA group, so the group sum needs no second pass. With softcap, S is the capped
// score c*tanh(x/c) and dS is multiplied by the tanh derivative 1 - tanh^2. dlse, the
// gradient reaching lse (null when there is none), enters through delta only.
//
// Masked pairs get P = dS = 0 by selection, never by a product, so an inf/NaN score, lse or
// delta there cannot leak in. Keys outside [Band::key_first, skb) exist for no query: the dQ
// kernels zero their K rows (unread, or right after the load) before dS K; in the dK/dV
// kernels every pair of such a key is masked, so its dK/dV sums only selected zeros (a key
// row's sums read no other key's K/V: theirs need no zeroing).
//
// fp16/bf16 kernels use tensor cores (mma.sync m16n8k16 + ldmatrix, cp.async double
// buffering); the *_f32 kernels are the exact fp32 path on CUDA cores.
//
// FEAT (common.cuh) adds packed sequences (ATTN_VARLEN: grid z indexes sequences, lse and
// delta are (Hq, total_q)) or dropout (ATTN_DROPOUT: the forward's keep mask regenerated,
// dV = (cZP)^T dO and dP = cZ (dO V^T), c = 1 / (1 - p); delta is unchanged). FEAT = 0 is the
// plain kernel; the trailing arguments (offsets, dropout state) are then ignored. The delta
// kernels serve packed calls as one batch of total_q rows.
#include "common.cuh"

// Philox calls per lane evaluated side by side for a tile's dropout mask
// (AttnDropout::row_bits / col_bits): more hold more registers beside the accumulators.
#define BWD_DROP_UNROLL 2

// ---- delta = rowsum(dO * O) ----------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(128) bwd_delta_kernel(
    const u16* __restrict__ o, const u16* __restrict__ dout, const float* __restrict__ dlse,
    float* __restrict__ delta,
    i64 o_sb, i64 o_sh, i64 o_ss, i64 o_sd, i64 g_sb, i64 g_sh, i64 g_ss, i64 g_sd,
    int Hq, int Sq, int D) {
    const int lane = threadIdx.x & 31;
    const int i = blockIdx.x * 4 + (threadIdx.x >> 5), h = blockIdx.y, b = blockIdx.z;
    if (i >= Sq) return;
    const u16* orow = o + b * o_sb + h * o_sh + (i64)i * o_ss;
    const u16* grow = dout + b * g_sb + h * g_sh + (i64)i * g_ss;
    float sum = 0.f;
    for (int d = lane; d < D; d += 32)
        sum += Elem<T>::to_float(orow[d * o_sd]) * Elem<T>::to_float(grow[d * g_sd]);
    sum = warp_sum(sum);
    if (lane == 0) {
        const i64 idx = ((i64)b * Hq + h) * Sq + i;
        delta[idx] = dlse ? sum - dlse[idx] : sum;  // dlse: contiguous (B, Hq, Sq) or null
    }
}

__global__ void __launch_bounds__(128) bwd_delta_f32_kernel(
    const float* __restrict__ o, const float* __restrict__ dout, const float* __restrict__ dlse,
    float* __restrict__ delta,
    i64 o_sb, i64 o_sh, i64 o_ss, i64 o_sd, i64 g_sb, i64 g_sh, i64 g_ss, i64 g_sd,
    int Hq, int Sq, int D) {
    const int lane = threadIdx.x & 31;
    const int i = blockIdx.x * 4 + (threadIdx.x >> 5), h = blockIdx.y, b = blockIdx.z;
    if (i >= Sq) return;
    const float* orow = o + b * o_sb + h * o_sh + (i64)i * o_ss;
    const float* grow = dout + b * g_sb + h * g_sh + (i64)i * g_ss;
    float sum = 0.f;
    for (int d = lane; d < D; d += 32) sum = fmaf(orow[d * o_sd], grow[d * g_sd], sum);
    sum = warp_sum(sum);
    if (lane == 0) {
        const i64 idx = ((i64)b * Hq + h) * Sq + i;
        delta[idx] = dlse ? sum - dlse[idx] : sum;  // dlse: contiguous (B, Hq, Sq) or null
    }
}

// ---- dQ (fp16/bf16) ---------------------------------------------------------------------

// 4 warps of 16 query rows (64 queries per block), BN keys per streamed tile (host-chosen,
// _compile.DQ_TILES). Shared memory: (2 * 64 + 4 * BN) * (DP + 8) * 2 bytes (Q, dO, two
// stages of K and V).
template <typename T, int DP, int BN, bool BAND, bool SOFTCAP, int FEAT>
__global__ void __launch_bounds__(128) bwd_dq_kernel(
    const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
    const u16* __restrict__ dout, const float* __restrict__ lse,
    const float* __restrict__ delta, const int* __restrict__ seqlens, u16* __restrict__ dq,
    i64 q_sb, i64 q_sh, i64 q_ss, i64 q_sd, i64 k_sb, i64 k_sh, i64 k_ss, i64 k_sd,
    i64 v_sb, i64 v_sh, i64 v_ss, i64 v_sd, i64 g_sb, i64 g_sh, i64 g_ss, i64 g_sd,
    i64 dq_sb, i64 dq_sh, i64 dq_ss,
    int Hq, int group, int Sq, int Sk, int D, int left, int right,
    float scale_log2, float cap_in, float cap_out, float scale, int vec,
    const int* __restrict__ cu_q, const int* __restrict__ cu_k,
    const i64* __restrict__ drop_state, u32 drop_threshold, float drop_scale) {
    static_assert(DP % 32 == 0 && BN % 16 == 0, "bad dq tile");
    using E = Elem<T>;
    constexpr int BM = 64, LDS = DP + 8, NT = 128;
    constexpr int NTN = BN / 8, NTD = DP / 8;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    u16* sQ = reinterpret_cast<u16*>(smem_raw);
    u16* sG = sQ + BM * LDS;  // dO
    u16* sK = sG + BM * LDS;
    u16* sV = sK + 2 * BN * LDS;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int m0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
    const int hk = h / group;
    constexpr bool VARLEN = (FEAT & ATTN_VARLEN) != 0, DROP = (FEAT & ATTN_DROPOUT) != 0;
    const Span span = Span::of<VARLEN>(seqlens, cu_q, cu_k, b, Sq, Sk, left, right);
    const Band band = span.band;
    const int sq = span.sq;
    const AttnDropout drop =
        DROP ? AttnDropout::load(drop_state, drop_threshold, drop_scale) : AttnDropout{};
    if (VARLEN && m0 >= sq) return;  // a tile past its sequence's end: nothing to write
    const u32 bh = (u32)(b * Hq + h);
    const u16* kg = k + span.k_base<VARLEN>(b, k_sb, k_ss) + hk * k_sh;
    const u16* vg = v + span.k_base<VARLEN>(b, v_sb, v_ss) + hk * v_sh;

    const int m1 = min(m0 + BM, sq) - 1;
    const int lo = band.key_lo(m0, BAND), hi = band.key_hi(m1, BAND);
    const int t0 = lo / BN;
    const int ntiles = hi > lo ? (hi + BN - 1) / BN - t0 : 0;
    const int kfirst = band.key_first(BAND);

    if (ntiles > 0) {
        load_tile_16<BM, DP, LDS, NT>(
            sQ, q + span.q_base<VARLEN>(b, q_sb, q_ss) + h * q_sh + (i64)m0 * q_ss, q_ss, q_sd,
            sq - m0, D, vec, q);
        load_tile_16<BM, DP, LDS, NT>(
            sG, dout + span.q_base<VARLEN>(b, g_sb, g_ss) + h * g_sh + (i64)m0 * g_ss, g_ss,
            g_sd, sq - m0, D, vec, dout);
        const int n0 = t0 * BN;
        // Only this first tile can reach below kfirst (the next start past key_lo(m0)).
        load_tile_16<BN, DP, LDS, NT, true>(sK, kg + (i64)n0 * k_ss, k_ss, k_sd, band.skb - n0,
                                            D, vec, k, kfirst - n0);
        load_tile_16<BN, DP, LDS, NT, true>(sV, vg + (i64)n0 * v_ss, v_ss, v_sd, band.skb - n0,
                                            D, vec, v, kfirst - n0);
        cp_async_commit();
    }

    // Per-row softmax statistics of the two rows this thread holds.
    float lse2[2], dlt[2];
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        const int i = m0 + warp * 16 + (lane >> 2) + hf * 8;
        const i64 idx = span.stat<VARLEN>(b, h, Hq, Sq) + i;
        lse2[hf] = i < sq ? lse_to_log2(lse[idx]) : pos_inf();
        dlt[hf] = i < sq ? delta[idx] : 0.f;
    }

    float acc[NTD][4];
#pragma unroll
    for (int d = 0; d < NTD; ++d)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[d][e] = 0.f;
    const int wrow = warp * 16;

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

        // S = Q K^T and dP = dO V^T share the A-fragment addressing.
        float s[NTN][4], dp[NTN][4];
#pragma unroll
        for (int n = 0; n < NTN; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < DP / 16; ++kk) {
            const int ra = wrow + (lane & 7) + ((lane >> 3) & 1) * 8;
            const int ca = kk * 16 + (lane >> 4) * 8;
            u32 a[4], g[4];
            ldsm_x4(smem_u32(sQ + ra * LDS + ca), a[0], a[1], a[2], a[3]);
            ldsm_x4(smem_u32(sG + ra * LDS + ca), g[0], g[1], g[2], g[3]);
#pragma unroll
            for (int np = 0; np < BN / 16; ++np) {
                const int rb = np * 16 + (lane & 7) + (lane >> 4) * 8;
                const int cb = kk * 16 + ((lane >> 3) & 1) * 8;
                u32 b0, b1, b2, b3;
                ldsm_x4(smem_u32(cK + rb * LDS + cb), b0, b1, b2, b3);
                E::mma(s[2 * np], a, b0, b1);
                E::mma(s[2 * np + 1], a, b2, b3);
                ldsm_x4(smem_u32(cV + rb * LDS + cb), b0, b1, b2, b3);
                E::mma(dp[2 * np], g, b0, b1);
                E::mma(dp[2 * np + 1], g, b2, b3);
            }
        }

        // dS = P * (dP - delta) [* (1 - tanh^2)], in place of s. Where masked, the score, lse,
        // dP - delta and tanh are selected as -inf, 0, 0, 0: P = dS = 0 exactly, whatever lse
        // or delta hold there (NaN, inf).
        const bool full = band.tile_full(m0, m1, n0, n0 + BN - 1, BAND);
        unsigned long long kept = 0;
        if constexpr (DROP)
            // call c = 2 n + hf: row hf, 8-key group n; bit n * 4 + e
            kept = drop.row_bits<NTN * 2, BWD_DROP_UNROLL>(bh, lane, [&](int c, int& i, int& g) {
                i = m0 + wrow + (lane >> 2) + (c & 1) * 8;
                g = (n0 >> 3) + (c >> 1);
            }, WarpShfl{});
#pragma unroll
        for (int n = 0; n < NTN; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int hf = e >> 1;
                float dpv = dp[n][e];
                if constexpr (DROP)  // dP = cZ (dO V^T)
                    dpv = (kept >> (n * 4 + e)) & 1 ? dpv * drop.scale : 0.f;
                float x = s[n][e], t = 0.f, l2 = lse2[hf], dd = dpv - dlt[hf];
                if (SOFTCAP) {
                    t = tanhf(x * cap_in);
                    x = t * cap_out;
                } else {
                    x *= scale_log2;
                }
                if (!full) {
                    const int i = m0 + wrow + (lane >> 2) + hf * 8;
                    const int j = n0 + n * 8 + (lane & 3) * 2 + (e & 1);
                    if (!band.visible(i, j, BAND)) x = neg_inf(), l2 = dd = t = 0.f;
                }
                const float p = fast_exp2(x - l2);
                float ds = p * dd;
                if (SOFTCAP) ds *= 1.f - t * t;
                s[n][e] = ds;
            }

        // dQ += dS K (K read transposed: keys are the reduction dimension).
        mma_p_times_tile<E, BN / 16, DP, LDS>(acc, s, cK, lane);
        __syncthreads();
    }

    const bool pairs = (D & 1) == 0;
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        const int i = m0 + wrow + (lane >> 2) + hf * 8;
        if (i >= sq) continue;
        u16* row = dq + span.q_base<VARLEN>(b, dq_sb, dq_ss) + h * dq_sh + (i64)i * dq_ss;
#pragma unroll
        for (int d = 0; d < NTD; ++d) {
            const int c = d * 8 + (lane & 3) * 2;
            const float x0 = acc[d][2 * hf] * scale, x1 = acc[d][2 * hf + 1] * scale;
            if (pairs && c + 1 < D) {
                *reinterpret_cast<u32*>(row + c) = E::pack(x0, x1);
            } else {
                if (c < D) row[c] = E::from_float(x0);
                if (c + 1 < D) row[c + 1] = E::from_float(x1);
            }
        }
    }
}

// ---- dK, dV (fp16/bf16) -----------------------------------------------------------------

// NW warps of 16 key rows (BK = NW * 16 keys per block, resident), BQ queries per streamed
// tile (host-chosen, _compile.DKV_TILES). Above DP = 128 the dK/dV accumulators would not fit
// in registers, so each block owns half of the columns (NCH = 2 blocks per key tile; S and dP
// are recomputed by both). Shared memory: 2 * BK * (DP + 8) * 2 (K, V) + 4 * BQ * (DP + 8) * 2
// (two stages of Q, dO) + 4 * BQ * 4 (two stages of lse, delta) bytes.
template <typename T, int DP, int NW, int BQ, bool BAND, bool SOFTCAP, int FEAT>
__global__ void __launch_bounds__(NW * 32) bwd_dkdv_kernel(
    const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
    const u16* __restrict__ dout, const float* __restrict__ lse,
    const float* __restrict__ delta, const int* __restrict__ seqlens, u16* __restrict__ dk,
    u16* __restrict__ dv,
    i64 q_sb, i64 q_sh, i64 q_ss, i64 q_sd, i64 k_sb, i64 k_sh, i64 k_ss, i64 k_sd,
    i64 v_sb, i64 v_sh, i64 v_ss, i64 v_sd, i64 g_sb, i64 g_sh, i64 g_ss, i64 g_sd,
    i64 dk_sb, i64 dk_sh, i64 dk_ss, i64 dv_sb, i64 dv_sh, i64 dv_ss,
    int Hq, int group, int Sq, int Sk, int D, int left, int right,
    float scale_log2, float cap_in, float cap_out, float scale, int vec,
    const int* __restrict__ cu_q, const int* __restrict__ cu_k,
    const i64* __restrict__ drop_state, u32 drop_threshold, float drop_scale) {
    static_assert(DP % 32 == 0 && BQ % 16 == 0, "bad dkdv tile");
    using E = Elem<T>;
    constexpr int NCH = DP > 128 ? 2 : 1, DC = DP / NCH;
    constexpr int BK = NW * 16, LDS = DP + 8, NT = NW * 32;
    constexpr int NTQ = BQ / 8, NTC = DC / 8;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    u16* sK = reinterpret_cast<u16*>(smem_raw);
    u16* sV = sK + BK * LDS;
    u16* sQ = sV + BK * LDS;       // 2 stages
    u16* sG = sQ + 2 * BQ * LDS;   // 2 stages of dO
    float* sL = reinterpret_cast<float*>(sG + 2 * BQ * LDS);  // 2 stages of lse
    float* sD = sL + 2 * BQ;                                  // 2 stages of delta

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int kb = blockIdx.x / NCH, c0 = (blockIdx.x % NCH) * DC;
    const int hk = blockIdx.y, b = blockIdx.z;
    const int n0 = kb * BK;
    constexpr bool VARLEN = (FEAT & ATTN_VARLEN) != 0, DROP = (FEAT & ATTN_DROPOUT) != 0;
    const Span span = Span::of<VARLEN>(seqlens, cu_q, cu_k, b, Sq, Sk, left, right);
    const Band band = span.band;
    const int sq = span.sq;
    const AttnDropout drop =
        DROP ? AttnDropout::load(drop_state, drop_threshold, drop_scale) : AttnDropout{};
    if (VARLEN && n0 >= band.skb) return;  // a tile past its sequence's end
    // Rows this block writes: up to Sk (zeros past seqlens_k), or to its sequence's end.
    const int kend = VARLEN ? band.skb : Sk;

    // Queries that can see some key of this block, for every head of the group.
    const int n1 = min(n0 + BK, band.skb) - 1;
    const int qlo = band.query_lo(n0, BAND), qhi = band.query_hi(n1, sq, BAND);
    const int tq0 = qlo / BQ;
    const int ntq = (n0 < band.skb && qhi > qlo) ? (qhi + BQ - 1) / BQ - tq0 : 0;
    const int total = group * ntq;

    const u16* kg = k + span.k_base<VARLEN>(b, k_sb, k_ss) + hk * k_sh;
    const u16* vg = v + span.k_base<VARLEN>(b, v_sb, v_ss) + hk * v_sh;
    const i64 q_base = span.q_base<VARLEN>(b, q_sb, q_ss);
    const i64 g_base = span.q_base<VARLEN>(b, g_sb, g_ss);
    auto issue = [&](int it, int st) {
        const int h = hk * group + it / ntq;
        const int mq0 = (tq0 + it % ntq) * BQ;
        load_tile_16<BQ, DP, LDS, NT>(sQ + st * BQ * LDS, q + q_base + h * q_sh + (i64)mq0 * q_ss,
                                      q_ss, q_sd, sq - mq0, D, vec, q);
        load_tile_16<BQ, DP, LDS, NT>(sG + st * BQ * LDS,
                                      dout + g_base + h * g_sh + (i64)mq0 * g_ss, g_ss, g_sd,
                                      sq - mq0, D, vec, dout);
        const i64 row = span.stat<VARLEN>(b, h, Hq, Sq) + mq0;
        load_row_f32<BQ, NT>(sL + st * BQ, lse + row, sq - mq0, lse);
        load_row_f32<BQ, NT>(sD + st * BQ, delta + row, sq - mq0, delta);
    };

    if (total > 0) {
        load_tile_16<BK, DP, LDS, NT>(sK, kg + (i64)n0 * k_ss, k_ss, k_sd, band.skb - n0,
                                      D, vec, k);
        load_tile_16<BK, DP, LDS, NT>(sV, vg + (i64)n0 * v_ss, v_ss, v_sd, band.skb - n0,
                                      D, vec, v);
        issue(0, 0);
        cp_async_commit();
    }

    float gk[NTC][4], gv[NTC][4];
#pragma unroll
    for (int d = 0; d < NTC; ++d)
#pragma unroll
        for (int e = 0; e < 4; ++e) gk[d][e] = gv[d][e] = 0.f;
    const int wrow = warp * 16;
    // Key rows in the mma accumulator layout; queries are the columns.
    const int j_row = n0 + wrow + (lane >> 2);

    for (int it = 0; it < total; ++it) {
        const int st = it & 1;
        const int mq0 = (tq0 + it % ntq) * BQ;
        const u32 bh = (u32)(b * Hq + hk * group + it / ntq);
        if (it + 1 < total) {
            issue(it + 1, st ^ 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const u16* cQ = sQ + st * BQ * LDS;
        const u16* cG = sG + st * BQ * LDS;
        const float* cL = sL + st * BQ;
        const float* cD = sD + st * BQ;

        // S^T = K Q^T and dP^T = V dO^T (keys x queries).
        float s[NTQ][4], dp[NTQ][4];
#pragma unroll
        for (int n = 0; n < NTQ; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < DP / 16; ++kk) {
            const int ra = wrow + (lane & 7) + ((lane >> 3) & 1) * 8;
            const int ca = kk * 16 + (lane >> 4) * 8;
            u32 a[4], w[4];
            ldsm_x4(smem_u32(sK + ra * LDS + ca), a[0], a[1], a[2], a[3]);
            ldsm_x4(smem_u32(sV + ra * LDS + ca), w[0], w[1], w[2], w[3]);
#pragma unroll
            for (int np = 0; np < BQ / 16; ++np) {
                const int rb = np * 16 + (lane & 7) + (lane >> 4) * 8;
                const int cb = kk * 16 + ((lane >> 3) & 1) * 8;
                u32 b0, b1, b2, b3;
                ldsm_x4(smem_u32(cQ + rb * LDS + cb), b0, b1, b2, b3);
                E::mma(s[2 * np], a, b0, b1);
                E::mma(s[2 * np + 1], a, b2, b3);
                ldsm_x4(smem_u32(cG + rb * LDS + cb), b0, b1, b2, b3);
                E::mma(dp[2 * np], w, b0, b1);
                E::mma(dp[2 * np + 1], w, b2, b3);
            }
        }

        // P^T in s, dS^T in dp; masked pairs select -inf, 0, 0 as in the dQ kernel.
        const bool full = band.tile_full(mq0, mq0 + BQ - 1, n0, n0 + BK - 1, BAND) &&
                          mq0 + BQ <= sq;
        unsigned long long keep = 0;
        if constexpr (DROP)
            // call c = n * 4 + e: query column n * 8 + 2 (lane % 4) + e % 2, key group of
            // rows j_row + 8 (e / 2); bit c
            keep = drop.col_bits<NTQ * 4, BWD_DROP_UNROLL>(bh, lane, [&](int c, int& i, int& g) {
                const int n = c >> 2, e = c & 3;
                i = mq0 + n * 8 + (lane & 3) * 2 + (e & 1);
                g = ((n0 + wrow) >> 3) + (e >> 1);
            }, WarpShfl{});
#pragma unroll
        for (int n = 0; n < NTQ; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int col = n * 8 + (lane & 3) * 2 + (e & 1);
                float dpv = dp[n][e];
                bool kept = true;
                if constexpr (DROP) {  // dP = cZ (dO V^T); dV takes cZP
                    kept = (keep >> (n * 4 + e)) & 1;
                    dpv = kept ? dpv * drop.scale : 0.f;
                }
                float x = s[n][e], t = 0.f, l2 = lse_to_log2(cL[col]), dd = dpv - cD[col];
                if (SOFTCAP) {
                    t = tanhf(x * cap_in);
                    x = t * cap_out;
                } else {
                    x *= scale_log2;
                }
                if (!full) {
                    const int i = mq0 + col, j = j_row + (e >> 1) * 8;
                    if (i >= sq || !band.visible(i, j, BAND)) x = neg_inf(), l2 = dd = t = 0.f;
                }
                const float p = fast_exp2(x - l2);
                float ds = p * dd;
                if (SOFTCAP) ds *= 1.f - t * t;
                s[n][e] = DROP ? (kept ? p * drop.scale : 0.f) : p;
                dp[n][e] = ds;
            }

        // dV += P^T dO and dK += dS^T Q over this block's column chunk.
#pragma unroll
        for (int kk = 0; kk < BQ / 16; ++kk) {
            u32 pa[4], sa[4];
            pa[0] = E::pack(s[2 * kk][0], s[2 * kk][1]);
            pa[1] = E::pack(s[2 * kk][2], s[2 * kk][3]);
            pa[2] = E::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pa[3] = E::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
            sa[0] = E::pack(dp[2 * kk][0], dp[2 * kk][1]);
            sa[1] = E::pack(dp[2 * kk][2], dp[2 * kk][3]);
            sa[2] = E::pack(dp[2 * kk + 1][0], dp[2 * kk + 1][1]);
            sa[3] = E::pack(dp[2 * kk + 1][2], dp[2 * kk + 1][3]);
            const int r = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
            for (int dpi = 0; dpi < DC / 16; ++dpi) {
                const int c = c0 + dpi * 16 + (lane >> 4) * 8;
                u32 b0, b1, b2, b3;
                ldsm_x4_t(smem_u32(cG + r * LDS + c), b0, b1, b2, b3);
                E::mma(gv[2 * dpi], pa, b0, b1);
                E::mma(gv[2 * dpi + 1], pa, b2, b3);
                ldsm_x4_t(smem_u32(cQ + r * LDS + c), b0, b1, b2, b3);
                E::mma(gk[2 * dpi], sa, b0, b1);
                E::mma(gk[2 * dpi + 1], sa, b2, b3);
            }
        }
        __syncthreads();
    }

    // Keys that exist for no query (past seqlens_k, before key_first) get exact zeros: every
    // pair of theirs is masked, so only selected zeros entered their sums; so do blocks no query
    // sees.
    const bool pairs = (D & 1) == 0;
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        const int j = j_row + hf * 8;
        if (j >= kend) continue;
        u16* krow = dk + span.k_base<VARLEN>(b, dk_sb, dk_ss) + hk * dk_sh + (i64)j * dk_ss;
        u16* vrow = dv + span.k_base<VARLEN>(b, dv_sb, dv_ss) + hk * dv_sh + (i64)j * dv_ss;
#pragma unroll
        for (int d = 0; d < NTC; ++d) {
            const int c = c0 + d * 8 + (lane & 3) * 2;
            const float k0 = gk[d][2 * hf] * scale, k1 = gk[d][2 * hf + 1] * scale;
            const float v0 = gv[d][2 * hf], v1 = gv[d][2 * hf + 1];
            if (pairs && c + 1 < D) {
                *reinterpret_cast<u32*>(krow + c) = E::pack(k0, k1);
                *reinterpret_cast<u32*>(vrow + c) = E::pack(v0, v1);
            } else {
                if (c < D) {
                    krow[c] = E::from_float(k0);
                    vrow[c] = E::from_float(v0);
                }
                if (c + 1 < D) {
                    krow[c + 1] = E::from_float(k1);
                    vrow[c + 1] = E::from_float(v1);
                }
            }
        }
    }
}

// ---- fp32 (CUDA cores) ------------------------------------------------------------------

template <int DP> struct BwdF32Cfg {
    static constexpr int NW = 4;
    static constexpr int R = 4;          // rows (queries for dQ, keys for dK/dV) per warp
    static constexpr int BR = NW * R;    // rows per block
    static constexpr int BC = 32;        // streamed columns per tile: one per lane
    static constexpr int LDC = DP + 1;   // odd stride: lane c reading row c is conflict-free
    // dQ: Q, dO rows + K, V tiles; dK/dV: K, V rows + Q, dO tiles + lse, delta.
    static constexpr int SMEM = (2 * BR * DP + 2 * BC * LDC + 2 * BC) * 4;
};

template <int ROWS, int DP, int LD, int NT>
ATTN_DEVICE void load_rows_f32(float* sm, const float* g, i64 s_row, i64 s_col, int nvalid,
                               int D) {
    for (int idx = threadIdx.x; idx < ROWS * DP; idx += NT) {
        const int r = idx / DP, c = idx % DP;
        sm[r * LD + c] = (r < nvalid && c < D) ? g[(i64)r * s_row + (i64)c * s_col] : 0.f;
    }
}

template <int DP, bool BAND, bool SOFTCAP, int FEAT>
__global__ void __launch_bounds__(128) bwd_dq_f32_kernel(
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    const float* __restrict__ dout, const float* __restrict__ lse,
    const float* __restrict__ delta, const int* __restrict__ seqlens, float* __restrict__ dq,
    i64 q_sb, i64 q_sh, i64 q_ss, i64 q_sd, i64 k_sb, i64 k_sh, i64 k_ss, i64 k_sd,
    i64 v_sb, i64 v_sh, i64 v_ss, i64 v_sd, i64 g_sb, i64 g_sh, i64 g_ss, i64 g_sd,
    i64 dq_sb, i64 dq_sh, i64 dq_ss,
    int Hq, int group, int Sq, int Sk, int D, int left, int right,
    float scale, float cap_in, float softcap, float unused, int unused2,
    const int* __restrict__ cu_q, const int* __restrict__ cu_k,
    const i64* __restrict__ drop_state, u32 drop_threshold, float drop_scale) {
    using C = BwdF32Cfg<DP>;
    constexpr int R = C::R, BM = C::BR, BN = C::BC, LDC = C::LDC, DPL = DP / 32, NT = C::NW * 32;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float* sQ = reinterpret_cast<float*>(smem_raw);
    float* sG = sQ + BM * DP;
    float* sK = sG + BM * DP;
    float* sV = sK + BN * LDC;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int m0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
    const int hk = h / group;
    constexpr bool VARLEN = (FEAT & ATTN_VARLEN) != 0, DROP = (FEAT & ATTN_DROPOUT) != 0;
    const Span span = Span::of<VARLEN>(seqlens, cu_q, cu_k, b, Sq, Sk, left, right);
    const Band band = span.band;
    const int sq = span.sq;
    const AttnDropout drop =
        DROP ? AttnDropout::load(drop_state, drop_threshold, drop_scale) : AttnDropout{};
    if (VARLEN && m0 >= sq) return;  // a tile past its sequence's end: nothing to write
    const float* kg = k + span.k_base<VARLEN>(b, k_sb, k_ss) + hk * k_sh;
    const float* vg = v + span.k_base<VARLEN>(b, v_sb, v_ss) + hk * v_sh;
    load_rows_f32<BM, DP, DP, NT>(
        sQ, q + span.q_base<VARLEN>(b, q_sb, q_ss) + h * q_sh + (i64)m0 * q_ss, q_ss, q_sd,
        sq - m0, D);
    load_rows_f32<BM, DP, DP, NT>(
        sG, dout + span.q_base<VARLEN>(b, g_sb, g_ss) + h * g_sh + (i64)m0 * g_ss, g_ss, g_sd,
        sq - m0, D);
    const int m1 = min(m0 + BM, sq) - 1;
    const int lo = band.key_lo(m0, BAND), hi = band.key_hi(m1, BAND);
    const int kfirst = band.key_first(BAND);

    float acc[R][DPL], lse_r[R], dlt[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int i = m0 + warp * R + r;
        const i64 idx = span.stat<VARLEN>(b, h, Hq, Sq) + i;
        // A fully-masked row (lse = -inf) gets +inf: every exp(s - lse) is then 0.
        lse_r[r] = i < sq ? (lse[idx] == neg_inf() ? pos_inf() : lse[idx]) : pos_inf();
        dlt[r] = i < sq ? delta[idx] : 0.f;
#pragma unroll
        for (int c = 0; c < DPL; ++c) acc[r][c] = 0.f;
    }

    for (int n0 = (lo / BN) * BN; n0 < hi; n0 += BN) {
        __syncthreads();
        load_rows_f32<BN, DP, LDC, NT>(sK, kg + (i64)n0 * k_ss, k_ss, k_sd, band.skb - n0, D);
        load_rows_f32<BN, DP, LDC, NT>(sV, vg + (i64)n0 * v_ss, v_ss, v_sd, band.skb - n0, D);
        // Keys before kfirst exist for no query (the first tile only): P and dS are selected
        // there, but their K rows must not meet dS = 0 as NaN or inf. The padded rows are
        // zeroed whole, by other threads than loaded them: a barrier first.
        if (BAND && n0 < kfirst) {
            __syncthreads();
            zero_f32<NT>(sK, (kfirst - n0) * LDC);
        }
        __syncthreads();
        float s[R], dp[R];
#pragma unroll
        for (int r = 0; r < R; ++r) s[r] = dp[r] = 0.f;
#pragma unroll 4
        for (int d = 0; d < DP; ++d) {
            const float kv = sK[lane * LDC + d], vv = sV[lane * LDC + d];
#pragma unroll
            for (int r = 0; r < R; ++r) {
                s[r] = fmaf(sQ[(warp * R + r) * DP + d], kv, s[r]);
                dp[r] = fmaf(sG[(warp * R + r) * DP + d], vv, dp[r]);
            }
        }
        const int j = n0 + lane;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int i = m0 + warp * R + r;
            float x, t = 0.f;
            if (SOFTCAP) {
                t = tanhf(s[r] * cap_in);
                x = t * softcap;
            } else {
                x = s[r] * scale;
            }
            const bool vis = band.visible(i, j, BAND);
            const float p = vis ? expf(x - lse_r[r]) : 0.f;
            float ds;  // masked: 0 * 0, whatever delta holds
            if constexpr (DROP) {  // dP = cZ (dO V^T)
                const bool kept = drop.keep((u32)(b * Hq + h), i, j);
                ds = p * (vis ? (kept ? dp[r] * drop.scale : 0.f) - dlt[r] : 0.f);
            } else {
                ds = p * (vis ? dp[r] - dlt[r] : 0.f);
            }
            if (SOFTCAP) ds *= 1.f - t * t;
#pragma unroll 8
            for (int jj = 0; jj < BN; ++jj) {
                const float dsj = __shfl_sync(0xffffffffu, ds, jj);
#pragma unroll
                for (int c = 0; c < DPL; ++c)
                    acc[r][c] = fmaf(dsj, sK[jj * LDC + lane + 32 * c], acc[r][c]);
            }
        }
    }

#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int i = m0 + warp * R + r;
        if (i >= sq) continue;
        float* row = dq + span.q_base<VARLEN>(b, dq_sb, dq_ss) + h * dq_sh + (i64)i * dq_ss;
#pragma unroll
        for (int c = 0; c < DPL; ++c)
            if (lane + 32 * c < D) row[lane + 32 * c] = acc[r][c] * scale;
    }
}

template <int DP, bool BAND, bool SOFTCAP, int FEAT>
__global__ void __launch_bounds__(128) bwd_dkdv_f32_kernel(
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    const float* __restrict__ dout, const float* __restrict__ lse,
    const float* __restrict__ delta, const int* __restrict__ seqlens, float* __restrict__ dk,
    float* __restrict__ dv,
    i64 q_sb, i64 q_sh, i64 q_ss, i64 q_sd, i64 k_sb, i64 k_sh, i64 k_ss, i64 k_sd,
    i64 v_sb, i64 v_sh, i64 v_ss, i64 v_sd, i64 g_sb, i64 g_sh, i64 g_ss, i64 g_sd,
    i64 dk_sb, i64 dk_sh, i64 dk_ss, i64 dv_sb, i64 dv_sh, i64 dv_ss,
    int Hq, int group, int Sq, int Sk, int D, int left, int right,
    float scale, float cap_in, float softcap, float unused, int unused2,
    const int* __restrict__ cu_q, const int* __restrict__ cu_k,
    const i64* __restrict__ drop_state, u32 drop_threshold, float drop_scale) {
    using C = BwdF32Cfg<DP>;
    constexpr int R = C::R, BK = C::BR, BQ = C::BC, LDC = C::LDC, DPL = DP / 32, NT = C::NW * 32;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float* sK = reinterpret_cast<float*>(smem_raw);
    float* sV = sK + BK * DP;
    float* sQ = sV + BK * DP;
    float* sG = sQ + BQ * LDC;
    float* sL = sG + BQ * LDC;
    float* sD = sL + BQ;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n0 = blockIdx.x * BK, hk = blockIdx.y, b = blockIdx.z;
    constexpr bool VARLEN = (FEAT & ATTN_VARLEN) != 0, DROP = (FEAT & ATTN_DROPOUT) != 0;
    const Span span = Span::of<VARLEN>(seqlens, cu_q, cu_k, b, Sq, Sk, left, right);
    const Band band = span.band;
    const int sq = span.sq;
    const AttnDropout drop =
        DROP ? AttnDropout::load(drop_state, drop_threshold, drop_scale) : AttnDropout{};
    if (VARLEN && n0 >= band.skb) return;  // a tile past its sequence's end
    // Rows this block writes: up to Sk (zeros past seqlens_k), or to its sequence's end.
    const int kend = VARLEN ? band.skb : Sk;
    load_rows_f32<BK, DP, DP, NT>(
        sK, k + span.k_base<VARLEN>(b, k_sb, k_ss) + hk * k_sh + (i64)n0 * k_ss, k_ss, k_sd,
        band.skb - n0, D);
    load_rows_f32<BK, DP, DP, NT>(
        sV, v + span.k_base<VARLEN>(b, v_sb, v_ss) + hk * v_sh + (i64)n0 * v_ss, v_ss, v_sd,
        band.skb - n0, D);
    const int n1 = min(n0 + BK, band.skb) - 1;
    const int qlo = band.query_lo(n0, BAND), qhi = band.query_hi(n1, sq, BAND);
    const bool any = n0 < band.skb && qhi > qlo;

    float gk[R][DPL], gv[R][DPL];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int c = 0; c < DPL; ++c) gk[r][c] = gv[r][c] = 0.f;

    for (int hh = 0; any && hh < group; ++hh) {
        const int h = hk * group + hh;
        for (int mq0 = (qlo / BQ) * BQ; mq0 < qhi; mq0 += BQ) {
            __syncthreads();
            load_rows_f32<BQ, DP, LDC, NT>(
                sQ, q + span.q_base<VARLEN>(b, q_sb, q_ss) + h * q_sh + (i64)mq0 * q_ss, q_ss,
                q_sd, sq - mq0, D);
            load_rows_f32<BQ, DP, LDC, NT>(
                sG, dout + span.q_base<VARLEN>(b, g_sb, g_ss) + h * g_sh + (i64)mq0 * g_ss,
                g_ss, g_sd, sq - mq0, D);
            if (threadIdx.x < BQ) {
                const int i = mq0 + threadIdx.x;
                const i64 idx = span.stat<VARLEN>(b, h, Hq, Sq) + i;
                const float l = i < sq ? lse[idx] : neg_inf();
                sL[threadIdx.x] = l == neg_inf() ? pos_inf() : l;
                sD[threadIdx.x] = i < sq ? delta[idx] : 0.f;
            }
            __syncthreads();
            float s[R], dp[R];
#pragma unroll
            for (int r = 0; r < R; ++r) s[r] = dp[r] = 0.f;
#pragma unroll 4
            for (int d = 0; d < DP; ++d) {
                const float qv = sQ[lane * LDC + d], gv_ = sG[lane * LDC + d];
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    s[r] = fmaf(sK[(warp * R + r) * DP + d], qv, s[r]);
                    dp[r] = fmaf(sV[(warp * R + r) * DP + d], gv_, dp[r]);
                }
            }
            const int i = mq0 + lane;
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const int j = n0 + warp * R + r;
                float x, t = 0.f;
                if (SOFTCAP) {
                    t = tanhf(s[r] * cap_in);
                    x = t * softcap;
                } else {
                    x = s[r] * scale;
                }
                const bool vis = i < sq && band.visible(i, j, BAND);
                // Masked: 0 * 0, whatever delta or (for a key that exists for no query) its
                // K/V rows hold; its tanh too may be NaN.
                const float p = vis ? expf(x - sL[lane]) : 0.f;
                float ds, pv;
                if constexpr (DROP) {  // dP = cZ (dO V^T); dV takes cZP
                    const bool kept = drop.keep((u32)(b * Hq + h), i, j);
                    ds = p * (vis ? (kept ? dp[r] * drop.scale : 0.f) - sD[lane] : 0.f);
                    pv = kept ? p * drop.scale : 0.f;
                } else {
                    ds = p * (vis ? dp[r] - sD[lane] : 0.f);
                    pv = p;
                }
                if (SOFTCAP) ds = vis ? ds * (1.f - t * t) : 0.f;
#pragma unroll 8
                for (int ii = 0; ii < BQ; ++ii) {
                    const float pi = __shfl_sync(0xffffffffu, pv, ii);
                    const float dsi = __shfl_sync(0xffffffffu, ds, ii);
#pragma unroll
                    for (int c = 0; c < DPL; ++c) {
                        gv[r][c] = fmaf(pi, sG[ii * LDC + lane + 32 * c], gv[r][c]);
                        gk[r][c] = fmaf(dsi, sQ[ii * LDC + lane + 32 * c], gk[r][c]);
                    }
                }
            }
        }
    }

#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int j = n0 + warp * R + r;
        if (j >= kend) continue;
        float* krow = dk + span.k_base<VARLEN>(b, dk_sb, dk_ss) + hk * dk_sh + (i64)j * dk_ss;
        float* vrow = dv + span.k_base<VARLEN>(b, dv_sb, dv_ss) + hk * dv_sh + (i64)j * dv_ss;
#pragma unroll
        for (int c = 0; c < DPL; ++c)
            if (lane + 32 * c < D) {
                krow[lane + 32 * c] = gk[r][c] * scale;
                vrow[lane + 32 * c] = gv[r][c];
            }
    }
}
