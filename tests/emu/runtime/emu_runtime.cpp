// The CUDA-semantics runtime of tests/emu (see emu_runtime.h for the model). One mutex per block
// orders every barrier and collective; a thread that waits is counted, so that the moment every live
// thread waits and none can be released is seen at once and reported as a deadlock.
#include "emu_runtime.h"

#include <algorithm>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <stdexcept>
#include <thread>
#include <vector>

thread_local uint3 emu_thread_idx;
thread_local uint3 emu_block_idx;
thread_local dim3 emu_block_dim;
thread_local dim3 emu_grid_dim;

namespace emu {
namespace {

// Thrown into a thread's kernel to unwind it once its launch has failed.
struct Abort {};

struct Site {
  const char* file = nullptr;
  int line = 0;
  bool operator==(const Site& o) const { return line == o.line && std::strcmp(file, o.file) == 0; }
  bool operator!=(const Site& o) const { return !(*this == o); }
};

std::string where(const Site& s) {
  const char* slash = std::strrchr(s.file, '/');
  return std::string(slash != nullptr ? slash + 1 : s.file) + ":" + std::to_string(s.line);
}

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kShflDown: return "__shfl_down_sync";
    case WarpOp::kShflUp: return "__shfl_up_sync";
    case WarpOp::kShflXor: return "__shfl_xor_sync";
    case WarpOp::kShfl: return "__shfl_sync";
    case WarpOp::kBallot: return "__ballot_sync";
    case WarpOp::kSyncwarp: return "__syncwarp";
  }
  return "?";
}

std::string hex(unsigned mask) {
  std::ostringstream s;
  s << "0x" << std::hex << mask;
  return s.str();
}

struct WarpCollective {
  bool open = false;
  WarpOp op = WarpOp::kSyncwarp;
  Site site;
  unsigned mask = 0;
  int width = 32;
  unsigned arrived = 0;
  uint64_t generation = 0;
  uint64_t values[32] = {};
  int args[32] = {};
  uint64_t results[32] = {};
  std::condition_variable released;
};

struct Block {
  std::mutex mu;
  std::condition_variable released;  // __syncthreads and the end of a block
  int threads = 0;
  int live = 0;     // threads that have not returned from the kernel for this block
  int blocked = 0;  // live threads waiting in a barrier or a collective, not yet released
  std::vector<char> exited;
  std::vector<std::string> waiting_at;
  Site barrier_site;
  int barrier_arrived = 0;
  uint64_t barrier_generation = 0;
  int ended = 0;
  uint64_t end_generation = 0;
  std::vector<std::unique_ptr<WarpCollective>> warps;
  bool failed = false;
  std::string error;
};

// The OS threads that play CUDA threads, kept between launches (creating 1,024 threads per launch
// would cost more than most emulated kernels). Worker i runs CUDA thread i of every launch.
class ThreadPool {
 public:
  ~ThreadPool() {
    for (auto& w : workers_) {
      {
        std::lock_guard<std::mutex> lock(w->mu);
        w->stop = true;
      }
      w->wake.notify_one();
    }
    for (auto& w : workers_) w->thread.join();
  }

  // Runs job(i) for i in [0, n) on n workers at once; returns when all have finished.
  void run(int n, const std::function<void(int)>& job) {
    while (static_cast<int>(workers_.size()) < n) {
      workers_.push_back(std::make_unique<Worker>());
      Worker* w = workers_.back().get();
      w->thread = std::thread([this, w] { serve(*w); });
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      remaining_ = n;
    }
    for (int i = 0; i < n; ++i) {
      Worker& w = *workers_[i];
      {
        std::lock_guard<std::mutex> lock(w.mu);
        w.job = &job;
        w.index = i;
      }
      w.wake.notify_one();
    }
    std::unique_lock<std::mutex> lock(mu_);
    finished_.wait(lock, [&] { return remaining_ == 0; });
  }

 private:
  struct Worker {
    std::mutex mu;
    std::condition_variable wake;
    const std::function<void(int)>* job = nullptr;
    int index = 0;
    bool stop = false;
    std::thread thread;
  };

  void serve(Worker& w) {
    for (;;) {
      const std::function<void(int)>* job;
      int index;
      {
        std::unique_lock<std::mutex> lock(w.mu);
        w.wake.wait(lock, [&] { return w.job != nullptr || w.stop; });
        if (w.stop) return;
        job = w.job;
        index = w.index;
        w.job = nullptr;
      }
      (*job)(index);
      std::lock_guard<std::mutex> lock(mu_);
      if (--remaining_ == 0) finished_.notify_one();
    }
  }

