/* C API tests of libfastlora_kernels that need no GPU.
 *
 *   fastlora_test_api validation        every argument check, the status strings, the
 *                                       workspace size, and the no-driver path
 *   fastlora_test_api fake <fake.so>    with a stand-in libcuda (fake_libcuda.c): no
 *                                       context, arch not built, launch failure, and the
 *                                       launch sequence (kernels, grids, workspace)
 * Device pointers here are made-up addresses: only the fake driver ever sees them. */
#define _POSIX_C_SOURCE 200809L /* setenv */
#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fastlora_kernels.h"

static int failures;
#define EXPECT(cond, ...) do { if (!(cond)) { failures++; \
    fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); fprintf(stderr, __VA_ARGS__); \
    fprintf(stderr, "\n"); } } while (0)

/* a valid call's arguments; each check changes one */
typedef struct {
    const void *x, *w, *bias, *A, *B, *dy;
    void *y, *u, *dx, *dA, *dB, *ws;
    int64_t ldx, ldw, lda, ldb, ldy, lddy, lddx, M, N, K, r;
    float s, p;
    const int64_t* seed;
    size_t ws_bytes;
    int dtype;
    void* fws; /* the forward's workspace (TMA scratch) */
    size_t fws_bytes;
} call;

#define DEV(a) ((void*)(uintptr_t)(a))
static int default_dtype = FASTLORA_FP16; /* test_fake: a dtype this build holds */

static call base(int64_t M, int64_t N, int64_t K, int64_t r) {
    call c = {DEV(0x100000), DEV(0x200000), DEV(0x300000), DEV(0x400000), DEV(0x500000),
              DEV(0x600000), DEV(0x700000), DEV(0x800000), DEV(0x900000), DEV(0xa00000),
              DEV(0xb00000), NULL,
              K, K, K, r, N, N, K, M, N, K, r,
              2.0f, 0.1f, (const int64_t*)DEV(0xc00000), 0, default_dtype};
    return c;
}

static int fwd(call c) {
    return fastlora_forward(c.x, c.ldx, c.w, c.ldw, c.bias, c.A, c.lda, c.B, c.ldb, c.y, c.ldy,
                            c.u, c.M, c.N, c.K, c.r, c.s, c.p, c.seed, c.fws, c.fws_bytes,
                            (fastlora_dtype)c.dtype, NULL);
}
static int bwd(call c) {
    return fastlora_backward(c.dy, c.lddy, c.x, c.ldx, c.w, c.ldw, c.A, c.lda, c.B, c.ldb, c.u,
                             c.dx, c.lddx, c.dA, c.dB, c.M, c.N, c.K, c.r, c.s, c.p, c.seed,
                             c.ws, c.ws_bytes, (fastlora_dtype)c.dtype, NULL);
}

/* the call fails with `status` and the message names `word` */
static void expect_status(const char* what, int got, int status, const char* word) {
    EXPECT(got == status, "%s: status %d (%s), want %d (%s); message: %s", what, got,
           fastlora_status_string(got), status, fastlora_status_string(status),
           fastlora_last_error());
    if (word && got != FASTLORA_SUCCESS)
        EXPECT(strstr(fastlora_last_error(), word) != NULL, "%s: message '%s' lacks '%s'",
               what, fastlora_last_error(), word);
}

