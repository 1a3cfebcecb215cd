// Per-location bilinear convolution on the CPU: forward and backward, fused per tile.
//
//   y[b, o, l] = sum_{c, k} W[o, c, k] * mixed[b, l, k, c],
//   mixed[b, l, k, c] = sum_k' M[b, l, k, k'] * x[b, c, pos(l, k')]      (full M)
//                     = M[b, l, k] * x[b, c, pos(l, k)]                   (diagonal M)
//
// where pos(l, k) is the input pixel that tap k of output location l reads (stride, padding,
// dilation as F.conv2d). The torch path (ops/torch_paths.py) builds the whole tap stack
// (B, C, HV, L) in memory, multiplies it by M and contracts it: several passes over a tensor
// HV times the input. Here each image is processed in tiles of output locations whose mixed
// taps (tile x HV*C numbers) stay in cache: the mixing writes them once, one GEMM with the
// kernel (MKL through at::mm_out) contracts them. The input is read channels-last
// (B, H_pad, W_pad, C), so every tap's C channels are contiguous and the mixing loops run
// along C. The backward recomputes the mixed taps per tile instead of storing them.
//
// Threads: the forward runs its (image, tile) pairs in parallel, the backward its images
// (at::parallel_for; this file is compiled with -fopenmp, without which at::parallel_for's
// inline OpenMP loop would run on one thread). The GEMMs inside a parallel region run on
// their thread alone (MKL does not nest inside an OpenMP region). The weight gradient is
// accumulated per chunk of images and the chunks are summed in image order; there are no
// atomics, so results do not depend on timing.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

