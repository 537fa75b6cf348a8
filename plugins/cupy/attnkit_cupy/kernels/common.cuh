// Shared device helpers for the attnkit CuPy kernels.
//
// The kernels are compiled by NVRTC at run time, where no CUDA or C++ header is available, so
// this file defines everything it needs itself: integer types, fp16/bf16 conversions and the
// PTX wrappers (cp.async, ldmatrix, mma.sync m16n8k16). It compiles unchanged with nvcc.
#pragma once

typedef unsigned int u32;
typedef unsigned short u16;
typedef long long i64;

#define ATTN_DEVICE __device__ __forceinline__

// Scores are kept in log2 units so the softmax can use exp2.
#define ATTN_LOG2E 1.4426950408889634f
#define ATTN_LN2 0.6931471805599453f

ATTN_DEVICE float neg_inf() { return __int_as_float(0xff800000); }
ATTN_DEVICE float pos_inf() { return __int_as_float(0x7f800000); }

// Element tags: fp16/bf16 tensors are moved around as raw 16-bit words.
struct Half {};
struct BF16 {};

template <typename T> struct Elem;

// The conversions and mma.sync wrappers of a 16-bit type, named T in PTX ("f16", "bf16"):
// one body for both, so they differ only in that name.
#define ATTN_ELEM16_OPS(T)                                                                  \
    static ATTN_DEVICE u16 from_float(float f) {                                           \
        u16 h;                                                                              \
        asm("cvt.rn." T ".f32 %0, %1;" : "=h"(h) : "f"(f));                                 \
        return h;                                                                           \
    }                                                                                       \
    /* lo goes to the low half (the lower column index in an mma fragment). */              \
    static ATTN_DEVICE u32 pack(float lo, float hi) {                                      \
        u32 r;                                                                              \
        asm("cvt.rn." T "x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));                 \
        return r;                                                                           \
    }                                                                                       \
    static ATTN_DEVICE void mma(float* c, const u32* a, u32 b0, u32 b1) {                  \
        asm volatile(                                                                       \
            "mma.sync.aligned.m16n8k16.row.col.f32." T "." T ".f32 "                        \
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"                         \
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                \
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));                \
    }                                                                                       \
    /* c = A B with a zero accumulator: the first k-step of a score tile writes c instead  \
       of reading it, so the tile needs no zeroing moves (ptxas feeds the zero as RZ). */   \
    static ATTN_DEVICE void mma_zero(float* c, const u32* a, u32 b0, u32 b1) {             \
        asm("mma.sync.aligned.m16n8k16.row.col.f32." T "." T ".f32 "                        \
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%10,%10,%10};"                     \
            : "=f"(c[0]), "=f"(c[1]), "=f"(c[2]), "=f"(c[3])                                \
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.f));      \
    }

template <> struct Elem<Half> {
    static ATTN_DEVICE float to_float(u16 h) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
        return f;
    }
    ATTN_ELEM16_OPS("f16")
};

template <> struct Elem<BF16> {
    static ATTN_DEVICE float to_float(u16 h) { return __uint_as_float(((u32)h) << 16); }
    ATTN_ELEM16_OPS("bf16")
};

#undef ATTN_ELEM16_OPS

// ---- small math -------------------------------------------------------------------------

// exp2 with the hardware approximation (relative error ~2^-22, exp2(-inf) = 0).
ATTN_DEVICE float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

ATTN_DEVICE float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

ATTN_DEVICE float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

ATTN_DEVICE float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

ATTN_DEVICE float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// lse (natural log) -> the log2-unit offset the backward subtracts. A fully-masked row has
// lse = -inf; +inf makes every probability of that row exp2(s - inf) = 0 instead of NaN.
ATTN_DEVICE float lse_to_log2(float lse) { return lse == neg_inf() ? pos_inf() : lse * ATTN_LOG2E; }

// ---- the visible band -------------------------------------------------------------------
//
// Query i of a batch with skb valid keys sees key j iff j < skb and
// -left <= j - (i + skb - Sq) <= right. The host clamps left/right to [0, Sq + Sk], so an
// unbounded side is a finite number that never masks and no sum below overflows int32.
// Valid keys of batch b. The host does not read seqlens_k of CUDA tensors (that would stall
// every call), so an out-of-range value is clamped here to keep every access in bounds.
ATTN_DEVICE int valid_keys(const int* seqlens, int b, int Sk) {
    return seqlens ? min(max(seqlens[b], 0), Sk) : Sk;
}