#define BAD_BOTH(field, value, word) do { call c_ = base(64, 32, 48, 8); c_.field = value; \
    expect_status("forward " #field "=" #value, fwd(c_), FASTLORA_ERROR_INVALID_ARGUMENT, word); \
    expect_status("backward " #field "=" #value, bwd(c_), FASTLORA_ERROR_INVALID_ARGUMENT, word); \
} while (0)
#define BAD_FWD(field, value, word) do { call c_ = base(64, 32, 48, 8); c_.field = value; \
    expect_status("forward " #field "=" #value, fwd(c_), FASTLORA_ERROR_INVALID_ARGUMENT, word); \
} while (0)
#define BAD_BWD(field, value, word) do { call c_ = base(64, 32, 48, 8); c_.field = value; \
    expect_status("backward " #field "=" #value, bwd(c_), FASTLORA_ERROR_INVALID_ARGUMENT, word); \
} while (0)

static void test_validation(void) {
    /* no GPU calls may happen before validation: a bad call never needs the driver */
    BAD_BOTH(x, NULL, "x");
    BAD_BOTH(w, NULL, "weight");
    BAD_BOTH(A, NULL, "lora_A");
    BAD_BOTH(B, NULL, "lora_B");
    BAD_FWD(y, NULL, "y");
    BAD_BOTH(u, NULL, "u");
    BAD_BWD(dy, NULL, "dy");
    BAD_BWD(dx, NULL, "dx");
    BAD_BOTH(M, -1, "M");
    BAD_BOTH(M, ((int64_t)1 << 30) + 1, "M");
    BAD_BOTH(N, 0, "N");
    BAD_BOTH(N, (int64_t)1 << 31, "N");
    BAD_BOTH(K, 0, "K");
    BAD_BOTH(K, -5, "K");
    BAD_BOTH(r, 0, "r must");
    BAD_BOTH(r, FASTLORA_MAX_R + 1, "r must");
    BAD_BOTH(p, -0.1f, "dropout_p");
    BAD_BOTH(p, 1.0f, "dropout_p");
    BAD_BOTH(p, NAN, "dropout_p");
    BAD_BOTH(s, INFINITY, "scaling");
    BAD_BOTH(s, NAN, "scaling");
    BAD_BOTH(seed, NULL, "seed");
    BAD_BOTH(dtype, 7, "dtype");
    BAD_BOTH(dtype, -1, "dtype");
    BAD_BOTH(ldx, 47, "ldx");
    BAD_BOTH(ldw, 0, "ldw");
    BAD_BOTH(lda, 40, "lda");
    BAD_BOTH(ldb, 7, "ldb");
    BAD_BOTH(ldx, (int64_t)1 << 31, "ldx");
    BAD_FWD(ldy, 31, "ldy");
    BAD_BWD(lddy, 31, "lddy");
    BAD_BWD(lddx, 47, "lddx");
    {   /* r*K must fit int32 */
        call c = base(64, 32, (int64_t)1 << 25, 128);
        c.ldx = c.ldw = c.lda = c.lddx = c.K;
        expect_status("forward r*K", fwd(c), FASTLORA_ERROR_INVALID_ARGUMENT, "r*K");
    }
    {   /* workspace too small, misaligned */
        call c = base(64, 32, 48, 8);
        c.ws = DEV(0xd00000);
        c.ws_bytes = fastlora_backward_workspace_size(64, 32, 48, 8, FASTLORA_FP16) - 1;
        expect_status("backward small workspace", bwd(c), FASTLORA_ERROR_INVALID_ARGUMENT,
                      "workspace_bytes");
        c.ws = DEV(0xd00008);
        c.ws_bytes = 1 << 20;
        expect_status("backward misaligned workspace", bwd(c), FASTLORA_ERROR_INVALID_ARGUMENT,
                      "aligned");
        c.fws = DEV(0xd00000);
        c.fws_bytes = fastlora_forward_workspace_size(64, 32, 48, 8, FASTLORA_FP16) - 1;
        expect_status("forward small workspace", fwd(c), FASTLORA_ERROR_INVALID_ARGUMENT,
                      "workspace_bytes");
        c.fws = DEV(0xd00008);
        c.fws_bytes = 1 << 20;
        expect_status("forward misaligned workspace", fwd(c), FASTLORA_ERROR_INVALID_ARGUMENT,
                      "aligned");
    }
    {   /* a leading dimension below the row length is fine for a single row */
        call c = base(1, 32, 48, 8);
        c.ldx = 1;
        int s = fwd(c);
        EXPECT(s != FASTLORA_ERROR_INVALID_ARGUMENT, "M=1 with ldx=1: %s", fastlora_last_error());
    }
    /* M == 0: nothing to do, NULL M-sized tensors allowed, no driver needed */
    {
        call c = base(0, 32, 48, 8);
        c.x = NULL; c.y = NULL; c.u = NULL;
        expect_status("forward M=0", fwd(c), FASTLORA_SUCCESS, NULL);
        c.dy = NULL; c.dx = NULL; c.dA = NULL; c.dB = NULL;
        expect_status("backward M=0 without dA, dB", bwd(c), FASTLORA_SUCCESS, NULL);
        EXPECT(fastlora_backward_workspace_size(0, 32, 48, 8, FASTLORA_FP16) == 0, "ws(M=0)");
    }
    /* p == 0: seed may be NULL */
    {
        call c = base(64, 32, 48, 8);
        c.p = 0.0f; c.seed = NULL; c.bias = NULL;
        int s = fwd(c);
        EXPECT(s != FASTLORA_ERROR_INVALID_ARGUMENT, "p=0, seed=NULL: %s", fastlora_last_error());
    }
}

static void test_strings(void) {
    int codes[] = {FASTLORA_SUCCESS, FASTLORA_ERROR_INVALID_ARGUMENT, FASTLORA_ERROR_NO_DRIVER,
                   FASTLORA_ERROR_NO_CONTEXT, FASTLORA_ERROR_ARCH_NOT_BUILT,
                   FASTLORA_ERROR_LAUNCH};
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++) {
        const char* s = fastlora_status_string(codes[i]);
        EXPECT(s && *s && strcmp(s, "unknown status") != 0, "status string of %d", codes[i]);
        for (size_t j = 0; j < i; j++)
            EXPECT(strcmp(s, fastlora_status_string(codes[j])) != 0, "duplicate string %s", s);
    }
    EXPECT(strcmp(fastlora_status_string(99), "unknown status") == 0, "unknown code");
    char v[32];
    snprintf(v, sizeof v, "%d.%d.%d", FASTLORA_VERSION_MAJOR, FASTLORA_VERSION_MINOR,
             FASTLORA_VERSION_PATCH);
    EXPECT(strcmp(fastlora_version(), v) == 0, "version %s vs header %s", fastlora_version(), v);
    EXPECT(strstr(fastlora_build_info(), "triton") && strstr(fastlora_build_info(), "sm_"),
           "build info: %s", fastlora_build_info());
    /* g | dA partials | dB partials | TMA scratch, each 256-aligned; partial counts from the
     * smallest dx and dy row tiles (64, kernels/_configs.py); scratch 512 B per CTA for at
     * least 1024 CTAs (aot/generate.py).  M=1000: 16 row blocks */
    size_t want = 16128 + 16 * 8 * 128 * 4 + 16 * 64 * 8 * 4 + 1024 * 512;
    EXPECT(fastlora_backward_workspace_size(1000, 64, 128, 8, FASTLORA_FP16) == want,
           "workspace size %zu, want %zu",
           fastlora_backward_workspace_size(1000, 64, 128, 8, FASTLORA_FP16), want);
    /* M=100000 -> 1563 row blocks (and 1563 dy programs of TMA scratch) */
    want = 100000 * 16 * 2 + 1563 * 16 * 64 * 4 + 1563 * 32 * 16 * 4 + 1563 * 512;
    EXPECT(fastlora_backward_workspace_size(100000, 32, 64, 16, FASTLORA_BF16) == want,
           "workspace size (M=100000) %zu, want %zu",
           fastlora_backward_workspace_size(100000, 32, 64, 16, FASTLORA_BF16), want);
    /* the forward: TMA scratch only, for the shrink's 16-row programs or 1024 CTAs */
    EXPECT(fastlora_forward_workspace_size(1000, 64, 128, 8, FASTLORA_FP16) == 1024 * 512,
           "forward workspace %zu", fastlora_forward_workspace_size(1000, 64, 128, 8, 0));
    EXPECT(fastlora_forward_workspace_size(100000, 64, 128, 8, FASTLORA_FP16) == 6250 * 512,
           "forward workspace %zu", fastlora_forward_workspace_size(100000, 64, 128, 8, 0));
    EXPECT(fastlora_forward_workspace_size(0, 64, 128, 8, FASTLORA_FP16) == 0, "fws(M=0)");
}

