#include "runtime/node_buffer.h"

#include <sys/mman.h>

#include <new>
#include <utility>

#ifdef KTINJECT_HAVE_NUMA
#include <numa.h>
#endif

namespace ktinject {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;

}  // namespace

NodeBuffer::NodeBuffer(size_t bytes, int memory_node) { reserve(bytes, memory_node); }

NodeBuffer::~NodeBuffer() { release(); }

NodeBuffer::NodeBuffer(NodeBuffer&& other) noexcept
    : base_(std::exchange(other.base_, nullptr)),
      data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      mapped_(std::exchange(other.mapped_, 0)) {}

NodeBuffer& NodeBuffer::operator=(NodeBuffer&& other) noexcept {
  if (this != &other) {
    release();
    base_ = std::exchange(other.base_, nullptr);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    mapped_ = std::exchange(other.mapped_, 0);
  }
  return *this;
}

void NodeBuffer::release() {
  if (base_ != nullptr) munmap(base_, mapped_);
  base_ = data_ = nullptr;
  size_ = mapped_ = 0;
}

void NodeBuffer::reserve(size_t bytes, int memory_node) {
  if (bytes <= size_ && data_ != nullptr) return;
  release();
  const size_t mapped = ((bytes == 0 ? 1 : bytes) + kHugePage - 1) / kHugePage * kHugePage;
  // Map one huge page more and start at a 2 MiB boundary, so every page can be a huge page.
  void* base =
      mmap(nullptr, mapped + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (base == MAP_FAILED) throw std::bad_alloc();
  const uintptr_t start = (reinterpret_cast<uintptr_t>(base) + kHugePage - 1) / kHugePage * kHugePage;
  void* p = reinterpret_cast<void*>(start);
#ifdef MADV_HUGEPAGE
  madvise(p, mapped, MADV_HUGEPAGE);
#endif
#ifdef KTINJECT_HAVE_NUMA
  if (memory_node >= 0 && numa_available() >= 0) numa_tonode_memory(p, mapped, memory_node);
#else
  (void)memory_node;
#endif
  base_ = static_cast<uint8_t*>(base);
  data_ = static_cast<uint8_t*>(p);
  size_ = bytes;
  mapped_ = mapped + kHugePage;
}

}  // namespace ktinject
