/* Decode attention over the paged KV cache on CPU: one query token per sequence, read straight
 * from the cache's blocks. Built at first use by kernels/cpu_build.py; kernels/cpu_native.py
 * says why it exists.
 *
 * Layout (engine/kv_layout.py): kv is (2, num_blocks, block_size, kv_heads, head_dim), K then V;
 * q and out are (batch, heads, head_dim), contiguous; head_dim a multiple of 16. One sequence at
 * a time: its keys slot by slot (all KV heads side by side, in memory order) give every query
 * head's scores q.k * scale in float32 (16-bit operands widened exactly); softmax in float32;
 * then for each KV head the probability-weighted sum of its values, for the group of query heads
 * sharing it, in float32, divided by the softmax's sum. Only the first context_lens[b] slots of a
 * sequence are read, so stale slots past a context (of any value, NaN included) never reach the
 * result.
 *
 * GCC/Clang vector extensions (16 floats) rather than intrinsics: the compiler maps them onto
 * whatever the machine has (-march=native: AVX-512 here, two AVX2 registers elsewhere).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_bf16.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#define LANES 16
#define MAX_GROUP 16 /* query heads per KV head; more: the caller takes the torch path */
#define MAX_CHUNKS 16 /* head_dim / 16, head_dim <= 256 */
#define MAX_HEADS 256 /* query heads */

typedef float v16f __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));

static inline v16f load_f32(const float *p) {
    v16f x;
    memcpy(&x, p, sizeof x);
    return x;
}

static inline v16f load_bf16(const uint16_t *p) {  /* bfloat16 is float32's upper half: exact */
    v16h h;
    memcpy(&h, p, sizeof h);
    v16u u = __builtin_convertvector(h, v16u) << 16;
    v16f x;
    memcpy(&x, &u, sizeof x);
    return x;
}

typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

static inline float hsum(v16f x) {  /* a tree of halves: four dependent adds, not fifteen */
    v8f lo8, hi8;
    memcpy(&lo8, &x, sizeof lo8);
    memcpy(&hi8, (const char *)&x + sizeof lo8, sizeof hi8);
    v8f s8 = lo8 + hi8;
    v4f lo4, hi4;
    memcpy(&lo4, &s8, sizeof lo4);
    memcpy(&hi4, (const char *)&s8 + sizeof lo4, sizeof hi4);
    v4f s4 = lo4 + hi4;
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

/* exp(x) for x <= 0 (scores minus their maximum), branch-free so that the loop over it vectorises:
 * x = n ln2 + r with |r| <= ln2/2 (ln2 split in two so n ln2 is exact), exp(r) by its Taylor series
 * to r^7 (truncation under 1e-8 relative), and 2^n put into the exponent bits. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;  /* exp(-87) ~ 1.6e-38, still normal; below that a softmax weight is 0 */
    float n = __builtin_rintf(x * 1.44269504088896341f);
    float r = x - n * 0.693145751953125f;
    r = r - n * 1.428606765330187045e-06f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    bits32 scale;
    scale.u = (uint32_t)((int32_t)n + 127) << 23;
    return p * scale.f;
}

/* Slot t + PREFETCH_AHEAD, all KV heads, into every cache level: the blocks lie anywhere in the
 * cache, so the hardware's stream prefetch stops at each block's end and every block would start
 * with a wait on memory. With the KV of 30 layers far larger than the caches (as in a serving
 * engine), 16 slots ahead took a batch-32 layer from 1.6 ms to 0.8 ms on one Zen 5 core (1.07 ms
 * prefetching whole blocks one block ahead; 4, 8, 32, 64 slots ahead, or prefetching into the
 * outer levels only, were slower). */
#define PREFETCH_AHEAD 16
#define PREFETCH_LOCALITY 3
static inline void prefetch_slot(const char *cache, const int32_t *table, int t, int ctx, int block_size,
                                 int64_t slot_bytes) {
    int ahead = t + PREFETCH_AHEAD;
    if (ahead >= ctx) return;
    const char *p = cache + ((int64_t)table[ahead / block_size] * block_size + ahead % block_size) * slot_bytes;
    for (int64_t o = 0; o < slot_bytes; o += 64) __builtin_prefetch(p + o, 0, PREFETCH_LOCALITY);
}

