// Shared helpers of the emalora_fast._C CPU ops.
#pragma once

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

namespace emalora_fast {

// Elements per chunk of the CPU loops: small enough to stay in L1 between the passes a chunk
// gets, large enough to amortize the loop overhead.
constexpr int64_t kChunk = 1024;

// Grain of at::parallel_for over flat element ranges.
constexpr int64_t kGrain = 1 << 15;

}  // namespace emalora_fast
