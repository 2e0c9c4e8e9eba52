/* libfastlora_kernels: the C face of fastlora's ahead-of-time compiled Triton kernels.
 *
 * Mirrors the Python launchers (kernels/lora_forward.py, kernels/lora_backward.py) launch
 * for launch: forward = shrink then forward; backward = dy (g and the dB partials), dx
 * (with the dA partials), reduce.  Same grids, same constexprs, same seed pointer; the
 * tile config is chosen here by a fixed rule (see fl_choose).  On sm_90 the aligned
 * variants are the TMA build: tensor descriptors built in the kernel need global scratch
 * (grid x per-CTA bytes), which comes from the caller's workspace.
 *
 * libcuda is opened with dlopen at the first call that needs it (FASTLORA_LIBCUDA names
 * another library, for tests), so the library builds and loads on machines without CUDA.
 */
#include "fastlora_kernels.h"

#include <dlfcn.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fl_internal.h"
#include "fl_pack.h"

/* An M-tiled kernel (shrink, forward, dx) takes the large tile when that still gives at
 * least this many CTAs per SM; below, the small tile, for more parallelism. */
#define FL_LARGE_TILE_CTAS_PER_SM 2
#define FL_WS_ALIGN 256 /* workspace sections start on this (cuMemAlloc's alignment) */
#define FL_MAX_CONTEXTS 64

/* ------------------------------------------------------------------ errors */

static __thread char fl_err[768];

static int fl_fail(int status, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(fl_err, sizeof fl_err, fmt, ap);
    va_end(ap);
    return status;
}

const char* fastlora_status_string(int status) {
    switch (status) {
        case FASTLORA_SUCCESS: return "success";
        case FASTLORA_ERROR_INVALID_ARGUMENT: return "invalid argument";
        case FASTLORA_ERROR_NO_DRIVER: return "CUDA driver not available";
        case FASTLORA_ERROR_NO_CONTEXT: return "no current CUDA context";
        case FASTLORA_ERROR_ARCH_NOT_BUILT: return "GPU architecture not built into this library";
        case FASTLORA_ERROR_LAUNCH: return "CUDA driver call failed";
        default: return "unknown status";
    }
}

const char* fastlora_last_error(void) { return fl_err; }
const char* fastlora_version(void) { return FL_VERSION; }
const char* fastlora_build_info(void) { return fl_build_info; }

/* ------------------------------------------------------------------ driver (dlopen) */

typedef struct {
    CUresult (*Init)(unsigned int);
    CUresult (*GetErrorString)(CUresult, const char**);
    CUresult (*CtxGetCurrent)(CUcontext*);
    CUresult (*CtxGetDevice)(CUdevice*);
    CUresult (*DeviceGetAttribute)(int*, CUdevice_attribute, CUdevice);
    CUresult (*ModuleLoadData)(CUmodule*, const void*);
    CUresult (*ModuleGetFunction)(CUfunction*, CUmodule, const char*);
    CUresult (*FuncGetAttribute)(int*, CUfunction_attribute, CUfunction);
    CUresult (*FuncSetAttribute)(CUfunction, CUfunction_attribute, int);
    CUresult (*LaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned,
                             unsigned, unsigned, CUstream, void**, void**);
    CUresult (*MemsetD8Async)(CUdeviceptr, unsigned char, size_t, CUstream);
    CUresult (*MemAllocAsync)(CUdeviceptr*, size_t, CUstream); /* optional (CUDA >= 11.2) */
    CUresult (*MemFreeAsync)(CUdeviceptr, CUstream);
} fl_driver;

static fl_driver fl_cu;
static int fl_cu_status = -1;
static char fl_cu_error[512];
static pthread_once_t fl_cu_once = PTHREAD_ONCE_INIT;

