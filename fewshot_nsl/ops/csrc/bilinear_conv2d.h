// Host-side interface of the per-location bilinear convolution kernels.
//
// Deliberately free of torch headers: bilinear_conv2d_kernels.cu only needs the CUDA toolkit,
// so it can be compiled (and checked) on its own; the tensor plumbing, dtype dispatch and the
// per-sample path live in bilinear_conv2d.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fewshot_nsl {

// Element type of every tensor argument (x, weight, M, outputs). Accumulation is float32 for
// the 32/16-bit types and float64 for kFloat64.
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Convolution arithmetic; all tensors are contiguous:
//   x (B, C, H, W), weight (O, C, kh, kw), y (B, O, Ho, Wo),
//   M (B, Ho, Wo, HV, HV) full or (B, Ho, Wo, HV) diagonal, HV = kh * kw.
struct Geometry {
  int64_t batch, in_channels, in_h, in_w;
  int64_t out_channels, kernel_h, kernel_w, out_h, out_w;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  bool diagonal;
};

// y[b, o, p] = sum_{c, k} W[o, c, k] * X~[b, c, k, p],
// X~[b, c, k, p] = sum_k' M[b, p, k, k'] * x[b, c, p + k']  (computed on the fly, never stored).
cudaError_t location_forward(DType dtype, const void* x, const void* weight, const void* M,
                             void* y, const Geometry& g, cudaStream_t stream);

// Number of reduction splits used for grad_weight; the caller allocates the workspace
// grad_weight_partials with weight_grad_splits(g) * O * C * HV accumulator elements.
int weight_grad_splits(const Geometry& g);

// grad_patches: workspace of B * C * HV * Ho * Wo accumulator elements (float32, or float64
// for kFloat64). Every element of grad_x, grad_weight and grad_M is written.
cudaError_t location_backward(DType dtype, const void* grad_y, const void* x, const void* weight,
                              const void* M, void* grad_patches, void* grad_weight_partials,
                              void* grad_x, void* grad_weight, void* grad_M, const Geometry& g,
                              cudaStream_t stream);

}  // namespace fewshot_nsl