  std::vector<std::unique_ptr<Worker>> workers_;
  std::mutex mu_;
  std::condition_variable finished_;
  int remaining_ = 0;
};

thread_local Block* tl_block = nullptr;
thread_local int tl_thread = 0;

std::mutex g_launch_mu;
std::string g_last_error;
std::vector<std::string> g_launches;
unsigned g_block_order_seed = 0;

// Records the launch's first error, releases every waiting thread, and unwinds this one.
[[noreturn]] void fail(Block& b, const std::string& message) {
  if (!b.failed) {
    b.failed = true;
    b.error = message;
    b.released.notify_all();
    for (auto& w : b.warps) w->released.notify_all();
  }
  throw Abort();
}

std::string thread_name(int t) {
  return "thread " + std::to_string(t) + " (warp " + std::to_string(t / 32) + ", lane " + std::to_string(t % 32) + ")";
}

std::string ranges(const std::vector<int>& ids) {
  std::ostringstream s;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (i > 0) s << ",";
    s << ids[i];
    if (j > i) s << "-" << ids[j];
    i = j + 1;
  }
  return s.str();
}

void check_deadlock(Block& b) {
  if (b.live == 0 || b.blocked < b.live) return;
  std::map<std::string, std::vector<int>> by_site;
  for (int t = 0; t < b.threads; ++t)
    if (!b.exited[t] && !b.waiting_at[t].empty()) by_site[b.waiting_at[t]].push_back(t);
  std::ostringstream s;
  s << "deadlock: every live thread waits and none can be released:";
  for (const auto& [site, ids] : by_site) s << " threads " << ranges(ids) << " at " << site << ";";
  fail(b, s.str());
}

// Waits (counted as blocked) until `done`; whoever releases the waiters uncounts them.
template <typename Done>
void wait(Block& b, std::unique_lock<std::mutex>& lock, std::condition_variable& cv, const std::string& what,
          Done done) {
  b.blocked += 1;
  b.waiting_at[tl_thread] = what;
  check_deadlock(b);
  cv.wait(lock, [&] { return done() || b.failed; });
  if (b.failed) throw Abort();
  b.waiting_at[tl_thread].clear();
}

int source_lane(WarpOp op, int lane, int arg, int width) {
  const int segment = lane & ~(width - 1);
  switch (op) {
    case WarpOp::kShflDown: return (lane & (width - 1)) + arg >= width ? lane : lane + arg;
    case WarpOp::kShflUp: return (lane & (width - 1)) - arg < 0 ? lane : lane - arg;
    case WarpOp::kShflXor: {
      const int src = lane ^ arg;
      return (src < 0 || src >= segment + width) ? lane : src;
    }
    case WarpOp::kShfl: return segment + (arg & (width - 1));
    default: return lane;
  }
}

// A thread returns from the kernel: nobody may be waiting for it.
void thread_exits(Block& b) {
  const int lane = tl_thread % 32;
  WarpCollective& w = *b.warps[tl_thread / 32];
  if (w.open && ((w.mask >> lane) & 1u) && !((w.arrived >> lane) & 1u))
    fail(b, thread_name(tl_thread) + " returned while its warp waits for it at " + op_name(w.op) + " (" +
                where(w.site) + ", mask " + hex(w.mask) + ")");
  if (b.barrier_arrived > 0)
    fail(b, thread_name(tl_thread) + " returned while " + std::to_string(b.barrier_arrived) +
                " threads wait at __syncthreads (" + where(b.barrier_site) + ")");
  b.exited[tl_thread] = 1;
  b.live -= 1;
  check_deadlock(b);
}

// Every thread of the block has returned: the next block starts from a clean state.
bool block_ends(Block& b, std::unique_lock<std::mutex>& lock) {
  b.ended += 1;
  if (b.ended == b.threads) {
    b.ended = 0;
    b.live = b.threads;
    b.blocked = 0;
    std::fill(b.exited.begin(), b.exited.end(), 0);
    b.end_generation += 1;
    b.released.notify_all();
    return true;
  }
  const uint64_t generation = b.end_generation;
  b.released.wait(lock, [&] { return b.end_generation != generation || b.failed; });
  return !b.failed;
}