static void test_no_driver(void) {
    /* the real path where libcuda.so.1 is absent; elsewhere force it with a bad path */
    void* h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (h) {
        dlclose(h);
        setenv("FASTLORA_LIBCUDA", "/nonexistent/libcuda.so.1", 1);
    }
    call c = base(64, 32, 48, 8);
    expect_status("forward without a driver", fwd(c), FASTLORA_ERROR_NO_DRIVER, "CUDA driver");
    expect_status("backward without a driver", bwd(c), FASTLORA_ERROR_NO_DRIVER, "CUDA driver");
    c.M = 0; c.dA = DEV(0xa00000); /* M=0 backward zeroes dA: needs the driver */
    expect_status("backward M=0 without a driver", bwd(c), FASTLORA_ERROR_NO_DRIVER, NULL);
}

/* ------------------------------------------------------------------ fake driver */

typedef struct {
    char name[64];
    unsigned grid[3], block, shared;
    int is_memset, is_alloc, is_free;
    const void* image;
    unsigned long long param0, size;
} fake_event;

static int (*log_count)(void);
static const fake_event* (*log_at)(int);
static void (*log_reset)(void);

static int first_built_arch(void) {
    const char* s = strstr(fastlora_build_info(), "sm_");
    return s ? atoi(s + 3) : 0;
}

