// CUDA kernels of the per-location bilinear convolution (forward and backward).
//
// Formulation (docs/cuda.md): with the mixed patches
//     X~[b, c, k, p] = sum_k' M[b, p, k, k'] * x[b, c, p + k']      (diagonal: M[b, p, k] * x[..])
// the output is one GEMM per sample, y[b] = W (O x C*HV) @ X~[b] (C*HV x P), so every tap's
// response is computed once and the mixing costs C*HV*HV (diagonal: C*HV) per location, small
// next to the O*C*HV of the contraction. X~ is never stored: the GEMM's operand loader builds it
// tile by tile in shared memory (an implicit GEMM, like implicit-GEMM convolution).
//
// Backward, with G~[b, c, k, p] = sum_o W[o, c, k] * gy[b, o, p] (a GEMM, stored as workspace):
//     gW[o, (c,k)]   = sum_{b,p} gy[b, o, p] * X~[b, c, k, p]         (GEMM, split-K, no atomics)
//     gM[b,p,k,k']   = sum_c G~[b, c, k, p] * x[b, c, p + k']         (one thread per element)
//     gx[b, c, q]    = sum_{p, k'} [p + k' = q] sum_k M[b,p,k,k'] G~[b,c,k,p]   (gather)
// Every output element is written by exactly one thread; no atomics anywhere.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "bilinear_conv2d.h"

// Kernel launches go through this macro so that tests can run the same kernels on the CPU
// (host_emulation.h, used by tests/test_cuda.py); under nvcc it is the plain <<<>>> launch.
#ifndef FEWSHOT_NSL_LAUNCH
#define FEWSHOT_NSL_LAUNCH(kernel, grid, block, stream, ...) \
  kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#endif

namespace fewshot_nsl {
namespace {

// ---------------------------------------------------------------------------------------------
// Element conversions (accumulate in acc_t = float, or double for double inputs)
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_acc(float v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <typename scalar_t>
__device__ __forceinline__ scalar_t from_acc(double v);
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }

// ---------------------------------------------------------------------------------------------
// Patch access: the raw tap value x[b, c, p + k] and the mixed patch X~[b, c, k, p]
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
struct Patches {
  using acc_t = typename AccType<scalar_t>::type;
  const scalar_t* x;
  const scalar_t* M;
  Geometry g;

  __device__ __forceinline__ int64_t taps() const { return g.kernel_h * g.kernel_w; }
  __device__ __forceinline__ int64_t positions() const { return g.out_h * g.out_w; }

  // x[b, c, p + tap] (zero in the padding).
  __device__ __forceinline__ acc_t tap_value(int64_t b, int64_t c, int64_t tap, int64_t p) const {
    const int64_t ih = (p / g.out_w) * g.stride_h - g.pad_h + (tap / g.kernel_w) * g.dil_h;
    const int64_t iw = (p % g.out_w) * g.stride_w - g.pad_w + (tap % g.kernel_w) * g.dil_w;
    if (ih < 0 || ih >= g.in_h || iw < 0 || iw >= g.in_w) return acc_t(0);
    return to_acc(x[((b * g.in_channels + c) * g.in_h + ih) * g.in_w + iw]);
  }