static void fl_cu_load(void) {
    const char* path = getenv("FASTLORA_LIBCUDA");
    if (!path || !*path) path = "libcuda.so.1";
    void* h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        snprintf(fl_cu_error, sizeof fl_cu_error, "cannot load the CUDA driver (%s): %s", path,
                 dlerror());
        fl_cu_status = FASTLORA_ERROR_NO_DRIVER;
        return;
    }
    struct { void** slot; const char* name; int required; } syms[] = {
        {(void**)&fl_cu.Init, "cuInit", 1},
        {(void**)&fl_cu.GetErrorString, "cuGetErrorString", 1},
        {(void**)&fl_cu.CtxGetCurrent, "cuCtxGetCurrent", 1},
        {(void**)&fl_cu.CtxGetDevice, "cuCtxGetDevice", 1},
        {(void**)&fl_cu.DeviceGetAttribute, "cuDeviceGetAttribute", 1},
        {(void**)&fl_cu.ModuleLoadData, "cuModuleLoadData", 1},
        {(void**)&fl_cu.ModuleGetFunction, "cuModuleGetFunction", 1},
        {(void**)&fl_cu.FuncGetAttribute, "cuFuncGetAttribute", 1},
        {(void**)&fl_cu.FuncSetAttribute, "cuFuncSetAttribute", 1},
        {(void**)&fl_cu.LaunchKernel, "cuLaunchKernel", 1},
        {(void**)&fl_cu.MemsetD8Async, "cuMemsetD8Async", 1},
        {(void**)&fl_cu.MemAllocAsync, "cuMemAllocAsync", 0},
        {(void**)&fl_cu.MemFreeAsync, "cuMemFreeAsync", 0},
    };
    for (size_t i = 0; i < sizeof syms / sizeof syms[0]; i++) {
        *syms[i].slot = dlsym(h, syms[i].name);
        if (!*syms[i].slot && syms[i].required) {
            snprintf(fl_cu_error, sizeof fl_cu_error, "%s has no %s", path, syms[i].name);
            fl_cu_status = FASTLORA_ERROR_NO_DRIVER;
            return;
        }
    }
    CUresult r = fl_cu.Init(0);
    if (r != CUDA_SUCCESS) {
        snprintf(fl_cu_error, sizeof fl_cu_error, "cuInit failed with CUresult %d (no GPU?)",
                 (int)r);
        fl_cu_status = FASTLORA_ERROR_NO_DRIVER;
        return;
    }
    fl_cu_status = FASTLORA_SUCCESS;
}

static int fl_cuda_fail(CUresult r, const char* what) {
    const char* s = NULL;
    if (fl_cu.GetErrorString) fl_cu.GetErrorString(r, &s);
    return fl_fail(FASTLORA_ERROR_LAUNCH, "%s failed: CUresult %d (%s)", what, (int)r,
                   s ? s : "unknown");
}

/* ------------------------------------------------------------------ per-context state */

typedef struct {
    CUcontext ctx;
    const fl_table* table[2]; /* by dtype; NULL when this build lacks it */
    CUfunction* funcs[2];     /* lazily loaded, one per variant of table[dtype] */
    int arch, sms, smem_optin;
} fl_ctx;

static fl_ctx fl_ctxs[FL_MAX_CONTEXTS];
static int fl_nctx;
static pthread_mutex_t fl_lock = PTHREAD_MUTEX_INITIALIZER;

static void fl_built_list(char* buf, size_t n) {
    buf[0] = 0;
    for (size_t i = 0; i < fl_table_count; i++) {
        size_t len = strlen(buf);
        snprintf(buf + len, n - len, "%ssm_%d %s", i ? ", " : "", fl_tables[i]->arch,
                 fl_tables[i]->dtype == FASTLORA_FP16 ? "fp16" : "bf16");
    }
}

