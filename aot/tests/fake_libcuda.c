/* A stand-in libcuda for testing libfastlora_kernels on machines without a GPU: it
 * implements the driver calls the library makes, runs nothing, and records each launch.
 * Loaded through FASTLORA_LIBCUDA=<this .so>.  Controlled per call by the environment:
 *   FAKE_CUDA_CTX          current context id (0 or unset: none)
 *   FAKE_CUDA_CC           compute capability x 10 of the device behind a new context
 *   FAKE_CUDA_FAIL_LAUNCH  1: cuLaunchKernel returns CUDA_ERROR_LAUNCH_FAILED
 * The test reads the log with fake_cuda_log() / fake_cuda_log_count() / fake_cuda_reset(). */
#include <cuda.h>
#include <stdlib.h>
#include <string.h>

#define EXPORT __attribute__((visibility("default")))

typedef struct {
    char name[64];
    unsigned grid[3], block, shared;
    int is_memset, is_alloc, is_free;
    const void* image;
    unsigned long long param0, size;
} fake_event;

static fake_event events[256];
static int n_events;
static const void* fn_images[4096];
static char fn_names[4096][64];
static int n_fns;

static int env_int(const char* k, int dflt) {
    const char* v = getenv(k);
    return v && *v ? atoi(v) : dflt;
}
static fake_event* push(void) {
    if (n_events == 256) n_events = 255;
    fake_event* e = &events[n_events++];
    memset(e, 0, sizeof *e);
    return e;
}

EXPORT int fake_cuda_log_count(void) { return n_events; }
EXPORT const fake_event* fake_cuda_log(int i) { return &events[i]; }
EXPORT void fake_cuda_reset(void) { n_events = 0; }
EXPORT int fake_cuda_modules_loaded(void) { return n_fns; }

EXPORT CUresult cuInit(unsigned int flags) { (void)flags; return CUDA_SUCCESS; }
EXPORT CUresult cuGetErrorString(CUresult r, const char** s) {
    *s = r == CUDA_ERROR_LAUNCH_FAILED ? "fake launch failure" : "fake error";
    return CUDA_SUCCESS;
}
EXPORT CUresult cuCtxGetCurrent(CUcontext* ctx) {
    *ctx = (CUcontext)(uintptr_t)(env_int("FAKE_CUDA_CTX", 0) * 0x1000);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuCtxGetDevice(CUdevice* dev) {
    *dev = env_int("FAKE_CUDA_CTX", 0);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuDeviceGetAttribute(int* v, CUdevice_attribute a, CUdevice dev) {
    (void)dev;
    int cc = env_int("FAKE_CUDA_CC", 90);
    switch (a) {
        case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *v = cc / 10; break;
        case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *v = cc % 10; break;
        case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *v = 132; break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: *v = 227 * 1024; break;
        default: *v = 0;
    }
    return CUDA_SUCCESS;
}
EXPORT CUresult cuModuleLoadData(CUmodule* m, const void* image) {
    if (memcmp(image, "\177ELF", 4) != 0) return CUDA_ERROR_INVALID_IMAGE; /* a real cubin? */
    *m = (CUmodule)image;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuModuleGetFunction(CUfunction* f, CUmodule m, const char* name) {
    if (n_fns == 4096) return CUDA_ERROR_OUT_OF_MEMORY;
    fn_images[n_fns] = m;
    strncpy(fn_names[n_fns], name, 63);
    *f = (CUfunction)(uintptr_t)(++n_fns);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuFuncGetAttribute(int* v, CUfunction_attribute a, CUfunction f) {
    (void)a; (void)f;
    *v = 0;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuFuncSetAttribute(CUfunction f, CUfunction_attribute a, int v) {
    (void)f; (void)a; (void)v;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                               unsigned by, unsigned bz, unsigned shared, CUstream s,
                               void** params, void** extra) {
    (void)by; (void)bz; (void)s; (void)extra;
    if (env_int("FAKE_CUDA_FAIL_LAUNCH", 0)) return CUDA_ERROR_LAUNCH_FAILED;
    int i = (int)(uintptr_t)f - 1;
    fake_event* e = push();
    strncpy(e->name, fn_names[i], 63);
    e->image = fn_images[i];
    e->grid[0] = gx; e->grid[1] = gy; e->grid[2] = gz;
    e->block = bx;
    e->shared = shared;
    e->param0 = *(unsigned long long*)params[0];
    return CUDA_SUCCESS;
}
EXPORT CUresult cuMemsetD8Async(CUdeviceptr p, unsigned char v, size_t n, CUstream s) {
    (void)v; (void)s;
    fake_event* e = push();
    e->is_memset = 1; e->param0 = p; e->size = n;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuMemAllocAsync(CUdeviceptr* p, size_t n, CUstream s) {
    (void)s;
    fake_event* e = push();
    e->is_alloc = 1; e->size = n;
    *p = 0x7f0000000000ull;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuMemFreeAsync(CUdeviceptr p, CUstream s) {
    (void)s;
    fake_event* e = push();
    e->is_free = 1; e->param0 = p;
    return CUDA_SUCCESS;
}
