// Python bindings and tensor plumbing of the bilinear convolution extension.
//
//   per-location M: the CUDA kernels of bilinear_conv2d_kernels.cu (implicit GEMM, no atomics);
//   per-sample M:   M folded into a per-image kernel W_eff[b] = W M[b] and one convolution
//                   grouped over the batch (cuDNN through ATen); the backward is ATen's
//                   convolution_backward plus two small matmuls for gW and gM.
//
// Every function has an `_out` twin writing into caller-provided tensors; scripts/check_cuda.py
// pre-fills those with NaN to prove that every element is written.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <array>
#include <tuple>
#include <vector>

#include "bilinear_conv2d.h"

namespace fewshot_nsl {
namespace {

using Pair = std::vector<int64_t>;

DType to_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kDouble:
      return DType::kFloat64;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK_VALUE(false, "bilinear_conv2d: x must be float32, float64, float16 or ",
                        "bfloat16, got ", type);
  }
  return DType::kFloat32;  // unreachable: TORCH_CHECK_VALUE throws
}

// Checks the arguments and returns the geometry. Python validates first (with messages in the
// project's terms); these checks guard direct callers of the extension.
Geometry make_geometry(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& M,
                       const Pair& stride, const Pair& padding, const Pair& dilation,
                       bool per_location, bool diagonal) {
  TORCH_CHECK_VALUE(x.dim() == 4, "bilinear_conv2d: x must be (B, C, H, W), got ", x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(1) == x.size(1),
                    "bilinear_conv2d: weight must be (O, C, kh, kw) with C = ", x.size(1),
                    ", got ", weight.sizes());
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                    "bilinear_conv2d: stride, padding and dilation must be pairs");
  TORCH_CHECK_VALUE(stride[0] > 0 && stride[1] > 0 && dilation[0] > 0 && dilation[1] > 0 &&
                        padding[0] >= 0 && padding[1] >= 0,
                    "bilinear_conv2d: need stride >= 1, dilation >= 1, padding >= 0");
  TORCH_CHECK_VALUE(x.is_cuda() && weight.device() == x.device() && M.device() == x.device(),
                    "bilinear_conv2d: x, weight and M must be on the same CUDA device");
  TORCH_CHECK_VALUE(weight.scalar_type() == x.scalar_type() && M.scalar_type() == x.scalar_type(),
                    "bilinear_conv2d: x, weight and M must have the same dtype");
  Geometry g{};
  g.batch = x.size(0);
  g.in_channels = x.size(1);
  g.in_h = x.size(2);
  g.in_w = x.size(3);
  g.out_channels = weight.size(0);
  g.kernel_h = weight.size(2);
  g.kernel_w = weight.size(3);
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_h = padding[0];
  g.pad_w = padding[1];
  g.dil_h = dilation[0];
  g.dil_w = dilation[1];
  g.diagonal = diagonal;
  g.out_h = (g.in_h + 2 * g.pad_h - g.dil_h * (g.kernel_h - 1) - 1) / g.stride_h + 1;
  g.out_w = (g.in_w + 2 * g.pad_w - g.dil_w * (g.kernel_w - 1) - 1) / g.stride_w + 1;
  TORCH_CHECK_VALUE(g.out_h > 0 && g.out_w > 0, "bilinear_conv2d: input ", x.sizes(),
                    " too small for the kernel/stride/padding/dilation");
  const int64_t hv = g.kernel_h * g.kernel_w;
  std::vector<int64_t> expected{g.batch};
  if (per_location) {
    expected.push_back(g.out_h);
    expected.push_back(g.out_w);
  }
  expected.push_back(hv);
  if (!diagonal) expected.push_back(hv);
  TORCH_CHECK_VALUE(M.sizes() == at::IntArrayRef(expected), "bilinear_conv2d: M must have shape ",
                    at::IntArrayRef(expected), ", got ", M.sizes());
  return g;
}

void check_out(const at::Tensor& out, const at::Tensor& like, at::IntArrayRef sizes,
               const char* name) {
  TORCH_CHECK_VALUE(out.sizes() == sizes && out.is_contiguous() &&
                        out.scalar_type() == like.scalar_type() && out.device() == like.device(),
                    "bilinear_conv2d: ", name, " must be a contiguous ", like.scalar_type(),
                    " tensor of shape ", sizes, " on ", like.device(), ", got ", out.sizes());
}

