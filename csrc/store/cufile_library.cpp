// Loading libcufile with dlopen and calling it through the resolved entry points.
#include "store/cufile_library.h"

#include <dlfcn.h>

#include <cerrno>

#include "store/direct_file.h"

namespace paged_kv::store {

namespace {

// The CUfileOpError codes this shim names (cuFile API reference); others print as numbers.
const char* known_error(int err) {
  switch (err) {
    case 0: return "CU_FILE_SUCCESS";
    case 5001: return "CU_FILE_DRIVER_NOT_INITIALIZED";
    case 5002: return "CU_FILE_DRIVER_INVALID_PROPS";
    case 5003: return "CU_FILE_DRIVER_UNSUPPORTED_LIMIT";
    case 5004: return "CU_FILE_DRIVER_VERSION_MISMATCH";
    case 5005: return "CU_FILE_DRIVER_VERSION_READ_ERROR";
    case 5006: return "CU_FILE_DRIVER_CLOSING";
    case 5007: return "CU_FILE_PLATFORM_NOT_SUPPORTED";
    case 5008: return "CU_FILE_IO_NOT_SUPPORTED";
    case 5009: return "CU_FILE_DEVICE_NOT_SUPPORTED";
    case 5010: return "CU_FILE_NVFS_DRIVER_ERROR";
    case 5011: return "CU_FILE_CUDA_DRIVER_ERROR";
    default: return nullptr;
  }
}

std::string describe_error(const cufile_abi::Error& e) {
  std::string text = "error " + cufile_error_name(e.err);
  if (e.cu_err != 0) text += ", CUDA driver error " + std::to_string(e.cu_err);
  return text;
}

std::string dl_error_text() {
  const char* text = dlerror();
  return text != nullptr ? text : "unknown dlopen error";
}

// Resolves `name` into `*fn`; returns false and sets `*reason` when the symbol is missing.
template <typename Fn>
bool resolve(void* library, const std::string& path, const char* name, Fn* fn,
             std::string* reason) {
  dlerror();  // clear
  void* symbol = dlsym(library, name);
  if (symbol == nullptr) {
    *reason = std::string("symbol ") + name + " missing from " + path + ": " + dl_error_text();
    return false;
  }
  *fn = reinterpret_cast<Fn>(symbol);
  return true;
}

}  // namespace

std::string cufile_error_name(int err) {
  const char* name = known_error(err);
  return name != nullptr ? std::to_string(err) + " (" + name + ")" : std::to_string(err);
}

std::vector<std::string> CufileLibrary::default_names() { return {"libcufile.so.0", "libcufile.so"}; }

std::unique_ptr<CufileLibrary> CufileLibrary::load(const std::vector<std::string>& names,
                                                   std::string* reason) {
  std::unique_ptr<CufileLibrary> lib(new CufileLibrary());
  std::string tried;
  for (const std::string& name : names) {
    void* handle = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle != nullptr) {
      lib->library_ = handle;
      lib->path_ = name;
      break;
    }
    tried += (tried.empty() ? "" : "; ") + dl_error_text();
  }
  if (lib->library_ == nullptr) {
    *reason = "libcufile not found (" + (tried.empty() ? std::string("no names to try") : tried) + ")";
    return nullptr;
  }
  void* h = lib->library_;
  const std::string& path = lib->path_;
  // cuFileDriverClose_v2 where the library has it (cufile.h's name for cuFileDriverClose).
  dlerror();
  void* close_v2 = dlsym(h, "cuFileDriverClose_v2");
  if (close_v2 != nullptr) {
    lib->driver_close_ = reinterpret_cast<cufile_abi::Error (*)()>(close_v2);
  } else if (!resolve(h, path, "cuFileDriverClose", &lib->driver_close_, reason)) {
    return nullptr;
  }
  if (!resolve(h, path, "cuFileDriverOpen", &lib->driver_open_, reason) ||
      !resolve(h, path, "cuFileHandleRegister", &lib->handle_register_, reason) ||
      !resolve(h, path, "cuFileHandleDeregister", &lib->handle_deregister_, reason) ||
      !resolve(h, path, "cuFileBufRegister", &lib->buf_register_, reason) ||
      !resolve(h, path, "cuFileBufDeregister", &lib->buf_deregister_, reason) ||
      !resolve(h, path, "cuFileRead", &lib->read_, reason)) {
    return nullptr;
  }
  reason->clear();
  return lib;
}

const CufileLibrary* CufileLibrary::shared(const std::vector<std::string>& extra_paths,
                                           std::string* reason) {
  static std::mutex mutex;
  static bool tried = false;
  static CufileLibrary* library = nullptr;  // never destroyed, see the header
  static std::string failure;
  std::lock_guard<std::mutex> lock(mutex);
  if (!tried) {
    tried = true;
    std::vector<std::string> names = default_names();
    names.insert(names.end(), extra_paths.begin(), extra_paths.end());
    library = load(names, &failure).release();
  }
  if (library == nullptr) *reason = failure;
  return library;
}

CufileLibrary::~CufileLibrary() {
  if (driver_state_ == 1 && driver_close_ != nullptr) driver_close_();
  if (library_ != nullptr) dlclose(library_);
}

std::string CufileLibrary::open_driver() const {
  std::lock_guard<std::mutex> lock(driver_mutex_);
  if (driver_state_ == 0) {
    const cufile_abi::Error e = driver_open_();
    if (e.err == cufile_abi::kSuccess) {
      driver_state_ = 1;
    } else {
      driver_state_ = -1;
      driver_reason_ = "cuFileDriverOpen failed: " + describe_error(e);
    }
  }
  return driver_state_ == 1 ? std::string() : driver_reason_;
}

std::string CufileLibrary::register_file(int fd, cufile_abi::Handle* handle) const {
  cufile_abi::Descr descr{};
  descr.type = cufile_abi::kHandleTypeOpaqueFd;
  descr.handle.fd = fd;
  descr.fs_ops = nullptr;
  *handle = nullptr;
  const cufile_abi::Error e = handle_register_(handle, &descr);
  if (e.err != cufile_abi::kSuccess) {
    *handle = nullptr;
    return "cuFileHandleRegister failed: " + describe_error(e);
  }
  return std::string();
}

void CufileLibrary::deregister_file(cufile_abi::Handle handle) const {
  if (handle != nullptr) handle_deregister_(handle);
}

std::string CufileLibrary::read(cufile_abi::Handle handle, void* dst, size_t bytes,
                                int64_t file_offset) const {
  size_t done = 0;
  while (done < bytes) {
    errno = 0;
    const ssize_t got = read_(handle, dst, bytes - done, static_cast<off_t>(file_offset + done),
                              static_cast<off_t>(done));
    if (got > 0) {
      done += static_cast<size_t>(got);
      continue;
    }
    std::string why;
    if (got == 0) {
      why = "end of file";
    } else if (got == -1) {
      why = errno_text(errno);
    } else {
      why = "error " + cufile_error_name(static_cast<int>(-got));
    }
    return "cuFileRead of " + std::to_string(bytes) + " bytes at offset " +
           std::to_string(file_offset) + " failed after " + std::to_string(done) + " bytes: " + why;
  }
  return std::string();
}

}  // namespace paged_kv::store