struct Band {
    int skb;    // valid keys of this batch
    int off;    // skb - Sq: key index of query i's diagonal is i + off
    int left;
    int right;

    // Batch b's band: its valid keys (seqlens clamped to [0, Sk]) and the bottom-right offset.
    static ATTN_DEVICE Band of_batch(const int* seqlens, int b, int Sk, int Sq, int left,
                                     int right) {
        Band band;
        band.skb = valid_keys(seqlens, b, Sk);
        band.off = band.skb - Sq;
        band.left = left;
        band.right = right;
        return band;
    }

    ATTN_DEVICE bool visible(int i, int j, bool band) const {
        if (j >= skb) return false;
        if (!band) return true;
        int rel = j - i - off;
        return rel >= -left && rel <= right;
    }
    // Keys [lo, hi) that any query of [m0, m1] may see.
    ATTN_DEVICE int key_lo(int m0, bool band) const { return band ? max(0, m0 + off - left) : 0; }
    // First key some query of the batch sees: keys outside [key_first, skb) exist for no query
    // and may hold anything (NaN, inf), so the kernels zero their rows (unread, or right after
    // the load) wherever a product would meet them.
    ATTN_DEVICE int key_first(bool band) const { return key_lo(0, band); }
    ATTN_DEVICE int key_hi(int m1, bool band) const {
        return band ? min(skb, m1 + off + right + 1) : skb;
    }
    // Queries [lo, hi) of [0, Sq) that any key of [n0, n1] may be seen by.
    ATTN_DEVICE int query_lo(int n0, bool band) const {
        return band ? max(0, n0 - off - right) : 0;
    }
    ATTN_DEVICE int query_hi(int n1, int Sq, bool band) const {
        return band ? min(Sq, n1 - off + left + 1) : Sq;
    }
    // True when every (query in [m0, m1], key in [n0, n1]) pair is visible.
    ATTN_DEVICE bool tile_full(int m0, int m1, int n0, int n1, bool band) const {
        if (n1 >= skb) return false;
        if (!band) return true;
        return n0 - m1 - off >= -left && n1 - m0 - off <= right;
    }
};

// ---- packed variable-length batches -----------------------------------------------------

// Feature bits of the fwd/bwd kernels (template argument FEAT): 0 is the plain dense kernel.
// ATTN_VARLEN: grid z indexes the sequences of cu_q/cu_k offsets, not batches; Sq and Sk are
//   the packed tensors' rows (total_q, total_k) and lse/delta are (Hq, total_q).
// ATTN_DROPOUT: probabilities are dropped with attnkit.dropout's keep mask (AttnDropout).
#define ATTN_VARLEN 1
#define ATTN_DROPOUT 2

// Where one block's batch (dense) or sequence (ATTN_VARLEN) lives: its query rows start at
// row q0 of q/out (0 when dense: the batch stride places it) and its keys at row k0 of k/v;
// sq query rows, and the band of its keys. Offsets are clamped to the tensors' rows because
// the host does not read them (that would stall every call): any values keep every access
// in bounds.
struct Span {
    Band band;
    int sq;
    int q0;
    int k0;

    template <bool VARLEN>
    static ATTN_DEVICE Span of(const int* seqlens, const int* cu_q, const int* cu_k, int b,
                               int Sq, int Sk, int left, int right) {
        Span s;
        if (VARLEN) {
            s.q0 = min(max(cu_q[b], 0), Sq);
            s.sq = min(max(cu_q[b + 1], s.q0), Sq) - s.q0;
            s.k0 = min(max(cu_k[b], 0), Sk);
            const int sk = min(max(cu_k[b + 1], s.k0), Sk) - s.k0;
            s.band.skb = sk;
            s.band.off = sk - s.sq;
            s.band.left = left;
            s.band.right = right;
        } else {
            s.q0 = s.k0 = 0;
            s.sq = Sq;
            s.band = Band::of_batch(seqlens, b, Sk, Sq, left, right);
        }
        return s;
    }

