/* TurboQuant's CPU encode in one pass per vector: norm, randomised fast Walsh-Hadamard rotation, nearest-centroid
 * codes, bit packing in `pack_bits`' layout, and Prod's Stage-1 residual; then the packing of QJL signs.
 *
 * Built and loaded by `tqlab.quant.native` (plain C, no Python or torch headers). Everything is float32, in the
 * same order of operations as the PyTorch path (x / ‖x‖, then · D1, H, · (D2 / √d)) except the summation order
 * of the transform and the norm's (taken in double here; there, in float32 save for rows whose squares under- or
 * overflow), so codes differ from it only where a coordinate lies within rounding of a boundary. Vectors of 16 floats
 * (GCC/Clang vector extensions) compile to AVX-512, two AVX2 or four NEON ops.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_DIM 8192 /* tqlab.quant.native.MAX_DIM */
#define W 16         /* floats per vector */

typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));

#if defined(__clang__)
#define SWAP(w, ...) __builtin_shufflevector(w, w, __VA_ARGS__)
#else
#define SWAP(w, ...) __builtin_shuffle(w, (vi){__VA_ARGS__})
#endif

static vf load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static void store(float *p, vf v) { memcpy(p, &v, sizeof v); }

typedef float vh __attribute__((vector_size(W / 2 * sizeof(float))));
typedef double vd __attribute__((vector_size(W / 2 * sizeof(double))));

/* ‖v‖ accumulated in double: no underflow for entries below ~1e-19 nor overflow above ~1e19, where torch's float32
 * norm gives 0 or inf */
static float norm(const float *v, int64_t d) {
    int64_t j = 0;
    vd acc = {0};
    for (; j + W / 2 <= d; j += W / 2) {
        vh h;
        memcpy(&h, v + j, sizeof h);
        vd a = __builtin_convertvector(h, vd);
        acc += a * a;
    }
    double s = 0.;
    for (int i = 0; i < W / 2; ++i) s += acc[i];
    for (; j < d; ++j) s += (double)v[j] * v[j];
    return (float)sqrt(s);
}

/* Unnormalised Walsh-Hadamard transform of v[0, d), d a power of two: the four butterfly stages inside each
 * vector of 16 as lane swaps, the stages between vectors as whole-vector adds. */
static void fwht(float *v, int64_t d) {
    int64_t h = 1;
    if (d >= W) {
        const vf s1 = {1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1};
        const vf s2 = {1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1};
        const vf s4 = {1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1};
        const vf s8 = {1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1, -1};
        for (int64_t r = 0; r < d; r += W) {
            vf w = load(v + r);
            w = SWAP(w, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14) + s1 * w;
            w = SWAP(w, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13) + s2 * w;
            w = SWAP(w, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11) + s4 * w;
            w = SWAP(w, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7) + s8 * w;
            store(v + r, w);
        }
        for (h = W; h < d; h <<= 1)
            for (int64_t a = 0; a < d; a += 2 * h)
                for (int64_t j = a; j < a + h; j += W) {
                    vf p = load(v + j), q = load(v + j + h);
                    store(v + j, p + q);
                    store(v + j + h, p - q);
                }
        return;
    }
    for (; h < d; h <<= 1)
        for (int64_t a = 0; a < d; a += 2 * h)
            for (int64_t j = a; j < a + h; ++j) {
                float p = v[j], q = v[j + h];
                v[j] = p + q;
                v[j + h] = p - q;
            }
}

/* codes[0, d) of `bits` bits each as a little-endian bit stream (codes padded with zeros to a multiple of 8);
 * one copy per width, so that its loops unroll */
static inline __attribute__((always_inline)) void pack_width(const uint8_t *codes, int64_t d, uint8_t *out,
                                                             const int bits) {
    for (int64_t g = 0; g < (d + 7) / 8; ++g) {
        uint32_t word = 0;
        for (int k = 0; k < 8; ++k) word |= (uint32_t)codes[g * 8 + k] << (k * bits);
        for (int b = 0; b < bits; ++b) out[g * bits + b] = (uint8_t)(word >> (8 * b));
    }
}

static void pack(const uint8_t *codes, int64_t d, int bits, uint8_t *out) {
    switch (bits) {
    case 1: pack_width(codes, d, out, 1); break;
    case 2: pack_width(codes, d, out, 2); break;
    case 3: pack_width(codes, d, out, 3); break;
    default: pack_width(codes, d, out, 4); break;
    }
}

static float sum_squares(const float *v, int64_t d) {
    int64_t j = 0;
    vf acc = {0};
    for (; j + W <= d; j += W) { vf a = load(v + j); acc += a * a; }
    float s = 0.f;
    for (int i = 0; i < W; ++i) s += acc[i];
    for (; j < d; ++j) s += v[j] * v[j];
    return s;
}