std::string invalid_shape(dim3 grid, dim3 block, size_t shared_bytes, size_t param_bytes) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  std::ostringstream s;
  if (block.x == 0 || block.y == 0 || block.z == 0 || grid.x == 0 || grid.y == 0 || grid.z == 0)
    s << "invalid configuration argument: a zero grid or block dimension";
  else if (threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64)
    s << "invalid configuration argument: " << threads << " threads per block (" << block.x << "x" << block.y << "x"
      << block.z << "; the limit is 1024, and 1024x1024x64 per dimension)";
  else if (grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
    s << "invalid configuration argument: grid " << grid.x << "x" << grid.y << "x" << grid.z;
  else if (shared_bytes > 48 * 1024)
    s << "invalid configuration argument: " << shared_bytes << " bytes of dynamic shared memory (limit 49152)";
  else if (param_bytes > EMU_MAX_PARAM_BYTES)
    s << "too many resources requested for launch: " << param_bytes << " bytes of kernel parameters (the limit is "
      << EMU_MAX_PARAM_BYTES << ")";
  return s.str();
}

}  // namespace

uint64_t warp_collective(const char* file, int line, WarpOp op, unsigned mask, uint64_t value, int arg, int width) {
  Block& b = *tl_block;
  const Site site{file, line};
  const int lane = tl_thread % 32;
  const int warp = tl_thread / 32;
  std::unique_lock<std::mutex> lock(b.mu);
  if (b.failed) throw Abort();
  const std::string call = std::string(op_name(op)) + " (" + where(site) + ", mask " + hex(mask) + ")";
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    fail(b, thread_name(tl_thread) + " calls " + call + " with width " + std::to_string(width) +
                ", which is not a power of 2 up to 32");
  if (!((mask >> lane) & 1u))
    fail(b, thread_name(tl_thread) + " calls " + call + ", whose mask leaves out its own lane");
  const int lanes_here = std::min(32, b.threads - warp * 32);
  const unsigned existing = lanes_here == 32 ? 0xffffffffu : ((1u << lanes_here) - 1u);
  if (mask & ~existing)
    fail(b, thread_name(tl_thread) + " calls " + call + ", whose mask names lanes this warp does not have (block of " +
                std::to_string(b.threads) + " threads)");
  for (int l = 0; l < 32; ++l)
    if (((mask >> l) & 1u) && b.exited[warp * 32 + l])
      fail(b, thread_name(tl_thread) + " calls " + call + ", but lane " + std::to_string(l) +
                  " of its warp has already returned from the kernel");
  WarpCollective& w = *b.warps[warp];
  if (!w.open) {
    w.open = true;
    w.op = op;
    w.site = site;
    w.mask = mask;
    w.width = width;
    w.arrived = 0;
  } else if (w.op != op || w.site != site || w.mask != mask || w.width != width) {
    fail(b, "divergent warp operations: " + thread_name(tl_thread) + " calls " + call + " while lanes " +
                hex(w.arrived) + " of its warp wait at " + op_name(w.op) + " (" + where(w.site) + ", mask " +
                hex(w.mask) + ")");
  }
  w.values[lane] = value;
  w.args[lane] = arg;
  w.arrived |= 1u << lane;
  if (w.arrived == w.mask) {
    unsigned ballot = 0;
    for (int l = 0; l < 32; ++l)
      if (((w.mask >> l) & 1u) && w.values[l] != 0) ballot |= 1u << l;
    for (int l = 0; l < 32; ++l) {
      if (!((w.mask >> l) & 1u)) continue;
      if (op == WarpOp::kBallot) {
        w.results[l] = ballot;
      } else if (op == WarpOp::kSyncwarp) {
        w.results[l] = 0;
      } else {
        const int src = source_lane(op, l, w.args[l], width);
        if (!((w.mask >> src) & 1u))
          fail(b, "lane " + std::to_string(l) + " of warp " + std::to_string(warp) + " reads lane " +
                      std::to_string(src) + " at " + call + ", outside the mask (undefined on a GPU)");
        w.results[l] = w.values[src];
      }
    }
    w.open = false;
    w.generation += 1;
    b.blocked -= __builtin_popcount(w.mask) - 1;
    w.released.notify_all();
    return w.results[lane];
  }
  const uint64_t generation = w.generation;
  wait(b, lock, w.released, std::string(op_name(op)) + " (" + where(site) + ")",
       [&] { return w.generation != generation; });
  return w.results[lane];
}

