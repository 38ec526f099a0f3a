#include "runtime/bandwidth.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>

#include "runtime/node_buffer.h"
#include "runtime/thread_pool.h"

namespace ktinject {
namespace {

// Each worker XORs its slice 8 bytes at a time in four independent chains (enough loads in flight to
// saturate the memory bus); the sink keeps the compiler from dropping the reads.
class ReadJob : public Job {
 public:
  ReadJob(const uint8_t* data, size_t bytes, int workers) : data_(data), bytes_(bytes), workers_(workers) {}
  void run(int node, int local) override {
    (void)node;
    const int index = index_.fetch_add(1);
    const size_t chunk = bytes_ / workers_ / 64 * 64;
    const uint64_t* p = reinterpret_cast<const uint64_t*>(data_ + index * chunk);
    uint64_t a = 0, b = 0, c = 0, d = 0;
    for (size_t i = 0; i + 4 <= chunk / 8; i += 4) {
      a ^= p[i];
      b ^= p[i + 1];
      c ^= p[i + 2];
      d ^= p[i + 3];
    }
    sink_.fetch_xor((a ^ b ^ c ^ d) + static_cast<uint64_t>(local));
  }

 private:
  const uint8_t* data_;
  size_t bytes_;
  int workers_;
  std::atomic<int> index_{0};
  std::atomic<uint64_t> sink_{0};
};

}  // namespace

double measure_read_bandwidth(size_t bytes, int threads, int repeats) {
  auto pool = ThreadPool::get(choose_layout(threads, 0));
  NodeBuffer buf(bytes, -1);
  std::memset(buf.data(), 1, bytes);
  double best = 0;
  for (int r = 0; r < repeats; ++r) {
    ReadJob job(buf.data(), bytes, pool->threads());
    const auto t0 = std::chrono::steady_clock::now();
    pool->wait(pool->start(&job));
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, static_cast<double>(bytes) / s / 1e9);
  }
  return best;
}

}  // namespace ktinject
