/* Internal types shared by the runtime (fastlora_kernels.c) and the generated sources
 * (fl_pack.h, fl_sm<arch>_<dtype>.c, fl_registry.c).  Not installed. */
#ifndef FL_INTERNAL_H
#define FL_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include <cuda.h> /* types only: the functions come from libcuda via dlopen */

/* kernel ids: the order of KERNEL_ARGS in aot/generate.py */
enum { FL_K_SHRINK, FL_K_FORWARD, FL_K_DY, FL_K_DX, FL_K_REDUCE, FL_K_COUNT };
/* variant roles (ROLES in aot/generate.py) */
enum { FL_ROLE_LARGE = 0, FL_ROLE_SMALL = 1, FL_ROLE_GENERIC = 2 };

/* One compiled kernel: what the runtime needs to pick and launch it. */
typedef struct {
    int kernel, r_pad, role, flag; /* flag: HAS_BIAS (forward) or HAS_DROPOUT */
    int block_m, block_n, block_k, num_warps;
    int shared;       /* dynamic shared memory, bytes */
    int tma;          /* the TMA build: persistent grid (forward, dx), scratch per CTA */
    int scratch;      /* global scratch bytes per CTA (TMA descriptors built in-kernel) */
    int n_scratch;    /* trailing scratch pointer parameters (Triton's launcher ABI) */
    const char* name; /* the function in the cubin */
    const unsigned char* cubin;
    size_t cubin_size;
} fl_variant;

typedef struct {
    int arch, dtype;
    const fl_variant* variants;
    size_t count;
} fl_table;

/* Every value any kernel takes, by the names KERNEL_ARGS in aot/generate.py uses. */
typedef struct {
    CUdeviceptr x, w, bias, a, b, u, y, seed, dy, dx, g, ws_a, ws_b, da, db, scratch;
    int64_t M, N, K, R, ldx, ldw, lda, ldb, ldu, ldy, lddy, lddx, ldg, num_progs;
    int64_t ws_a_split, ws_a_row, ws_b_split, ws_b_row, na, pa, nb, pb, progs_a;
    float scaling, dropout_p;
} fl_launch;

#define FL_MAX_PARAMS 48
typedef struct {
    union {
        CUdeviceptr p;
        int32_t i;
        float f;
    } v[FL_MAX_PARAMS];
    void* ptrs[FL_MAX_PARAMS];
    int n;
    int n_scratch;
    CUdeviceptr scratch; /* the first trailing pointer: global scratch, or 0 */
    const char* bad; /* the parameter that did not fit its type */
} fl_params;

#define FL_DIV16(v) ((((uint64_t)(v)) & 15u) == 0)
#define FL_PUT_PTR(P, val, nm) do { (P)->v[(P)->n].p = (CUdeviceptr)(val); \
    (P)->ptrs[(P)->n] = &(P)->v[(P)->n]; (P)->n++; } while (0)
#define FL_PUT_F32(P, val, nm) do { (P)->v[(P)->n].f = (float)(val); \
    (P)->ptrs[(P)->n] = &(P)->v[(P)->n]; (P)->n++; } while (0)
#define FL_PUT_I32(P, val, nm) do { int64_t v_ = (val); \
    if (v_ < INT32_MIN || v_ > INT32_MAX) { (P)->bad = (nm); return -1; } \
    (P)->v[(P)->n].i = (int32_t)v_; (P)->ptrs[(P)->n] = &(P)->v[(P)->n]; (P)->n++; } while (0)

/* Triton's launcher appends n_scratch pointers: global scratch (the TMA descriptors a
 * kernel builds, grid x per-CTA bytes) and profile scratch (unused: NULL). */
static inline int fl_put_scratch(fl_params* P) {
    for (int i = 0; i < P->n_scratch; i++) FL_PUT_PTR(P, i == 0 ? P->scratch : 0, "scratch");
    return 0;
}

/* fl_registry.c (written by CMake): the tables this build holds */
extern const fl_table* const fl_tables[];
extern const size_t fl_table_count;
extern const char fl_build_info[];

#endif
