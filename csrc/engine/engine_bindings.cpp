// Python binding of the pager: paged_kv._C.Pager over pool tensors (and an optional disk store),
// with PagerError and PagerInternalError.
#include <torch/extension.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <vector>

#include "engine/index_allocator.h"
#include "engine/lru_list.h"
#include "engine/pager.h"
#include "engine/pager_errors.h"
#include "engine/tensor_mover.h"

namespace py = pybind11;

namespace paged_kv {
namespace {

using engine::PageId;
using engine::PageMeta;
using engine::Pager;
using engine::PagerConfig;
using engine::TensorMover;

// A pager with the mover over its pools; keeps the disk store's Python object alive.
class PagerHandle {
 public:
  PagerHandle(const PagerConfig& config, const at::Tensor& pool, const at::Tensor& host_pool,
              py::object disk_store, bool bounce_through_host_slots, const std::string& io_backend,
              const std::vector<std::string>& cufile_paths)
      : disk_owner_(std::move(disk_store)) {
    store::DiskStore* disk = nullptr;
    if (!disk_owner_.is_none()) {
      TORCH_CHECK(py::isinstance<store::DiskStore>(disk_owner_), "paged_kv pager: disk_store must "
                  "be a paged_kv.store.DiskStore, got ", std::string(py::str(py::type::of(disk_owner_))));
      disk = disk_owner_.cast<store::DiskStore*>();
    }
    {
      // The backend check reads and writes the disk and may wait on the GPU.
      py::gil_scoped_release release;
      mover_ = std::make_unique<TensorMover>(pool, host_pool, disk, bounce_through_host_slots,
                                             io_backend, cufile_paths);
    }
    TORCH_CHECK(config.num_frames <= mover_->num_frames(), "paged_kv pager: num_frames ",
                config.num_frames, " exceeds the pool's ", mover_->num_frames(), " frames");
    TORCH_CHECK(config.num_host_slots <= mover_->num_host_slots(), "paged_kv pager: num_host_slots ",
                config.num_host_slots, " exceeds host_pool's ", mover_->num_host_slots(), " slots");
    TORCH_CHECK(config.num_disk_slots <= mover_->num_disk_slots(), "paged_kv pager: num_disk_slots ",
                config.num_disk_slots, disk ? " exceeds the disk store's " : " needs a disk store, got ",
                disk ? std::to_string(mover_->num_disk_slots()) + " slots" : std::string("none"));
    PagerConfig with_bytes = config;
    with_bytes.page_bytes = mover_->page_bytes();
    pager_ = std::make_unique<Pager>(with_bytes, *mover_);
  }

  Pager& pager() { return *pager_; }
  const TensorMover& mover() const { return *mover_; }