/* Scores of every query head (qf: heads x head_dim float32, head h = kvh * group + g) against
 * the first ctx keys: each slot's keys, all KV heads side by side, read once and in order. Then
 * (after softmax_rows) one KV head's values: acc (group x head_dim float32) = sum over t of
 * p[g][t] * v[t] for its group's weights p. Always inlined into per-shape copies below: with
 * group and chunks constants the accumulators live in registers. */
#define DEFINE_PASSES(SUFFIX, T, LOAD)                                                                \
    static inline __attribute__((always_inline)) void scores_##SUFFIX(                              \
        const float *qf, const T *k_cache, const int32_t *table, int ctx, int block_size, int kv_heads, \
        const int chunks, const int group, float scale, float *scores) {                              \
        int64_t slot_stride = (int64_t)kv_heads * chunks * LANES;                                     \
        for (int t = 0; t < ctx; t++) {                                                               \
            prefetch_slot((const char *)k_cache, table, t, ctx, block_size, slot_stride * (int64_t)sizeof(T)); \
            const T *slot = k_cache + ((int64_t)table[t / block_size] * block_size + t % block_size) * slot_stride; \
            for (int kvh = 0; kvh < kv_heads; kvh++) {                                                \
                const T *k = slot + (int64_t)kvh * chunks * LANES;                                    \
                const float *qh = qf + (int64_t)kvh * group * chunks * LANES;                         \
                v16f acc[MAX_GROUP];                                                                  \
                for (int g = 0; g < group; g++) acc[g] = (v16f){0};                                   \
                for (int c = 0; c < chunks; c++) {                                                    \
                    v16f kc = LOAD(k + c * LANES);                                                    \
                    for (int g = 0; g < group; g++) acc[g] += load_f32(qh + (g * chunks + c) * LANES) * kc; \
                }                                                                                     \
                for (int g = 0; g < group; g++)                                                       \
                    scores[(int64_t)(kvh * group + g) * ctx + t] = hsum(acc[g]) * scale;              \
            }                                                                                         \
        }                                                                                             \
    }                                                                                                 \
    static inline __attribute__((always_inline)) void values_##SUFFIX(                              \
        const float *p, const T *v_cache, const int32_t *table, int ctx, int block_size,               \
        int64_t slot_stride, int64_t head_offset, const int chunks, const int group, v16f *out) {     \
        v16f acc[MAX_GROUP * MAX_CHUNKS];                                                             \
        for (int i = 0; i < group * chunks; i++) acc[i] = (v16f){0};                                  \
        for (int t = 0; t < ctx; t++) {                                                               \
            if (head_offset == 0) /* the first head's pass brings the blocks in for the others */     \
                prefetch_slot((const char *)v_cache, table, t, ctx, block_size, slot_stride * (int64_t)sizeof(T)); \
            const T *v = v_cache + ((int64_t)table[t / block_size] * block_size + t % block_size) * slot_stride + head_offset; \
            for (int c = 0; c < chunks; c++) {                                                        \
                v16f vc = LOAD(v + c * LANES);                                                        \
                for (int g = 0; g < group; g++) acc[g * chunks + c] += p[(int64_t)g * ctx + t] * vc;  \
            }                                                                                         \
        }                                                                                             \
        for (int i = 0; i < group * chunks; i++) out[i] = acc[i];                                     \
    }

DEFINE_PASSES(bf16, uint16_t, load_bf16)
DEFINE_PASSES(f32, float, load_f32)

/* Softmax of each of the group's score rows in place, unnormalised; returns the sums in sums.
 * round_weights: the weights that multiply the values are rounded to bfloat16 (the sums are not),
 * as torch's CPU flash attention does for 16-bit inputs, so that a bfloat16 model's outputs follow
 * what transformers computes through it. */