static int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* grid.x covers M rows with one of the tile heights the configs use */
static int covers(unsigned g, int64_t M) {
    int bms[] = {16, 32, 64, 128, 256};
    for (int i = 0; i < 5; i++) if (g == cdiv(M, bms[i])) return 1;
    return 0;
}

static void test_fake(const char* fake_path) {
    setenv("FASTLORA_LIBCUDA", fake_path, 1);
    void* h = dlopen(fake_path, RTLD_NOW | RTLD_LOCAL);
    EXPECT(h != NULL, "dlopen %s: %s", fake_path, dlerror());
    if (!h) return;
    log_count = (int (*)(void))dlsym(h, "fake_cuda_log_count");
    log_at = (const fake_event* (*)(int))dlsym(h, "fake_cuda_log");
    log_reset = (void (*)(void))dlsym(h, "fake_cuda_reset");
    int arch = first_built_arch();
    if (!strstr(fastlora_build_info(), "fp16")) default_dtype = FASTLORA_BF16;
    char cc[16];
    snprintf(cc, sizeof cc, "%d", arch);

    call c = base(4096, 4096, 4096, 16);
    setenv("FAKE_CUDA_CTX", "0", 1);
    expect_status("no context", fwd(c), FASTLORA_ERROR_NO_CONTEXT, "context");

    setenv("FAKE_CUDA_CTX", "1", 1);
    setenv("FAKE_CUDA_CC", "86", 1);
    expect_status("sm_86", fwd(c), FASTLORA_ERROR_ARCH_NOT_BUILT, "sm_86");
    char built[32];
    snprintf(built, sizeof built, "sm_%d", arch);
    EXPECT(strstr(fastlora_last_error(), built), "message lists %s: %s", built,
           fastlora_last_error());

    setenv("FAKE_CUDA_CTX", "2", 1);
    setenv("FAKE_CUDA_CC", cc, 1);
    /* forward: workspace from the pool, shrink, forward, workspace freed */
    log_reset();
    expect_status("forward", fwd(c), FASTLORA_SUCCESS, NULL);
    EXPECT(log_count() == 4, "forward events %d, want 4", log_count());
    if (log_count() == 4) {
        const fake_event *a = log_at(1), *b = log_at(2);
        EXPECT(log_at(0)->is_alloc && log_at(3)->is_free, "forward workspace alloc/free");
        EXPECT(log_at(0)->size == fastlora_forward_workspace_size(c.M, c.N, c.K, c.r, 0),
               "forward workspace %llu", log_at(0)->size);
        EXPECT(strcmp(a->name, "_lora_shrink_kernel") == 0, "first launch %s", a->name);
        EXPECT(strcmp(b->name, "_lora_forward_kernel") == 0, "second launch %s", b->name);
        EXPECT(covers(a->grid[0], c.M) && a->grid[1] == 1, "shrink grid %u x %u", a->grid[0],
               a->grid[1]);
        EXPECT(a->param0 == (uintptr_t)c.x && b->param0 == (uintptr_t)c.x, "x is parameter 0");
        EXPECT(b->block % 32 == 0 && b->block >= 128, "block %u", b->block);
    }
    /* the caller's workspace: two launches, nothing allocated */
    log_reset();
    c.fws = DEV(0x7d0000000000ull);
    c.fws_bytes = fastlora_forward_workspace_size(c.M, c.N, c.K, c.r, 0);
    expect_status("forward, caller's workspace", fwd(c), FASTLORA_SUCCESS, NULL);
    EXPECT(log_count() == 2, "forward with a workspace: %d events, want 2", log_count());
    /* every rank block and an unaligned shape (the generic variants), both dtypes */
    int64_t ranks[] = {1, 16, 17, 32, 33, 64, 65, 128};
    for (int dt = 0; dt < 2; dt++) {
        for (size_t i = 0; i < sizeof ranks / sizeof ranks[0]; i++) {
            call d = base(300, 100, 72, ranks[i]);
            d.ldb = d.r;
            d.dtype = dt;
            int s = fwd(d);
            if (s == FASTLORA_ERROR_ARCH_NOT_BUILT && strstr(fastlora_last_error(), "holds"))
                continue; /* this dtype not built */
            expect_status("forward, unaligned", s, FASTLORA_SUCCESS, NULL);
            d.ws = NULL;
            expect_status("backward, unaligned", bwd(d), FASTLORA_SUCCESS, NULL);
            d.x = DEV(0x100002); /* misaligned pointer */
            expect_status("forward, misaligned x", fwd(d), FASTLORA_SUCCESS, NULL);
            d = base(2048, 256, 512, ranks[i]);
            d.ldb = d.r;
            d.dtype = dt;
            d.p = 0.0f; d.bias = NULL; d.seed = NULL;
            expect_status("forward, aligned, no bias, no dropout", fwd(d), FASTLORA_SUCCESS, NULL);
            expect_status("backward, aligned, no dropout", bwd(d), FASTLORA_SUCCESS, NULL);
        }
    }
    /* backward: dy (g, dB partials), dx (dA partials), reduce */
    log_reset();
    c.ws = NULL;
    expect_status("backward", bwd(c), FASTLORA_SUCCESS, NULL);
    const char* want[] = {"alloc", "_lora_dy_kernel", "_lora_dx_kernel", "_lora_reduce_kernel",
                          "free"};
    EXPECT(log_count() == 5, "backward events %d, want 5", log_count());
    for (int i = 0; i < log_count() && i < 5; i++) {
        const fake_event* e = log_at(i);
        const char* got = e->is_alloc ? "alloc" : e->is_free ? "free" : e->name;
        EXPECT(strcmp(got, want[i]) == 0, "backward event %d: %s, want %s", i, got, want[i]);
    }
    if (log_count() == 5) {
        EXPECT(log_at(0)->size == fastlora_backward_workspace_size(c.M, c.N, c.K, c.r, 0),
               "workspace allocated %llu", log_at(0)->size);
        EXPECT(covers(log_at(1)->grid[0], c.M), "dy grid %u", log_at(1)->grid[0]);
        EXPECT(log_at(1)->param0 == (uintptr_t)c.dy && log_at(2)->param0 == (uintptr_t)c.dy,
               "dy is parameter 0 of dy and dx");
        EXPECT(log_at(3)->grid[0] == cdiv(c.r * c.K, 1024) + cdiv(c.N * c.r, 1024),
               "reduce grid %u", log_at(3)->grid[0]);
        /* the dA partials right after g (256-aligned) at the workspace start */
        EXPECT(log_at(3)->param0 == 0x7f0000000000ull + 4096 * 16 * 2, "reduce reads %llx",
               log_at(3)->param0);
    }
    /* only dB, caller's workspace: dy, dx (for g... and dx), reduce over dB alone */
    log_reset();
    c.dA = NULL;
    c.ws = DEV(0x7e0000000000ull);
    c.ws_bytes = fastlora_backward_workspace_size(c.M, c.N, c.K, c.r, 0);
    expect_status("backward without dA", bwd(c), FASTLORA_SUCCESS, NULL);
    EXPECT(log_count() == 3, "backward without dA: %d launches, want 3", log_count());
    if (log_count() == 3)
        EXPECT(strcmp(log_at(2)->name, "_lora_reduce_kernel") == 0 &&
                   log_at(2)->grid[0] == cdiv(c.N * c.r, 1024),
               "%s grid %u", log_at(2)->name, log_at(2)->grid[0]);
    /* the sm_90 TMA build, when this library holds it: persistent grids (at most the SM
     * count the fake device reports) */
    if (strstr(fastlora_build_info(), "sm_90")) {
        setenv("FAKE_CUDA_CTX", "3", 1); /* a new context: its arch is read afresh */
        setenv("FAKE_CUDA_CC", "90", 1);
        log_reset();
        c.fws = NULL;
        expect_status("forward sm_90", fwd(c), FASTLORA_SUCCESS, NULL);
        EXPECT(log_count() == 4 && log_at(2)->grid[0] <= 132, "sm_90 forward: %d events, "
               "grid %u", log_count(), log_count() > 2 ? log_at(2)->grid[0] : 0);
        c.dA = DEV(0xa00000);
        expect_status("backward sm_90", bwd(c), FASTLORA_SUCCESS, NULL);
        setenv("FAKE_CUDA_CTX", "2", 1);
        setenv("FAKE_CUDA_CC", cc, 1);
    }
    /* M == 0: dA and dB zeroed */
    log_reset();
    call z = base(0, 32, 48, 8);
    expect_status("backward M=0", bwd(z), FASTLORA_SUCCESS, NULL);
    EXPECT(log_count() == 2 && log_at(0)->is_memset && log_at(0)->size == 8 * 48 * 2 &&
               log_at(1)->size == 32 * 8 * 2,
           "M=0 backward: %d events", log_count());
    /* a failing launch is reported, not fatal */
    setenv("FAKE_CUDA_FAIL_LAUNCH", "1", 1);
    expect_status("launch failure", fwd(c), FASTLORA_ERROR_LAUNCH, "cuLaunchKernel");
    unsetenv("FAKE_CUDA_FAIL_LAUNCH");
    expect_status("after a failure", fwd(c), FASTLORA_SUCCESS, NULL);
}

int main(int argc, char** argv) {
    if (argc >= 2 && strcmp(argv[1], "validation") == 0) {
        test_no_driver(); /* first: later calls with valid arguments must not reach a GPU */
        test_validation();
        test_strings();
    } else if (argc >= 3 && strcmp(argv[1], "fake") == 0) {
        test_fake(argv[2]);
    } else {
        fprintf(stderr, "usage: %s validation | fake <fake_libcuda.so>\n", argv[0]);
        return 2;
    }
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("all checks passed (%s)\n", fastlora_build_info());
    return 0;
}