void syncthreads(const char* file, int line) {
  Block& b = *tl_block;
  const Site site{file, line};
  std::unique_lock<std::mutex> lock(b.mu);
  if (b.failed) throw Abort();
  if (b.live < b.threads) {
    std::vector<int> gone;
    for (int t = 0; t < b.threads; ++t)
      if (b.exited[t]) gone.push_back(t);
    fail(b, thread_name(tl_thread) + " reaches __syncthreads (" + where(site) + ") after threads " + ranges(gone) +
                " returned from the kernel: a barrier in divergent code");
  }
  if (b.barrier_arrived == 0) {
    b.barrier_site = site;
  } else if (b.barrier_site != site) {
    fail(b, "divergent __syncthreads: " + thread_name(tl_thread) + " at " + where(site) + " while " +
                std::to_string(b.barrier_arrived) + " threads wait at " + where(b.barrier_site));
  }
  b.barrier_arrived += 1;
  if (b.barrier_arrived == b.live) {
    b.barrier_arrived = 0;
    b.barrier_generation += 1;
    b.blocked -= b.live - 1;
    b.released.notify_all();
    return;
  }
  const uint64_t generation = b.barrier_generation;
  wait(b, lock, b.released, "__syncthreads (" + where(site) + ")", [&] { return b.barrier_generation != generation; });
}

void launch(const char* kernel, const char* file, int line, dim3 grid, dim3 block, size_t shared_bytes,
            size_t param_bytes, const std::function<void()>& body) {
  const std::string name = std::string(kernel) + " (" + where(Site{file, line}) + ")";
  std::unique_lock<std::mutex> launch_lock(g_launch_mu);
  g_launches.push_back(kernel);
  const std::string shape_error = invalid_shape(grid, block, shared_bytes, param_bytes);
  if (!shape_error.empty()) {
    if (g_last_error.empty()) g_last_error = "launch of " + name + ": " + shape_error;
    return;
  }
  Block b;
  b.threads = static_cast<int>(block.x * block.y * block.z);
  b.live = b.threads;
  b.exited.assign(b.threads, 0);
  b.waiting_at.assign(b.threads, "");
  for (int w = 0; w < (b.threads + 31) / 32; ++w) b.warps.push_back(std::make_unique<WarpCollective>());
  std::vector<uint64_t> order(uint64_t(grid.x) * grid.y * grid.z);
  std::iota(order.begin(), order.end(), uint64_t(0));
  if (g_block_order_seed != 0) std::shuffle(order.begin(), order.end(), std::mt19937(g_block_order_seed));

  static ThreadPool pool;
  pool.run(b.threads, [&](int t) {
    tl_block = &b;
    tl_thread = t;
    emu_thread_idx = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
    emu_block_dim = block;
    emu_grid_dim = grid;
    for (uint64_t id : order) {
      emu_block_idx = uint3{static_cast<unsigned>(id % grid.x), static_cast<unsigned>((id / grid.x) % grid.y),
                            static_cast<unsigned>(id / (uint64_t(grid.x) * grid.y))};
      try {
        body();
        std::unique_lock<std::mutex> lock(b.mu);
        if (b.failed) return;
        thread_exits(b);
        if (!block_ends(b, lock)) return;
      } catch (const Abort&) {
        return;
      } catch (const std::exception& e) {
        std::unique_lock<std::mutex> lock(b.mu);
        try {
          fail(b, thread_name(t) + " threw: " + e.what());
        } catch (const Abort&) {
        }
        return;
      }
    }
  });
  if (b.failed && g_last_error.empty()) g_last_error = "launch of " + name + ": " + b.error;
}

void check_last_launch(const char* file, int line) {
  std::string error;
  {
    std::lock_guard<std::mutex> lock(g_launch_mu);
    error.swap(g_last_error);
  }
  if (!error.empty())
    throw std::runtime_error("CUDA error (emulated): " + error + " [checked at " + where(Site{file, line}) + "]");
}

}  // namespace emu

// Introspection for the tests, through ctypes.
extern "C" {

int emu_launch_count() {
  std::lock_guard<std::mutex> lock(emu::g_launch_mu);
  return static_cast<int>(emu::g_launches.size());
}

// The kernels launched since the last reset, one name per line, into buf (truncated to size).
int emu_launch_names(char* buf, int size) {
  std::lock_guard<std::mutex> lock(emu::g_launch_mu);
  std::string all;
  for (const std::string& n : emu::g_launches) all += n + "\n";
  if (size > 0) {
    std::strncpy(buf, all.c_str(), size - 1);
    buf[size - 1] = '\0';
  }
  return static_cast<int>(all.size());
}

void emu_reset_launches() {
  std::lock_guard<std::mutex> lock(emu::g_launch_mu);
  emu::g_launches.clear();
  emu::g_last_error.clear();
}

// 0: blocks run in grid order; otherwise a permutation drawn from this seed.
void emu_set_block_order_seed(unsigned seed) {
  std::lock_guard<std::mutex> lock(emu::g_launch_mu);
  emu::g_block_order_seed = seed;
}
}