    // Element offset of this batch's (dense: b * batch stride) or sequence's (packed: first
    // row * row stride) query rows, and of its key rows.
    template <bool VARLEN>
    ATTN_DEVICE i64 q_base(int b, i64 s_b, i64 s_row) const {
        return VARLEN ? (i64)q0 * s_row : b * s_b;
    }
    template <bool VARLEN>
    ATTN_DEVICE i64 k_base(int b, i64 s_b, i64 s_row) const {
        return VARLEN ? (i64)k0 * s_row : b * s_b;
    }

    // Index of query row 0 of head h in lse/delta: (B, Hq, Sq) dense, (Hq, total_q) packed.
    template <bool VARLEN>
    ATTN_DEVICE i64 stat(int b, int h, int Hq, int Sq) const {
        return VARLEN ? (i64)h * Sq + q0 : ((i64)b * Hq + h) * Sq;
    }
};

// ---- attention dropout ----------------------------------------------------------------------
//
// attnkit.dropout's keep mask: one Philox4x32-10 call (Salmon et al., SC'11) per query row and
// 8 consecutive key columns, its 128 bits as eight 16-bit draws, low half of word 0 first:
//   x = philox(counter = (j / 8, i, b * Hq + h, offset), key = (seed_lo, seed_hi))
//   keep(b, h, i, j) = ((x[(j % 8) / 2] >> (16 * (j % 2))) & 0xFFFF) >= threshold
// seed = state[0], offset = low word of state[1]. The state is read from device memory, so a
// call needs no host sync and a CUDA graph replays with the generator's fresh draws.
//
// The mma kernels share each call among the lanes whose elements it covers (row_bits,
// col_bits) instead of evaluating it once per element; Shfl is __shfl_sync on the device (a
// functor, so the exchange can be checked off the device).
struct WarpShfl {
    ATTN_DEVICE u32 operator()(u32 x, int src) const { return __shfl_sync(0xffffffffu, x, src); }
};

struct AttnDropout {
    u32 k0, k1, offset, threshold;
    float scale;  // 1 / (1 - p)

    static ATTN_DEVICE AttnDropout load(const i64* state, u32 threshold, float scale) {
        AttnDropout d;
        const unsigned long long seed = (unsigned long long)state[0];
        d.k0 = (u32)seed;
        d.k1 = (u32)(seed >> 32);
        d.offset = (u32)(unsigned long long)state[1];
        d.threshold = threshold;
        d.scale = scale;
        return d;
    }

    // The four words of philox4x32_10(counter = (c0, c1, c2, offset), key = (k0, k1)).
    ATTN_DEVICE void philox(u32 c0, u32 c1, u32 c2, u32 (&x)[4]) const {
        u32 c3 = offset, a = k0, b = k1;
#pragma unroll
        for (int r = 0; r < 10; ++r) {
            if (r) {
                a += 0x9E3779B9u;
                b += 0xBB67AE85u;
            }
            const u32 hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
            const u32 hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
            c0 = hi1 ^ c1 ^ a;
            c1 = lo1;
            c2 = hi0 ^ c3 ^ b;
            c3 = lo0;
        }
        x[0] = c0;
        x[1] = c1;
        x[2] = c2;
        x[3] = c3;
    }

    // Word w (0..3) of a call, selected without indexing (x stays in registers).
    static ATTN_DEVICE u32 word(const u32 (&x)[4], int w) {
        return w < 2 ? (w == 0 ? x[0] : x[1]) : (w == 2 ? x[2] : x[3]);
    }

    // Draw d (0..7) of a call.
    static ATTN_DEVICE u32 draw(const u32 (&x)[4], int d) {
        return (word(x, d >> 1) >> ((d & 1) * 16)) & 0xFFFFu;
    }

    // One element (the fp32 kernels: a lane per key or query, one call per element).
    ATTN_DEVICE bool keep(u32 bh, int i, int j) const {
        u32 x[4];
        philox((u32)j >> 3, (u32)i, bh, x);
        return draw(x, j & 7) >= threshold;
    }