namespace {

struct Geometry {
  int64_t batch, channels, height, width;  // input
  int64_t out_channels, kh, kw, taps;      // kernel
  int64_t h_out, w_out, locations;         // output
  int64_t sh, sw, ph, pw, dh, dw;          // stride, padding, dilation
  int64_t h_pad, w_pad;                    // padded input
  bool diagonal;
};

// Output locations per tile: the tile's mixed taps (tile * HV * C numbers) about 256 KiB.
int64_t tile_locations(const Geometry& g, int64_t element_size) {
  const int64_t row_bytes = g.taps * g.channels * element_size;
  const int64_t tile = (256 * 1024) / std::max<int64_t>(row_bytes, 1);
  return std::min(g.locations, std::max<int64_t>(tile, 16));
}

Geometry make_geometry(
    const at::Tensor& x,
    const at::Tensor& weight,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    bool diagonal) {
  TORCH_CHECK(x.dim() == 4, "x must be (B, C, H, W)");
  TORCH_CHECK(weight.dim() == 4, "weight must be (O, C, kh, kw)");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "stride, padding and dilation must be pairs");
  Geometry g{};
  g.batch = x.size(0);
  g.channels = x.size(1);
  g.height = x.size(2);
  g.width = x.size(3);
  g.out_channels = weight.size(0);
  g.kh = weight.size(2);
  g.kw = weight.size(3);
  g.taps = g.kh * g.kw;
  g.sh = stride[0];
  g.sw = stride[1];
  g.ph = padding[0];
  g.pw = padding[1];
  g.dh = dilation[0];
  g.dw = dilation[1];
  g.h_pad = g.height + 2 * g.ph;
  g.w_pad = g.width + 2 * g.pw;
  g.h_out = (g.h_pad - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.w_out = (g.w_pad - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  g.locations = g.h_out * g.w_out;
  g.diagonal = diagonal;
  TORCH_CHECK(weight.size(1) == g.channels, "weight has ", weight.size(1),
              " input channels, x has ", g.channels);
  TORCH_CHECK(g.h_out > 0 && g.w_out > 0, "empty output map");
  return g;
}

// The input zero-padded and channels-last: (B, H_pad, W_pad, C), contiguous.
at::Tensor padded_channels_last(const at::Tensor& x, const Geometry& g) {
  return at::constant_pad_nd(x, {g.pw, g.pw, g.ph, g.ph}).permute({0, 2, 3, 1}).contiguous();
}

// The kernel with its taps before its channels: (O, HV * C), index k * C + c.
at::Tensor taps_major_weight(const at::Tensor& weight, const Geometry& g) {
  return weight.permute({0, 2, 3, 1}).reshape({g.out_channels, g.taps * g.channels}).contiguous();
}

// Pointers to the C channels that each tap of location l reads (channels-last padded image).
template <typename scalar_t>
inline void tap_sources(const scalar_t* image, const Geometry& g, int64_t l,
                        const scalar_t** sources) {
  const int64_t oh = l / g.w_out, ow = l % g.w_out;
  for (int64_t i = 0; i < g.kh; ++i) {
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t row = oh * g.sh + i * g.dh, col = ow * g.sw + j * g.dw;
      sources[i * g.kw + j] = image + (row * g.w_pad + col) * g.channels;
    }
  }
}

template <typename scalar_t>
inline void tap_targets(scalar_t* image, const Geometry& g, int64_t l, scalar_t** targets) {
  tap_sources<scalar_t>(image, g, l, const_cast<const scalar_t**>(targets));
}

// The inner loops run along the C channels of one tap (contiguous in the channels-last
// input), one 64-byte vector at a time (16 floats / 8 doubles: a 512-bit register where
// the CPU has one; the compiler splits it elsewhere), through GCC/Clang vector extensions so
// that the width does not depend on what the auto-vectoriser chooses. No sum is reassociated
// across channels: every channel's result adds its terms in the same order as a naive loop.
template <typename scalar_t>
struct Lanes {
  static constexpr int64_t kWidth = 64 / sizeof(scalar_t);
  typedef scalar_t Vec __attribute__((vector_size(64)));
};

template <typename V, typename scalar_t>
inline V load(const scalar_t* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename scalar_t>
inline void store(scalar_t* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// dst[d][c] (+)= sum_s coef(d, s) * src[s][c] for d < kOutputs, s < n, c < C, with
// coef(d, s) = m[d * d_stride + s * s_stride]. Each source block
// is loaded once and feeds every output's accumulator (kept in registers). Per (d, c) the
// terms are added for ascending s, from zero or from dst.
template <typename scalar_t, int64_t kOutputs, bool kAccumulate>
inline void combine(scalar_t* const* dst, const scalar_t* const* src, const scalar_t* m,
                    int64_t d_stride, int64_t s_stride, int64_t n, int64_t C) {
  using V = typename Lanes<scalar_t>::Vec;
  constexpr int64_t W = Lanes<scalar_t>::kWidth;
  int64_t c0 = 0;
  for (; c0 + W <= C; c0 += W) {
    V acc[kOutputs];
    for (int64_t d = 0; d < kOutputs; ++d) acc[d] = kAccumulate ? load<V>(dst[d] + c0) : V{};
    for (int64_t q = 0; q < n; ++q) {
      const V block = load<V>(src[q] + c0);
      for (int64_t d = 0; d < kOutputs; ++d) acc[d] += m[d * d_stride + q * s_stride] * block;
    }
    for (int64_t d = 0; d < kOutputs; ++d) store(dst[d] + c0, acc[d]);
  }
  for (; c0 < C; ++c0) {
    for (int64_t d = 0; d < kOutputs; ++d) {
      scalar_t total = kAccumulate ? dst[d][c0] : scalar_t(0);
      for (int64_t q = 0; q < n; ++q) total += m[d * d_stride + q * s_stride] * src[q][c0];
      dst[d][c0] = total;
    }
  }
}

// The sum of a vector's lanes by a fixed pairwise tree: halves added as vectors down to 16
// bytes (the compiler keeps this in registers), then the last lanes pairwise.
template <typename scalar_t, int64_t kBytes>
inline scalar_t lane_sum(const scalar_t* lanes) {
  if constexpr (kBytes <= 16) {
    constexpr int64_t n = kBytes / sizeof(scalar_t);
    scalar_t part[n];
    std::memcpy(part, lanes, kBytes);
    for (int64_t width = n / 2; width >= 1; width /= 2) {
      for (int64_t j = 0; j < width; ++j) part[j] += part[j + width];
    }
    return part[0];
  } else {
    typedef scalar_t Half __attribute__((vector_size(kBytes / 2)));
    Half low, high;
    std::memcpy(&low, lanes, kBytes / 2);
    std::memcpy(&high, lanes + kBytes / 2 / sizeof(scalar_t), kBytes / 2);
    const Half sum = low + high;
    scalar_t out[kBytes / 2 / sizeof(scalar_t)];
    std::memcpy(out, &sum, kBytes / 2);
    return lane_sum<scalar_t, kBytes / 2>(out);
  }
}

// sum_c a[c] * b[c]: one vector of partial sums, then lane_sum (the same order on every
// call; a serial 16-term sum would make the 81 dot products of a 3x3 full-form location
// latency-bound), then the remainder.
template <typename scalar_t>
inline scalar_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  using V = typename Lanes<scalar_t>::Vec;
  constexpr int64_t W = Lanes<scalar_t>::kWidth;
  V acc{};
  int64_t c = 0;
  for (; c + W <= n; c += W) acc += load<V>(a + c) * load<V>(b + c);
  scalar_t lanes[W];
  store(lanes, acc);
  scalar_t total = lane_sum<scalar_t, sizeof(V)>(lanes);
  for (; c < n; ++c) total += a[c] * b[c];
  return total;
}

// mixed[t, k, c] for the locations l0 .. l0 + count of one image.
template <typename scalar_t>
void mix_tile(const scalar_t* image, const scalar_t* m_image, const Geometry& g, int64_t l0,
              int64_t count, scalar_t* mixed, std::vector<const scalar_t*>& sources) {
  const int64_t C = g.channels, HV = g.taps;
  for (int64_t t = 0; t < count; ++t) {
    const int64_t l = l0 + t;
    tap_sources<scalar_t>(image, g, l, sources.data());
    scalar_t* row = mixed + t * HV * C;
    if (g.diagonal) {  // mixed[k] = M[k] * x[pos(k)]
      const scalar_t* m = m_image + l * HV;
      for (int64_t k = 0; k < HV; ++k) {
        scalar_t* out = row + k * C;
        combine<scalar_t, 1, false>(&out, &sources[k], m + k, 0, 0, 1, C);
      }
    } else if (HV == 9) {  // 3x3 kernels: all nine outputs per pass over the nine sources
      scalar_t* outputs[9];
      for (int64_t k = 0; k < 9; ++k) outputs[k] = row + k * C;
      combine<scalar_t, 9, false>(outputs, sources.data(), m_image + l * 81, 9, 1, 9, C);
    } else {  // mixed[k] = sum_k' M[k, k'] x[pos(k')]
      const scalar_t* m = m_image + l * HV * HV;
      for (int64_t k = 0; k < HV; ++k) {
        scalar_t* out = row + k * C;
        combine<scalar_t, 1, false>(&out, sources.data(), m + k * HV, 0, 1, HV, C);
      }
    }
  }
}

// Given grad_mixed[t, k, c] of a tile: grad_M for its locations and grad_x (padded,
// channels-last) accumulated for the pixels they read.
template <typename scalar_t>
void unmix_tile(const scalar_t* image, const scalar_t* m_image, const Geometry& g, int64_t l0,
                int64_t count, const scalar_t* grad_mixed, scalar_t* grad_m_image,
                scalar_t* grad_image, std::vector<const scalar_t*>& sources,
                std::vector<scalar_t*>& targets, std::vector<const scalar_t*>& grad_rows) {
  const int64_t C = g.channels, HV = g.taps;
  for (int64_t t = 0; t < count; ++t) {
    const int64_t l = l0 + t;
    tap_sources<scalar_t>(image, g, l, sources.data());
    tap_targets<scalar_t>(grad_image, g, l, targets.data());
    const scalar_t* grow = grad_mixed + t * HV * C;
    for (int64_t k = 0; k < HV; ++k) grad_rows[k] = grow + k * C;
    if (g.diagonal) {
      const scalar_t* m = m_image + l * HV;
      scalar_t* gm = grad_m_image + l * HV;
      for (int64_t k = 0; k < HV; ++k) {
        gm[k] = dot<scalar_t>(grad_rows[k], sources[k], C);
        // grad_x[pos(k)] += M[k] * grad_mixed[k]
        combine<scalar_t, 1, true>(&targets[k], &grad_rows[k], m + k, 0, 0, 1, C);
      }
    } else {
      const scalar_t* m = m_image + l * HV * HV;
      scalar_t* gm = grad_m_image + l * HV * HV;
      for (int64_t k = 0; k < HV; ++k) {
        for (int64_t q = 0; q < HV; ++q) gm[k * HV + q] = dot<scalar_t>(grad_rows[k], sources[q], C);
      }
      // grad_x[pos(q)] += sum_k M[k, q] * grad_mixed[k]
      if (HV == 9) {
        combine<scalar_t, 9, true>(targets.data(), grad_rows.data(), m, 1, 9, 9, C);
      } else {
        for (int64_t q = 0; q < HV; ++q) {
          combine<scalar_t, 1, true>(&targets[q], grad_rows.data(), m + q, 0, HV, HV, C);
        }
      }
    }
  }
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& M,
                  const Geometry& g) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && M.device().is_cpu(),
              "location_cpu: tensors must be on the CPU");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && M.scalar_type() == x.scalar_type(),
              "location_cpu: x, weight and M must share one dtype");
  const std::vector<int64_t> expected =
      g.diagonal ? std::vector<int64_t>{g.batch, g.h_out, g.w_out, g.taps}
                 : std::vector<int64_t>{g.batch, g.h_out, g.w_out, g.taps, g.taps};
  TORCH_CHECK(M.sizes() == at::IntArrayRef(expected), "location_cpu: M has shape ", M.sizes(),
              ", expected ", at::IntArrayRef(expected));
}

}  // namespace

