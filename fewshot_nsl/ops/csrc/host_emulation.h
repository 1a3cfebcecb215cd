// Test-only: compile bilinear_conv2d_kernels.cu with a host C++ compiler and run its kernels on
// the CPU, so that their indexing, tiling, split-K and shared-memory logic are checked against
// the float64 reference on machines without a GPU (tests/test_cuda.py).
//
//   g++ -std=c++20 -x c++ -include host_emulation.h bilinear_conv2d_kernels.cu ...
//
// Every CUDA thread of a block is a std::thread; __syncthreads() is a std::barrier; blocks run
// one after another, so __shared__ arrays become function-local statics (one copy, shared by
// the block's threads). Only what the kernels use is emulated (1-d blocks, no warp intrinsics).
// Not part of the extension build.
#pragma once

#ifdef __CUDACC__
#error "host_emulation.h is for compiling the kernels with a host compiler, not nvcc"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <barrier>
#include <thread>
#include <vector>

#undef __global__
#undef __device__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#undef threadIdx
#undef blockIdx
#undef blockDim
#undef gridDim
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

namespace fewshot_nsl_emulation {

inline thread_local uint3 thread_idx;
inline thread_local uint3 block_idx;
inline thread_local std::barrier<>* block_barrier = nullptr;
inline dim3 block_dim;  // written between launches only
inline dim3 grid_dim;

template <class Kernel, class... Args>
void launch(dim3 grid, dim3 block, Kernel kernel, Args... args) {
  grid_dim = grid;
  block_dim = block;
  const unsigned threads = block.x;  // the kernels use 1-d blocks
  std::barrier<> barrier(threads);
  std::vector<std::thread> pool;
  pool.reserve(threads);
  // One std::thread per CUDA thread, reused for every block; the barrier after each block
  // keeps the shared (static) arrays from being refilled while a thread still reads them.
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      thread_idx = uint3{t, 0, 0};
      block_barrier = &barrier;
      for (unsigned z = 0; z < grid.z; ++z) {
        for (unsigned y = 0; y < grid.y; ++y) {
          for (unsigned x = 0; x < grid.x; ++x) {
            block_idx = uint3{x, y, z};
            kernel(args...);
            barrier.arrive_and_wait();
          }
        }
      }
    });
  }
  for (auto& thread : pool) thread.join();
}

}  // namespace fewshot_nsl_emulation

#define threadIdx fewshot_nsl_emulation::thread_idx
#define blockIdx fewshot_nsl_emulation::block_idx
#define blockDim fewshot_nsl_emulation::block_dim
#define gridDim fewshot_nsl_emulation::grid_dim
#define __syncthreads() fewshot_nsl_emulation::block_barrier->arrive_and_wait()
#define cudaGetLastError() cudaSuccess
#define FEWSHOT_NSL_LAUNCH(kernel, grid, block, stream, ...) \
  fewshot_nsl_emulation::launch(grid, block, kernel, __VA_ARGS__)