    // Keep bits in the mma accumulator layout with query rows and key columns (forward, dQ):
    // a quad of lanes (lane / 4 equal) holds rows r and r + 8 and, in each 8-column group, the
    // columns 2 (lane % 4) + {0, 1}: word lane % 4 of each call. Calls c = 0..NCALL-1 are
    // (row, group) pairs: call(c, i, g) gives row i and group g = j / 8; bit 2c + b is column
    // 2 (lane % 4) + b of call c. Each lane evaluates every fourth call and the quad trades
    // words (4 shuffles per 4 calls): one call per 8 elements, not one per element.
    template <int NCALL, int UNROLL, typename Call, typename Shfl>
    ATTN_DEVICE unsigned long long row_bits(u32 bh, int lane, Call call, Shfl shfl) const {
        static_assert(NCALL % 4 == 0 && 2 * NCALL <= 64, "row_bits: 4 | calls <= 32");
        const int q = lane & 3;
        unsigned long long bits = 0;
#pragma unroll UNROLL
        for (int c0 = 0; c0 < NCALL; c0 += 4) {
            int i, g;
            call(c0 + q, i, g);
            u32 x[4];
            philox((u32)g, (u32)i, bh, x);
#pragma unroll
            for (int s = 0; s < 4; ++s) {
                // Lane q sends word (q + s) % 4 and gets word q of lane (q - s) % 4's call.
                const int src = (q - s) & 3;
                const u32 got = shfl(word(x, (q + s) & 3), (lane & ~3) | src);
                const int c = c0 + src;
                bits |= (unsigned long long)((got & 0xFFFFu) >= threshold) << (2 * c);
                bits |= (unsigned long long)((got >> 16) >= threshold) << (2 * c + 1);
            }
        }
        return bits;
    }

    // Keep bits in the transposed layout, key rows and query columns (dK/dV): lane holds key
    // rows whose column in their 8-key group is lane / 4, so the 8 lanes of equal lane % 4
    // need the same calls (same queries, same key groups), draw lane / 4 of each. Calls c =
    // 0..NCALL-1 (call(c, i, g): query i, key group g), bit c. Each lane evaluates every
    // eighth call and the 8 lanes trade draws (8 shuffles per 8 calls).
    template <int NCALL, int UNROLL, typename Call, typename Shfl>
    ATTN_DEVICE unsigned long long col_bits(u32 bh, int lane, Call call, Shfl shfl) const {
        static_assert(NCALL % 8 == 0 && NCALL <= 64, "col_bits: 8 | calls <= 64");
        const int t = lane >> 2;
        unsigned long long bits = 0;
#pragma unroll UNROLL
        for (int c0 = 0; c0 < NCALL; c0 += 8) {
            int i, g;
            call(c0 + t, i, g);
            u32 x[4];
            philox((u32)g, (u32)i, bh, x);
#pragma unroll
            for (int s = 0; s < 8; ++s) {
                // Lane t sends draw (t + s) % 8 and gets draw t of lane (t - s) % 8's call.
                const int src = (t - s) & 7;
                const u32 got = shfl(draw(x, (t + s) & 7), src * 4 + (lane & 3));
                bits |= (unsigned long long)(got >= threshold) << (c0 + src);
            }
        }
        return bits;
    }
};

// ---- shared memory and asynchronous copies ----------------------------------------------

ATTN_DEVICE u32 smem_u32(const void* p) {
    u32 r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}

// 16-byte global -> shared copy; bytes beyond src_bytes (0 or 16) are zero-filled.
ATTN_DEVICE void cp_async16(u32 dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src),
                 "r"(src_bytes)
                 : "memory");
}

ATTN_DEVICE void cp_async4(u32 dst, const void* src, int src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(dst), "l"(src),
                 "r"(src_bytes)
                 : "memory");
}

ATTN_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

template <int N> ATTN_DEVICE void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

ATTN_DEVICE void ldsm_x4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