static void softmax_rows(float *scores, int ctx, int group, float *sums, int round_weights) {
    for (int g = 0; g < group; g++) {
        float *s = scores + (int64_t)g * ctx, m = s[0], sum = 0.0f;
        for (int t = 1; t < ctx; t++) m = s[t] > m ? s[t] : m;
        for (int t = 0; t < ctx; t++) s[t] = exp_nonpositive(s[t] - m);
        for (int t = 0; t < ctx; t++) sum += s[t];
        sums[g] = sum;
        if (round_weights)
            for (int t = 0; t < ctx; t++) s[t] = bf16_to_f32(f32_to_bf16(s[t]));
    }
}

/* One sequence, every head: q_rows (heads x head_dim) against the first ctx slots of its blocks;
 * writes its output rows. scratch: heads * (ctx + head_dim) floats. */
#define DEFINE_ATTEND(SUFFIX, T, LOAD, STORE)                                                         \
    static inline __attribute__((always_inline)) void attend_##SUFFIX(                              \
        const T *q_rows, const T *k_cache, const T *v_cache, T *out_rows, const int32_t *table, int ctx, \
        int block_size, int kv_heads, const int chunks, const int group, float scale, float *scratch) { \
        int heads = kv_heads * group, head_dim = chunks * LANES;                                      \
        int64_t slot_stride = (int64_t)kv_heads * head_dim;                                           \
        float *qf = scratch, *scores = scratch + (int64_t)heads * head_dim, sums[MAX_HEADS];          \
        for (int i = 0; i < heads * chunks; i++) {                                                    \
            v16f x = LOAD(q_rows + i * LANES);                                                        \
            memcpy(qf + i * LANES, &x, sizeof x);                                                     \
        }                                                                                             \
        scores_##SUFFIX(qf, k_cache, table, ctx, block_size, kv_heads, chunks, group, scale, scores); \
        softmax_rows(scores, ctx, heads, sums, sizeof(T) == 2);                                       \
        for (int kvh = 0; kvh < kv_heads; kvh++) {                                                    \
            v16f acc[MAX_GROUP * MAX_CHUNKS];                                                         \
            values_##SUFFIX(scores + (int64_t)kvh * group * ctx, v_cache, table, ctx, block_size, slot_stride, \
                            (int64_t)kvh * head_dim, chunks, group, acc);                             \
            T *o = out_rows + (int64_t)kvh * group * head_dim;                                        \
            for (int g = 0; g < group; g++)                                                           \
                for (int c = 0; c < chunks; c++)                                                      \
                    STORE(o + (g * chunks + c) * LANES, acc[g * chunks + c] / sums[kvh * group + g]); \
        }                                                                                             \
    }                                                                                                 \
    static void attend_##SUFFIX##_any(const T *q, const T *k, const T *v, T *o, const int32_t *table, int ctx, \
                                      int bs, int kv_heads, int chunks, int group, float scale, float *scratch) { \
        attend_##SUFFIX(q, k, v, o, table, ctx, bs, kv_heads, chunks, group, scale, scratch);         \
    }                                                                                                 \
    /* SmolLM2 (3 query heads per KV head, head_dim 64) and Llama-3 8B's (4, 128) shapes, unrolled */ \
    static void attend_##SUFFIX##_3x4(const T *q, const T *k, const T *v, T *o, const int32_t *table, int ctx, \
                                      int bs, int kv_heads, float scale, float *scratch) {            \
        attend_##SUFFIX(q, k, v, o, table, ctx, bs, kv_heads, 4, 3, scale, scratch);                  \
    }                                                                                                 \
    static void attend_##SUFFIX##_4x8(const T *q, const T *k, const T *v, T *o, const int32_t *table, int ctx, \
                                      int bs, int kv_heads, float scale, float *scratch) {            \
        attend_##SUFFIX(q, k, v, o, table, ctx, bs, kv_heads, 8, 4, scale, scratch);                  \
    }                                                                                                 \
    /* Sequences lo ..< hi of the batch. */                                                           \
    static void items_##SUFFIX(const T *q, const T *kv, T *out, const int32_t *tables, const int32_t *lens, \
                               int lo, int hi, int max_blocks, int64_t half, int block_size, int heads, int kv_heads, \
                               int head_dim, float scale, float *scratch) {                          \
        int group = heads / kv_heads, chunks = head_dim / LANES;                                      \
        for (int b = lo; b < hi; b++) {                                                               \
            int64_t first = (int64_t)b * heads * head_dim;                                            \
            const int32_t *table = tables + (int64_t)b * max_blocks;                                  \
            if (lens[b] <= 0) /* nothing to attend to: zeros (an empty softmax would give NaN) */     \
                memset(out + first, 0, sizeof(T) * (size_t)heads * head_dim);                         \
            else if (group == 3 && chunks == 4)                                                       \
                attend_##SUFFIX##_3x4(q + first, kv, kv + half, out + first, table, lens[b], block_size, kv_heads, scale, scratch); \
            else if (group == 4 && chunks == 8)                                                       \
                attend_##SUFFIX##_4x8(q + first, kv, kv + half, out + first, table, lens[b], block_size, kv_heads, scale, scratch); \
            else                                                                                      \
                attend_##SUFFIX##_any(q + first, kv, kv + half, out + first, table, lens[b], block_size, kv_heads, chunks, group, \
                                      scale, scratch);                                                \
        }                                                                                             \
    }

