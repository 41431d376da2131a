// The pybind11 module paged_kv._C: build facts and error-check controls. Loading it also loads
// the op registrations compiled into the same library.
#include <pybind11/pybind11.h>
#include <torch/python.h>

#include <string>

#ifdef PKV_WITH_CUDA
#include <cuda_runtime_api.h>

#include "cuda/claim_counters.h"
#include "cuda/mapped_host_memory.h"
#include "cuda/op_error_buffer.h"
#endif

#ifndef PKV_CUDA_ARCH_LIST
#define PKV_CUDA_ARCH_LIST ""
#endif

namespace py = pybind11;

namespace paged_kv { void bind_store(pybind11::module_& m); }
namespace paged_kv { void bind_engine(pybind11::module_& m); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "paged_kv compiled library";
  m.def("build_info", []() {
    py::dict info;
#ifdef PKV_WITH_CUDA
    info["cuda"] = true;
    info["cuda_runtime_compiled"] = CUDART_VERSION;
    info["cuda_arch_list"] = std::string(PKV_CUDA_ARCH_LIST);
#ifdef PKV_HAS_SM90A
    info["wgmma_prefill"] = true;  // the Hopper prefill kernel (sm_90a) is built
#else
    info["wgmma_prefill"] = false;
#endif
#else
    info["cuda"] = false;
    info["cuda_runtime_compiled"] = py::none();
    info["cuda_arch_list"] = std::string();
    info["wgmma_prefill"] = false;
#endif
    return info;
  });
#ifdef PKV_WITH_CUDA
  m.def("check_errors", &paged_kv::cuda::check_errors, py::arg("device"),
        "Synchronise the device and raise any bad input a paged_kv kernel recorded on it.");
  m.def("set_sync_checks", &paged_kv::cuda::set_sync_checks, py::arg("enabled"));
  m.def("sync_checks", &paged_kv::cuda::sync_checks);
  m.def("claim_counter_buffers", []() {
    const paged_kv::cuda::ClaimCounterStats stats = paged_kv::cuda::claim_counter_stats();
    py::dict d;
    d["allocated"] = stats.allocated;
    d["pooled"] = stats.pooled;
    return d;
  }, "Decode claim-counter buffers allocated so far, and those pooled (handed back by "
     "destroyed CUDA graphs).");
  m.def("mapped_host_view", &paged_kv::cuda::mapped_host_view, py::arg("host"), py::arg("device"),
        "A CUDA tensor over a pinned CPU tensor's pages (zero-copy); see paged_kv.ops.mapped_host_view.");
#endif
  paged_kv::bind_store(m);
  paged_kv::bind_engine(m);  // after the store: the pager takes its DiskStore
}
