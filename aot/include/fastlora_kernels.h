/* fastlora_kernels.h: fastlora's fused LoRA forward and backward, ahead-of-time compiled
 * Triton kernels behind a small C API (libfastlora_kernels.so, built by CMakeLists.txt).
 *
 * The math (PEFT's LoRA, s = scaling, D = dropout with rate p on the low-rank input):
 *   forward   u  = s * D(x) A^T                   [M, r]
 *             y  = x W^T + bias + u B^T           [M, N]
 *   backward  g  = s * dy B                       [M, r]
 *             dx = dy W + (g A) * m / (1-p)       [M, K]
 *             dA = g^T D(x)                       [r, K]
 *             dB = dy^T u                         [N, r]
 *
 * Conventions
 * - Every pointer is a CUDA device pointer; every tensor is row-major with unit column
 *   stride.  x, W, A, B, y, dy, dx take a row stride ("leading dimension", in elements,
 *   >= their row length); bias, u, dA, dB are contiguous.
 * - All tensors of a call share one dtype (fp16 or bf16); accumulation is fp32.
 * - Sizes: M >= 0, N >= 1, K >= 1, 1 <= r <= FASTLORA_MAX_R; M <= 2^30 and N, K and every
 *   leading dimension < 2^31.  M == 0 is a no-op (the backward zeroes dA and dB).
 * - Dropout: 0 <= dropout_p < 1.  The keep mask of element (row, col) is Philox keyed by
 *   *seed (a device int64, read by the kernels, so calls are graph-capturable); pass the
 *   same seed to the backward as to the forward.  seed may be NULL when dropout_p == 0.
 *   A seed value gives the same mask as fastlora's Triton backend (kernels.lora_forward)
 *   given a seed tensor holding that value.
 * - Work is queued on `stream` in the calling thread's current CUDA context, whose device
 *   must be one this library was built for (fastlora_build_info() lists the archs).
 * - Every function returns a fastlora_status; fastlora_last_error() says more (per thread).
 */
#ifndef FASTLORA_KERNELS_H
#define FASTLORA_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define FASTLORA_API
#else
#define FASTLORA_API __attribute__((visibility("default")))
#endif

#define FASTLORA_VERSION_MAJOR 0
#define FASTLORA_VERSION_MINOR 1
#define FASTLORA_VERSION_PATCH 0
#define FASTLORA_MAX_R 128

/* Same type as CUstream (cuda.h) and cudaStream_t (cuda_runtime.h); NULL = legacy stream. */
struct CUstream_st;
typedef struct CUstream_st* fastlora_stream_t;

typedef enum {
    FASTLORA_FP16 = 0,
    FASTLORA_BF16 = 1,
} fastlora_dtype;

typedef enum {
    FASTLORA_SUCCESS = 0,
    FASTLORA_ERROR_INVALID_ARGUMENT = 1, /* NULL pointer, bad size/stride/rank, p outside
                                            [0, 1), non-finite scaling, bad dtype, small or
                                            misaligned workspace */
    FASTLORA_ERROR_NO_DRIVER = 2,        /* libcuda.so.1 not found, or cuInit failed */
    FASTLORA_ERROR_NO_CONTEXT = 3,       /* no current CUDA context on this thread */
    FASTLORA_ERROR_ARCH_NOT_BUILT = 4,   /* the device's sm_XY (or this dtype on it) is not
                                            in this build */
    FASTLORA_ERROR_LAUNCH = 5,           /* a CUDA driver call failed (module load, launch,
                                            workspace allocation) */
} fastlora_status;

/* Bytes of device workspace fastlora_forward needs for these sizes (0 when M == 0): the
 * global scratch of the sm_90 TMA kernels (tensor descriptors built in the kernel). */
FASTLORA_API size_t fastlora_forward_workspace_size(
    int64_t M, int64_t N, int64_t K, int64_t r, fastlora_dtype dtype);

/* y = x W^T + bias + u B^T and u = s * D(x) A^T.
 * x [M, K] (ldx), weight [N, K] (ldw), bias [N] or NULL, lora_A [r, K] (lda),
 * lora_B [N, r] (ldb); outputs y [M, N] (ldy) and u [M, r] (contiguous, keep it for the
 * backward).  workspace: NULL (taken from the stream's pool with cuMemAllocAsync and freed
 * in stream order) or a 16-byte aligned device buffer of workspace_bytes >=
 * fastlora_forward_workspace_size(...), not used concurrently by other work. */
FASTLORA_API int fastlora_forward(
    const void* x, int64_t ldx, const void* weight, int64_t ldw, const void* bias,
    const void* lora_A, int64_t lda, const void* lora_B, int64_t ldb,
    void* y, int64_t ldy, void* u,
    int64_t M, int64_t N, int64_t K, int64_t r,
    float scaling, float dropout_p, const int64_t* seed,
    void* workspace, size_t workspace_bytes,
    fastlora_dtype dtype, fastlora_stream_t stream);

/* Bytes of device workspace fastlora_backward needs for these sizes (0 when M == 0):
 * g [M, r], the fp32 per-row-block partial sums of dA and dB, and the TMA scratch. */
FASTLORA_API size_t fastlora_backward_workspace_size(
    int64_t M, int64_t N, int64_t K, int64_t r, fastlora_dtype dtype);

/* dx [M, K] (lddx), dA [r, K] and dB [N, r] (contiguous; either may be NULL to skip it)
 * from dy [M, N] (lddy) and the forward's x, weight, lora_A, lora_B, u and seed.
 * workspace: NULL (the library takes it from the stream's pool with cuMemAllocAsync and
 * frees it in stream order) or a 16-byte aligned device buffer of workspace_bytes >=
 * fastlora_backward_workspace_size(...), not used concurrently by other work. */
FASTLORA_API int fastlora_backward(
    const void* dy, int64_t lddy, const void* x, int64_t ldx,
    const void* weight, int64_t ldw, const void* lora_A, int64_t lda,
    const void* lora_B, int64_t ldb, const void* u,
    void* dx, int64_t lddx, void* dA, void* dB,
    int64_t M, int64_t N, int64_t K, int64_t r,
    float scaling, float dropout_p, const int64_t* seed,
    void* workspace, size_t workspace_bytes,
    fastlora_dtype dtype, fastlora_stream_t stream);

/* "success", "invalid argument", ... for a status code (never NULL). */
FASTLORA_API const char* fastlora_status_string(int status);
/* The message of this thread's last failed call ("" if none). */
FASTLORA_API const char* fastlora_last_error(void);
/* "0.1.0" */
FASTLORA_API const char* fastlora_version(void);
/* e.g. "fastlora 0.1.0; triton 3.9.0; sm_80 fp16 bf16; sm_90 fp16 bf16" */
FASTLORA_API const char* fastlora_build_info(void);

#ifdef __cplusplus
}
#endif
#endif /* FASTLORA_KERNELS_H */