static inline void store_f32(float *p, v16f x) { memcpy(p, &x, sizeof x); }

static inline void store_bf16(uint16_t *p, v16f x) {
    for (int l = 0; l < LANES; l++) p[l] = f32_to_bf16(x[l]);
}

DEFINE_ATTEND(bf16, uint16_t, load_bf16, store_bf16)
DEFINE_ATTEND(f32, float, load_f32, store_f32)

/* dtype: 0 float32, 1 bfloat16. Returns 0; -1 if a shape is not supported (head_dim not a
 * multiple of 16 or over 256, more than MAX_GROUP query heads per KV head), -2 if scratch memory
 * ran out.
 *
 * Built with OpenMP, the sequences are split between the calling thread's OpenMP
 * threads: as many as torch was told to use on this thread (torch.set_num_threads sets the same
 * per-thread count), and the same pool, since this library's libgomp.so.1 resolves to the one
 * torch already loaded. */
int pdmesh_decode_attention(int dtype, const void *q, const void *kv, void *out, const int32_t *tables,
                            const int32_t *lens, int batch, int max_blocks, int num_blocks, int block_size,
                            int heads, int kv_heads, int head_dim, float scale) {
    int group = heads / kv_heads, longest = 1, items = batch, failed = 0;
    if (head_dim % LANES != 0 || head_dim / LANES > MAX_CHUNKS || group > MAX_GROUP || group * kv_heads != heads ||
        heads > MAX_HEADS)
        return -1;
    for (int b = 0; b < batch; b++) longest = lens[b] > longest ? lens[b] : longest;
    int64_t half = (int64_t)num_blocks * block_size * kv_heads * head_dim; /* V after K */
    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads() < items ? omp_get_max_threads() : items;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(| : failed)
#endif
    {
        int tid = 0, nt = 1;
#ifdef _OPENMP
        tid = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        int lo = (int)((int64_t)items * tid / nt), hi = (int)((int64_t)items * (tid + 1) / nt);
        float *scratch = malloc(sizeof(float) * (size_t)heads * ((size_t)longest + head_dim));
        if (scratch == NULL) {
            failed = 1;
        } else {
            if (dtype == 1)
                items_bf16(q, kv, out, tables, lens, lo, hi, max_blocks, half, block_size, heads, kv_heads, head_dim,
                           scale, scratch);
            else
                items_f32(q, kv, out, tables, lens, lo, hi, max_blocks, half, block_size, heads, kv_heads, head_dim,
                          scale, scratch);
            free(scratch);
        }
    }
    (void)threads;
    return failed ? -2 : 0;
}
