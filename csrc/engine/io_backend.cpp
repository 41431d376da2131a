#include "engine/io_backend.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>

#include "store/checksum.h"

#ifdef PKV_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#endif

namespace paged_kv::engine {

namespace {

#ifdef PKV_WITH_CUDA
// A CUDA failure inside the cuFile path: a StoreError, so it joins the batch's failures.
void check_cuda(cudaError_t status, const char* call) {
  if (status != cudaSuccess) {
    throw store::StoreError(std::string(call) + " failed: " + cudaGetErrorString(status));
  }
}
#endif

std::string gigabytes_per_second(double bytes, double seconds) {
  char text[32];
  std::snprintf(text, sizeof text, "%.2f GB/s", seconds > 0 ? bytes / seconds / 1e9 : 0.0);
  return text;
}

}  // namespace

// ---- CufileFrameReader ----

CufileFrameReader::CufileFrameReader(const store::CufileLibrary& library, store::DiskStore& disk)
    : library_(library), disk_(disk) {
  const int fd = disk.file_descriptor();
  if (fd < 0) throw store::StoreError("the disk store has no file descriptor for cuFile");
  const std::string failure = library.register_file(fd, &handle_);
  if (!failure.empty()) {
    throw store::StoreError(failure + " (the slot file " + disk.path() + ", " +
                            (disk.direct_io() ? "opened with O_DIRECT" :
                                                "buffered: " + disk.direct_io_reason()) + ")");
  }
}

CufileFrameReader::~CufileFrameReader() { library_.deregister_file(handle_); }

std::vector<store::SlotFailure> CufileFrameReader::read(const std::vector<Read>& reads,
                                                        void* mirror, void* stream) {
  return store::attempt_each(reads, [&](const Read& r) { read_one(r, mirror, stream); });
}

void CufileFrameReader::read_one(const Read& r, void* mirror, void* stream) {
#ifdef PKV_WITH_CUDA
  const size_t bytes = static_cast<size_t>(disk_.page_bytes());
  const uint64_t stored = disk_.read_header(r.slot, r.expected);  // raises with read_page's words
  const std::string what = "read of slot " + std::to_string(r.slot) + " of " + disk_.path() +
                           " with cuFile failed: ";
  auto cuda_stream = static_cast<cudaStream_t>(stream);
  std::string failure = library_.read(handle_, r.frame, bytes, disk_.payload_offset(r.slot));
  if (failure.empty()) {
    try {
      check_cuda(cudaMemcpyAsync(mirror, r.frame, bytes, cudaMemcpyDeviceToHost, cuda_stream),
                 "cudaMemcpyAsync (frame to the checksum mirror)");
      check_cuda(cudaStreamSynchronize(cuda_stream), "cudaStreamSynchronize");
      const uint64_t computed = store::checksum64(mirror, bytes);
      if (computed != stored) {
        failure = "payload checksum mismatch (stored " + std::to_string(stored) + ", computed " +
                  std::to_string(computed) + "): the page's bytes as cuFile read them are corrupt";
      }
    } catch (const std::exception& e) {
      failure = e.what();
    }
  }
  if (!failure.empty()) {
    // Never leave a wrong or torn page where the kernel could read it.
    cudaMemsetAsync(r.frame, 0, bytes, cuda_stream);
    cudaStreamSynchronize(cuda_stream);
    throw store::StoreError(what + failure);
  }
#else
  (void)r;
  (void)mirror;
  (void)stream;
  throw store::StoreError("cuFile reads need a CUDA build of paged_kv");
#endif
}

// ---- choosing ----

namespace {

#ifdef PKV_WITH_CUDA
// Writes known pages into free slots, reads them back with both backends and times them.
// Returns "" when the bytes cuFile read match, with `*speeds` "cuFile read X GB/s, POSIX Y GB/s"
// and `*faster` whether cuFile was at least as fast; else why cuFile failed the check.
std::string check_cufile(CufileFrameReader& reader, store::DiskStore& disk, int device,
                         std::string* speeds, bool* faster) {
  const int64_t page_bytes = disk.page_bytes();
  std::vector<int64_t> slots;
  for (int64_t s = disk.num_slots() - 1; s >= 0 && slots.size() < 4; --s) {
    if (!disk.slot_in_use(s)) slots.push_back(s);
  }
  if (slots.empty()) return "no empty disk slot to check cuFile on";
  const auto k = static_cast<int64_t>(slots.size());
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const auto pinned = at::TensorOptions().dtype(at::kByte).pinned_memory(true);
  at::Tensor written = at::empty({k * page_bytes}, pinned);
  at::Tensor posix_host = at::empty({k * page_bytes}, pinned);
  at::Tensor mirror = at::empty({page_bytes}, pinned);
  at::Tensor check = at::empty({k * page_bytes}, pinned);
  at::Tensor gpu = at::empty({k * page_bytes},
                             at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device));
  auto* w = static_cast<unsigned char*>(written.data_ptr());
  uint64_t state = 0x9e3779b97f4a7c15ULL;  // splitmix64: bytes no two pages share
  for (int64_t i = 0; i < k * page_bytes; ++i) {
    state += 0x9e3779b97f4a7c15ULL;
    uint64_t z = state;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    w[i] = static_cast<unsigned char>(z ^ (z >> 31));
  }
  std::vector<store::PageWrite> writes(slots.size());
  std::vector<store::PageRead> posix_reads(slots.size());
  std::vector<CufileFrameReader::Read> cufile_reads(slots.size());
  auto* gpu_bytes = static_cast<unsigned char*>(gpu.data_ptr());
  auto* posix_bytes = static_cast<unsigned char*>(posix_host.data_ptr());
  for (size_t i = 0; i < slots.size(); ++i) {
    store::SlotTag tag;
    tag.tenant = -1;
    tag.session = -1;
    tag.logical_page = slots[i];
    writes[i] = store::PageWrite{slots[i], tag, w + static_cast<int64_t>(i) * page_bytes};
    posix_reads[i] = store::PageRead{slots[i], tag, posix_bytes + static_cast<int64_t>(i) * page_bytes};
    cufile_reads[i].slot = slots[i];
    cufile_reads[i].expected = tag;
    cufile_reads[i].frame = gpu_bytes + static_cast<int64_t>(i) * page_bytes;
  }
  const std::vector<store::SlotFailure> write_failures = disk.write_pages(writes);
  if (!write_failures.empty()) {
    return "writing the check pages failed: " +
           store::describe_failures(write_failures, writes.size(), "page writes");
  }
  cudaStream_t stream = nullptr;
  if (cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) != cudaSuccess) {
    return "cudaStreamCreateWithFlags failed";
  }
  std::string failure;
  double posix_seconds = 0, cufile_seconds = 0;
  const int64_t target = 64LL << 20;  // bytes each backend reads in the timed rounds
  const int64_t rounds = std::clamp<int64_t>((target + k * page_bytes - 1) / (k * page_bytes), 1, 16);
  using clock = std::chrono::steady_clock;
  try {
    // One untimed round each (first-use set-up), then the timed rounds.
    for (int64_t round = 0; round <= rounds && failure.empty(); ++round) {
      const auto t0 = clock::now();
      const std::vector<store::SlotFailure> posix_failures = disk.read_pages(posix_reads);
      if (!posix_failures.empty()) {
        failure = "the POSIX reads of the check pages failed: " +
                  store::describe_failures(posix_failures, posix_reads.size(), "page reads");
        break;
      }
      check_cuda(cudaMemcpyAsync(gpu_bytes, posix_bytes, static_cast<size_t>(k * page_bytes),
                                 cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync");
      check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
      const auto t1 = clock::now();
      const std::vector<store::SlotFailure> cufile_failures =
          reader.read(cufile_reads, mirror.data_ptr(), stream);
      const auto t2 = clock::now();
      if (!cufile_failures.empty()) {
        failure = "cuFile failed on the check pages: " +
                  store::describe_failures(cufile_failures, cufile_reads.size(), "page reads");
        break;
      }
      if (round > 0) {
        posix_seconds += std::chrono::duration<double>(t1 - t0).count();
        cufile_seconds += std::chrono::duration<double>(t2 - t1).count();
      }
    }
    if (failure.empty()) {
      check_cuda(cudaMemcpyAsync(check.data_ptr(), gpu_bytes, static_cast<size_t>(k * page_bytes),
                                 cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync");
      check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
      const auto* got = static_cast<const unsigned char*>(check.data_ptr());
      for (int64_t i = 0; i < k * page_bytes; ++i) {
        if (got[i] != w[i]) {
          failure = "bytes differ: cuFile read byte " + std::to_string(i % page_bytes) +
                    " of slot " + std::to_string(slots[static_cast<size_t>(i / page_bytes)]) +
                    " as " + std::to_string(got[i]) + ", the page holds " + std::to_string(w[i]);
          break;
        }
      }
    }
  } catch (const std::exception& e) {
    failure = e.what();
  }
  cudaStreamSynchronize(stream);
  cudaStreamDestroy(stream);
  if (!failure.empty()) return failure;
  const double bytes = static_cast<double>(rounds * k * page_bytes);
  *speeds = "cuFile read " + gigabytes_per_second(bytes, cufile_seconds) + ", POSIX " +
            gigabytes_per_second(bytes, posix_seconds) + " (" + std::to_string(rounds * k) +
            " pages of " + std::to_string(page_bytes) + " bytes each, verified)";
  *faster = cufile_seconds <= posix_seconds;
  return std::string();
}
#endif

}  // namespace

IoBackendChoice choose_io_backend(const std::string& wanted,
                                  const std::vector<std::string>& cufile_paths,
                                  store::DiskStore& disk, bool pool_on_cuda, int device,
                                  bool bounce_through_host_slots) {
  TORCH_CHECK_VALUE(wanted == "auto" || wanted == "cufile" || wanted == "posix",
                    "paged_kv pager: io_backend must be 'auto', 'cufile' or 'posix', got '", wanted, "'");
  IoBackendChoice choice;
  choice.backend = "posix";
  if (wanted == "posix") {
    choice.reason = "io_backend='posix' was asked for";
    return choice;
  }
  // Why cuFile cannot be used: for "cufile" an error, for "auto" the reason POSIX is used.
  auto unusable = [&](const std::string& why) {
    if (wanted == "cufile") {
      throw store::StoreError("paged_kv: io_backend='cufile' but cuFile is not usable: " + why +
                              "; use io_backend='auto' (which falls back to POSIX I/O) or 'posix'");
    }
    choice.reason = "cuFile not usable: " + why;
    return std::move(choice);
  };
  std::string why;
  const store::CufileLibrary* library = store::CufileLibrary::shared(cufile_paths, &why);
  if (library == nullptr) return unusable(why);
#ifndef PKV_WITH_CUDA
  (void)pool_on_cuda;
  (void)device;
  (void)bounce_through_host_slots;
  return unusable(library->path() + " loads, but this build of paged_kv has no CUDA");
#else
  if (!pool_on_cuda) {
    return unusable(library->path() + " loads, but the frames are in host memory (a CPU pool), "
                    "where POSIX reads land directly");
  }
  if (bounce_through_host_slots) {
    return unusable("disk reads go through host slots (bounce_through_host_slots)");
  }
  {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    why = library->open_driver();
  }
  if (!why.empty()) return unusable(why + " (" + library->path() + ")");
  std::unique_ptr<CufileFrameReader> reader;
  try {
    reader = std::make_unique<CufileFrameReader>(*library, disk);
  } catch (const std::exception& e) {
    return unusable(e.what());
  }
  std::string speeds;
  bool faster = false;
  why = check_cufile(*reader, disk, device, &speeds, &faster);
  if (!why.empty()) return unusable(why);
  if (wanted == "auto" && !faster) {
    choice.reason = "POSIX is faster: " + speeds;
    return choice;
  }
  choice.backend = "cufile";
  choice.reason = (wanted == "cufile" ? "io_backend='cufile' was asked for; " : "cuFile is at least as fast: ") +
                  speeds + " (" + library->path() + ")";
  choice.reader = std::move(reader);
  return choice;
#endif
}

}  // namespace paged_kv::engine