at::Tensor location_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& M,
                            at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, bool diagonal) {
  const Geometry g = make_geometry(x, weight, stride, padding, dilation, diagonal);
  check_inputs(x, weight, M, g);
  const at::Tensor image_cl = padded_channels_last(x, g);
  const at::Tensor w_taps = taps_major_weight(weight, g);
  const at::Tensor m = M.contiguous();
  at::Tensor out = at::empty({g.batch, g.out_channels, g.h_out, g.w_out}, x.options());
  const int64_t tile = tile_locations(g, x.element_size());
  const int64_t row = g.taps * g.channels;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "location_forward_cpu", [&] {
    const scalar_t* image_data = image_cl.data_ptr<scalar_t>();
    const scalar_t* m_data = m.data_ptr<scalar_t>();
    const int64_t image_numel = g.h_pad * g.w_pad * g.channels;
    const int64_t m_numel = g.locations * (diagonal ? g.taps : g.taps * g.taps);
    // Every (image, tile) pair writes its own output columns: they run in parallel, so a
    // small batch (one image at inference) still uses every thread.
    const int64_t tiles = (g.locations + tile - 1) / tile;
    at::parallel_for(0, g.batch * tiles, 1, [&](int64_t begin, int64_t end) {
      // OpenMP's worker threads do not inherit the caller's dispatch state ("below autograd"
      // inside the custom op), and the ops here need none of the rest: set just that. (Not
      // the whole at::ThreadLocalState: it holds Python objects, e.g. saved-tensor hooks,
      // whose copy needs the GIL that the calling thread holds.)
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      at::Tensor mixed = at::empty({tile, row}, x.options());
      std::vector<const scalar_t*> sources(g.taps);
      for (int64_t job = begin; job < end; ++job) {
        const int64_t b = job / tiles, l0 = (job % tiles) * tile;
        const int64_t count = std::min(tile, g.locations - l0);
        mix_tile<scalar_t>(image_data + b * image_numel, m_data + b * m_numel, g, l0, count,
                           mixed.data_ptr<scalar_t>(), sources);
        // (O, count) columns of image b's (O, L) output, row stride L
        at::Tensor out_tile = out[b].view({g.out_channels, g.locations}).narrow(1, l0, count);
        at::mm_out(out_tile, w_taps, mixed.narrow(0, 0, count).t());
      }
    });
  });
  return out;
}