/* The current context's state, created on first use; status on failure. */
static int fl_get_ctx(fastlora_dtype dtype, fl_ctx** out) {
    pthread_once(&fl_cu_once, fl_cu_load);
    if (fl_cu_status != FASTLORA_SUCCESS) return fl_fail(fl_cu_status, "%s", fl_cu_error);
    CUcontext ctx = NULL;
    CUresult r = fl_cu.CtxGetCurrent(&ctx);
    if (r != CUDA_SUCCESS) return fl_cuda_fail(r, "cuCtxGetCurrent");
    if (!ctx)
        return fl_fail(FASTLORA_ERROR_NO_CONTEXT,
                       "no current CUDA context on this thread: make one current "
                       "(cuCtxSetCurrent, cuDevicePrimaryCtxRetain, or any CUDA runtime call)");
    pthread_mutex_lock(&fl_lock);
    fl_ctx* c = NULL;
    for (int i = 0; i < fl_nctx; i++)
        if (fl_ctxs[i].ctx == ctx) c = &fl_ctxs[i];
    if (!c) {
        CUdevice dev;
        int major = 0, minor = 0, sms = 0, optin = 0;
        if ((r = fl_cu.CtxGetDevice(&dev)) != CUDA_SUCCESS ||
            (r = fl_cu.DeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                                          dev)) != CUDA_SUCCESS ||
            (r = fl_cu.DeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                                          dev)) != CUDA_SUCCESS ||
            (r = fl_cu.DeviceGetAttribute(&sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
                                          dev)) != CUDA_SUCCESS ||
            (r = fl_cu.DeviceGetAttribute(
                 &optin, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, dev)) !=
                CUDA_SUCCESS) {
            pthread_mutex_unlock(&fl_lock);
            return fl_cuda_fail(r, "querying the device");
        }
        if (fl_nctx == FL_MAX_CONTEXTS) {
            pthread_mutex_unlock(&fl_lock);
            return fl_fail(FASTLORA_ERROR_LAUNCH, "more than %d CUDA contexts", FL_MAX_CONTEXTS);
        }
        c = &fl_ctxs[fl_nctx++];
        memset(c, 0, sizeof *c);
        c->ctx = ctx;
        c->arch = major * 10 + minor;
        c->sms = sms > 0 ? sms : 1;
        c->smem_optin = optin;
        for (size_t i = 0; i < fl_table_count; i++)
            if (fl_tables[i]->arch == c->arch) c->table[fl_tables[i]->dtype] = fl_tables[i];
    }
    pthread_mutex_unlock(&fl_lock);
    if (!c->table[dtype]) {
        char built[256];
        fl_built_list(built, sizeof built);
        return fl_fail(FASTLORA_ERROR_ARCH_NOT_BUILT,
                       "the device is sm_%d; this library holds %s kernels for: %s (rebuild "
                       "with -DFASTLORA_CUDA_ARCHS including %d)",
                       c->arch, dtype == FASTLORA_FP16 ? "fp16" : "bf16",
                       built[0] ? built : "nothing", c->arch);
    }
    *out = c;
    return FASTLORA_SUCCESS;
}

static int fl_function(fl_ctx* c, fastlora_dtype dtype, const fl_variant* v, CUfunction* f) {
    const fl_table* t = c->table[dtype];
    size_t idx = (size_t)(v - t->variants);
    pthread_mutex_lock(&fl_lock);
    int status = FASTLORA_SUCCESS;
    if (!c->funcs[dtype]) c->funcs[dtype] = calloc(t->count, sizeof(CUfunction));
    if (!c->funcs[dtype]) {
        status = fl_fail(FASTLORA_ERROR_LAUNCH, "out of host memory");
    } else if (!c->funcs[dtype][idx]) {
        CUmodule mod;
        CUfunction fn;
        CUresult r = fl_cu.ModuleLoadData(&mod, v->cubin);
        if (r == CUDA_SUCCESS) r = fl_cu.ModuleGetFunction(&fn, mod, v->name);
        if (r == CUDA_SUCCESS && v->shared > 49152) { /* as Triton's loader does */
            int static_smem = 0;
            r = fl_cu.FuncGetAttribute(&static_smem, CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, fn);
            if (r == CUDA_SUCCESS)
                r = fl_cu.FuncSetAttribute(fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                           c->smem_optin - static_smem);
        }
        if (r != CUDA_SUCCESS)
            status = fl_cuda_fail(r, "loading a kernel (cuModuleLoadData/GetFunction)");
        else
            c->funcs[dtype][idx] = fn;
    }
    if (status == FASTLORA_SUCCESS) *f = c->funcs[dtype][idx];
    pthread_mutex_unlock(&fl_lock);
    return status;
}