  // X~[b, c, k, p] = sum_k' M[b, p, k, k'] x[b, c, p + k']  (diagonal: M[b, p, k] x[b, c, p + k]).
  __device__ __forceinline__ acc_t mixed(int64_t b, int64_t c, int64_t k, int64_t p) const {
    const int64_t hv = taps();
    const int64_t row = (b * positions() + p) * hv + k;
    if (g.diagonal) return to_acc(M[row]) * tap_value(b, c, k, p);
    const scalar_t* m_row = M + row * hv;
    acc_t sum = acc_t(0);
    for (int64_t kp = 0; kp < hv; ++kp) sum += to_acc(m_row[kp]) * tap_value(b, c, kp, p);
    return sum;
  }
};

// ---------------------------------------------------------------------------------------------
// One tiled GEMM kernel, three uses: C[z](m, n) = sum_r A(z, m, r) * B(z, r, n)
//
// A block computes a kTileM x kTileN tile of C with 256 threads, 4 x 4 outputs per thread, and
// walks the reduction in steps of kTileR through shared memory. Operands come from loader
// functors, so the forward's B operand is the mixed patch computed on the fly. kAFastR /
// kBFastR say whether consecutive r are (roughly) consecutive in memory, which picks the
// thread -> element mapping of the shared-memory fill so that global reads coalesce.
// blockIdx.z = batch * splits + split: `splits` cuts the reduction into chunks of
// `r_per_split` (split-K; the store receives the split index and a separate kernel sums).
// ---------------------------------------------------------------------------------------------
constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileR = 16;
constexpr int kThreads = 256;
constexpr int kPerThread = 4;  // outputs per thread along m and along n
static_assert(kTileM == 16 * kPerThread && kTileN == 16 * kPerThread, "16 x 16 thread grid");
static_assert(kTileM * kTileR == kPerThread * kThreads, "A tile fill: 4 elements per thread");
static_assert(kTileN * kTileR == kPerThread * kThreads, "B tile fill: 4 elements per thread");

template <typename acc_t, bool kAFastR, bool kBFastR, class LoadA, class LoadB, class Store>
__global__ void __launch_bounds__(kThreads)
    tiled_gemm_kernel(int64_t m_size, int64_t n_size, int64_t r_size, int splits,
                      int64_t r_per_split, LoadA load_a, LoadB load_b, Store store) {
  // +4 padding: the r-fast fills write columns of the tile; this keeps them off one bank.
  __shared__ acc_t a_tile[kTileR][kTileM + 4];
  __shared__ acc_t b_tile[kTileR][kTileN + 4];

  const int tid = threadIdx.x;
  const int tx = tid % 16;
  const int ty = tid / 16;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM;
  const int64_t batch = blockIdx.z / splits;
  const int split = blockIdx.z % splits;
  const int64_t r_begin = split * r_per_split;
  const int64_t r_end = r_begin + r_per_split < r_size ? r_begin + r_per_split : r_size;

  acc_t acc[kPerThread][kPerThread];
#pragma unroll
  for (int i = 0; i < kPerThread; ++i)
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) acc[i][j] = acc_t(0);

  for (int64_t r0 = r_begin; r0 < r_end; r0 += kTileR) {
#pragma unroll
    for (int l = 0; l < kPerThread; ++l) {
      const int idx = tid + l * kThreads;
      const int mm = kAFastR ? idx / kTileR : idx % kTileM;
      const int rr = kAFastR ? idx % kTileR : idx / kTileM;
      const int64_t m = m0 + mm;
      const int64_t r = r0 + rr;
      a_tile[rr][mm] = (m < m_size && r < r_end) ? load_a(batch, m, r) : acc_t(0);
    }
#pragma unroll
    for (int l = 0; l < kPerThread; ++l) {
      const int idx = tid + l * kThreads;
      const int nn = kBFastR ? idx / kTileR : idx % kTileN;
      const int rr = kBFastR ? idx % kTileR : idx / kTileN;
      const int64_t n = n0 + nn;
      const int64_t r = r0 + rr;
      b_tile[rr][nn] = (n < n_size && r < r_end) ? load_b(batch, r, n) : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < kTileR; ++rr) {
      acc_t a_val[kPerThread];
      acc_t b_val[kPerThread];
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) a_val[i] = a_tile[rr][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) b_val[j] = b_tile[rr][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < kPerThread; ++i)
#pragma unroll
        for (int j = 0; j < kPerThread; ++j) acc[i][j] += a_val[i] * b_val[j];
    }
    __syncthreads();
  }