/* For each of `rows` rows of x [rows, d] (float32, contiguous):
 *   signs_in != NULL: norms[i] = ‖x_i‖ and y = (D2/√d) H D1 x_i / ‖x_i‖ (by 1 where it is 0), D1 = signs_in and
 *                     D2/√d = scaled_signs_out (d a power of two);
 *   signs_in == NULL: y = x_i (already a rotated unit vector; norms untouched).
 * Then codes[j] = #{k : y_j > boundaries[k]} (n_boundaries <= 15) packed into packed[i] (row_bytes each),
 * and, where residual != NULL, residual[i] = y − centroids[codes] and residual_norms[i] = its norm. */
static void encode(const float *x, int64_t rows, int64_t d, const float *signs_in, const float *scaled_signs_out,
                   const float *boundaries, int n_boundaries, const float *centroids, int bits, uint8_t *packed,
                   int64_t row_bytes, float *norms, float *residual, float *residual_norms) {
    float y[MAX_DIM] __attribute__((aligned(64)));
    float nearest[MAX_DIM] __attribute__((aligned(64)));
    int32_t count[MAX_DIM] __attribute__((aligned(64)));
    uint8_t codes[MAX_DIM + 8];
    for (int64_t i = 0; i < rows; ++i) {
        const float *xi = x + i * d;
        if (signs_in) {
            float n = norm(xi, d);
            float divisor = n > 0.f ? n : 1.f; /* a subnormal norm too: the quotient stays a unit vector */
            for (int64_t j = 0; j < d; ++j) y[j] = xi[j] / divisor * signs_in[j];
            fwht(y, d);
            for (int64_t j = 0; j < d; ++j) y[j] *= scaled_signs_out[j];
            norms[i] = n;
        } else {
            memcpy(y, xi, d * sizeof(float));
        }
        for (int64_t j = 0; j < d; ++j) { count[j] = 0; nearest[j] = centroids[0]; }
        for (int k = 0; k < n_boundaries; ++k) {
            float b = boundaries[k], c = centroids[k + 1];
            for (int64_t j = 0; j < d; ++j) {
                int above = y[j] > b;
                count[j] += above;
                nearest[j] = above ? c : nearest[j];
            }
        }
        for (int64_t j = 0; j < d; ++j) codes[j] = (uint8_t)count[j];
        for (int64_t j = d; j % 8; ++j) codes[j] = 0;
        pack(codes, d, bits, packed + i * row_bytes);
        if (residual) {
            float *ri = residual + i * d;
            for (int64_t j = 0; j < d; ++j) ri[j] = y[j] - nearest[j];
            residual_norms[i] = sqrtf(sum_squares(ri, d)); /* entries within [-2, 2]: float suffices */
        }
    }
}

/* One call of `encode` over `rows` rows (tqlab.quant.native._Job: every field 8 bytes), cut into chunks of `chunk`
 * rows that the threads running `tq_encode_job` on it claim in turn (`next`: the first row not yet claimed). */
typedef struct {
    const float *x;
    int64_t rows, d;
    const float *signs_in, *scaled_signs_out, *boundaries;
    int64_t n_boundaries;
    const float *centroids;
    int64_t bits;
    uint8_t *packed;
    int64_t row_bytes;
    float *norms, *residual, *residual_norms;
    int64_t chunk, next;
} job_t;

void tq_encode_job(void *data) {
    job_t *job = data;
    for (;;) {
        int64_t first = __atomic_fetch_add(&job->next, job->chunk, __ATOMIC_RELAXED);
        if (first >= job->rows) return;
        int64_t count = job->rows - first < job->chunk ? job->rows - first : job->chunk;
        encode(job->x + first * job->d, count, job->d, job->signs_in, job->scaled_signs_out, job->boundaries,
               (int)job->n_boundaries, job->centroids, (int)job->bits, job->packed + first * job->row_bytes,
               job->row_bytes, job->norms ? job->norms + first : NULL,
               job->residual ? job->residual + first * job->d : NULL,
               job->residual_norms ? job->residual_norms + first : NULL);
    }
}

/* bit k of byte b of row i: p[i, 8b + k] >= 0, for p [rows, m] (float32, contiguous); zero bits pad m to 8 */
void tq_pack_signs(const float *p, int64_t rows, int64_t m, uint8_t *out) {
    int64_t row_bytes = (m + 7) / 8;
    for (int64_t i = 0; i < rows; ++i) {
        const float *pi = p + i * m;
        uint8_t *oi = out + i * row_bytes;
        for (int64_t b = 0; b < m / 8; ++b) {
            unsigned byte = 0;
            for (int k = 0; k < 8; ++k) byte |= (unsigned)(pi[b * 8 + k] >= 0.f) << k;
            oi[b] = (uint8_t)byte;
        }
        if (m % 8) {
            unsigned byte = 0;
            for (int64_t j = m / 8 * 8; j < m; ++j) byte |= (unsigned)(pi[j] >= 0.f) << (j % 8);
            oi[row_bytes - 1] = (uint8_t)byte;
        }
    }
}