/* ------------------------------------------------------------------ choosing and launching */

static int64_t fl_cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* kernels/_configs.py: pad_rank */
static int fl_pad_rank(int64_t r) {
    int p = FL_MMA_MIN_R;
    while (p < r) p *= 2;
    return p;
}

static const fl_variant* fl_find(const fl_table* t, int kernel, int r_pad, int role, int flag) {
    for (size_t i = 0; i < t->count; i++) {
        const fl_variant* v = &t->variants[i];
        if (v->kernel == kernel && v->r_pad == r_pad && v->role == role && v->flag == flag)
            return v;
    }
    return NULL;
}

/* grid of one launch, as the Python launchers compute it; sets L->num_progs */
static int64_t fl_grid(const fl_ctx* c, const fl_variant* v, fl_launch* L) {
    int64_t tiles;
    switch (v->kernel) {
        case FL_K_SHRINK: return fl_cdiv(L->M, v->block_m);
        case FL_K_DY: return fl_cdiv(L->M, v->block_m);
        case FL_K_FORWARD: tiles = fl_cdiv(L->M, v->block_m) * fl_cdiv(L->N, v->block_n); break;
        case FL_K_DX: tiles = fl_cdiv(L->M, v->block_m) * fl_cdiv(L->K, v->block_k); break;
        default: return fl_cdiv(L->na, FL_REDUCE_BLOCK) + fl_cdiv(L->nb, FL_REDUCE_BLOCK);
    }
    int64_t progs = tiles;
    if (v->tma) { /* persistent: one program per SM at most */
        int64_t sms = c->sms < FL_MAX_PERSISTENT_CTAS ? c->sms : FL_MAX_PERSISTENT_CTAS;
        if (progs > sms) progs = sms;
    }
    L->num_progs = progs;
    return progs;
}

/* The config rule: the 16-aligned specialisation (on sm_90 the TMA build) when every hinted
 * pointer, size and stride is a multiple of 16 (else "generic", the smallest pointer-build
 * tile without hints); among the aligned ones, the large tile when it gives >= 2 CTAs per
 * SM, else the small one. */
static const fl_variant* fl_choose(const fl_ctx* c, fastlora_dtype dtype, int kernel, int flag,
                                   fl_launch* L) {
    const fl_table* t = c->table[dtype];
    int r_pad = kernel == FL_K_REDUCE ? 0 : fl_pad_rank(L->R);
    if (kernel == FL_K_REDUCE || !fl_aligned_checks[kernel](L))
        return fl_find(t, kernel, r_pad, FL_ROLE_GENERIC, flag);
    const fl_variant* large = fl_find(t, kernel, r_pad, FL_ROLE_LARGE, flag);
    if (!large) return NULL;
    int64_t tiles = large->kernel == FL_K_FORWARD
                        ? fl_cdiv(L->M, large->block_m) * fl_cdiv(L->N, large->block_n)
                    : large->kernel == FL_K_DX
                        ? fl_cdiv(L->M, large->block_m) * fl_cdiv(L->K, large->block_k)
                        : fl_cdiv(L->M, large->block_m);
    if (tiles >= (int64_t)FL_LARGE_TILE_CTAS_PER_SM * c->sms) return large;
    return fl_find(t, kernel, r_pad, FL_ROLE_SMALL, flag);
}

