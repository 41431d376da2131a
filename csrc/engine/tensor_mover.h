// A Mover over pool tensors (torch glue): the GPU frame pool, the host slot pool and, when
// given, a disk store.
//
// Disk reads into frames go straight into the frames when the pool is on the CPU. On CUDA they
// take the backend chosen at construction (engine/io_backend.h): with "cufile", cuFile reads the
// pages straight into the frames and each is checksummed on a pinned host copy; with "posix",
// through a pinned staging buffer of a few pages that the mover owns (read in parallel by the
// store, then copied asynchronously). Either way the pager lends no host slots for them; with
// bounce_through_host_slots they take the Mover default through lent host slots instead.
//
// On CUDA, copies between frames and slots are cudaMemcpyAsync calls on a stream the mover owns;
// each batch first waits for the work already queued on the current stream (which may still be
// writing a frame the batch reads, or reading a frame or slot it overwrites); disk transfers,
// which the host runs, first wait for both streams (a slot they read or overwrite may be in
// flight). flush() makes the current stream wait for the mover's stream (an event, no host
// synchronisation) when every move since the last flush went into GPU frames: the kernels that
// read those frames run on the current stream, so the fault service never waits on the host.
// When some move wrote host slots, whose bytes the host may read next, it synchronises the
// mover's stream. On CPU every move is a memcpy, complete when the call returns.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/io_backend.h"
#include "engine/mover.h"
#include "store/disk_store.h"

#ifdef PKV_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace paged_kv::engine {

class TensorMover : public Mover {
 public:
  // gpu_pool: [F, L, 2, H, P, D], contiguous, CPU or CUDA.
  // host_pool: [S, L, 2, H, P, D] (S may be 0), contiguous, CPU, gpu_pool's dtype; pinned when
  //   gpu_pool is on CUDA.
  // disk: optional (null for none, not owned); its page_bytes() must be one frame's bytes.
  // Raises c10::Error (RuntimeError in Python) naming the tensor when a check fails.
  // io_backend: how disk pages reach CUDA frames, "auto", "cufile" or "posix", with
  //   cufile_paths extra places to load libcufile from (engine/io_backend.h); "cufile" raises
  //   StoreError naming the reason when cuFile is not usable. Ignored without a disk store.
  TensorMover(const at::Tensor& gpu_pool, const at::Tensor& host_pool, store::DiskStore* disk,
              bool bounce_through_host_slots = false, const std::string& io_backend = "posix",
              const std::vector<std::string>& cufile_paths = {});
  ~TensorMover() override;
  TensorMover(const TensorMover&) = delete;
  TensorMover& operator=(const TensorMover&) = delete;

  int64_t page_bytes() const { return page_bytes_; }
  int64_t num_frames() const { return num_frames_; }
  int64_t num_host_slots() const { return num_host_slots_; }
  int64_t num_disk_slots() const { return disk_ ? disk_->num_slots() : 0; }
  bool on_cuda() const { return on_cuda_; }
  // The disk backend in use ("posix" or "cufile"; "" without a disk store) and why.
  const std::string& io_backend() const { return io_backend_; }
  const std::string& io_backend_reason() const { return io_backend_reason_; }

  void gpu_to_host(const std::vector<FrameSlotMove>& moves) override;
  void host_to_gpu(const std::vector<FrameSlotMove>& moves) override;
  void host_to_disk(const std::vector<SlotDiskMove>& moves) override;
  void disk_to_host(const std::vector<SlotDiskMove>& moves) override;
  void disk_to_gpu(const std::vector<DiskFrameMove>& moves) override;
  bool needs_bounce_slots() const override { return bounce_through_host_slots_; }
  void zero_frames(const std::vector<int64_t>& frames) override;
  void gpu_to_gpu(const std::vector<FramePair>& copies) override;
  void flush() override;

 private:
  char* frame_ptr(int64_t frame) const;
  char* slot_ptr(int64_t slot) const;
  void check_disk_move(const SlotDiskMove& move, const char* what) const;
  // Copies whole pages between frames and slots, merging runs of consecutive indices.
  void copy_pages(const std::vector<FrameSlotMove>& moves, bool to_host);
  void copy_bytes(void* dst, const void* src, int64_t bytes);
  // Reads the pages into the given host buffers; raises StoreError naming every failed slot.
  void read_disk(const std::vector<store::PageRead>& reads);
  void wait_for_current_stream();
  void wait_for_own_stream();
  void order_current_stream_after_own();

  at::Tensor gpu_pool_;
  at::Tensor host_pool_;
  store::DiskStore* disk_;
  int64_t page_bytes_ = 0;
  int64_t num_frames_ = 0;
  int64_t num_host_slots_ = 0;
  bool on_cuda_ = false;
  bool wrote_host_since_flush_ = false;  // a device-to-host copy is queued since the last flush()
  bool bounce_through_host_slots_ = false;
  at::Tensor staging_;  // pinned, a few pages: disk reads into CUDA frames (allocated on first use)
  std::string io_backend_;
  std::string io_backend_reason_;
  std::unique_ptr<CufileFrameReader> cufile_;  // set when io_backend_ is "cufile"
#ifdef PKV_WITH_CUDA
  int device_ = -1;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t ready_ = nullptr;  // recorded on the current stream before each batch
  cudaEvent_t done_ = nullptr;   // recorded on the mover's stream by flush()
#endif
};

}  // namespace paged_kv::engine
