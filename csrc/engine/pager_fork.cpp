// Forks: sequences that share sealed pages.
//
// A fork's sealed pages are views (kPageShared) of the parent's: they hold no frame or slot, and
// every operation on a view acts on the page it shares (resolve). That page's PTE changes are
// written to its views' rows too (update_tier), so the kernel reads either row alike. When the
// sequence holding the copies is removed, one view takes them over: the frames and slots change
// owner, and the disk copy keeps the tag it was written with (tag_origin_).
#include <algorithm>
#include <stdexcept>

#include "engine/pager.h"
#include "engine/pager_call_scope.h"
#include "engine/pager_errors.h"

namespace paged_kv::engine {

PageId Pager::resolve(PageId id) const {
  if (!meta(id).shared_view()) return id;
  return shared_of_.at(owner_key(id));
}

int64_t Pager::sharers(int64_t row, int64_t page) const {
  const PageId id = resolve(page_id(row, page, "sharers"));
  const auto it = views_.find(owner_key(id));
  return 1 + (it == views_.end() ? 0 : static_cast<int64_t>(it->second.size()));
}

store::SlotTag Pager::disk_tag(int64_t row, int64_t page) const {
  return tag_of(resolve(page_id(row, page, "disk_tag")));
}

int64_t Pager::fork(int64_t parent, int64_t row) {
  check_row(parent, "fork");
  const Row& from = rows_[parent];
  const int64_t n = static_cast<int64_t>(from.pages.size());
  int64_t open = 0;
  while (open < n && !from.pages[n - 1 - open].sealed()) ++open;
  if (open > frames_.num_free() + gpu_lru_.size()) {
    raise_no_frames(open, "fork of sequence " + std::to_string(parent) + " (its open pages are copied)");
  }
  const int64_t child = add_sequence(from.tenant, row);
  try {
    Row& to = rows_[child];
    to.pages.resize(static_cast<size_t>(n - open));
    to.scores.assign(static_cast<size_t>(n - open), 0.f);
    to.score_weights.assign(static_cast<size_t>(n - open), 0.f);
    for (int64_t p = 0; p < n - open; ++p) {
      const PageId view{static_cast<int32_t>(child), static_cast<int32_t>(p)};
      const PageId shared = resolve(PageId{static_cast<int32_t>(parent), static_cast<int32_t>(p)});
      const PageMeta& m = meta(shared);
      PageMeta& v = to.pages[p];
      v.tenant = m.tenant;
      v.generation = m.generation;
      v.flags = kPageSealed | kPageShared;
      v.tier = m.tier;
      shared_of_[owner_key(view)] = shared;
      views_[owner_key(shared)].push_back(view);
      ptes_[static_cast<size_t>(child * config_.max_pages + p)] = m.pte();
    }
    if (n > open && !row_dirty_[child]) {
      row_dirty_[child] = 1;
      dirty_rows_.push_back(child);
    }
    if (open > 0) {
      // The open pages: new frames in the child, filled from the parent's frames.
      const int64_t first = append_pages(child, open, false);
      std::vector<FramePair> copies;
      for (int64_t i = 0; i < open; ++i) {
        copies.push_back(FramePair{from.pages[n - open + i].frame, rows_[child].pages[first + i].frame});
      }
      mover_.gpu_to_gpu(copies);
      moves_pending_ = true;
      flush_moves();
    }
  } catch (...) {
    remove_sequence(child);
    throw;
  }
  return child;
}

void Pager::release_page(PageId id) {
  PageMeta& m = meta(id);
  const int64_t key = owner_key(id);
  if (m.shared_view()) {
    const PageId shared = shared_of_.at(key);
    shared_of_.erase(key);
    std::vector<PageId>& views = views_.at(owner_key(shared));
    views.erase(std::find(views.begin(), views.end(), id));
    if (views.empty()) views_.erase(owner_key(shared));
    return;
  }
  const auto views_it = views_.find(key);
  const auto origin_it = tag_origin_.find(key);
  const PageId origin = origin_it != tag_origin_.end() ? origin_it->second : id;
  if (origin_it != tag_origin_.end()) tag_origin_.erase(origin_it);
  if (views_it == views_.end()) {
    unlink_all(m);
    if (m.frame >= 0) drop_frame(id, m);
    if (m.host_slot >= 0) drop_host_copy(id, m);
    if (m.disk_slot >= 0) drop_disk_copy(id, m);
    return;
  }
  // Shared: the first view takes the copies (same tenant, so no quota changes), the others
  // now view it.
  std::vector<PageId> views = std::move(views_it->second);
  views_.erase(views_it);
  const PageId heir = views.front();
  const int64_t heir_key = owner_key(heir);
  shared_of_.erase(heir_key);
  PageMeta& h = meta(heir);
  const uint8_t flags = static_cast<uint8_t>(m.flags & ~kPageShared);
  h = m;
  h.flags = flags;
  if (m.frame >= 0) frames_.transfer(m.frame, key, heir_key);
  if (m.host_slot >= 0) host_slots_.transfer(m.host_slot, key, heir_key);
  if (m.disk_slot >= 0) disk_slots_.transfer(m.disk_slot, key, heir_key);
  tag_origin_[heir_key] = origin;
  views.erase(views.begin());
  for (const PageId& v : views) shared_of_[owner_key(v)] = heir;
  if (!views.empty()) views_[heir_key] = std::move(views);
  m = PageMeta();  // its copies are the heir's now
}

}  // namespace paged_kv::engine