static int fl_run(fl_ctx* c, fastlora_dtype dtype, int kernel, int flag, fl_launch* L,
                  CUstream stream, const fl_variant** chosen) {
    static const char* names[FL_K_COUNT] = {"shrink", "forward", "dy", "dx", "reduce"};
    const fl_variant* v = fl_choose(c, dtype, kernel, flag, L);
    if (!v)
        return fl_fail(FASTLORA_ERROR_ARCH_NOT_BUILT, "no %s variant for r=%lld in this build",
                       names[kernel], (long long)L->R);
    if (chosen) *chosen = v;
    CUfunction f;
    int s = fl_function(c, dtype, v, &f);
    if (s) return s;
    int64_t gx = fl_grid(c, v, L);
    if (v->scratch && !L->scratch)
        return fl_fail(FASTLORA_ERROR_LAUNCH, "%s: the TMA build needs scratch memory",
                       names[kernel]);
    fl_params P;
    P.n_scratch = v->n_scratch;
    P.scratch = v->scratch ? L->scratch : 0;
    P.bad = NULL;
    if (fl_packers[kernel](L, &P) != 0)
        return fl_fail(FASTLORA_ERROR_INVALID_ARGUMENT, "%s: argument %s does not fit int32",
                       names[kernel], P.bad);
    if (gx <= 0) return FASTLORA_SUCCESS;
    CUresult r = fl_cu.LaunchKernel(f, (unsigned)gx, 1, 1, 32u * v->num_warps, 1, 1,
                                    (unsigned)v->shared, stream, P.ptrs, NULL);
    if (r != CUDA_SUCCESS) {
        char what[96];
        snprintf(what, sizeof what, "cuLaunchKernel(%s, sm_%d)", v->name, c->arch);
        return fl_cuda_fail(r, what);
    }
    return FASTLORA_SUCCESS;
}

/* ------------------------------------------------------------------ validation */

#define FL_I32_LIMIT ((int64_t)INT32_MAX)
#define FL_M_LIMIT ((int64_t)1 << 30)

#define FL_CHECK(cond, ...) \
    do { if (!(cond)) return fl_fail(FASTLORA_ERROR_INVALID_ARGUMENT, __VA_ARGS__); } while (0)

static int fl_check_common(int64_t M, int64_t N, int64_t K, int64_t r, float scaling,
                           float dropout_p, const int64_t* seed, fastlora_dtype dtype) {
    FL_CHECK(dtype == FASTLORA_FP16 || dtype == FASTLORA_BF16,
             "dtype must be FASTLORA_FP16 (0) or FASTLORA_BF16 (1), got %d", (int)dtype);
    FL_CHECK(M >= 0 && M <= FL_M_LIMIT, "M must be in [0, 2^30], got %lld", (long long)M);
    FL_CHECK(N >= 1 && N <= FL_I32_LIMIT, "N must be in [1, 2^31), got %lld", (long long)N);
    FL_CHECK(K >= 1 && K <= FL_I32_LIMIT, "K must be in [1, 2^31), got %lld", (long long)K);
    FL_CHECK(r >= 1 && r <= FL_MAX_R, "r must be in [1, %d], got %lld", FL_MAX_R, (long long)r);
    FL_CHECK(r * K <= FL_I32_LIMIT && r * N <= FL_I32_LIMIT,
             "r*K and r*N must be < 2^31 (got r=%lld, N=%lld, K=%lld)", (long long)r,
             (long long)N, (long long)K);
    FL_CHECK(isfinite(scaling), "scaling must be finite, got %g", (double)scaling);
    FL_CHECK(dropout_p >= 0.0f && dropout_p < 1.0f, "dropout_p must be in [0, 1), got %g",
             (double)dropout_p);
    FL_CHECK(dropout_p == 0.0f || seed != NULL, "seed must not be NULL when dropout_p > 0");
    return FASTLORA_SUCCESS;
}

static int fl_check_ptr(const void* p, const char* name, int may_be_null) {
    FL_CHECK(p != NULL || may_be_null, "%s must not be NULL", name);
    return FASTLORA_SUCCESS;
}

static int fl_check_ld(int64_t ld, int64_t cols, int64_t rows, const char* name) {
    FL_CHECK(ld <= FL_I32_LIMIT && (ld >= cols || rows <= 1),
             "%s must be >= %lld (the row length) and < 2^31, got %lld", name, (long long)cols,
             (long long)ld);
    return FASTLORA_SUCCESS;
}

