// Python bindings of the disk tier: paged_kv._C.DiskStore, SlotTag, StoreError and checksum64.
//
// Pages cross as contiguous CPU tensors of exactly page_bytes bytes (any dtype: the store moves
// bytes). Every transfer runs with the GIL released.
#include <ATen/core/Tensor.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/python.h>

#include <array>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

// pybind11 gives its own types hidden visibility and warns about a bound class more visible
// than those; the store's types are used only inside this library, so hide them here too.
#pragma GCC visibility push(hidden)
#include "store/checksum.h"
#include "store/cufile_library.h"
#include "store/disk_store.h"
#pragma GCC visibility pop

namespace paged_kv {

namespace {

namespace py = pybind11;
using store::DiskStore;
using store::FaultInjector;
using store::FaultKind;
using store::PageRead;
using store::PageWrite;
using store::SlotFailure;
using store::SlotTag;
using store::StoreError;

std::string describe_tensor(const at::Tensor& t) {
  std::ostringstream out;
  out << "shape " << t.sizes() << ", strides " << t.strides() << ", dtype " << t.scalar_type()
      << ", " << t.nbytes() << " bytes";
  return out.str();
}

// The address of a page-sized, contiguous CPU tensor; raises ValueError naming `call`, `arg`
// and what is wrong otherwise. `page_bytes` < 0 accepts any size.
void* host_bytes(const at::Tensor& t, int64_t page_bytes, const std::string& call,
                 const char* arg) {
  const std::string where = call + ": " + arg;
  if (!t.defined()) throw py::value_error(where + " is an undefined tensor");
  if (t.layout() != at::kStrided) throw py::value_error(where + " must be a strided tensor");
  if (!t.device().is_cpu()) {
    throw py::value_error(where + " must be a CPU tensor (pinned or not), got one on " +
                          t.device().str());
  }
  if (!t.is_contiguous()) {
    throw py::value_error(where + " must be contiguous, got " + describe_tensor(t) +
                          "; pass .contiguous()");
  }
  if (page_bytes >= 0 && static_cast<int64_t>(t.nbytes()) != page_bytes) {
    throw py::value_error(where + " must hold page_bytes = " + std::to_string(page_bytes) +
                          " bytes, got " + describe_tensor(t));
  }
  return t.data_ptr();
}

SlotTag make_tag(int32_t tenant, int64_t session, int64_t logical_page, uint64_t generation) {
  SlotTag tag;
  tag.tenant = tenant;
  tag.session = session;
  tag.logical_page = logical_page;
  tag.generation = generation;
  return tag;
}

SlotTag tag_from_tuple(const py::tuple& t) {
  if (t.size() != 4) {
    throw py::value_error("a slot tag is (tenant, session, logical_page, generation), got a "
                          "tuple of " + std::to_string(t.size()) + " items");
  }
  return make_tag(t[0].cast<int32_t>(), t[1].cast<int64_t>(), t[2].cast<int64_t>(),
                  t[3].cast<uint64_t>());
}

std::string tag_repr(const SlotTag& tag) {
  return "SlotTag(tenant=" + std::to_string(tag.tenant) + ", session=" +
         std::to_string(tag.session) + ", logical_page=" + std::to_string(tag.logical_page) +
         ", generation=" + std::to_string(tag.generation) + ")";
}

// One (slot, tag, tensor) request of a batched call.
struct Request {
  int64_t slot;
  SlotTag tag;
  at::Tensor tensor;  // held for the duration of the call
};

std::vector<Request> parse_requests(const py::sequence& requests, const std::string& call,
                                    const char* tensor_name) {
  std::vector<Request> parsed;
  parsed.reserve(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    const std::string where = call + ": request " + std::to_string(i);
    py::object item = requests[i];
    if (!py::isinstance<py::sequence>(item) || py::len(item) != 3) {
      throw py::type_error(where + " must be a (slot, tag, " + tensor_name + ") triple");
    }
    py::sequence triple = item.cast<py::sequence>();
    Request request;
    try {
      request.slot = triple[0].cast<int64_t>();
      request.tag = triple[1].cast<SlotTag>();
      request.tensor = triple[2].cast<at::Tensor>();
    } catch (const py::cast_error&) {
      throw py::type_error(where + " must be (slot: int, tag: SlotTag or (tenant, session, "
                           "logical_page, generation), " + tensor_name + ": torch.Tensor)");
    }
    parsed.push_back(std::move(request));
  }
  return parsed;
}

py::list failure_list(const std::vector<SlotFailure>& failures) {
  py::list out;
  for (const SlotFailure& f : failures) out.append(py::make_tuple(f.index, f.slot, f.message));
  return out;
}

FaultInjector& injector_of(DiskStore& s) {
  FaultInjector* faults = s.fault_injector();
  if (faults == nullptr) throw StoreError("this disk store cannot inject faults");
  return *faults;
}

}  // namespace

void bind_store(py::module_& m) {
  py::register_exception<StoreError>(m, "StoreError", PyExc_RuntimeError);

  py::class_<SlotTag>(m, "SlotTag",
                      "Who a disk slot's page belongs to: tenant, session, logical page and "
                      "generation. A read must present the tag the write stored. Anywhere a "
                      "SlotTag is taken, a (tenant, session, logical_page, generation) tuple "
                      "works too.")
      .def(py::init(&make_tag), py::arg("tenant") = 0, py::arg("session") = 0,
           py::arg("logical_page") = 0, py::arg("generation") = 0)
      .def(py::init(&tag_from_tuple), py::arg("tag"))
      .def_readwrite("tenant", &SlotTag::tenant)
      .def_readwrite("session", &SlotTag::session)
      .def_readwrite("logical_page", &SlotTag::logical_page)
      .def_readwrite("generation", &SlotTag::generation)
      .def("__eq__",
           [](const SlotTag& a, const SlotTag& b) {
             return a.tenant == b.tenant && a.session == b.session &&
                    a.logical_page == b.logical_page && a.generation == b.generation;
           })
      .def("__repr__", &tag_repr);
  py::implicitly_convertible<py::tuple, SlotTag>();

  py::class_<DiskStore> store(
      m, "DiskStore",
      "The disk tier: one preallocated file of page slots in `folder`, read and written with "
      "O_DIRECT where the file system allows it (else buffered; see direct_io_reason). Each "
      "slot's header carries its tag and checksums, and every read verifies them. The file is "
      "deleted when the store is.");
  store
      .def(py::init([](const std::string& folder, int64_t num_slots, int64_t page_bytes,
                       int io_threads, bool direct_io,
                       const std::vector<std::pair<std::string, int64_t>>& faults) {
             store::DiskStoreOptions options;
             options.folder = folder;
             options.num_slots = num_slots;
             options.page_bytes = page_bytes;
             options.io_threads = io_threads;
             options.try_direct_io = direct_io;
             options.faults = std::make_shared<FaultInjector>();
             for (const auto& fault : faults) {
               options.faults->arm(FaultInjector::parse(fault.first), fault.second);
             }
             py::gil_scoped_release release;
             return DiskStore::create(options);
           }),
           py::arg("folder"), py::arg("num_slots"), py::arg("page_bytes"),
           py::arg("io_threads") = 4, py::arg("direct_io") = true,
           py::arg("faults") = std::vector<std::pair<std::string, int64_t>>(),
           "Creates and preallocates the slot file; raises StoreError when the folder is "
           "unusable or lacks room. direct_io=False skips O_DIRECT. faults (tests): "
           "[(kind, nth)] armed before the file is opened, as inject_fault does.")
      .def_property_readonly("num_slots", &DiskStore::num_slots)
      .def_property_readonly("page_bytes", &DiskStore::page_bytes)
      .def_property_readonly("slot_bytes", &DiskStore::slot_bytes,
                             "Bytes per slot on disk: a 4096-byte header and the page, aligned")
      .def_property_readonly("path", &DiskStore::path)
      .def_property_readonly("direct_io", &DiskStore::direct_io)
      .def_property_readonly("direct_io_reason", &DiskStore::direct_io_reason,
                             "Why I/O is buffered; empty when O_DIRECT is in use")
      .def_property_readonly("io_threads", &DiskStore::io_threads)
      .def(
          "write_page",
          [](DiskStore& s, int64_t slot, const SlotTag& tag, const at::Tensor& src) {
            const void* bytes = host_bytes(src, s.page_bytes(), "DiskStore.write_page", "src");
            py::gil_scoped_release release;
            s.write_page(slot, tag, bytes);
          },
          py::arg("slot"), py::arg("tag"), py::arg("src"),
          "Writes `src` (a contiguous CPU tensor of page_bytes bytes) into `slot` under `tag`. "
          "On failure raises StoreError and the slot holds no valid page.")
      .def(
          "write_page",
          [](DiskStore& s, int64_t slot, const at::Tensor& src, int32_t tenant, int64_t session,
             int64_t logical_page, uint64_t generation) {
            const void* bytes = host_bytes(src, s.page_bytes(), "DiskStore.write_page", "src");
            const SlotTag tag = make_tag(tenant, session, logical_page, generation);
            py::gil_scoped_release release;
            s.write_page(slot, tag, bytes);
          },
          py::arg("slot"), py::arg("src"), py::kw_only(), py::arg("tenant"), py::arg("session"),
          py::arg("logical_page"), py::arg("generation"))
      .def(
          "read_page",
          [](DiskStore& s, int64_t slot, const SlotTag& expected, const at::Tensor& dst) {
            void* bytes = host_bytes(dst, s.page_bytes(), "DiskStore.read_page", "dst");
            {
              py::gil_scoped_release release;
              s.read_page(slot, expected, bytes);
            }
            return dst;
          },
          py::arg("slot"), py::arg("tag"), py::arg("dst"),
          "Reads `slot` into `dst` (a contiguous CPU tensor of page_bytes bytes) and returns "
          "it, after checking the slot's tag against `tag` and both checksums; raises "
          "StoreError on any mismatch or I/O error (`dst` then holds no page data).")
      .def(
          "read_page",
          [](DiskStore& s, int64_t slot, const at::Tensor& dst, int32_t tenant, int64_t session,
             int64_t logical_page, uint64_t generation) {
            void* bytes = host_bytes(dst, s.page_bytes(), "DiskStore.read_page", "dst");
            const SlotTag expected = make_tag(tenant, session, logical_page, generation);
            {
              py::gil_scoped_release release;
              s.read_page(slot, expected, bytes);
            }
            return dst;
          },
          py::arg("slot"), py::arg("dst"), py::kw_only(), py::arg("tenant"), py::arg("session"),
          py::arg("logical_page"), py::arg("generation"))
      .def(
          "write_pages",
          [](DiskStore& s, const py::sequence& requests, bool check) {
            const std::string call = "DiskStore.write_pages";
            std::vector<Request> parsed = parse_requests(requests, call, "src");
            std::vector<PageWrite> pages(parsed.size());
            for (size_t i = 0; i < parsed.size(); ++i) {
              const std::string arg = "src of request " + std::to_string(i);
              pages[i].slot = parsed[i].slot;
              pages[i].tag = parsed[i].tag;
              pages[i].src = host_bytes(parsed[i].tensor, s.page_bytes(), call, arg.c_str());
            }
            std::vector<SlotFailure> failures;
            {
              py::gil_scoped_release release;
              failures = s.write_pages(pages);
            }
            if (check && !failures.empty()) {
              throw StoreError(store::describe_failures(failures, pages.size(), "page writes"));
            }
            return failure_list(failures);
          },
          py::arg("requests"), py::arg("check") = true,
          "Writes a batch of (slot, tag, src) requests, io_threads at a time. With check=True "
          "(default) raises StoreError naming every failed request and its slot; with "
          "check=False returns the failures as [(index, slot, message)]. Either way every "
          "request was attempted, and each failed slot holds no valid page.")
      .def(
          "read_pages",
          [](DiskStore& s, const py::sequence& requests, bool check) {
            const std::string call = "DiskStore.read_pages";
            std::vector<Request> parsed = parse_requests(requests, call, "dst");
            std::vector<PageRead> pages(parsed.size());
            for (size_t i = 0; i < parsed.size(); ++i) {
              const std::string arg = "dst of request " + std::to_string(i);
              pages[i].slot = parsed[i].slot;
              pages[i].expected = parsed[i].tag;
              pages[i].dst = host_bytes(parsed[i].tensor, s.page_bytes(), call, arg.c_str());
            }
            std::vector<SlotFailure> failures;
            {
              py::gil_scoped_release release;
              failures = s.read_pages(pages);
            }
            if (check && !failures.empty()) {
              throw StoreError(store::describe_failures(failures, pages.size(), "page reads"));
            }
            return failure_list(failures);
          },
          py::arg("requests"), py::arg("check") = true,
          "Reads a batch of (slot, tag, dst) requests, io_threads at a time, verifying each as "
          "read_page does. check as in write_pages.")
      .def(
          "read_header",
          [](DiskStore& s, int64_t slot, const SlotTag& expected) {
            py::gil_scoped_release release;
            return s.read_header(slot, expected);
          },
          py::arg("slot"), py::arg("tag"),
          "Checks that `slot` holds a page under `tag` by reading its header alone (the first "
          "step of a read that bypasses the host, such as cuFile's) and returns the payload "
          "checksum it stores; raises StoreError as read_page does.")
      .def_property_readonly("file_descriptor", &DiskStore::file_descriptor,
                             "The slot file's descriptor (for cuFile), -1 when none")
      .def("payload_offset", &DiskStore::payload_offset, py::arg("slot"),
           "The file offset of the slot's page bytes, after its 4096-byte header")
      .def("slot_in_use", &DiskStore::slot_in_use, py::arg("slot"),
           "False only for a slot never written")
      .def(
          "inject_fault",
          [](DiskStore& s, const std::string& kind, int64_t nth) {
            injector_of(s).arm(FaultInjector::parse(kind), nth);
          },
          py::arg("kind"), py::arg("nth") = 1,
          "Tests: makes the nth page operation from now that `kind` matches fail that way (one "
          "of DiskStore.FAULT_KINDS; nth=1 is the next one). It fires once.")
      .def("clear_faults", [](DiskStore& s) { injector_of(s).clear(); })
      .def(
          "faults_fired",
          [](DiskStore& s, const std::string& kind) {
            return injector_of(s).fired(FaultInjector::parse(kind));
          },
          py::arg("kind"), "How many times fault `kind` has fired in this store.")
      .def("__repr__", [](const DiskStore& s) {
        return "DiskStore(path='" + s.path() + "', num_slots=" + std::to_string(s.num_slots()) +
               ", page_bytes=" + std::to_string(s.page_bytes()) + ", slot_bytes=" +
               std::to_string(s.slot_bytes()) + ", direct_io=" +
               (s.direct_io() ? "True" : "False") + ")";
      });
  py::list kinds;
  for (int k = 1; k < static_cast<int>(FaultKind::kCount); ++k) {
    kinds.append(FaultInjector::name(static_cast<FaultKind>(k)));
  }
  store.attr("FAULT_KINDS") = py::tuple(kinds);

  m.def(
      "_cufile_load",
      [](const std::vector<std::string>& names) {
        std::string reason;
        std::unique_ptr<store::CufileLibrary> library = store::CufileLibrary::load(names, &reason);
        return library ? std::string() : reason;
      },
      py::arg("names"),
      "Tests: loads libcufile from exactly `names` (in order) through the shim, resolves its entry "
      "points and unloads it; returns '' on success, else the reason. Opens no driver.");
  m.def(
      "cufile_library_status",
      [](const std::vector<std::string>& extra_paths) {
        std::string reason;
        const store::CufileLibrary* library = store::CufileLibrary::shared(extra_paths, &reason);
        return library ? "loads (" + library->path() + ")" : "not usable: " + reason;
      },
      py::arg("extra_paths") = std::vector<std::string>(),
      "Whether the process's libcufile loads through the shim (with every entry point) and from "
      "where; the first call's outcome is kept.");
  m.def(
      "checksum64",
      [](const at::Tensor& data, uint64_t seed) {
        const void* bytes = host_bytes(data, -1, "checksum64", "data");
        const size_t size = data.nbytes();
        py::gil_scoped_release release;
        return store::checksum64(bytes, size, seed);
      },
      py::arg("data"), py::arg("seed") = 0,
      "The disk tier's 64-bit checksum of a contiguous CPU tensor's bytes.");
}

}  // namespace paged_kv
