// cuFile (GPUDirect Storage) reached through dlopen, so paged_kv builds and runs where libcufile
// is missing (torch-free, CUDA-free: nothing here links against libcufile or the CUDA runtime).
//
// The shim declares the few cuFile types it passes across the C ABI itself, laid out as
// cufile.h lays them out. Sources for the layouts (facts only): NVIDIA's cuFile API reference and
// the CUfileDescr_t / CUfileError_t declarations that NVIDIA's cuda-python bindings mirror from
// cufile.h (cuda/bindings/cycufile.pxd):
//   CUfileError_t  { CUfileOpError err; CUresult cu_err; }       two C enums (int), 8 bytes,
//                                                                 returned by value
//   CUfileDescr_t  { CUfileFileHandleType type;                   enum, CU_FILE_HANDLE_TYPE_OPAQUE_FD = 1
//                    union { int fd; void* handle; } handle;      at offset 8 on LP64
//                    const CUfileFSOps_t* fs_ops; }               null for a plain fd; 24 bytes
//   CUfileHandle_t = void*
//   cuFileRead(CUfileHandle_t fh, void* buf_ptr_base, size_t size, off_t file_offset,
//              off_t buf_ptr_offset) -> ssize_t: bytes read, -1 with errno set, or the negated
//              CUfileOpError
//   cuFileHandleDeregister(CUfileHandle_t) returns nothing; cuFileBufRegister(const void*,
//   size_t, int flags) and cuFileBufDeregister(const void*) return CUfileError_t.
// cufile.h maps cuFileDriverClose to cuFileDriverClose_v2 (reference counted); the library
// exports both names, and the shim prefers the _v2 one.
//
// Every failure comes back as a reason string for a person to read: which library could not be
// loaded and why, which symbol is missing from which file, which call failed with which code.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace paged_kv::store {

namespace cufile_abi {

using Handle = void*;  // CUfileHandle_t

struct Error {  // CUfileError_t
  int err;     // CUfileOpError; 0 is CU_FILE_SUCCESS
  int cu_err;  // CUresult, set when err is CU_FILE_CUDA_DRIVER_ERROR
};

constexpr int kSuccess = 0;
constexpr int kHandleTypeOpaqueFd = 1;  // CU_FILE_HANDLE_TYPE_OPAQUE_FD

struct Descr {  // CUfileDescr_t
  int type;
  union {
    int fd;
    void* handle;
  } handle;
  const void* fs_ops;
};

static_assert(sizeof(Error) == 8, "CUfileError_t is two 4-byte enums");
static_assert(sizeof(Descr) == 24 && offsetof(Descr, handle) == 8 && offsetof(Descr, fs_ops) == 16,
              "CUfileDescr_t layout (LP64)");

}  // namespace cufile_abi

// "5001 (CU_FILE_DRIVER_NOT_INITIALIZED)", or just the number for a code this shim does not name.
std::string cufile_error_name(int err);

// One loaded libcufile with every entry point the disk tier uses resolved.
class CufileLibrary {
 public:
  // The names dlopen tries by default, in order: "libcufile.so.0", then "libcufile.so".
  static std::vector<std::string> default_names();

  // Loads the first of `names` that dlopen accepts (a bare name searches the usual places, a
  // path is taken as is) and resolves every entry point. Returns null with `*reason` set when no
  // name loads ("libcufile not found: tried ...: <dlerror>, ...") or a symbol is missing
  // ("symbol cuFileRead missing from <path>: <dlerror>"). The library is closed (dlclose) when
  // the object is destroyed; its driver is never opened here.
  static std::unique_ptr<CufileLibrary> load(const std::vector<std::string>& names,
                                             std::string* reason);

  // The process's library: loaded once, from `extra_paths` (such as an installed nvidia-cufile
  // wheel's libcufile.so.0) after default_names(); the outcome of the first call is kept, and a
  // later call returns it whatever it passes. Null with `*reason` set when loading failed. Never
  // destroyed (a library torn down at exit while CUDA is going away helps nobody).
  static const CufileLibrary* shared(const std::vector<std::string>& extra_paths,
                                     std::string* reason);

  ~CufileLibrary();
  CufileLibrary(const CufileLibrary&) = delete;
  CufileLibrary& operator=(const CufileLibrary&) = delete;

  // Where the library was loaded from (the name or path dlopen accepted).
  const std::string& path() const { return path_; }

  // Opens cuFile's driver (cuFileDriverOpen) once for this object; later calls return the first
  // outcome. "" on success, else "cuFileDriverOpen failed: error 5001 (...)". The driver stays
  // open until the object is destroyed (cuFileDriverClose).
  std::string open_driver() const;

  // Registers an open file descriptor (cuFileHandleRegister). "" and `*handle` on success, else
  // the reason with the error code.
  std::string register_file(int fd, cufile_abi::Handle* handle) const;
  void deregister_file(cufile_abi::Handle handle) const;

  // Reads `bytes` bytes at `file_offset` of the registered file into device (or registered host)
  // memory at `dst`, repeating after short reads. Returns "" or why it failed, naming the call,
  // the offset, the bytes read so far and cuFile's error.
  std::string read(cufile_abi::Handle handle, void* dst, size_t bytes, int64_t file_offset) const;

 private:
  CufileLibrary() = default;

  void* library_ = nullptr;
  std::string path_;
  mutable std::mutex driver_mutex_;
  mutable int driver_state_ = 0;  // 0: not tried, 1: open, -1: failed (under driver_mutex_)
  mutable std::string driver_reason_;

  cufile_abi::Error (*driver_open_)() = nullptr;
  cufile_abi::Error (*driver_close_)() = nullptr;
  cufile_abi::Error (*handle_register_)(cufile_abi::Handle*, cufile_abi::Descr*) = nullptr;
  void (*handle_deregister_)(cufile_abi::Handle) = nullptr;
  // Resolved so that a library lacking them counts as broken; pages are read into unregistered
  // frames for now (cuFile then stages them through its own registered buffers).
  cufile_abi::Error (*buf_register_)(const void*, size_t, int) = nullptr;
  cufile_abi::Error (*buf_deregister_)(const void*) = nullptr;
  ssize_t (*read_)(cufile_abi::Handle, void*, size_t, off_t, off_t) = nullptr;
};

}  // namespace paged_kv::store