  // Strided ownership (ty + 16 i, tx + 16 j): stores of a warp hit consecutive n.
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int64_t m = m0 + ty + 16 * i;
    if (m >= m_size) continue;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t n = n0 + tx + 16 * j;
      if (n < n_size) store(batch, split, m, n, acc[i][j]);
    }
  }
}

// ---- forward: y[b] (O x P) = W (O x R) @ X~[b] (R x P), R = C * HV -------------------------
template <typename scalar_t>
struct WeightRows {  // A(m = o, r = (c, k)) = W[o, r]; r-fast
  const scalar_t* weight;
  int64_t reduction;
  __device__ __forceinline__ typename AccType<scalar_t>::type operator()(int64_t, int64_t m,
                                                                        int64_t r) const {
    return to_acc(weight[m * reduction + r]);
  }
};

template <typename scalar_t>
struct MixedPatchByRow {  // B(r = (c, k), n = p) = X~[b, c, k, p]; n-fast
  Patches<scalar_t> patches;
  __device__ __forceinline__ typename AccType<scalar_t>::type operator()(int64_t b, int64_t r,
                                                                        int64_t n) const {
    const int64_t hv = patches.taps();
    return patches.mixed(b, r / hv, r % hv, n);
  }
};

template <typename scalar_t>
struct StoreOutput {  // y[b, m, n]
  scalar_t* out;
  int64_t m_size, n_size;
  template <typename acc_t>
  __device__ __forceinline__ void operator()(int64_t b, int, int64_t m, int64_t n,
                                             acc_t value) const {
    out[(b * m_size + m) * n_size + n] = from_acc<scalar_t>(value);
  }
};

// ---- backward GEMM 1: G~[b] (R x P) = W^T (R x O) @ gy[b] (O x P) --------------------------
template <typename scalar_t>
struct WeightColumns {  // A(m = (c, k), r = o) = W[o, m]; m-fast
  const scalar_t* weight;
  int64_t reduction;
  __device__ __forceinline__ typename AccType<scalar_t>::type operator()(int64_t, int64_t m,
                                                                        int64_t r) const {
    return to_acc(weight[r * reduction + m]);
  }
};

template <typename scalar_t>
struct GradOutByChannel {  // B(r = o, n = p) = gy[b, o, p]; n-fast
  const scalar_t* grad_y;
  int64_t out_channels, positions;
  __device__ __forceinline__ typename AccType<scalar_t>::type operator()(int64_t b, int64_t r,
                                                                        int64_t n) const {
    return to_acc(grad_y[(b * out_channels + r) * positions + n]);
  }
};

// ---- backward GEMM 2 (split-K): gW (O x R) = sum_{(b, p)} gy (O x BP) @ X~^T (BP x R) --------
template <typename scalar_t>
struct GradOutByPosition {  // A(m = o, r = (b, p)) = gy[b, o, p]; r-fast
  const scalar_t* grad_y;
  int64_t out_channels, positions;
  __device__ __forceinline__ typename AccType<scalar_t>::type operator()(int64_t, int64_t m,
                                                                        int64_t r) const {
    const int64_t b = r / positions;
    return to_acc(grad_y[(b * out_channels + m) * positions + (r % positions)]);
  }
};

template <typename scalar_t>
struct MixedPatchByColumn {  // B(r = (b, p), n = (c, k)) = X~[b, c, k, p]; r-fast
  Patches<scalar_t> patches;
  __device__ __forceinline__ typename AccType<scalar_t>::type operator()(int64_t, int64_t r,
                                                                        int64_t n) const {
    const int64_t hv = patches.taps();
    const int64_t positions = patches.positions();
    return patches.mixed(r / positions, n / hv, n % hv, r % positions);
  }
};