#define FL_TRY(expr) do { int s_ = (expr); if (s_) return s_; } while (0)

static size_t fl_align(size_t n) { return (n + FL_WS_ALIGN - 1) / FL_WS_ALIGN * FL_WS_ALIGN; }

/* TMA scratch for launches whose grid is at most cdiv(M, min_bm) or a persistent grid */
static size_t fl_scratch_bytes(int64_t M, int min_bm) {
    int64_t ctas = fl_cdiv(M, min_bm);
    if (ctas < FL_MAX_PERSISTENT_CTAS) ctas = FL_MAX_PERSISTENT_CTAS;
    return fl_align((size_t)ctas * FL_TMA_SCRATCH_PER_CTA);
}

/* the caller's workspace, or one from the stream's pool (freed by fl_release) */
static int fl_workspace(void* workspace, size_t need, CUstream s, CUdeviceptr* ws,
                        CUdeviceptr* owned) {
    *owned = 0;
    *ws = (CUdeviceptr)workspace;
    if (*ws) return FASTLORA_SUCCESS;
    if (!fl_cu.MemAllocAsync)
        return fl_fail(FASTLORA_ERROR_LAUNCH, "the driver has no cuMemAllocAsync: pass a workspace");
    CUresult rr = fl_cu.MemAllocAsync(owned, need, s);
    if (rr != CUDA_SUCCESS) return fl_cuda_fail(rr, "cuMemAllocAsync (workspace)");
    *ws = *owned;
    return FASTLORA_SUCCESS;
}

static int fl_release(int st, CUdeviceptr owned, CUstream s) {
    if (owned) {
        CUresult rr = fl_cu.MemFreeAsync(owned, s);
        if (!st && rr != CUDA_SUCCESS) st = fl_cuda_fail(rr, "cuMemFreeAsync (workspace)");
    }
    return st;
}

/* ------------------------------------------------------------------ the API */

size_t fastlora_forward_workspace_size(int64_t M, int64_t N, int64_t K, int64_t r,
                                       fastlora_dtype dtype) {
    (void)N; (void)K; (void)r; (void)dtype;
    if (M <= 0) return 0;
    return fl_scratch_bytes(M, FL_MIN_BM_SHRINK);
}

int fastlora_forward(const void* x, int64_t ldx, const void* weight, int64_t ldw,
                     const void* bias, const void* lora_A, int64_t lda, const void* lora_B,
                     int64_t ldb, void* y, int64_t ldy, void* u, int64_t M, int64_t N,
                     int64_t K, int64_t r, float scaling, float dropout_p, const int64_t* seed,
                     void* workspace, size_t workspace_bytes, fastlora_dtype dtype,
                     fastlora_stream_t stream) {
    fl_err[0] = 0;
    FL_TRY(fl_check_common(M, N, K, r, scaling, dropout_p, seed, dtype));
    int empty = M == 0;
    FL_TRY(fl_check_ptr(x, "x", empty));
    FL_TRY(fl_check_ptr(weight, "weight", 0));
    FL_TRY(fl_check_ptr(lora_A, "lora_A", 0));
    FL_TRY(fl_check_ptr(lora_B, "lora_B", 0));
    FL_TRY(fl_check_ptr(y, "y", empty));
    FL_TRY(fl_check_ptr(u, "u", empty));
    FL_TRY(fl_check_ld(ldx, K, M, "ldx"));
    FL_TRY(fl_check_ld(ldw, K, N, "ldw"));
    FL_TRY(fl_check_ld(lda, K, r, "lda"));
    FL_TRY(fl_check_ld(ldb, r, N, "ldb"));
    FL_TRY(fl_check_ld(ldy, N, M, "ldy"));
    size_t need = fastlora_forward_workspace_size(M, N, K, r, dtype);
    FL_CHECK(!workspace || workspace_bytes >= need,
             "workspace_bytes is %zu, fastlora_forward_workspace_size says %zu",
             workspace_bytes, need);
    FL_CHECK(FL_DIV16(workspace), "workspace must be 16-byte aligned");
    if (empty) return FASTLORA_SUCCESS;

    fl_ctx* c;
    FL_TRY(fl_get_ctx(dtype, &c));
    CUstream s = (CUstream)stream;
    CUdeviceptr ws, owned;
    FL_TRY(fl_workspace(workspace, need, s, &ws, &owned));
    fl_launch L;
    memset(&L, 0, sizeof L);
    L.x = (CUdeviceptr)x; L.w = (CUdeviceptr)weight; L.a = (CUdeviceptr)lora_A;
    L.b = (CUdeviceptr)lora_B; L.u = (CUdeviceptr)u; L.y = (CUdeviceptr)y;
    L.bias = bias ? (CUdeviceptr)bias : L.w; /* never read when HAS_BIAS=False */
    L.seed = seed ? (CUdeviceptr)seed : L.x; /* never read when HAS_DROPOUT=False */
    L.scratch = ws;
    L.M = M; L.N = N; L.K = K; L.R = r;
    L.ldx = ldx; L.ldw = ldw; L.lda = lda; L.ldb = ldb; L.ldy = ldy; L.ldu = r;
    L.scaling = scaling; L.dropout_p = dropout_p;
    int st = fl_run(c, dtype, FL_K_SHRINK, dropout_p > 0.0f, &L, s, NULL);
    if (!st) st = fl_run(c, dtype, FL_K_FORWARD, bias != NULL, &L, s, NULL);
    return fl_release(st, owned, s);
}

