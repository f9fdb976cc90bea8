// chunked_sum: Σ f(begin, end) over the fixed-size chunks [k·grain, (k+1)·grain) of n values,
// one task per chunk, the chunks' results added in double in chunk order (the same total at
// any thread count). The whole-tensor reductions (reduce.cpp) and the sweeps that reduce as
// they convert (casts.cpp) share it.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace gradreg {

template <typename F>
double chunked_sum(int64_t n, int64_t grain, F f) {
  const int64_t chunks = (n + grain - 1) / grain;
  std::vector<double> part(static_cast<size_t>(chunks), 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) part[c] = f(c * grain, std::min(n, (c + 1) * grain));
  });
  double total = 0.0;
  for (double p : part) total += p;
  return total;
}

}  // namespace gradreg
