// Unit tests of csrc/multi_tensor_plan.h, compiled and run by tests/test_multi_tensor_plan.py.
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../multi_tensor_plan.h"

using fastamp::MultiTensorPlan;
using fastamp::plan_multi_tensor;

static int failures = 0;
#define EXPECT(cond)                                                                 \
  do {                                                                               \
    if (!(cond)) {                                                                   \
      std::fprintf(stderr, "%s:%d: EXPECT(%s) failed\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                                    \
    }                                                                                \
  } while (0)

// Every element of every tensor is covered exactly once, blocks are numbered in list order, and each
// launch respects its limits.
static void check_invariants(const std::vector<int64_t>& numels, int64_t chunk, int64_t max_t, int64_t max_b) {
  const MultiTensorPlan plan = plan_multi_tensor(numels, chunk, max_t, max_b);
  std::vector<std::vector<int>> seen(numels.size());
  for (size_t t = 0; t < numels.size(); ++t) {
    seen[t].assign(fastamp::ceil_div(numels[t], chunk), 0);
    EXPECT(plan.num_chunks[t] == fastamp::ceil_div(numels[t], chunk));
  }
  int64_t expected_block = 0;
  for (const auto& launch : plan.launches) {
    EXPECT(static_cast<int64_t>(launch.tensors.size()) <= max_t);
    EXPECT(static_cast<int64_t>(launch.block_slot.size()) <= max_b);
    EXPECT(!launch.block_slot.empty());
    EXPECT(launch.first_block == expected_block);
    for (size_t b = 0; b < launch.block_slot.size(); ++b) {
      const int32_t t = launch.tensors[launch.block_slot[b]];
      const int64_t c = launch.block_chunk[b];
      EXPECT(c >= 0 && c < static_cast<int64_t>(seen[t].size()));
      seen[t][c] += 1;
      EXPECT(plan.first_block[t] + c == expected_block);
      ++expected_block;
    }
  }
  EXPECT(plan.total_blocks == expected_block);
  for (const auto& s : seen)
    for (int v : s) EXPECT(v == 1);
}

int main() {
  // Sizes around the chunk boundary, empty tensors in every position.
  check_invariants({0}, 4, 3, 5);
  check_invariants({}, 4, 3, 5);
  check_invariants({1, 3, 4, 5, 0, 8, 9, 0}, 4, 3, 5);
  check_invariants({0, 0, 100, 0}, 4, 2, 3);
  // One launch's worth exactly, and one more.
  check_invariants({16, 16}, 4, 2, 8);
  check_invariants({16, 16, 1}, 4, 2, 8);
  // Hundreds of small tensors force many launches by the tensor limit.
  std::vector<int64_t> many(1000, 3);
  check_invariants(many, 4, 7, 1000);
  // A tensor larger than 2^31 elements: 64-bit chunk indices.
  const int64_t huge = (int64_t(1) << 31) + 5;
  check_invariants({huge}, int64_t(1) << 20, 4, 300);
  {
    const MultiTensorPlan plan = plan_multi_tensor({huge}, 65536, 110, 320);
    EXPECT(plan.total_blocks == fastamp::ceil_div(huge, 65536));
    EXPECT(plan.launches.back().block_chunk.back() == plan.total_blocks - 1);
  }
  // A tensor split across launches appears in each.
  {
    const MultiTensorPlan plan = plan_multi_tensor({40}, 4, 3, 4);
    EXPECT(plan.launches.size() == 3);
    for (const auto& launch : plan.launches) EXPECT(launch.tensors.size() == 1 && launch.tensors[0] == 0);
  }
  // Unlimited capacity (the CPU path): one launch.
  {
    const MultiTensorPlan plan = plan_multi_tensor({5, 0, 7}, 4, INT64_MAX, INT64_MAX);
    EXPECT(plan.launches.size() == 1);
    EXPECT(plan.launches[0].tensors.size() == 2);
    EXPECT(plan.first_block[2] == 2);
    EXPECT(plan.num_chunks[1] == 0);
  }
  // Bad arguments are refused.
  bool threw = false;
  try {
    plan_multi_tensor({1}, 0, 1, 1);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  EXPECT(threw);
  threw = false;
  try {
    plan_multi_tensor({-1}, 4, 1, 1);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  EXPECT(threw);

  if (failures) {
    std::fprintf(stderr, "%d expectation(s) failed\n", failures);
    return 1;
  }
  std::printf("multi_tensor_plan: all checks passed\n");
  return 0;
}