/* workspace layout: g [M, r] | dA partials [cdiv(M, bm_dx), r, K] fp32 | dB partials
 * [cdiv(M, bm_dy), N, r] fp32 | TMA scratch; partial counts bounded by the smallest tile */
static size_t fl_ws_g(int64_t M, int64_t r) { return fl_align((size_t)M * r * 2); }
static size_t fl_ws_a(int64_t M, int64_t K, int64_t r) {
    return fl_align((size_t)fl_cdiv(M, FL_MIN_BM_DX) * r * K * 4);
}
static size_t fl_ws_b(int64_t M, int64_t N, int64_t r) {
    return fl_align((size_t)fl_cdiv(M, FL_MIN_BM_DY) * N * r * 4);
}

size_t fastlora_backward_workspace_size(int64_t M, int64_t N, int64_t K, int64_t r,
                                        fastlora_dtype dtype) {
    (void)dtype; /* g is 2 bytes per element for both fp16 and bf16 */
    if (M <= 0 || N <= 0 || K <= 0 || r <= 0) return 0;
    return fl_ws_g(M, r) + fl_ws_a(M, K, r) + fl_ws_b(M, N, r) +
           fl_scratch_bytes(M, FL_MIN_BM_DY);
}

int fastlora_backward(const void* dy, int64_t lddy, const void* x, int64_t ldx,
                      const void* weight, int64_t ldw, const void* lora_A, int64_t lda,
                      const void* lora_B, int64_t ldb, const void* u, void* dx, int64_t lddx,
                      void* dA, void* dB, int64_t M, int64_t N, int64_t K, int64_t r,
                      float scaling, float dropout_p, const int64_t* seed, void* workspace,
                      size_t workspace_bytes, fastlora_dtype dtype, fastlora_stream_t stream) {
    fl_err[0] = 0;
    FL_TRY(fl_check_common(M, N, K, r, scaling, dropout_p, seed, dtype));
    int empty = M == 0;
    FL_TRY(fl_check_ptr(dy, "dy", empty));
    FL_TRY(fl_check_ptr(x, "x", empty));
    FL_TRY(fl_check_ptr(weight, "weight", 0));
    FL_TRY(fl_check_ptr(lora_A, "lora_A", 0));
    FL_TRY(fl_check_ptr(lora_B, "lora_B", 0));
    FL_TRY(fl_check_ptr(u, "u", empty));
    FL_TRY(fl_check_ptr(dx, "dx", empty));
    FL_TRY(fl_check_ld(lddy, N, M, "lddy"));
    FL_TRY(fl_check_ld(ldx, K, M, "ldx"));
    FL_TRY(fl_check_ld(ldw, K, N, "ldw"));
    FL_TRY(fl_check_ld(lda, K, r, "lda"));
    FL_TRY(fl_check_ld(ldb, r, N, "ldb"));
    FL_TRY(fl_check_ld(lddx, K, M, "lddx"));
    size_t need = fastlora_backward_workspace_size(M, N, K, r, dtype);
    FL_CHECK(!workspace || workspace_bytes >= need,
             "workspace_bytes is %zu, fastlora_backward_workspace_size says %zu",
             workspace_bytes, need);
    FL_CHECK(FL_DIV16(workspace), "workspace must be 16-byte aligned");
    CUstream s = (CUstream)stream;
    fl_ctx* c;
    if (empty) { /* as lora_backward: dA and dB are zeros */
        if (!dA && !dB) return FASTLORA_SUCCESS;
        FL_TRY(fl_get_ctx(dtype, &c));
        CUresult rr = CUDA_SUCCESS;
        if (dA) rr = fl_cu.MemsetD8Async((CUdeviceptr)dA, 0, (size_t)(r * K * 2), s);
        if (rr == CUDA_SUCCESS && dB)
            rr = fl_cu.MemsetD8Async((CUdeviceptr)dB, 0, (size_t)(N * r * 2), s);
        return rr == CUDA_SUCCESS ? FASTLORA_SUCCESS : fl_cuda_fail(rr, "cuMemsetD8Async");
    }
    FL_TRY(fl_get_ctx(dtype, &c));
    CUdeviceptr ws, owned;
    FL_TRY(fl_workspace(workspace, need, s, &ws, &owned));
    fl_launch L;
    memset(&L, 0, sizeof L);
    L.dy = (CUdeviceptr)dy; L.x = (CUdeviceptr)x; L.w = (CUdeviceptr)weight;
    L.a = (CUdeviceptr)lora_A; L.b = (CUdeviceptr)lora_B; L.u = (CUdeviceptr)u;
    L.dx = (CUdeviceptr)dx;
    L.seed = seed ? (CUdeviceptr)seed : L.x; /* never read when HAS_DROPOUT=False */
    L.g = ws;
    L.ws_a = L.g + fl_ws_g(M, r);
    L.ws_b = L.ws_a + fl_ws_a(M, K, r);
    L.scratch = L.ws_b + fl_ws_b(M, N, r);
    L.da = dA ? (CUdeviceptr)dA : L.ws_a; /* never written when na == 0 */
    L.db = dB ? (CUdeviceptr)dB : L.ws_b;
    L.M = M; L.N = N; L.K = K; L.R = r;
    L.ldx = ldx; L.ldw = ldw; L.lda = lda; L.ldb = ldb; L.lddy = lddy; L.lddx = lddx;
    L.ldu = r; L.ldg = r;
    L.ws_a_split = r * K; L.ws_a_row = K;
    L.ws_b_split = N * r; L.ws_b_row = r;
    L.scaling = scaling; L.dropout_p = dropout_p;
    int drop = dropout_p > 0.0f;

    const fl_variant *vy = NULL, *vx = NULL;
    int st = fl_run(c, dtype, FL_K_DY, 0, &L, s, &vy);
    if (!st) st = fl_run(c, dtype, FL_K_DX, drop, &L, s, &vx);
    if (!st && (dA || dB)) {
        L.na = dA ? r * K : 0;
        L.nb = dB ? N * r : 0;
        L.pa = fl_cdiv(M, vx->block_m);
        L.pb = fl_cdiv(M, vy->block_m);
        L.progs_a = fl_cdiv(L.na, FL_REDUCE_BLOCK);
        st = fl_run(c, dtype, FL_K_REDUCE, 0, &L, s, NULL);
    }
    return fl_release(st, owned, s);
}
