// How disk pages reach GPU frames (torch glue): "posix" (the store reads them with O_DIRECT into
// pinned host memory, then an asynchronous copy moves them to the frames) or "cufile" (cuFile
// reads the page bytes straight from the slot file into the frames).
//
// choose_io_backend turns Policy.io_backend ("auto", "cufile", "posix") into the backend a mover
// uses and the reason, for people to read:
//   posix   always works; the reason says it was asked for.
//   cufile  loads libcufile through the dlopen shim, opens its driver, registers the store's
//           file, then checks it on the store's own file (below); raises StoreError naming the
//           reason when any step fails or the bytes differ. It does not insist on speed.
//   auto    as cufile, but every failure means POSIX with the reason recorded, and cuFile is
//           used only when the check finds it returns the right bytes at least as fast as POSIX
//           ("cuFile read X GB/s, POSIX Y GB/s"). cuFile's compatibility mode (no nvidia-fs
//           driver) thus counts as cuFile only when it is correct and not slower.
// The check writes known pages into up to 4 slots that hold nothing (they keep those pages under
// tenant -1 afterwards, harmless: a read presents its own tag), reads them with both backends,
// each through the very path disk_to_gpu takes (cuFile: header check, cuFileRead into the GPU,
// copy back, checksum; POSIX: verified reads into pinned memory, copy to the GPU), compares the
// bytes on the GPU with the pages written, and times both.
//
// Whatever the backend, a page is declared good only after its payload checksum matched its
// header: the cuFile path copies each page back to a pinned host mirror and checksums it there
// (a GPU-to-host copy runs many times faster than the disk read it verifies), and a page that
// fails is zeroed in its frame and reported, never returned as data.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "store/cufile_library.h"
#include "store/disk_store.h"

namespace paged_kv::engine {

// Reads disk pages into GPU frames with cuFile. Built only when the pool is on CUDA.
class CufileFrameReader {
 public:
  // Registers `disk`'s slot file with cuFile; raises StoreError with the reason when it cannot.
  // `library` must have its driver open and outlive the reader.
  CufileFrameReader(const store::CufileLibrary& library, store::DiskStore& disk);
  ~CufileFrameReader();
  CufileFrameReader(const CufileFrameReader&) = delete;
  CufileFrameReader& operator=(const CufileFrameReader&) = delete;

  struct Read {
    int64_t slot = 0;
    store::SlotTag expected;
    void* frame = nullptr;  // device memory, page_bytes
  };

  // Reads every request (a failed one does not stop the others): header check on the host,
  // cuFileRead of the payload into the frame, copy back into `mirror` (pinned host memory of
  // page_bytes) on `stream` (a cudaStream_t), checksum. A failed request's frame is zeroed.
  // Returns the failures in request order. The caller makes sure nothing on the GPU still
  // reads or writes the frames.
  std::vector<store::SlotFailure> read(const std::vector<Read>& reads, void* mirror, void* stream);

 private:
  void read_one(const Read& r, void* mirror, void* stream);

  const store::CufileLibrary& library_;
  store::DiskStore& disk_;
  store::cufile_abi::Handle handle_ = nullptr;
};

struct IoBackendChoice {
  std::string backend;  // "posix" or "cufile"
  std::string reason;
  std::unique_ptr<CufileFrameReader> reader;  // set for "cufile"
};

// Chooses the backend as the header describes. `disk` is the store (not null); `pool_on_cuda`
// and `device` say where the frames are; `bounce_through_host_slots` (tests) routes disk reads
// through host slots, which leaves no room for cuFile; `cufile_paths` are extra places to load
// libcufile from (after libcufile.so.0 and libcufile.so). Raises StoreError for "cufile" when
// cuFile is not usable, and c10::Error (ValueError) for a name other than the three.
IoBackendChoice choose_io_backend(const std::string& wanted,
                                  const std::vector<std::string>& cufile_paths,
                                  store::DiskStore& disk, bool pool_on_cuda, int device,
                                  bool bounce_through_host_slots);

}  // namespace paged_kv::engine