template <typename acc_t>
struct StorePartial {  // partials[split, m, n] (batch is always 0 here)
  acc_t* partials;
  int64_t m_size, n_size;
  __device__ __forceinline__ void operator()(int64_t, int split, int64_t m, int64_t n,
                                             acc_t value) const {
    partials[(split * m_size + m) * n_size + n] = value;
  }
};

// Sum of the split-K partial results (fixed order: deterministic).
template <typename scalar_t, typename acc_t>
__global__ void sum_partials_kernel(const acc_t* partials, int splits, int64_t numel,
                                    scalar_t* out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t sum = acc_t(0);
    for (int s = 0; s < splits; ++s) sum += partials[s * numel + i];
    out[i] = from_acc<scalar_t>(sum);
  }
}

// gM[b, p, k, k'] = sum_c G~[b, c, k, p] * x[b, c, p + k']  (diagonal: k' = k).
// Thread index order (b, k, k', p) with p fastest so that the reads of G~ coalesce.
template <typename scalar_t, typename acc_t>
__global__ void grad_m_kernel(const acc_t* grad_patches, Patches<scalar_t> patches,
                              scalar_t* grad_M) {
  const Geometry& g = patches.g;
  const int64_t hv = patches.taps();
  const int64_t positions = patches.positions();
  const int64_t columns = g.diagonal ? 1 : hv;
  const int64_t numel = g.batch * hv * columns * positions;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = i % positions;
    int64_t rest = i / positions;
    const int64_t column = rest % columns;
    rest /= columns;
    const int64_t k = rest % hv;
    const int64_t b = rest / hv;
    const int64_t tap = g.diagonal ? k : column;
    acc_t sum = acc_t(0);
    for (int64_t c = 0; c < g.in_channels; ++c) {
      sum += grad_patches[((b * g.in_channels + c) * hv + k) * positions + p] *
             patches.tap_value(b, c, tap, p);
    }
    grad_M[((b * positions + p) * hv + k) * columns + column] = from_acc<scalar_t>(sum);
  }
}

// gx[b, c, ih, iw] = sum over taps k' and the output location p that reads (ih, iw) through
// k' of sum_k M[b, p, k, k'] * G~[b, c, k, p]. A gather, one thread per input element.
template <typename scalar_t, typename acc_t>
__global__ void grad_x_kernel(const acc_t* grad_patches, const scalar_t* M, Geometry g,
                              scalar_t* grad_x) {
  const int64_t hv = g.kernel_h * g.kernel_w;
  const int64_t positions = g.out_h * g.out_w;
  const int64_t numel = g.batch * g.in_channels * g.in_h * g.in_w;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t iw = i % g.in_w;
    const int64_t ih = (i / g.in_w) % g.in_h;
    const int64_t bc = i / (g.in_w * g.in_h);  // b * C + c
    const int64_t b = bc / g.in_channels;
    const acc_t* g_patch = grad_patches + bc * hv * positions;
    acc_t sum = acc_t(0);
    for (int64_t ki = 0; ki < g.kernel_h; ++ki) {
      const int64_t th = ih + g.pad_h - ki * g.dil_h;
      if (th < 0 || th % g.stride_h != 0) continue;
      const int64_t oh = th / g.stride_h;
      if (oh >= g.out_h) continue;
      for (int64_t kj = 0; kj < g.kernel_w; ++kj) {
        const int64_t tw = iw + g.pad_w - kj * g.dil_w;
        if (tw < 0 || tw % g.stride_w != 0) continue;
        const int64_t ow = tw / g.stride_w;
        if (ow >= g.out_w) continue;
        const int64_t p = oh * g.out_w + ow;
        const int64_t tap = ki * g.kernel_w + kj;
        const scalar_t* m_loc = M + (b * positions + p) * hv * (g.diagonal ? 1 : hv);
        if (g.diagonal) {
          sum += to_acc(m_loc[tap]) * g_patch[tap * positions + p];
        } else {
          for (int64_t k = 0; k < hv; ++k)
            sum += to_acc(m_loc[k * hv + tap]) * g_patch[k * positions + p];
        }
      }
    }
    grad_x[i] = from_acc<scalar_t>(sum);
  }
}

