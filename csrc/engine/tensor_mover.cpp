#include "engine/tensor_mover.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "engine/pager_errors.h"

#ifdef PKV_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/op_error_buffer.h"
#endif

namespace paged_kv::engine {

#ifdef PKV_WITH_CUDA
using cuda::check_cuda;
#endif

TensorMover::TensorMover(const at::Tensor& gpu_pool, const at::Tensor& host_pool,
                         store::DiskStore* disk, bool bounce_through_host_slots,
                         const std::string& io_backend, const std::vector<std::string>& cufile_paths)
    : gpu_pool_(gpu_pool),
      host_pool_(host_pool),
      disk_(disk),
      bounce_through_host_slots_(bounce_through_host_slots) {
  TORCH_CHECK(gpu_pool.dim() == 6, "paged_kv pager: pool must be [F, L, 2, H, P, D], got ",
              gpu_pool.dim(), " dimensions");
  TORCH_CHECK(gpu_pool.size(2) == 2, "paged_kv pager: pool's dimension 2 must be 2 (K, V), got ",
              gpu_pool.size(2));
  TORCH_CHECK(gpu_pool.is_contiguous(), "paged_kv pager: pool must be contiguous");
  TORCH_CHECK(gpu_pool.size(0) >= 1, "paged_kv pager: pool must have at least one frame");
  TORCH_CHECK(host_pool.dim() == 6 && host_pool.sizes().slice(1) == gpu_pool.sizes().slice(1),
              "paged_kv pager: host_pool must be [S, L, 2, H, P, D] with the pool's ",
              gpu_pool.sizes().slice(1), " after S, got ", host_pool.sizes());
  TORCH_CHECK(host_pool.scalar_type() == gpu_pool.scalar_type(), "paged_kv pager: host_pool's dtype ",
              host_pool.scalar_type(), " differs from the pool's ", gpu_pool.scalar_type());
  TORCH_CHECK(host_pool.device().is_cpu(), "paged_kv pager: host_pool must be on the CPU, got ",
              host_pool.device());
  TORCH_CHECK(host_pool.is_contiguous(), "paged_kv pager: host_pool must be contiguous");
  on_cuda_ = gpu_pool.device().is_cuda();
  TORCH_CHECK(on_cuda_ || gpu_pool.device().is_cpu(), "paged_kv pager: pool must be on a CUDA "
              "device or the CPU, got ", gpu_pool.device());
  num_frames_ = gpu_pool.size(0);
  num_host_slots_ = host_pool.size(0);
  page_bytes_ = gpu_pool[0].numel() * gpu_pool.element_size();
  if (disk_ != nullptr) {
    TORCH_CHECK(disk_->page_bytes() == page_bytes_, "paged_kv pager: the disk store holds pages of ",
                disk_->page_bytes(), " bytes, but one pool frame is ", page_bytes_, " bytes");
  }
  if (on_cuda_) {
#ifdef PKV_WITH_CUDA
    TORCH_CHECK(num_host_slots_ == 0 || host_pool.is_pinned(), "paged_kv pager: host_pool must be "
                "pinned (torch.empty(..., pin_memory=True)) when the pool is on CUDA");
    device_ = gpu_pool.get_device();
    const c10::cuda::CUDAGuard guard(gpu_pool.device());
    check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    check_cuda(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    check_cuda(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming), "cudaEventCreateWithFlags");
#else
    TORCH_CHECK(false, "paged_kv pager: the pool is on CUDA but paged_kv was built without CUDA");
#endif
  }
  if (disk_ != nullptr) {
    int device = -1;
#ifdef PKV_WITH_CUDA
    device = device_;
#endif
    IoBackendChoice choice = choose_io_backend(io_backend, cufile_paths, *disk_, on_cuda_, device,
                                               bounce_through_host_slots_);
    io_backend_ = choice.backend;
    io_backend_reason_ = choice.reason;
    cufile_ = std::move(choice.reader);
  }
}

TensorMover::~TensorMover() {
  cufile_.reset();
#ifdef PKV_WITH_CUDA
  if (stream_ != nullptr) {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    cudaStreamSynchronize(stream_);  // errors cannot be raised here; nothing may stay in flight
    cudaStreamDestroy(stream_);
    cudaEventDestroy(ready_);
    cudaEventDestroy(done_);
  }
#endif
}

char* TensorMover::frame_ptr(int64_t frame) const {
  if (frame < 0 || frame >= num_frames_) {
    throw PagerInternalError("paged_kv pager: internal error: move names GPU frame " +
                             std::to_string(frame) + " of " + std::to_string(num_frames_));
  }
  return static_cast<char*>(gpu_pool_.data_ptr()) + frame * page_bytes_;
}

char* TensorMover::slot_ptr(int64_t slot) const {
  if (slot < 0 || slot >= num_host_slots_) {
    throw PagerInternalError("paged_kv pager: internal error: move names host slot " +
                             std::to_string(slot) + " of " + std::to_string(num_host_slots_));
  }
  return static_cast<char*>(host_pool_.data_ptr()) + slot * page_bytes_;
}

void TensorMover::check_disk_move(const SlotDiskMove& move, const char* what) const {
  if (disk_ == nullptr) {
    throw PagerInternalError(std::string("paged_kv pager: internal error: ") + what +
                             " with no disk store");
  }
  if (move.disk_slot < 0 || move.disk_slot >= disk_->num_slots()) {
    throw PagerInternalError("paged_kv pager: internal error: move names disk slot " +
                             std::to_string(move.disk_slot) + " of " +
                             std::to_string(disk_->num_slots()));
  }
}

void TensorMover::copy_bytes(void* dst, const void* src, int64_t bytes) {
  if (!on_cuda_) {
    std::memcpy(dst, src, static_cast<size_t>(bytes));
    return;
  }
#ifdef PKV_WITH_CUDA
  check_cuda(cudaMemcpyAsync(dst, src, static_cast<size_t>(bytes), cudaMemcpyDefault, stream_),
             "cudaMemcpyAsync");
#endif
}

void TensorMover::copy_pages(const std::vector<FrameSlotMove>& moves, bool to_host) {
  if (moves.empty()) return;
  std::vector<FrameSlotMove> sorted(moves);
  std::sort(sorted.begin(), sorted.end(), [](const FrameSlotMove& a, const FrameSlotMove& b) {
    return a.frame < b.frame;
  });
  for (const FrameSlotMove& m : sorted) {
    frame_ptr(m.frame);  // range checks before anything moves
    slot_ptr(m.slot);
  }
  wait_for_current_stream();
  if (to_host) wrote_host_since_flush_ = true;
  for (size_t begin = 0; begin < sorted.size();) {
    size_t end = begin + 1;
    while (end < sorted.size() && sorted[end].frame == sorted[end - 1].frame + 1 &&
           sorted[end].slot == sorted[end - 1].slot + 1) {
      ++end;
    }
    const int64_t bytes = static_cast<int64_t>(end - begin) * page_bytes_;
    char* frame = frame_ptr(sorted[begin].frame);
    char* slot = slot_ptr(sorted[begin].slot);
    if (to_host) {
      copy_bytes(slot, frame, bytes);
    } else {
      copy_bytes(frame, slot, bytes);
    }
    begin = end;
  }
}

void TensorMover::zero_frames(const std::vector<int64_t>& frames) {
  for (const int64_t frame : frames) frame_ptr(frame);  // range checks before anything is cleared
  if (frames.empty()) return;
  if (!on_cuda_) {
    for (const int64_t frame : frames) std::memset(frame_ptr(frame), 0, static_cast<size_t>(page_bytes_));
    return;
  }
#ifdef PKV_WITH_CUDA
  wait_for_current_stream();  // a kernel queued before may still read the frame's old page
  for (const int64_t frame : frames) {
    check_cuda(cudaMemsetAsync(frame_ptr(frame), 0, static_cast<size_t>(page_bytes_), stream_),
               "cudaMemsetAsync");
  }
#endif
}

void TensorMover::gpu_to_gpu(const std::vector<FramePair>& copies) {
  for (const FramePair& c : copies) {  // range checks before anything moves
    frame_ptr(c.from);
    frame_ptr(c.to);
  }
  if (copies.empty()) return;
  wait_for_current_stream();  // the sources' last tokens may still be being written there
  for (const FramePair& c : copies) copy_bytes(frame_ptr(c.to), frame_ptr(c.from), page_bytes_);
}

void TensorMover::gpu_to_host(const std::vector<FrameSlotMove>& moves) { copy_pages(moves, true); }

void TensorMover::host_to_gpu(const std::vector<FrameSlotMove>& moves) { copy_pages(moves, false); }

void TensorMover::host_to_disk(const std::vector<SlotDiskMove>& moves) {
  std::vector<store::PageWrite> writes(moves.size());
  for (size_t i = 0; i < moves.size(); ++i) {
    check_disk_move(moves[i], "host_to_disk");
    writes[i].slot = moves[i].disk_slot;
    writes[i].tag = moves[i].tag;
    writes[i].src = slot_ptr(moves[i].slot);
  }
  if (writes.empty()) return;
  // The slot may still be written by an earlier device-to-host copy.
  wait_for_current_stream();
  wait_for_own_stream();
  const std::vector<store::SlotFailure> failures = disk_->write_pages(writes);
  if (!failures.empty()) {
    throw store::StoreError("paged_kv pager: writing pages back to disk failed: " +
                            store::describe_failures(failures, writes.size(), "page writes"));
  }
}

void TensorMover::disk_to_host(const std::vector<SlotDiskMove>& moves) {
  std::vector<store::PageRead> reads(moves.size());
  for (size_t i = 0; i < moves.size(); ++i) {
    check_disk_move(moves[i], "disk_to_host");
    reads[i].slot = moves[i].disk_slot;
    reads[i].expected = moves[i].tag;
    reads[i].dst = slot_ptr(moves[i].slot);
  }
  if (reads.empty()) return;
  // An earlier host-to-device copy, or a kernel reading the slot zero-copy on the current
  // stream, may still read the slot.
  wait_for_current_stream();
  wait_for_own_stream();
  read_disk(reads);
}

void TensorMover::read_disk(const std::vector<store::PageRead>& reads) {
  const std::vector<store::SlotFailure> failures = disk_->read_pages(reads);
  if (!failures.empty()) {
    throw store::StoreError("paged_kv pager: reading pages from disk failed: " +
                            store::describe_failures(failures, reads.size(), "page reads"));
  }
}

void TensorMover::disk_to_gpu(const std::vector<DiskFrameMove>& moves) {
  if (bounce_through_host_slots_) {
    Mover::disk_to_gpu(moves);
    return;
  }
  for (const DiskFrameMove& m : moves) {
    check_disk_move(SlotDiskMove{-1, m.disk_slot, m.tag}, "disk_to_gpu");
    frame_ptr(m.frame);
  }
  if (moves.empty()) return;
  wait_for_current_stream();  // a kernel may still read the frames being overwritten
  if (!on_cuda_) {
    // The frames are host memory: read straight into them.
    std::vector<store::PageRead> reads(moves.size());
    for (size_t i = 0; i < moves.size(); ++i) {
      reads[i].slot = moves[i].disk_slot;
      reads[i].expected = moves[i].tag;
      reads[i].dst = frame_ptr(moves[i].frame);
    }
    read_disk(reads);
    return;
  }
  const int64_t staging_pages = std::min<int64_t>(4, std::max(1, disk_->io_threads()));
  if (!staging_.defined()) {
    staging_ = at::empty({staging_pages * page_bytes_},
                         at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  }
  char* staging = static_cast<char*>(staging_.data_ptr());
  if (cufile_ != nullptr) {
    // cuFile writes the frames from the host's side of the GPU's streams: everything queued
    // before (a kernel still reading a frame being overwritten) must be done first.
    wait_for_own_stream();
    std::vector<CufileFrameReader::Read> reads(moves.size());
    for (size_t i = 0; i < moves.size(); ++i) {
      reads[i].slot = moves[i].disk_slot;
      reads[i].expected = moves[i].tag;
      reads[i].frame = frame_ptr(moves[i].frame);
    }
#ifdef PKV_WITH_CUDA
    void* stream = stream_;
#else
    void* stream = nullptr;
#endif
    const std::vector<store::SlotFailure> failures = cufile_->read(reads, staging, stream);
    if (!failures.empty()) {
      throw store::StoreError("paged_kv pager: reading pages from disk with cuFile failed: " +
                              store::describe_failures(failures, reads.size(), "page reads"));
    }
    return;
  }
  // A few pages at a time into the pinned staging buffer (the store reads them in parallel),
  // then asynchronous copies to the frames; the buffer is reused once those copies are done.
  for (size_t begin = 0; begin < moves.size(); begin += static_cast<size_t>(staging_pages)) {
    const size_t end = std::min(moves.size(), begin + static_cast<size_t>(staging_pages));
    std::vector<store::PageRead> reads(end - begin);
    for (size_t i = begin; i < end; ++i) {
      reads[i - begin].slot = moves[i].disk_slot;
      reads[i - begin].expected = moves[i].tag;
      reads[i - begin].dst = staging + static_cast<int64_t>(i - begin) * page_bytes_;
    }
    wait_for_own_stream();  // the previous batch's copies out of the buffer
    read_disk(reads);
    for (size_t i = begin; i < end; ++i) {
      copy_bytes(frame_ptr(moves[i].frame), staging + static_cast<int64_t>(i - begin) * page_bytes_,
                 page_bytes_);
    }
  }
}

void TensorMover::flush() {
  if (wrote_host_since_flush_) {
    wait_for_own_stream();
  } else {
    order_current_stream_after_own();
  }
}

void TensorMover::wait_for_current_stream() {
#ifdef PKV_WITH_CUDA
  if (!on_cuda_) return;
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  cudaStream_t current = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_)).stream();
  check_cuda(cudaEventRecord(ready_, current), "cudaEventRecord");
  check_cuda(cudaStreamWaitEvent(stream_, ready_, 0), "cudaStreamWaitEvent");
#endif
}

void TensorMover::wait_for_own_stream() {
#ifdef PKV_WITH_CUDA
  if (!on_cuda_) return;
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
  wrote_host_since_flush_ = false;
#endif
}

void TensorMover::order_current_stream_after_own() {
#ifdef PKV_WITH_CUDA
  if (!on_cuda_) return;
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  cudaStream_t current = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_)).stream();
  check_cuda(cudaEventRecord(done_, stream_), "cudaEventRecord");
  check_cuda(cudaStreamWaitEvent(current, done_, 0), "cudaStreamWaitEvent");
#endif
}

}  // namespace paged_kv::engine