ATTN_DEVICE void ldsm_x4_t(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

// Copy rows [0, ROWS) x cols [0, DP) of a 16-bit (rows, D) matrix into shared memory with row
// stride LDS elements. Rows >= nvalid (with LO, also rows < rlo) and columns >= D become 0
// without being read, so padded rows and keys that exist for no query never carry garbage
// (or NaN) into an mma; LO is for the one tile that can cross Band::key_first, so the others
// pay no extra check. `vec` (decided on the host: unit column stride, 16-byte aligned rows,
// D % 8 == 0) selects cp.async; otherwise plain strided loads are used. `safe` is any
// readable address, handed to zero-byte copies.
template <int ROWS, int DP, int LDS, int NT, bool LO = false>
ATTN_DEVICE void load_tile_16(u16* sm, const u16* g, i64 s_row, i64 s_col, int nvalid, int D,
                              bool vec, const u16* safe, int rlo = 0) {
    if (vec) {
        constexpr int CH = DP / 8;
        constexpr int ITERS = (ROWS * CH + NT - 1) / NT;
#pragma unroll
        for (int it = 0; it < ITERS; ++it) {
            int idx = threadIdx.x + it * NT;
            if ((ROWS * CH) % NT != 0 && idx >= ROWS * CH) break;
            int r = idx / CH, c = idx % CH;
            bool ok = r < nvalid && c * 8 < D;
            if (LO) ok = ok && r >= rlo;
            const u16* src = ok ? g + (i64)r * s_row + c * 8 : safe;
            cp_async16(smem_u32(sm + r * LDS + c * 8), src, ok ? 16 : 0);
        }
    } else {
        for (int idx = threadIdx.x; idx < ROWS * DP; idx += NT) {
            int r = idx / DP, c = idx % DP;
            u16 x = 0;
            if (r < nvalid && c < D && (!LO || r >= rlo))
                x = g[(i64)r * s_row + (i64)c * s_col];
            sm[r * LDS + c] = x;
        }
    }
}

// Copy n floats of a contiguous row (values at index >= nvalid become 0).
template <int N, int NT>
ATTN_DEVICE void load_row_f32(float* sm, const float* g, int nvalid, const float* safe) {
    for (int i = threadIdx.x; i < N; i += NT) {
        bool ok = i < nvalid;
        cp_async4(smem_u32(sm + i), ok ? g + i : safe, ok ? 4 : 0);
    }
}

// Zero the first n floats of an fp32 tile in shared memory, float idx by thread idx % NT: the
// rows of keys that exist for no query, in the fp32 kernels' one tile that crosses
// Band::key_first, after its load (the other tiles skip this).
template <int NT>
ATTN_DEVICE void zero_f32(float* sm, int n) {
    for (int idx = threadIdx.x; idx < n; idx += NT) sm[idx] = 0.f;
}

// acc += P B for one warp's 16 rows: P is KT * 16 columns of mma accumulator fragments
// (s[2 * kk], s[2 * kk + 1]; accumulators are laid out as A fragments once packed), B a
// (KT * 16) x DP tile in shared memory (row stride LDS) read transposed by ldmatrix, acc
// DP / 8 n8 tiles. P V in the forward and decode kernels, dS K in dQ.
template <typename E, int KT, int DP, int LDS>
ATTN_DEVICE void mma_p_times_tile(float (*acc)[4], const float (*s)[4], const u16* sB,
                                  int lane) {
#pragma unroll
    for (int kk = 0; kk < KT; ++kk) {
        u32 a[4];
        a[0] = E::pack(s[2 * kk][0], s[2 * kk][1]);
        a[1] = E::pack(s[2 * kk][2], s[2 * kk][3]);
        a[2] = E::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        a[3] = E::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
        for (int dp = 0; dp < DP / 16; ++dp) {
            u32 b0, b1, b2, b3;
            const int r = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
            ldsm_x4_t(smem_u32(sB + r * LDS + dp * 16 + (lane >> 4) * 8), b0, b1, b2, b3);
            E::mma(acc[2 * dp], a, b0, b1);
            E::mma(acc[2 * dp + 1], a, b2, b3);
        }
    }
}

// fp32 paths, one key per lane of a BN = 32 key tile: fold score x (this lane's key) into the
// row's online softmax (m, l) and accumulate P V into acc (this lane's DP / 32 columns of a
// BN x DP tile in shared memory, row stride DP). With DROP, a probability not kept enters
// l but not P V.
template <int BN, int DP, bool DROP = false>
ATTN_DEVICE void f32_softmax_pv(float x, float& m, float& l, float* acc, const float* sV,
                                int lane, bool keep = true) {
    constexpr int DPL = DP / 32;
    const float mx = fmaxf(m, warp_max(x));
    const float mu = mx == neg_inf() ? 0.f : mx;
    const float alpha = expf(m - mu);
    const float p = expf(x - mu);
    m = mx;
    l = l * alpha + p;
    const float pv = DROP && !keep ? 0.f : p;
#pragma unroll
    for (int c = 0; c < DPL; ++c) acc[c] *= alpha;
#pragma unroll 8
    for (int jj = 0; jj < BN; ++jj) {
        const float pj = __shfl_sync(0xffffffffu, pv, jj);
#pragma unroll
        for (int c = 0; c < DPL; ++c) acc[c] = fmaf(pj, sV[jj * DP + lane + 32 * c], acc[c]);
    }
}

// fp32 paths: s[r] = q_r . k_lane for the R query rows of this warp (rows warp * R + r of sQ,
// row stride DP) against this lane's key (row `lane` of sK, row stride LDK).
template <int R, int DP, int LDK>
ATTN_DEVICE void f32_row_scores(float* s, const float* sQ, const float* sK, int warp,
                                int lane) {
#pragma unroll
    for (int r = 0; r < R; ++r) s[r] = 0.f;
#pragma unroll 8
    for (int d = 0; d < DP; ++d) {
        const float kd = sK[lane * LDK + d];
#pragma unroll
        for (int r = 0; r < R; ++r) s[r] = fmaf(sQ[(warp * R + r) * DP + d], kd, s[r]);
    }
}

// ---- forward helpers ----------------------------------------------------------------------

// A compile-time bool as a value, to instantiate a generic lambda once per case.
template <bool B> struct BoolTag {
    static constexpr bool value = B;
};

// Streams (ROWS x DP) 16-bit tiles with cp.async where every thread always copies the same
// 16-byte column chunk: a row is taken as CHV chunks (DP / 8 rounded up to a power of two,
// those past DP / 8 idle) and thread t copies chunk t % CHV of rows t / CHV + p * RS. Its
// global address is then one pointer advanced by a fixed step and its shared address a
// constant offset, instead of a row/column split and a 64-bit multiply per chunk. `fits` says
// whether the scheme applies to these sizes; callers use load_tile_16 otherwise.
template <int ROWS, int DP, int LDS, int NT> struct RowStream {
    static constexpr int CH = DP / 8;
    static constexpr int CHV = CH <= 4 ? 4 : CH <= 8 ? 8 : CH <= 16 ? 16 : 32;
    static constexpr int RS = NT / CHV > 0 ? NT / CHV : 1;  // rows per pass
    static constexpr bool fits = CH <= 32 && NT % CHV == 0 && ROWS % RS == 0;
    static constexpr int PASSES = ROWS / RS;

    // This thread's byte offset inside a tile in shared memory.
    static ATTN_DEVICE u32 smem_offset() {
        return (u32)(((threadIdx.x / CHV) * LDS + (threadIdx.x % CHV) * 8) * 2);
    }
    // This thread's element offset inside a tile in global memory (row stride s_row).
    static ATTN_DEVICE i64 global_offset(i64 s_row) {
        return (i64)(threadIdx.x / CHV) * s_row + (threadIdx.x % CHV) * 8;
    }
    // Whether this thread's chunk holds data (columns < D): the others zero-fill theirs.
    static ATTN_DEVICE bool col_ok(int D) { return (int)(threadIdx.x % CHV) * 8 < D; }
    // This thread's first row (its rows are first_row() + p * RS).
    static ATTN_DEVICE int first_row() { return (int)(threadIdx.x / CHV); }
    // Copy a tile starting at g (already offset by global_offset). A thread whose chunk is past
    // D (col_ok false) zero-fills it from `safe`; with PRED so does a row p * RS >= rows, and
    // with LO too one < rows_lo (both counted from first_row()); else every row is copied.
    template <bool PRED, bool LO = false>
    static ATTN_DEVICE void load_rows(u32 sm, const u16* g, i64 s_row, bool col_ok,
                                      const u16* safe, int rows, int rows_lo = 0) {
        if (CHV != CH && threadIdx.x % CHV >= CH) return;  // a chunk past the padded row
        const u16* src = col_ok ? g : safe;
        const i64 step = col_ok ? RS * s_row : 0;
        const int bytes = col_ok ? 16 : 0;
#pragma unroll
        for (int p = 0; p < PASSES; ++p) {
            if (PRED) {
                const bool ok = col_ok && p * RS < rows && (!LO || p * RS >= rows_lo);
                cp_async16(sm + p * RS * LDS * 2, ok ? src : safe, ok ? 16 : 0);
            } else {
                cp_async16(sm + p * RS * LDS * 2, src, bytes);  // src is `safe` if !col_ok
            }
            src += step;
        }
    }
};