at::ScalarType acc_type(at::ScalarType type) {
  return type == at::kDouble ? at::kDouble : at::kFloat;
}

// Per-sample form: W_eff[b, o, c, k'] = sum_k W[o, c, k] M[b, k, k'], accumulated in acc_type.
at::Tensor effective_weight(const at::Tensor& weight, const at::Tensor& M, const Geometry& g) {
  const int64_t hv = g.kernel_h * g.kernel_w;
  const auto acc = acc_type(weight.scalar_type());
  const auto w = weight.reshape({1, g.out_channels * g.in_channels, hv}).to(acc);
  const auto m = M.to(acc);
  const auto eff = g.diagonal ? w * m.view({g.batch, 1, hv}) : at::matmul(w, m);
  return eff.to(weight.scalar_type())
      .reshape({g.batch * g.out_channels, g.in_channels, g.kernel_h, g.kernel_w});
}

void forward_out(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& M_in,
                 at::Tensor& out, const Pair& stride, const Pair& padding, const Pair& dilation,
                 bool per_location, bool diagonal) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const auto weight = weight_in.contiguous();
  const auto M = M_in.contiguous();
  const Geometry g =
      make_geometry(x, weight, M, stride, padding, dilation, per_location, diagonal);
  check_out(out, x, {g.batch, g.out_channels, g.out_h, g.out_w}, "out");
  if (per_location) {
    const auto status = location_forward(to_dtype(x.scalar_type()), x.data_ptr(), weight.data_ptr(),
                                         M.data_ptr(), out.data_ptr(), g,
                                         c10::cuda::getCurrentCUDAStream());
    C10_CUDA_CHECK(status);
    return;
  }
  const auto y = at::conv2d(x.reshape({1, g.batch * g.in_channels, g.in_h, g.in_w}),
                            effective_weight(weight, M, g), {}, stride, padding, dilation,
                            g.batch);
  out.copy_(y.view({g.batch, g.out_channels, g.out_h, g.out_w}));
}

void backward_out(const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& weight_in,
                  const at::Tensor& M_in, at::Tensor& grad_x, at::Tensor& grad_weight,
                  at::Tensor& grad_M, const Pair& stride, const Pair& padding,
                  const Pair& dilation, bool per_location, bool diagonal) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const auto weight = weight_in.contiguous();
  const auto M = M_in.contiguous();
  const auto grad_y = grad_y_in.contiguous();
  const Geometry g =
      make_geometry(x, weight, M, stride, padding, dilation, per_location, diagonal);
  TORCH_CHECK_VALUE(
      grad_y.sizes() == at::IntArrayRef({g.batch, g.out_channels, g.out_h, g.out_w}) &&
          grad_y.scalar_type() == x.scalar_type() && grad_y.device() == x.device(),
      "bilinear_conv2d: grad_y must match the output (", g.batch, ", ", g.out_channels, ", ",
      g.out_h, ", ", g.out_w, ") in dtype and device, got ", grad_y.sizes());
  check_out(grad_x, x, x.sizes(), "grad_x");
  check_out(grad_weight, weight, weight.sizes(), "grad_weight");
  check_out(grad_M, M, M.sizes(), "grad_M");
  const int64_t hv = g.kernel_h * g.kernel_w;
  const auto acc_options = x.options().dtype(acc_type(x.scalar_type()));

  if (per_location) {
    // Workspaces, fully written by the kernels before they are read.
    auto grad_patches =
        at::empty({g.batch, g.in_channels * hv, g.out_h * g.out_w}, acc_options);
    auto partials =
        at::empty({weight_grad_splits(g), g.out_channels, g.in_channels * hv}, acc_options);
    const auto status = location_backward(
        to_dtype(x.scalar_type()), grad_y.data_ptr(), x.data_ptr(), weight.data_ptr(),
        M.data_ptr(), grad_patches.data_ptr(), partials.data_ptr(), grad_x.data_ptr(),
        grad_weight.data_ptr(), grad_M.data_ptr(), g, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_CHECK(status);
    return;
  }

  // Per-sample: gradients of the grouped convolution, then of W_eff = W M[b].
  const auto eff = effective_weight(weight, M, g);
  const auto grads = at::convolution_backward(
      grad_y.reshape({1, g.batch * g.out_channels, g.out_h, g.out_w}),
      x.reshape({1, g.batch * g.in_channels, g.in_h, g.in_w}), eff, c10::nullopt, stride,
      padding, dilation, /*transposed=*/false, /*output_padding=*/{0, 0}, g.batch,
      {true, true, false});
  grad_x.copy_(std::get<0>(grads).view(x.sizes()));
  const auto acc = acc_type(x.scalar_type());
  const auto grad_eff =
      std::get<1>(grads).reshape({g.batch, g.out_channels * g.in_channels, hv}).to(acc);
  const auto w = weight.reshape({g.out_channels * g.in_channels, hv}).to(acc);
  const auto m = M.to(acc);
  if (diagonal) {
    // W_eff[b, oc, k] = W[oc, k] m[b, k]
    grad_weight.copy_((grad_eff * m.unsqueeze(1)).sum(0).view(weight.sizes()));
    grad_M.copy_((grad_eff * w.unsqueeze(0)).sum(1));
  } else {
    // gW[oc, k] = sum_b sum_k' gW_eff[b, oc, k'] M[b, k, k'];  gM[b] = W^T gW_eff[b]
    grad_weight.copy_(at::matmul(grad_eff, m.transpose(1, 2)).sum(0).view(weight.sizes()));
    grad_M.copy_(at::matmul(w.t(), grad_eff));
  }
}

