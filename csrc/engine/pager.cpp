// The pager's sequences, pins, touches, seals and page-table mirror. Eviction and the moves
// between tiers are in pager_moves.cpp; check_invariants() in pager_check.cpp.
#include "engine/pager.h"

#include <algorithm>
#include <limits>
#include <sstream>
#include <stdexcept>

#include "engine/pager_call_scope.h"
#include "engine/pager_errors.h"

namespace paged_kv::engine {
namespace {

void check_count(int64_t value, int64_t low, int64_t high, const char* name) {
  if (value < low || value > high) {
    std::ostringstream m;
    m << "paged_kv pager: " << name << " must be in [" << low << ", " << high << "], got " << value;
    throw std::invalid_argument(m.str());
  }
}

// Raises std::invalid_argument for a bad configuration, else returns it.
PagerConfig validated(const PagerConfig& config) {
  const int64_t max_index = kPteMaxIndex + 1;  // indices must fit the PTE's 30 bits
  check_count(config.num_frames, 1, max_index, "num_frames");
  check_count(config.num_host_slots, 0, max_index, "num_host_slots");
  check_count(config.num_disk_slots, 0, max_index, "num_disk_slots");
  check_count(config.max_sequences, 1, std::numeric_limits<int32_t>::max(), "max_sequences");
  check_count(config.max_pages, 1, std::numeric_limits<int32_t>::max(), "max_pages");
  check_count(config.page_bytes, 0, std::numeric_limits<int64_t>::max(), "page_bytes");
  if (config.num_disk_slots > 0 && config.num_host_slots == 0) {
    throw std::invalid_argument(
        "paged_kv pager: a disk tier needs at least one host slot (pages reach the disk through "
        "the host), got num_disk_slots=" + std::to_string(config.num_disk_slots) +
        " and num_host_slots=0");
  }
  if (config.write_through && config.num_host_slots == 0) {
    throw std::invalid_argument(
        "paged_kv pager: write_through writes sealed pages to host slots, but num_host_slots is 0");
  }
  return config;
}

}  // namespace

Pager::Pager(const PagerConfig& config, Mover& mover)
    : config_(validated(config)),
      mover_(mover),
      row_ids_("page-table row", config_.max_sequences),
      frames_("GPU frame", config_.num_frames),
      host_slots_("host slot", config_.num_host_slots),
      disk_slots_("disk slot", config_.num_disk_slots),
      gpu_lru_(config_.num_frames),
      host_lru_(config_.num_host_slots),
      disk_lru_(config_.num_disk_slots),
      frame_tenant_(static_cast<size_t>(config_.num_frames), -1),
      ptes_(static_cast<size_t>(config_.max_sequences * config_.max_pages), kPteUnmapped),
      row_dirty_(static_cast<size_t>(config_.max_sequences), 0) {
  rows_.resize(static_cast<size_t>(config_.max_sequences));
  // Per-tenant counts of frames and slots, for the quotas. A row's tenant is fixed while it
  // has pages, so an index is counted under the same tenant from allocation to release.
  const auto tenant_of_owner = [this](int64_t key) { return rows_[page_of_owner(key).row].tenant; };
  frames_.set_group_of(tenant_of_owner);
  host_slots_.set_group_of(tenant_of_owner);
  disk_slots_.set_group_of(tenant_of_owner);
}

// ---- arguments ----

void Pager::check_row(int64_t row, const char* op) const {
  if (row < 0 || row >= config_.max_sequences) {
    std::ostringstream m;
    m << "paged_kv pager: " << op << ": row " << row << " is outside the page table's "
      << config_.max_sequences << " rows";
    throw std::invalid_argument(m.str());
  }
  if (row_ids_.is_free(row)) {
    std::ostringstream m;
    m << "paged_kv pager: " << op << ": row " << row << " holds no sequence";
    throw std::invalid_argument(m.str());
  }
}

PageId Pager::page_id(int64_t row, int64_t page, const char* op) const {
  check_row(row, op);
  const int64_t n = static_cast<int64_t>(rows_[row].pages.size());
  if (page < 0 || page >= n) {
    std::ostringstream m;
    m << "paged_kv pager: " << op << ": page " << page << " of sequence " << row
      << " does not exist (the sequence has " << n << " pages)";
    throw std::invalid_argument(m.str());
  }
  return PageId{static_cast<int32_t>(row), static_cast<int32_t>(page)};
}

void Pager::check_page(PageId id, const char* op) const { page_id(id.row, id.page, op); }

std::vector<PageId> Pager::distinct_pages(const std::vector<PageId>& pages, const char* op) const {
  for (const PageId& id : pages) check_page(id, op);
  std::vector<PageId> distinct;
  distinct.reserve(pages.size());
  for (const PageId& id : pages) distinct.push_back(resolve(id));  // a fork's view: the page it shares
  std::sort(distinct.begin(), distinct.end());
  distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
  return distinct;
}

store::SlotTag Pager::tag_of(PageId id) const {
  const PageMeta& m = meta(id);
  store::SlotTag tag;
  tag.tenant = m.tenant;
  // A page that took over a removed sequence's copies keeps that page's tag (pager_fork.cpp).
  const auto origin = tag_origin_.find(owner_key(id));
  const PageId named = origin == tag_origin_.end() ? id : origin->second;
  tag.session = named.row;
  tag.logical_page = named.page;
  tag.generation = m.generation;
  return tag;
}

// ---- sequences ----

int64_t Pager::add_sequence(int32_t tenant, int64_t row) {
  if (tenant < 0) {
    throw std::invalid_argument("paged_kv pager: add_sequence: tenant must be >= 0, got " +
                                std::to_string(tenant));
  }
  if (row < 0) {
    if (row_ids_.num_free() == 0) {
      throw PagerError("paged_kv pager: add_sequence: all " + std::to_string(config_.max_sequences) +
                       " page-table rows hold sequences; remove one first");
    }
    row = row_ids_.allocate(tenant);
  } else {
    if (row >= config_.max_sequences) {
      std::ostringstream m;
      m << "paged_kv pager: add_sequence: row " << row << " is outside the page table's "
        << config_.max_sequences << " rows";
      throw std::invalid_argument(m.str());
    }
    if (!row_ids_.is_free(row)) {
      throw std::invalid_argument("paged_kv pager: add_sequence: row " + std::to_string(row) +
                                  " already holds a sequence");
    }
    row_ids_.allocate_at(row, tenant);
  }
  rows_[row].tenant = tenant;
  rows_[row].pages.clear();
  rows_[row].scores.clear();
  rows_[row].score_weights.clear();
  return row;
}

void Pager::remove_sequence(int64_t row) {
  check_row(row, "remove_sequence");
  Row& r = rows_[row];
  for (size_t p = 0; p < r.pages.size(); ++p) {
    release_page(PageId{static_cast<int32_t>(row), static_cast<int32_t>(p)});
  }
  std::fill(ptes_.begin() + row * config_.max_pages,
            ptes_.begin() + row * config_.max_pages + static_cast<int64_t>(r.pages.size()), kPteUnmapped);
  if (!r.pages.empty() && !row_dirty_[row]) {
    row_dirty_[row] = 1;
    dirty_rows_.push_back(row);
  }
  r.pages.clear();
  r.pages.shrink_to_fit();
  r.scores.clear();
  r.scores.shrink_to_fit();
  r.score_weights.clear();
  r.score_weights.shrink_to_fit();
  row_ids_.release(row, r.tenant);
}

bool Pager::is_live(int64_t row) const {
  return row >= 0 && row < config_.max_sequences && !row_ids_.is_free(row);
}

int64_t Pager::num_pages(int64_t row) const {
  check_row(row, "num_pages");
  return static_cast<int64_t>(rows_[row].pages.size());
}

int32_t Pager::tenant(int64_t row) const {
  check_row(row, "tenant");
  return rows_[row].tenant;
}

int64_t Pager::append_pages(int64_t row, int64_t n, bool seal_open) {
  check_row(row, "append_pages");
  Row& r = rows_[row];
  const int64_t first = static_cast<int64_t>(r.pages.size());
  if (n < 0 || first + n > config_.max_pages) {
    std::ostringstream m;
    m << "paged_kv pager: append_pages: cannot append " << n << " pages to sequence " << row
      << ", which has " << first << " of at most " << config_.max_pages << " pages";
    throw std::invalid_argument(m.str());
  }
  if (n == 0) return first;
  std::ostringstream why;
  why << "append_pages of " << n << " pages to sequence " << row;

  // The open pages are a suffix; when asked, seal them oldest first, so the oldest is the least
  // recent. Left open, they stay in their frames and the new open pages follow them, so the
  // open pages remain a suffix either way.
  std::vector<PageId> open;
  if (seal_open) {
    int64_t first_open = first;
    while (first_open > 0 && !r.pages[first_open - 1].sealed()) --first_open;
    for (int64_t p = first_open; p < first; ++p) {
      open.push_back(PageId{static_cast<int32_t>(row), static_cast<int32_t>(p)});
    }
  }
  // Pages sealed here become evictable; refuse before sealing anything if even that leaves too
  // few frames.
  int64_t unpinned_open = 0;
  for (const PageId& id : open) unpinned_open += meta(id).pins == 0 ? 1 : 0;
  if (n > frames_.num_free() + gpu_lru_.size() + unpinned_open) raise_no_frames(n, why.str());
  CallScope scope(*this, {});
  seal_pages(open);
  make_quota_room(Tier::kGpu, {{r.tenant, n}}, why.str());
  make_free_frames(n, why.str());

  r.pages.reserve(static_cast<size_t>(first + n));
  r.scores.resize(static_cast<size_t>(first + n), 0.f);
  r.score_weights.resize(static_cast<size_t>(first + n), 0.f);
  std::vector<int64_t> to_zero;  // frames whose last page was another tenant's
  for (int64_t i = 0; i < n; ++i) {
    const PageId id{static_cast<int32_t>(row), static_cast<int32_t>(first + i)};
    PageMeta m;
    m.tenant = r.tenant;
    m.generation = static_cast<uint32_t>(++next_generation_);
    m.frame = static_cast<int32_t>(frames_.allocate(owner_key(id)));
    if (frame_tenant_[m.frame] >= 0 && frame_tenant_[m.frame] != r.tenant) to_zero.push_back(m.frame);
    r.pages.push_back(m);
    refresh(id);  // open: in no LRU list
  }
  if (!to_zero.empty()) {
    mover_.zero_frames(to_zero);
    moves_pending_ = true;
    stats_.frames_zeroed += static_cast<int64_t>(to_zero.size());
  }
  flush_moves();
  return first;
}

void Pager::drop_open_pages(int64_t row, int64_t n) {
  check_row(row, "drop_open_pages");
  Row& r = rows_[row];
  const int64_t count = static_cast<int64_t>(r.pages.size());
  const auto refuse = [&](const std::string& why) {
    std::ostringstream m;
    m << "paged_kv pager: drop_open_pages: cannot drop the last " << n << " pages of sequence " << row
      << " (" << count << " pages): " << why;
    throw std::invalid_argument(m.str());
  };
  if (n < 0 || n > count) refuse("n must be between 0 and the number of pages");
  for (int64_t p = count - n; p < count; ++p) {
    const PageMeta& m = r.pages[static_cast<size_t>(p)];
    if (m.sealed()) refuse("page " + std::to_string(p) + " is sealed");
    if (m.pins > 0) refuse("page " + std::to_string(p) + " is pinned");
  }
  for (int64_t p = count - 1; p >= count - n; --p) {
    release_page(PageId{static_cast<int32_t>(row), static_cast<int32_t>(p)});
    ptes_[static_cast<size_t>(row) * config_.max_pages + p] = kPteUnmapped;
    r.pages.pop_back();
  }
  r.scores.resize(r.pages.size());
  r.score_weights.resize(r.pages.size());
  if (n > 0 && !row_dirty_[row]) {
    row_dirty_[row] = 1;
    dirty_rows_.push_back(row);
  }
}

void Pager::seal(int64_t row, int64_t page) {
  const PageId id = page_id(row, page, "seal");
  if (meta(id).sealed()) return;
  // Open pages stay a suffix of the sequence: the pages before this one are full too.
  int64_t first_open = page;
  while (first_open > 0 && !rows_[row].pages[first_open - 1].sealed()) --first_open;
  std::vector<PageId> open;
  for (int64_t p = first_open; p <= page; ++p) {
    open.push_back(PageId{static_cast<int32_t>(row), static_cast<int32_t>(p)});
  }
  CallScope scope(*this, {});
  seal_pages(open);
  flush_moves();
}

void Pager::seal_pages(const std::vector<PageId>& pages) {
  std::vector<PageId> write;
  for (const PageId& id : pages) {
    PageMeta& m = meta(id);
    m.set_flag(kPageSealed, true);
    relink(id, m);
    if (config_.write_through && !m.host_valid()) write.push_back(id);
  }
  if (write.empty()) return;
  // Written now, the page never needs a write-back when evicted. Where the host tier (or the
  // tenant's host quota) has no room, the pages stay sealed without a host copy and are written
  // back when evicted, as under write-back: sealing never fails for want of room.
  try {
    make_free_host_slots(static_cast<int64_t>(write.size()),
                         "write-through of " + std::to_string(write.size()) + " sealed pages");
    write_back_to_host(write);
  } catch (const PagerError&) {
    stats_.write_throughs_deferred += static_cast<int64_t>(write.size());
    return;
  }
  stats_.write_throughs += static_cast<int64_t>(write.size());
}

// ---- use and pins ----

void Pager::touch(const std::vector<PageId>& pages, int64_t tick) {
  for (const PageId& id : pages) check_page(id, "touch");
  for (const PageId& view : pages) {
    const PageId id = resolve(view);
    PageMeta& m = meta(id);
    m.last_use = tick;
    if (m.frame >= 0 && gpu_lru_.contains(m.frame)) gpu_lru_.touch(m.frame);
    if (m.host_slot >= 0 && host_lru_.contains(m.host_slot)) host_lru_.touch(m.host_slot);
    if (m.disk_slot >= 0 && disk_lru_.contains(m.disk_slot)) disk_lru_.touch(m.disk_slot);
  }
}

void Pager::add_pin(PageId id) {
  PageMeta& m = meta(id);
  if (m.pins == std::numeric_limits<uint16_t>::max()) {
    throw PagerError("paged_kv pager: page " + std::to_string(id.page) + " of sequence " +
                     std::to_string(id.row) + " is pinned too many times");
  }
  ++m.pins;
  relink(id, m);
}

void Pager::drop_pin(PageId id) {
  PageMeta& m = meta(id);
  if (m.pins == 0) {
    throw std::invalid_argument("paged_kv pager: unpin: page " + std::to_string(id.page) +
                                " of sequence " + std::to_string(id.row) + " is not pinned");
  }
  --m.pins;
  relink(id, m);
}

void Pager::pin(const std::vector<PageId>& views) {
  for (const PageId& id : views) check_page(id, "pin");
  std::vector<PageId> pages;
  for (const PageId& id : views) pages.push_back(resolve(id));
  size_t done = 0;
  try {
    for (; done < pages.size(); ++done) add_pin(pages[done]);
  } catch (...) {
    while (done > 0) drop_pin(pages[--done]);
    throw;
  }
}

void Pager::unpin(const std::vector<PageId>& views) {
  for (const PageId& id : views) check_page(id, "unpin");
  std::vector<PageId> pages;
  for (const PageId& id : views) pages.push_back(resolve(id));
  // Check the counts first (a page may be listed more than once), so a bad call changes nothing.
  std::vector<PageId> sorted(pages);
  std::sort(sorted.begin(), sorted.end());
  for (size_t i = 0; i < sorted.size();) {
    size_t j = i;
    while (j < sorted.size() && sorted[j] == sorted[i]) ++j;
    if (static_cast<size_t>(meta(sorted[i]).pins) < j - i) {
      std::ostringstream m;
      m << "paged_kv pager: unpin: page " << sorted[i].page << " of sequence " << sorted[i].row
        << " is pinned " << meta(sorted[i]).pins << " times, unpinned " << (j - i) << " times";
      throw std::invalid_argument(m.str());
    }
    i = j;
  }
  for (const PageId& id : pages) drop_pin(id);
}

// ---- bookkeeping ----

void Pager::refresh(PageId id) {
  PageMeta& m = meta(id);
  update_tier(id, m);
  relink(id, m);
}

void Pager::update_tier(PageId id, PageMeta& m) {
  m.tier = static_cast<uint8_t>(m.resident_tier());
  const int32_t pte = m.pte();
  const auto write = [&](PageId at) {
    int32_t& entry = ptes_[static_cast<size_t>(at.row) * config_.max_pages + at.page];
    if (entry != pte) {
      entry = pte;
      if (!row_dirty_[at.row]) {
        row_dirty_[at.row] = 1;
        dirty_rows_.push_back(at.row);
      }
    }
  };
  write(id);
  if (!views_.empty()) {  // forks' views of this page read the same copies
    const auto it = views_.find(owner_key(id));
    if (it != views_.end()) {
      for (const PageId& view : it->second) {
        meta(view).tier = m.tier;
        write(view);
      }
    }
  }
}

namespace {

// Puts `node` in `list` (flagged `dirty`) or takes it out, as `want` says.
void place(LruList& list, int64_t node, bool want, bool dirty) {
  if (want) {
    if (!list.contains(node)) {
      list.push_back(node, dirty);
    } else if (list.is_dirty(node) != dirty) {
      list.set_dirty(node, dirty);
    }
  } else if (list.contains(node)) {
    list.remove(node);
  }
}

}  // namespace

void Pager::relink(PageId id, const PageMeta& m) {
  (void)id;
  const Tier tier = m.current_tier();
  // A sealed, unpinned GPU page can be evicted; it needs a write-back without a lower copy.
  if (m.frame >= 0) {
    place(gpu_lru_, m.frame, m.sealed() && m.pins == 0, !m.host_valid() && !m.disk_valid());
  }
  // A host copy can be evicted unless it is what a pinned page's PTE names; it needs a write to
  // disk when the PTE names it and there is no disk copy.
  if (m.host_slot >= 0) {
    place(host_lru_, m.host_slot, m.host_valid() && !(tier == Tier::kHost && m.pins > 0),
          tier == Tier::kHost && !m.disk_valid());
  }
  // Only a disk copy of a page resident higher up can be dropped, and that needs no write.
  if (m.disk_slot >= 0) place(disk_lru_, m.disk_slot, m.disk_valid() && tier != Tier::kDisk, false);
}

void Pager::unlink_all(const PageMeta& m) {
  if (m.frame >= 0 && gpu_lru_.contains(m.frame)) gpu_lru_.remove(m.frame);
  if (m.host_slot >= 0 && host_lru_.contains(m.host_slot)) host_lru_.remove(m.host_slot);
  if (m.disk_slot >= 0 && disk_lru_.contains(m.disk_slot)) disk_lru_.remove(m.disk_slot);
}

void Pager::drop_frame(PageId id, PageMeta& m) {
  if (gpu_lru_.contains(m.frame)) gpu_lru_.remove(m.frame);
  frame_tenant_[m.frame] = m.tenant;
  frames_.release(m.frame, owner_key(id));
  m.frame = -1;
}

void Pager::drop_host_copy(PageId id, PageMeta& m) {
  if (host_lru_.contains(m.host_slot)) host_lru_.remove(m.host_slot);
  host_slots_.release(m.host_slot, owner_key(id));
  m.host_slot = -1;
  m.set_flag(kPageHostValid, false);
}

void Pager::drop_disk_copy(PageId id, PageMeta& m) {
  if (disk_lru_.contains(m.disk_slot)) disk_lru_.remove(m.disk_slot);
  disk_slots_.release(m.disk_slot, owner_key(id));
  m.disk_slot = -1;
  m.set_flag(kPageDiskValid, false);
}

void Pager::count_move(Direction d, int64_t pages) {
  stats_.pages_moved[static_cast<int>(d)] += pages;
  stats_.bytes_moved[static_cast<int>(d)] += pages * config_.page_bytes;
}

void Pager::flush_moves() {
  if (!moves_pending_) return;
  mover_.flush();
  moves_pending_ = false;
}

// ---- page table mirror ----

int32_t Pager::pte(int64_t row, int64_t page) const {
  if (row < 0 || row >= config_.max_sequences || page < 0 || page >= config_.max_pages) {
    std::ostringstream m;
    m << "paged_kv pager: pte: (row " << row << ", page " << page << ") is outside the page table ["
      << config_.max_sequences << ", " << config_.max_pages << "]";
    throw std::invalid_argument(m.str());
  }
  return ptes_[static_cast<size_t>(row * config_.max_pages + page)];
}

std::vector<int64_t> Pager::take_dirty_rows() {
  std::vector<int64_t> rows;
  rows.swap(dirty_rows_);
  for (int64_t row : rows) row_dirty_[row] = 0;
  std::sort(rows.begin(), rows.end());
  return rows;
}

void Pager::mark_all_rows_dirty() {
  for (int64_t row = 0; row < config_.max_sequences; ++row) {
    if (!row_dirty_[row]) {
      row_dirty_[row] = 1;
      dirty_rows_.push_back(row);
    }
  }
}

const PageMeta& Pager::page_meta(int64_t row, int64_t page) const {
  return meta(resolve(page_id(row, page, "page_meta")));
}

std::vector<int64_t> Pager::lru_order(Tier tier) const {
  switch (tier) {
    case Tier::kGpu: return gpu_lru_.order();
    case Tier::kHost: return host_lru_.order();
    case Tier::kDisk: return disk_lru_.order();
    default: throw std::invalid_argument("paged_kv pager: lru_order: no LRU list for unmapped pages");
  }
}

}  // namespace paged_kv::engine
