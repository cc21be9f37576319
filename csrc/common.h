// Shared helpers of the emalora_fast._C CPU ops.
#pragma once

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

namespace emalora_fast {

// Elements per chunk of the CPU loops: small enough to stay in L1 between the two looks a chunk
// gets (a finiteness scan, then the update), large enough to amortize the loop overhead.
constexpr int64_t kChunk = 1024;

// Grain of at::parallel_for over flat element ranges.
constexpr int64_t kGrain = 1 << 15;

// True when every x[i] is finite. x * 0 is 0 for finite x and NaN for inf/NaN, so the sum is 0
// exactly when all are finite; the simd reduction keeps the loop vectorized.
template <typename T>
inline bool all_finite(const T* x, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) {
    acc += static_cast<float>(x[i]) * 0.f;
  }
  return acc == 0.f;
}

}  // namespace emalora_fast