at::Tensor forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& M,
                   const Pair& stride, const Pair& padding, const Pair& dilation,
                   bool per_location, bool diagonal) {
  TORCH_CHECK_VALUE(x.dim() == 4 && weight.dim() == 4 && stride.size() == 2 &&
                        padding.size() == 2 && dilation.size() == 2,
                    "bilinear_conv2d: x and weight must be 4-d, stride/padding/dilation pairs");
  const int64_t out_h =
      (x.size(2) + 2 * padding[0] - dilation[0] * (weight.size(2) - 1) - 1) / stride[0] + 1;
  const int64_t out_w =
      (x.size(3) + 2 * padding[1] - dilation[1] * (weight.size(3) - 1) - 1) / stride[1] + 1;
  auto out = at::empty({x.size(0), weight.size(0), std::max<int64_t>(out_h, 0),
                        std::max<int64_t>(out_w, 0)},
                       x.options().memory_format(at::MemoryFormat::Contiguous));
  forward_out(x, weight, M, out, stride, padding, dilation, per_location, diagonal);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& M,
    const Pair& stride, const Pair& padding, const Pair& dilation, bool per_location,
    bool diagonal) {
  const auto contiguous = at::MemoryFormat::Contiguous;
  auto grad_x = at::empty(x.sizes(), x.options().memory_format(contiguous));
  auto grad_weight = at::empty(weight.sizes(), weight.options().memory_format(contiguous));
  auto grad_M = at::empty(M.sizes(), M.options().memory_format(contiguous));
  backward_out(grad_y, x, weight, M, grad_x, grad_weight, grad_M, stride, padding, dilation,
               per_location, diagonal);
  return {grad_x, grad_weight, grad_M};
}

}  // namespace
}  // namespace fewshot_nsl

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace pybind11::literals;
  m.doc() = "fewshot_nsl bilinear convolution (per-sample / per-location M), CUDA";
  m.def("forward", &fewshot_nsl::forward, "y = bilinear_conv2d(x, weight, M)", "x"_a,
        "weight"_a, "M"_a, "stride"_a, "padding"_a, "dilation"_a, "per_location"_a,
        "diagonal"_a);
  m.def("forward_out", &fewshot_nsl::forward_out, "forward into a preallocated out", "x"_a,
        "weight"_a, "M"_a, "out"_a, "stride"_a, "padding"_a, "dilation"_a, "per_location"_a,
        "diagonal"_a);
  m.def("backward", &fewshot_nsl::backward, "(grad_x, grad_weight, grad_M)", "grad_y"_a, "x"_a,
        "weight"_a, "M"_a, "stride"_a, "padding"_a, "dilation"_a, "per_location"_a,
        "diagonal"_a);
  m.def("backward_out", &fewshot_nsl::backward_out, "backward into preallocated outputs",
        "grad_y"_a, "x"_a, "weight"_a, "M"_a, "grad_x"_a, "grad_weight"_a, "grad_M"_a,
        "stride"_a, "padding"_a, "dilation"_a, "per_location"_a, "diagonal"_a);
}