// ---------------------------------------------------------------------------------------------
// Launch helpers
// ---------------------------------------------------------------------------------------------
template <typename acc_t, bool kAFastR, bool kBFastR, class LoadA, class LoadB, class Store>
void launch_gemm(int64_t m_size, int64_t n_size, int64_t r_size, int64_t batch, int splits,
                 LoadA load_a, LoadB load_b, Store store, cudaStream_t stream) {
  // Each split's chunk is a multiple of kTileR so that only the last chunk is ragged.
  const int64_t r_per_split = ((r_size + splits - 1) / splits + kTileR - 1) / kTileR * kTileR;
  const dim3 grid(static_cast<unsigned>((n_size + kTileN - 1) / kTileN),
                  static_cast<unsigned>((m_size + kTileM - 1) / kTileM),
                  static_cast<unsigned>(batch * splits));
  const auto kernel = &tiled_gemm_kernel<acc_t, kAFastR, kBFastR, LoadA, LoadB, Store>;
  FEWSHOT_NSL_LAUNCH(kernel, grid, kThreads, stream, m_size, n_size, r_size, splits,
                     std::max<int64_t>(r_per_split, kTileR), load_a, load_b, store);
}

// Grid for the grid-stride elementwise kernels.
unsigned elementwise_blocks(int64_t numel) {
  const int64_t blocks = (numel + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(blocks, 65535 * 8)));
}

template <typename scalar_t>
cudaError_t forward_impl(const scalar_t* x, const scalar_t* weight, const scalar_t* M,
                         scalar_t* y, const Geometry& g, cudaStream_t stream) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t hv = g.kernel_h * g.kernel_w;
  const int64_t reduction = g.in_channels * hv;
  const int64_t positions = g.out_h * g.out_w;
  const Patches<scalar_t> patches{x, M, g};
  launch_gemm<acc_t, true, false>(g.out_channels, positions, reduction, g.batch, 1,
                                  WeightRows<scalar_t>{weight, reduction},
                                  MixedPatchByRow<scalar_t>{patches},
                                  StoreOutput<scalar_t>{y, g.out_channels, positions}, stream);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t backward_impl(const scalar_t* grad_y, const scalar_t* x, const scalar_t* weight,
                          const scalar_t* M, void* grad_patches_raw, void* partials_raw,
                          scalar_t* grad_x, scalar_t* grad_weight, scalar_t* grad_M,
                          const Geometry& g, cudaStream_t stream) {
  using acc_t = typename AccType<scalar_t>::type;
  acc_t* grad_patches = static_cast<acc_t*>(grad_patches_raw);
  acc_t* partials = static_cast<acc_t*>(partials_raw);
  const int64_t hv = g.kernel_h * g.kernel_w;
  const int64_t reduction = g.in_channels * hv;
  const int64_t positions = g.out_h * g.out_w;
  const Patches<scalar_t> patches{x, M, g};

  // G~[b] = W^T gy[b], stored as (B, C*HV, P) through the same output functor as y.
  launch_gemm<acc_t, false, false>(reduction, positions, g.out_channels, g.batch, 1,
                                   WeightColumns<scalar_t>{weight, reduction},
                                   GradOutByChannel<scalar_t>{grad_y, g.out_channels, positions},
                                   StoreOutput<acc_t>{grad_patches, reduction, positions}, stream);

  const int splits = weight_grad_splits(g);
  launch_gemm<acc_t, true, true>(g.out_channels, reduction, g.batch * positions, 1, splits,
                                 GradOutByPosition<scalar_t>{grad_y, g.out_channels, positions},
                                 MixedPatchByColumn<scalar_t>{patches},
                                 StorePartial<acc_t>{partials, g.out_channels, reduction}, stream);
  const int64_t weight_numel = g.out_channels * reduction;
  const auto sum_kernel = &sum_partials_kernel<scalar_t, acc_t>;
  FEWSHOT_NSL_LAUNCH(sum_kernel, elementwise_blocks(weight_numel), kThreads, stream, partials,
                     splits, weight_numel, grad_weight);

  const int64_t m_numel = g.batch * positions * hv * (g.diagonal ? 1 : hv);
  const auto m_kernel = &grad_m_kernel<scalar_t, acc_t>;
  FEWSHOT_NSL_LAUNCH(m_kernel, elementwise_blocks(m_numel), kThreads, stream, grad_patches,
                     patches, grad_M);

  const int64_t x_numel = g.batch * g.in_channels * g.in_h * g.in_w;
  const auto x_kernel = &grad_x_kernel<scalar_t, acc_t>;
  FEWSHOT_NSL_LAUNCH(x_kernel, elementwise_blocks(x_numel), kThreads, stream, grad_patches, M,
                     g, grad_x);
  return cudaGetLastError();
}

}  // namespace

