// Large buffers placed in one NUMA node's memory: the packed expert weights of that node's slice and its
// scratch. Anonymous mmap, so pages are only committed when first written (by that node's workers),
// transparent huge pages requested (streaming hundreds of MiB through 4 KiB pages costs TLB misses),
// and, with libnuma, bound to the node explicitly.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ktinject {

class NodeBuffer {
 public:
  NodeBuffer() = default;
  // memory_node < 0: no binding (first touch decides).  Throws std::bad_alloc when mmap fails.
  NodeBuffer(size_t bytes, int memory_node);
  ~NodeBuffer();
  NodeBuffer(NodeBuffer&& other) noexcept;
  NodeBuffer& operator=(NodeBuffer&& other) noexcept;
  NodeBuffer(const NodeBuffer&) = delete;
  NodeBuffer& operator=(const NodeBuffer&) = delete;

  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  // Grows (contents are not kept) when smaller than `bytes`.
  void reserve(size_t bytes, int memory_node);

 private:
  void release();
  uint8_t* base_ = nullptr;  // what mmap returned (data_ is base_ rounded up to 2 MiB)
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
  size_t mapped_ = 0;
};

}  // namespace ktinject