 private:
  py::object disk_owner_;
  std::unique_ptr<TensorMover> mover_;  // declared before the pager, so it outlives it
  std::unique_ptr<Pager> pager_;
};

// pages: int32 or int64 [n, 2] of (page-table row, page), on any device.
std::vector<PageId> page_list(const Pager& pager, const at::Tensor& pages, const char* op) {
  TORCH_CHECK(pages.dim() == 2 && pages.size(1) == 2, "paged_kv pager: ", op,
              ": pages must be [n, 2] (row, page), got ", pages.sizes());
  TORCH_CHECK(pages.scalar_type() == at::kInt || pages.scalar_type() == at::kLong, "paged_kv pager: ",
              op, ": pages must be int32 or int64, got ", pages.scalar_type());
  const at::Tensor list = pages.to(at::kCPU, at::kLong).contiguous();
  const int64_t* v = list.data_ptr<int64_t>();
  std::vector<PageId> ids;
  ids.reserve(static_cast<size_t>(list.size(0)));
  for (int64_t i = 0; i < list.size(0); ++i) ids.push_back(pager.page_id(v[2 * i], v[2 * i + 1], op));
  return ids;
}

Tier tier_arg(int64_t tier) {
  TORCH_CHECK(tier >= 0 && tier <= 3, "paged_kv pager: tier must be 0 (GPU), 1 (host), 2 (disk) or 3, got ",
              tier);
  return static_cast<Tier>(tier);
}

at::Tensor mirror_tensor(const Pager& pager) {
  const PagerConfig& c = pager.config();
  // A view of the mirror; callers copy out of it before the pager changes it again.
  return at::from_blob(const_cast<int32_t*>(pager.pte_mirror().data()), {c.max_sequences, c.max_pages},
                       at::TensorOptions().dtype(at::kInt));
}

int64_t sync_table(Pager& pager, at::Tensor& table, bool all_rows) {
  const PagerConfig& c = pager.config();
  TORCH_CHECK(table.scalar_type() == at::kInt, "paged_kv pager: sync_table: page_table must be int32, got ",
              table.scalar_type());
  TORCH_CHECK(table.dim() == 2 && table.size(0) == c.max_sequences && table.size(1) == c.max_pages,
              "paged_kv pager: sync_table: page_table must be [", c.max_sequences, ", ", c.max_pages,
              "], got ", table.sizes());
  if (all_rows) pager.mark_all_rows_dirty();
  const std::vector<int64_t> rows = pager.take_dirty_rows();
  if (rows.empty()) return 0;
  const at::Tensor index = at::tensor(rows, at::TensorOptions().dtype(at::kLong));
  const at::Tensor source = mirror_tensor(pager).index_select(0, index);
  table.index_copy_(0, index.to(table.device()), source.to(table.device()));
  return static_cast<int64_t>(rows.size());
}

// A list of rows and one of page counts, one count per row (touch_prefixes, prefixes_reachable).
void check_prefix_lists(const std::vector<int64_t>& rows, const std::vector<int64_t>& counts,
                        const char* op) {
  TORCH_CHECK(rows.size() == counts.size(), "paged_kv pager: ", op, ": ", rows.size(), " rows but ",
              counts.size(), " page counts");
}

// Pages 0 .. counts[i] - 1 of each rows[i]: the pages one attention call reads.
std::vector<PageId> prefix_pages(const Pager& pager, const std::vector<int64_t>& rows,
                                 const std::vector<int64_t>& counts, const char* op) {
  check_prefix_lists(rows, counts, op);
  std::vector<PageId> ids;
  for (size_t i = 0; i < rows.size(); ++i) {
    for (int64_t p = 0; p < counts[i]; ++p) ids.push_back(pager.page_id(rows[i], p, op));
  }
  return ids;
}

// Whether every page an attention call reads is within the kernel's reach (a GPU frame, or a
// host slot when the kernel reads host memory): one pass over the PTE mirror, no tensors, so a
// decode step's check costs little host time.
bool prefixes_reachable(const Pager& pager, const std::vector<int64_t>& rows,
                        const std::vector<int64_t>& counts, bool host_readable) {
  check_prefix_lists(rows, counts, "prefixes_reachable");
  const int64_t stride = pager.config().max_pages;
  const std::vector<int32_t>& mirror = pager.pte_mirror();
  for (size_t i = 0; i < rows.size(); ++i) {
    if (counts[i] <= 0) continue;
    pager.page_id(rows[i], counts[i] - 1, "prefixes_reachable");  // checks the row and the count
    const int32_t* ptes = mirror.data() + rows[i] * stride;
    for (int64_t p = 0; p < counts[i]; ++p) {
      if (ptes[p] == kPteUnmapped) return false;
      const Tier tier = pte_tier(ptes[p]);
      if (!(tier == Tier::kGpu || (host_readable && tier == Tier::kHost))) return false;
    }
  }
  return true;
}

py::dict page_info(Pager& pager, int64_t row, int64_t page) {
  const PageMeta& m = pager.page_meta(row, page);
  py::dict d;
  d["tier"] = static_cast<int>(m.current_tier());
  d["pte"] = m.pte();
  d["frame"] = m.frame;
  d["host_slot"] = m.host_slot;
  d["disk_slot"] = m.disk_slot;
  d["sealed"] = m.sealed();
  d["host_valid"] = m.host_valid();
  d["disk_valid"] = m.disk_valid();
  d["pins"] = m.pins;
  d["tenant"] = m.tenant;
  d["last_use"] = m.last_use;
  d["generation"] = m.generation;
  d["sharers"] = pager.sharers(row, page);
  const store::SlotTag tag = pager.disk_tag(row, page);
  d["disk_tag"] = py::make_tuple(tag.tenant, tag.session, tag.logical_page, tag.generation);
  return d;
}

// The building blocks under names local to this file: pybind11 classes must not be more visible
// than the module (which hides its symbols).
class TestAllocator : public engine::IndexAllocator {
 public:
  using engine::IndexAllocator::IndexAllocator;
};

class TestLruList : public engine::LruList {
 public:
  using engine::LruList::LruList;
};

int64_t lru_node(const engine::LruList& list, int64_t node) {
  TORCH_CHECK(node >= 0 && node < list.capacity(), "node ", node, " is outside [0, ", list.capacity(), ")");
  return node;
}

py::dict stats_dict(const Pager& pager) {
  const engine::PagerStats& s = pager.stats();
  py::dict d;
  d["service_calls"] = s.service_calls;
  d["faults_serviced"] = s.faults_serviced;
  py::dict pages, bytes;
  for (int i = 0; i < engine::kNumDirections; ++i) {
    const char* name = engine::direction_name(static_cast<engine::Direction>(i));
    pages[name] = s.pages_moved[i];
    bytes[name] = s.bytes_moved[i];
  }
  d["pages_moved"] = pages;
  d["bytes_moved"] = bytes;
  py::dict evictions;
  evictions["gpu"] = s.evictions_gpu;
  evictions["host"] = s.evictions_host;
  evictions["disk"] = s.evictions_disk;
  d["evictions"] = evictions;
  d["evictions_without_write"] = s.evictions_without_write;
  d["write_throughs"] = s.write_throughs;
  d["write_throughs_deferred"] = s.write_throughs_deferred;
  d["frames_zeroed"] = s.frames_zeroed;
  d["service_seconds"] = static_cast<double>(s.service_ns) * 1e-9;
  return d;
}

}  // namespace

void bind_engine(py::module_& m) {
  py::register_exception<engine::PagerError>(m, "PagerError", PyExc_RuntimeError);
  py::register_exception<engine::PagerInternalError>(m, "PagerInternalError", PyExc_RuntimeError);

  py::class_<PagerHandle>(m, "Pager", "The pager over pool tensors (see paged_kv.pager.Pager).")
      .def(py::init([](int64_t num_frames, int64_t num_host_slots, int64_t num_disk_slots,
                       int64_t max_sequences, int64_t max_pages, bool write_through,
                       const at::Tensor& pool, const at::Tensor& host_pool, py::object disk_store,
                       bool bounce_through_host_slots, const std::string& io_backend,
                       const std::vector<std::string>& cufile_paths) {
             PagerConfig c;
             c.num_frames = num_frames;
             c.num_host_slots = num_host_slots;
             c.num_disk_slots = num_disk_slots;
             c.max_sequences = max_sequences;
             c.max_pages = max_pages;
             c.write_through = write_through;
             return std::make_unique<PagerHandle>(c, pool, host_pool, std::move(disk_store),
                                                  bounce_through_host_slots, io_backend, cufile_paths);
           }),
           py::arg("num_frames"), py::arg("num_host_slots"), py::arg("num_disk_slots"),
           py::arg("max_sequences"), py::arg("max_pages"), py::arg("write_through"), py::arg("pool"),
           py::arg("host_pool"), py::arg("disk_store") = py::none(),
           py::arg("bounce_through_host_slots") = false, py::arg("io_backend") = "posix",
           py::arg("cufile_paths") = std::vector<std::string>())
      .def("add_sequence",
           [](PagerHandle& h, int32_t tenant, int64_t row) { return h.pager().add_sequence(tenant, row); },
           py::arg("tenant"), py::arg("row") = -1)
      .def("remove_sequence", [](PagerHandle& h, int64_t row) { h.pager().remove_sequence(row); },
           py::arg("row"))
      .def("fork", [](PagerHandle& h, int64_t parent, int64_t row) { return h.pager().fork(parent, row); },
           py::arg("parent"), py::arg("row") = -1)
      .def("append_pages",
           [](PagerHandle& h, int64_t row, int64_t n, bool seal_open) {
             return h.pager().append_pages(row, n, seal_open);
           },
           py::arg("row"), py::arg("n"), py::kw_only(), py::arg("seal_open") = true)
      .def("drop_open_pages", [](PagerHandle& h, int64_t row, int64_t n) { h.pager().drop_open_pages(row, n); },
           py::arg("row"), py::arg("n"))
      .def("seal", [](PagerHandle& h, int64_t row, int64_t page) { h.pager().seal(row, page); },
           py::arg("row"), py::arg("page"))
      .def("is_live", [](PagerHandle& h, int64_t row) { return h.pager().is_live(row); }, py::arg("row"))
      .def("num_pages", [](PagerHandle& h, int64_t row) { return h.pager().num_pages(row); }, py::arg("row"))
      .def("tenant", [](PagerHandle& h, int64_t row) { return h.pager().tenant(row); }, py::arg("row"))
      .def("set_replacement",
           [](PagerHandle& h, const std::string& name, double decay, double share, int64_t sink_pages,
              int64_t window_pages) {
             engine::Replacement replacement = engine::Replacement::kLru;
             if (name == "span") {
               replacement = engine::Replacement::kSpan;
             } else if (name != "lru") {
               throw std::invalid_argument("paged_kv pager: set_replacement: replacement must be 'lru' or "
                                           "'span', got '" + name + "'");
             }
             h.pager().set_replacement(replacement, engine::SpanPolicy{decay, share, sink_pages, window_pages});
           },
           py::arg("replacement"), py::arg("decay") = engine::SpanPolicy().decay,
           py::arg("share") = engine::SpanPolicy().share, py::arg("sink_pages") = engine::SpanPolicy().sink_pages,
           py::arg("window_pages") = engine::SpanPolicy().window_pages)
      .def("replacement",
           [](PagerHandle& h) {
             return std::string(h.pager().replacement() == engine::Replacement::kSpan ? "span" : "lru");
           })
      .def("record_attention",
           [](PagerHandle& h, int64_t row, const at::Tensor& mass) {
             TORCH_CHECK(mass.dim() == 1 && mass.device().is_cpu() && at::isFloatingType(mass.scalar_type()),
                         "paged_kv pager: record_attention: mass must be a 1-D floating CPU tensor, got ",
                         mass.scalar_type(), " ", mass.sizes(), " on ", mass.device());
             const at::Tensor m = mass.to(at::kFloat).contiguous();
             const float* data = m.data_ptr<float>();
             h.pager().record_attention(row, std::vector<float>(data, data + m.numel()));
           },
           py::arg("row"), py::arg("mass"))
      .def("attention_scores",
           [](PagerHandle& h, int64_t row) {
             const std::vector<float> scores = h.pager().attention_scores(row);
             return at::tensor(c10::ArrayRef<float>(scores), at::TensorOptions().dtype(at::kFloat));
           },
           py::arg("row"))
      .def("touch",
           [](PagerHandle& h, const at::Tensor& pages, int64_t tick) {
             h.pager().touch(page_list(h.pager(), pages, "touch"), tick);
           },
           py::arg("pages"), py::arg("tick"))
      .def("touch_prefixes",
           [](PagerHandle& h, const std::vector<int64_t>& rows, const std::vector<int64_t>& counts,
              int64_t tick) { h.pager().touch(prefix_pages(h.pager(), rows, counts, "touch_prefixes"), tick); },
           py::arg("rows"), py::arg("counts"), py::arg("tick"))
      .def("prefixes_reachable",
           [](PagerHandle& h, const std::vector<int64_t>& rows, const std::vector<int64_t>& counts,
              bool host_readable) { return prefixes_reachable(h.pager(), rows, counts, host_readable); },
           py::arg("rows"), py::arg("counts"), py::arg("host_readable"))
      .def("pin", [](PagerHandle& h, const at::Tensor& pages) { h.pager().pin(page_list(h.pager(), pages, "pin")); },
           py::arg("pages"))
      .def("unpin",
           [](PagerHandle& h, const at::Tensor& pages) { h.pager().unpin(page_list(h.pager(), pages, "unpin")); },
           py::arg("pages"))
      .def("service",
           [](PagerHandle& h, const at::Tensor& pages) {
             return h.pager().service(page_list(h.pager(), pages, "service"));
           },
           py::arg("pages"))
      .def("max_serviceable", [](PagerHandle& h) { return h.pager().max_serviceable(); })
      .def("serviceable_prefix",
           [](PagerHandle& h, const at::Tensor& pages) {
             return h.pager().serviceable_prefix(page_list(h.pager(), pages, "serviceable_prefix"));
           },
           py::arg("pages"))
      .def("set_quota",
           [](PagerHandle& h, int32_t tenant, int64_t tier, int64_t pages) {
             h.pager().set_quota(tenant, tier_arg(tier), pages);
           },
           py::arg("tenant"), py::arg("tier"), py::arg("pages"))
      .def("quota", [](PagerHandle& h, int32_t tenant, int64_t tier) { return h.pager().quota(tenant, tier_arg(tier)); },
           py::arg("tenant"), py::arg("tier"))
      .def("usage", [](PagerHandle& h, int32_t tenant, int64_t tier) { return h.pager().usage(tenant, tier_arg(tier)); },
           py::arg("tenant"), py::arg("tier"))
      .def("promote",
           [](PagerHandle& h, const at::Tensor& pages, int64_t tier) {
             h.pager().promote(page_list(h.pager(), pages, "promote"), tier_arg(tier));
           },
           py::arg("pages"), py::arg("tier"))
      .def("demote",
           [](PagerHandle& h, const at::Tensor& pages, int64_t tier) {
             h.pager().demote(page_list(h.pager(), pages, "demote"), tier_arg(tier));
           },
           py::arg("pages"), py::arg("tier"))
      .def("page_table", [](PagerHandle& h) { return mirror_tensor(h.pager()).clone(); })
      .def("pte", [](PagerHandle& h, int64_t row, int64_t page) { return h.pager().pte(row, page); },
           py::arg("row"), py::arg("page"))
      .def("sync_table",
           [](PagerHandle& h, at::Tensor& table, bool all_rows) { return sync_table(h.pager(), table, all_rows); },
           py::arg("page_table"), py::arg("all_rows") = false)
      .def("take_dirty_rows", [](PagerHandle& h) { return h.pager().take_dirty_rows(); })
      .def("page_info", [](PagerHandle& h, int64_t row, int64_t page) { return page_info(h.pager(), row, page); },
           py::arg("row"), py::arg("page"))
      .def("stats", [](PagerHandle& h) { return stats_dict(h.pager()); })
      .def("reset_stats", [](PagerHandle& h) { h.pager().reset_stats(); })
      .def("free_frames", [](PagerHandle& h) { return h.pager().free_frames(); })
      .def("free_host_slots", [](PagerHandle& h) { return h.pager().free_host_slots(); })
      .def("free_disk_slots", [](PagerHandle& h) { return h.pager().free_disk_slots(); })
      .def("lru_order", [](PagerHandle& h, int64_t tier) { return h.pager().lru_order(tier_arg(tier)); },
           py::arg("tier"))
      .def("check_invariants", [](PagerHandle& h) { h.pager().check_invariants(); })
      .def("bytes_of_metadata", [](PagerHandle& h) { return h.pager().bytes_of_metadata(); })
      .def_property_readonly("page_bytes", [](PagerHandle& h) { return h.mover().page_bytes(); })
      .def_property_readonly("io_backend", [](PagerHandle& h) { return h.mover().io_backend(); })
      .def_property_readonly("io_backend_reason",
                             [](PagerHandle& h) { return h.mover().io_backend_reason(); })
      .def_property_readonly("config", [](PagerHandle& h) {
        const PagerConfig& c = h.pager().config();
        py::dict d;
        d["num_frames"] = c.num_frames;
        d["num_host_slots"] = c.num_host_slots;
        d["num_disk_slots"] = c.num_disk_slots;
        d["max_sequences"] = c.max_sequences;
        d["max_pages"] = c.max_pages;
        d["write_through"] = c.write_through;
        d["page_bytes"] = c.page_bytes;
        return d;
      })
      .def_property_readonly_static("metadata_bytes_per_page",
                                    [](py::object) { return Pager::kMetadataBytesPerPage; });

  // The pager's building blocks, for their own tests.
  py::class_<TestAllocator>(m, "_IndexAllocator")
      .def(py::init([](std::string name, int64_t capacity) {
             TORCH_CHECK(capacity >= 0, "capacity must be >= 0");
             return std::make_unique<TestAllocator>(std::move(name), capacity);
           }),
           py::arg("name"), py::arg("capacity"))
      .def("allocate", &engine::IndexAllocator::allocate, py::arg("owner"))
      .def("allocate_at", &engine::IndexAllocator::allocate_at, py::arg("index"), py::arg("owner"))
      .def("release", &engine::IndexAllocator::release, py::arg("index"), py::arg("owner"))
      .def("owner", [](const TestAllocator& a, int64_t i) {
        TORCH_CHECK(i >= 0 && i < a.capacity(), "index out of range");
        return a.owner(i);
      })
      .def("num_free", &engine::IndexAllocator::num_free)
      .def("check", &engine::IndexAllocator::check);
  py::class_<TestLruList>(m, "_LruList")
      .def(py::init([](int64_t capacity) {
             TORCH_CHECK(capacity >= 0, "capacity must be >= 0");
             return std::make_unique<TestLruList>(capacity);
           }),
           py::arg("capacity"))
      .def("push_back",
           [](TestLruList& l, int64_t node, bool dirty) { l.push_back(lru_node(l, node), dirty); },
           py::arg("node"), py::arg("dirty") = false)
      .def("remove", [](TestLruList& l, int64_t node) { l.remove(lru_node(l, node)); }, py::arg("node"))
      .def("touch", [](TestLruList& l, int64_t node) { l.touch(lru_node(l, node)); }, py::arg("node"))
      .def("contains", [](TestLruList& l, int64_t node) { return l.contains(lru_node(l, node)); },
           py::arg("node"))
      .def("front", &engine::LruList::front)
      .def("size", &engine::LruList::size)
      .def("num_dirty", &engine::LruList::num_dirty)
      .def("order", &engine::LruList::order)
      .def("check", [](const TestLruList& l) { return l.check("test"); });
}

}  // namespace paged_kv