std::vector<at::Tensor> location_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                          const at::Tensor& weight, const at::Tensor& M,
                                          at::IntArrayRef stride, at::IntArrayRef padding,
                                          at::IntArrayRef dilation, bool diagonal) {
  const Geometry g = make_geometry(x, weight, stride, padding, dilation, diagonal);
  check_inputs(x, weight, M, g);
  TORCH_CHECK(grad_y.sizes() == at::IntArrayRef({g.batch, g.out_channels, g.h_out, g.w_out}),
              "location_cpu: grad_y has shape ", grad_y.sizes());
  const at::Tensor image_cl = padded_channels_last(x, g);
  const at::Tensor w_taps = taps_major_weight(weight, g);
  const at::Tensor m = M.contiguous();
  const at::Tensor gy = grad_y.to(x.scalar_type()).contiguous();
  at::Tensor grad_image = at::zeros_like(image_cl);
  at::Tensor grad_m = at::empty_like(m);
  const int64_t tile = tile_locations(g, x.element_size());
  const int64_t row = g.taps * g.channels;
  std::map<int64_t, at::Tensor> grad_w_chunks;  // first image of a chunk -> its sum
  std::mutex chunks_lock;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "location_backward_cpu", [&] {
    const scalar_t* image_data = image_cl.data_ptr<scalar_t>();
    const scalar_t* m_data = m.data_ptr<scalar_t>();
    scalar_t* grad_image_data = grad_image.data_ptr<scalar_t>();
    scalar_t* grad_m_data = grad_m.data_ptr<scalar_t>();
    const int64_t image_numel = g.h_pad * g.w_pad * g.channels;
    const int64_t m_numel = g.locations * (diagonal ? g.taps : g.taps * g.taps);
    at::parallel_for(0, g.batch, 1, [&](int64_t begin, int64_t end) {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in location_forward
      at::Tensor mixed = at::empty({tile, row}, x.options());
      at::Tensor grad_mixed = at::empty({tile, row}, x.options());
      at::Tensor grad_w = at::zeros({g.out_channels, row}, x.options());
      std::vector<const scalar_t*> sources(g.taps);
      std::vector<scalar_t*> targets(g.taps);
      std::vector<const scalar_t*> grad_rows(g.taps);
      for (int64_t b = begin; b < end; ++b) {
        const at::Tensor gy_b = gy[b].view({g.out_channels, g.locations});
        const scalar_t* image = image_data + b * image_numel;
        const scalar_t* m_image = m_data + b * m_numel;
        for (int64_t l0 = 0; l0 < g.locations; l0 += tile) {
          const int64_t count = std::min(tile, g.locations - l0);
          const at::Tensor gy_tile = gy_b.narrow(1, l0, count);  // (O, count)
          at::Tensor gm_tile = grad_mixed.narrow(0, 0, count);   // (count, HV * C)
          at::mm_out(gm_tile, gy_tile.t(), w_taps);
          mix_tile<scalar_t>(image, m_image, g, l0, count, mixed.data_ptr<scalar_t>(), sources);
          grad_w.addmm_(gy_tile, mixed.narrow(0, 0, count));
          unmix_tile<scalar_t>(image, m_image, g, l0, count, grad_mixed.data_ptr<scalar_t>(),
                               grad_m_data + b * m_numel, grad_image_data + b * image_numel,
                               sources, targets, grad_rows);
        }
      }
      std::lock_guard<std::mutex> guard(chunks_lock);
      grad_w_chunks.emplace(begin, grad_w);
    });
  });

  // Sum the chunks in image order (deterministic whatever thread ran which chunk).
  at::Tensor grad_w_taps;
  for (auto& entry : grad_w_chunks) {
    grad_w_taps = grad_w_taps.defined() ? grad_w_taps.add_(entry.second) : entry.second;
  }
  at::Tensor grad_weight = grad_w_taps.view({g.out_channels, g.kh, g.kw, g.channels})
                               .permute({0, 3, 1, 2})
                               .contiguous();
  at::Tensor grad_x = grad_image.narrow(1, g.ph, g.height)
                          .narrow(2, g.pw, g.width)
                          .permute({0, 3, 1, 2})
                          .contiguous();
  return {grad_x, grad_weight, grad_m};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "fewshot_nsl: per-location bilinear convolution on the CPU (fused per tile)";
  // The GIL is released while a kernel runs (it calls no Python).
  module.def("location_forward", &location_forward,
             "y = per-location bilinear conv (x, weight, M, stride, padding, dilation, diagonal)",
             pybind11::call_guard<pybind11::gil_scoped_release>());
  module.def("location_backward", &location_backward,
             "(grad_x, grad_weight, grad_M) of location_forward",
             pybind11::call_guard<pybind11::gil_scoped_release>());
}