int weight_grad_splits(const Geometry& g) {
  // Enough blocks to fill a large GPU (~4 waves of 132 SMs) while keeping each split's
  // reduction at >= 1024 (b, p) positions so the partial buffer and final sum stay cheap.
  const int64_t tiles = ((g.out_channels + kTileM - 1) / kTileM) *
                        ((g.in_channels * g.kernel_h * g.kernel_w + kTileN - 1) / kTileN);
  const int64_t wanted = (512 + tiles - 1) / tiles;
  const int64_t by_size = std::max<int64_t>(1, g.batch * g.out_h * g.out_w / 1024);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({wanted, by_size, 1024})));
}

cudaError_t location_forward(DType dtype, const void* x, const void* weight, const void* M,
                             void* y, const Geometry& g, cudaStream_t stream) {
  switch (dtype) {
#define FEWSHOT_NSL_FORWARD(T)                                                                \
  return forward_impl<T>(static_cast<const T*>(x), static_cast<const T*>(weight),           \
                         static_cast<const T*>(M), static_cast<T*>(y), g, stream)
    case DType::kFloat32:
      FEWSHOT_NSL_FORWARD(float);
    case DType::kFloat64:
      FEWSHOT_NSL_FORWARD(double);
    case DType::kFloat16:
      FEWSHOT_NSL_FORWARD(__half);
    case DType::kBFloat16:
      FEWSHOT_NSL_FORWARD(__nv_bfloat16);
#undef FEWSHOT_NSL_FORWARD
  }
  return cudaErrorInvalidValue;
}

cudaError_t location_backward(DType dtype, const void* grad_y, const void* x, const void* weight,
                              const void* M, void* grad_patches, void* grad_weight_partials,
                              void* grad_x, void* grad_weight, void* grad_M, const Geometry& g,
                              cudaStream_t stream) {
  switch (dtype) {
#define FEWSHOT_NSL_BACKWARD(T)                                                                \
  return backward_impl<T>(static_cast<const T*>(grad_y), static_cast<const T*>(x),           \
                          static_cast<const T*>(weight), static_cast<const T*>(M),           \
                          grad_patches, grad_weight_partials, static_cast<T*>(grad_x),        \
                          static_cast<T*>(grad_weight), static_cast<T*>(grad_M), g, stream)
    case DType::kFloat32:
      FEWSHOT_NSL_BACKWARD(float);
    case DType::kFloat64:
      FEWSHOT_NSL_BACKWARD(double);
    case DType::kFloat16:
      FEWSHOT_NSL_BACKWARD(__half);
    case DType::kBFloat16:
      FEWSHOT_NSL_BACKWARD(__nv_bfloat16);
#undef FEWSHOT_NSL_BACKWARD
  }
  return cudaErrorInvalidValue;
}

}  // namespace fewshot_nsl
