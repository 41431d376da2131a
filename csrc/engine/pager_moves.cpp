// Eviction and the moves between tiers: service, promote, demote.
//
// Each move runs in three steps: take the destinations, issue one batched Mover call, then
// commit the new copies to the metadata. When the Mover raises, the destinations are given back
// and the pages keep the copies they had, so a failed call leaves the pager consistent.
#include <algorithm>
#include <chrono>
#include <sstream>
#include <stdexcept>

#include "engine/pager.h"
#include "engine/pager_call_scope.h"
#include "engine/pager_errors.h"

namespace paged_kv::engine {
namespace {

std::string words_of(PageId id) {
  return "page " + std::to_string(id.page) + " of sequence " + std::to_string(id.row);
}

}  // namespace

// ---- room in each tier ----

int64_t Pager::disk_room() const { return disk_slots_.num_free() + disk_lru_.size(); }

int64_t Pager::host_room() const {
  const int64_t dirty = host_lru_.num_dirty();
  return host_slots_.num_free() + (host_lru_.size() - dirty) + std::min(dirty, disk_room());
}

int64_t Pager::frame_room() const {
  const int64_t dirty = gpu_lru_.num_dirty();
  return frames_.num_free() + (gpu_lru_.size() - dirty) + std::min(dirty, host_room());
}

void Pager::raise_no_frames(int64_t count, const std::string& why) const {
  const int64_t free = frames_.num_free();
  const int64_t evictable = gpu_lru_.size();
  if (count <= free + evictable) {
    raise_tiers_full(why + " (needs " + std::to_string(count) + " GPU frames; " +
                         std::to_string(gpu_lru_.num_dirty()) + " of the " + std::to_string(evictable) +
                         " evictable pages have no copy below and " + std::to_string(host_room()) +
                         " can be written back)",
                     "host slot");
  }
  std::ostringstream m;
  m << "paged_kv pager: " << why << " needs " << count << " GPU frames, but only " << free
    << " are free and " << evictable << " can be evicted: the other "
    << config_.num_frames - free - evictable << " of the " << config_.num_frames
    << " GPU frames hold open or pinned pages. Service at most max_serviceable() pages per call "
       "(stream the rest in batches), or seal, unpin or remove pages";
  throw PagerError(m.str());
}

void Pager::raise_tiers_full(const std::string& why, const char* tier) const {
  std::ostringstream m;
  m << "paged_kv pager: " << why << ": all tiers are full: no " << tier
    << " can be freed to take a page written back. GPU frames: " << frames_.num_owned() << " of "
    << config_.num_frames << " in use; host slots: " << host_slots_.num_owned() << " of "
    << config_.num_host_slots << " in use (" << host_lru_.size() - host_lru_.num_dirty()
    << " hold copies of pages on the GPU or on disk, " << host_lru_.num_dirty()
    << " a page's only copy, the rest pinned pages); disk slots: " << disk_slots_.num_owned()
    << " of " << config_.num_disk_slots << " in use (" << disk_lru_.size()
    << " hold copies of pages resident higher up, the rest a page's only copy). Remove "
       "sequences, unpin pages, or give the pager more host or disk slots";
  throw PagerError(m.str());
}

// Victims are taken in LRU order; a dirty one (it needs a write-back) is passed over while the
// tier below has no room left for it, so the walk is O(1) per victim unless the tiers are
// nearly full. `out_of_victims` raises when the list ends before enough indices are free.
template <typename OutOfVictims>
void Pager::evict_for_room(const EvictionTier& tier, int64_t count, const std::string& why,
                           const OutOfVictims& out_of_victims, const std::vector<int64_t>* order) {
  std::vector<PageId> write_backs;
  try {
    size_t at = 0;  // position in `order`
    auto order_node = [&](size_t i) { return i < order->size() ? (*order)[i] : int64_t{-1}; };
    int64_t node = order != nullptr ? order_node(0) : tier.lru.front();
    for (int64_t short_by = count - tier.indices.num_free(); short_by > 0;) {
      if (node < 0) out_of_victims();
      const int64_t next = order != nullptr ? order_node(++at) : tier.lru.next(node);
      const PageId victim = page_of_owner(tier.indices.owner(node));
      if (!tier.lru.is_dirty(node)) {
        // The page has another valid copy (sealed pages never change): give this one up.
        (this->*tier.drop)(victim, meta(victim));
        refresh(victim);
        ++tier.evictions;
        ++stats_.evictions_without_write;
        --short_by;
      } else if (static_cast<int64_t>(write_backs.size()) < (this->*tier.lower_room)()) {
        tier.lru.remove(node);
        write_backs.push_back(victim);
        --short_by;
      }
      node = next;
    }
    if (write_backs.empty()) return;
    (this->*tier.make_lower_room)(static_cast<int64_t>(write_backs.size()), why);
    (this->*tier.write_back)(write_backs);
  } catch (...) {
    for (const PageId& id : write_backs) refresh(id);  // back into the tier's LRU list
    throw;
  }
  for (const PageId& id : write_backs) {
    (this->*tier.drop)(id, meta(id));
    refresh(id);
  }
  tier.evictions += static_cast<int64_t>(write_backs.size());
}

Pager::EvictionTier Pager::gpu_eviction_tier() {
  return EvictionTier{gpu_lru_,          frames_,
                      stats_.evictions_gpu, &Pager::drop_frame,
                      &Pager::host_room, &Pager::make_free_host_slots,
                      &Pager::write_back_to_host};
}

Pager::EvictionTier Pager::host_eviction_tier() {
  return EvictionTier{host_lru_,          host_slots_,
                      stats_.evictions_host, &Pager::drop_host_copy,
                      &Pager::disk_room, &Pager::make_free_disk_slots,
                      &Pager::write_back_to_disk};
}

void Pager::make_free_frames(int64_t count, const std::string& why) {
  if (count > frame_room()) raise_no_frames(count, why);
  const EvictionTier gpu = gpu_eviction_tier();
  if (replacement_ == Replacement::kSpan) {
    const std::vector<int64_t> order = span_victim_order();
    evict_for_room(gpu, count, why, [&] { raise_no_frames(count, why); }, &order);
  } else {
    evict_for_room(gpu, count, why, [&] { raise_no_frames(count, why); });
  }
}

void Pager::make_free_host_slots(int64_t count, const std::string& why) {
  if (count > host_room()) raise_tiers_full(why, "host slot");
  const EvictionTier host = host_eviction_tier();
  evict_for_room(host, count, why, [&] { raise_tiers_full(why, "host slot"); });
}

void Pager::make_free_disk_slots(int64_t count, const std::string& why) {
  if (count > disk_room()) raise_tiers_full(why, "disk slot");
  for (int64_t short_by = count - disk_slots_.num_free(); short_by > 0; --short_by) {
    const int64_t slot = disk_lru_.front();
    const PageId victim = page_of_owner(disk_slots_.owner(slot));
    // Only copies of pages resident higher up are listed, so dropping one loses nothing.
    drop_disk_copy(victim, meta(victim));
    refresh(victim);
    ++stats_.evictions_disk;
  }
}

// A tenant past its quota in `tier` gives up `count` of its own pages there.
void Pager::evict_tenant(Tier tier, int32_t tenant, int64_t count, const std::string& why) {
  const auto quota_full = [&] {
    std::ostringstream m;
    m << "paged_kv pager: " << why << ": tenant " << tenant << " would hold more than its quota of "
      << quota(tenant, tier) << " " << units_of(tier) << " (it holds " << usage(tenant, tier)
      << "), and too few of its pages there can leave: they are open, pinned, or the tiers below have "
         "no room for them. Raise the tenant's quota, or seal, unpin or remove its pages";
    throw PagerError(m.str());
  };
  // Refuse before anything moves when too few of the tenant's pages can leave: those with a
  // lower copy, and as many of the others as the tier below can take.
  const auto check_room = [&](const std::vector<int64_t>& order, const LruList& lru, int64_t lower_room) {
    int64_t dirty = 0;
    for (const int64_t node : order) dirty += lru.is_dirty(node) ? 1 : 0;
    if (static_cast<int64_t>(order.size()) - dirty + std::min(dirty, lower_room) < count) quota_full();
  };
  if (tier == Tier::kGpu) {
    const std::vector<int64_t> order = nodes_of_tenant(
        replacement_ == Replacement::kSpan ? span_victim_order() : gpu_lru_.order(), frames_, tenant);
    check_room(order, gpu_lru_, host_room());
    evict_for_room(gpu_eviction_tier(), frames_.num_free() + count, why, quota_full, &order);
  } else if (tier == Tier::kHost) {
    const std::vector<int64_t> order = nodes_of_tenant(host_lru_.order(), host_slots_, tenant);
    check_room(order, host_lru_, disk_room());
    evict_for_room(host_eviction_tier(), host_slots_.num_free() + count, why, quota_full, &order);
  } else {
    // Only copies of pages resident higher up can leave the disk.
    const std::vector<int64_t> order = nodes_of_tenant(disk_lru_.order(), disk_slots_, tenant);
    if (static_cast<int64_t>(order.size()) < count) quota_full();
    for (int64_t i = 0; i < count; ++i) {
      const PageId victim = page_of_owner(disk_slots_.owner(order[i]));
      drop_disk_copy(victim, meta(victim));
      refresh(victim);
      ++stats_.evictions_disk;
    }
  }
}

// ---- moves ----

// One batched move: a destination from `to` for every page, one Mover call, then either the
// destinations are given back (the Mover raised; the pages keep the copies they had) or
// `commit(meta, destination)` records the new copies.
template <typename Move, typename MakeMove, typename Issue, typename Commit>
void Pager::move_batch(const std::vector<PageId>& pages, IndexAllocator& to,
                       const MakeMove& make_move, const Issue& issue, const Commit& commit,
                       Direction direction) {
  if (pages.empty()) return;
  if (&to != &frames_) {  // frames: the callers made quota room for the whole request
    make_quota_room(&to == &host_slots_ ? Tier::kHost : Tier::kDisk, tenants_of(pages),
                    "a move of " + std::to_string(pages.size()) + " pages to the " + to.name() + "s");
  }
  std::vector<int64_t> owners;
  owners.reserve(pages.size());
  for (const PageId& id : pages) owners.push_back(owner_key(id));
  // Ascending destinations: pages listed in order whose sources are adjacent become one copy.
  const std::vector<int64_t> destinations = to.allocate_ascending(owners);
  std::vector<Move> moves;
  moves.reserve(pages.size());
  for (size_t i = 0; i < pages.size(); ++i) moves.push_back(make_move(pages[i], destinations[i]));
  try {
    issue(moves);
  } catch (...) {
    for (size_t i = 0; i < pages.size(); ++i) {
      // A failed move may have written part of the page: the frame now holds this tenant's bytes.
      if (&to == &frames_) frame_tenant_[destinations[i]] = meta(pages[i]).tenant;
      to.release(destinations[i], owner_key(pages[i]));
    }
    throw;
  }
  moves_pending_ = true;
  for (size_t i = 0; i < pages.size(); ++i) {
    commit(meta(pages[i]), destinations[i]);
    refresh(pages[i]);
  }
  count_move(direction, static_cast<int64_t>(pages.size()));
}

void Pager::write_back_to_host(const std::vector<PageId>& pages) {
  move_batch<FrameSlotMove>(
      pages, host_slots_,
      [this](PageId id, int64_t slot) { return FrameSlotMove{meta(id).frame, slot}; },
      [this](const std::vector<FrameSlotMove>& moves) { mover_.gpu_to_host(moves); },
      [](PageMeta& m, int64_t slot) {
        m.host_slot = static_cast<int32_t>(slot);
        m.set_flag(kPageHostValid, true);
      },
      Direction::kGpuToHost);
}

void Pager::write_back_to_disk(const std::vector<PageId>& pages) {
  move_batch<SlotDiskMove>(
      pages, disk_slots_,
      [this](PageId id, int64_t disk_slot) {
        return SlotDiskMove{meta(id).host_slot, disk_slot, tag_of(id)};
      },
      [this](const std::vector<SlotDiskMove>& moves) { mover_.host_to_disk(moves); },
      [](PageMeta& m, int64_t disk_slot) {
        m.disk_slot = static_cast<int32_t>(disk_slot);
        m.set_flag(kPageDiskValid, true);
      },
      Direction::kHostToDisk);
}

void Pager::load_into_host(const std::vector<PageId>& pages) {
  move_batch<SlotDiskMove>(
      pages, host_slots_,
      [this](PageId id, int64_t slot) { return SlotDiskMove{slot, meta(id).disk_slot, tag_of(id)}; },
      [this](const std::vector<SlotDiskMove>& moves) { mover_.disk_to_host(moves); },
      [](PageMeta& m, int64_t slot) {
        m.host_slot = static_cast<int32_t>(slot);
        m.set_flag(kPageHostValid, true);
      },
      Direction::kDiskToHost);
}

void Pager::load_into_frames(const std::vector<PageId>& pages) {
  std::vector<PageId> from_host;
  std::vector<PageId> from_disk;
  for (const PageId& id : pages) {
    const Tier tier = meta(id).current_tier();
    if (tier == Tier::kHost) from_host.push_back(id);
    if (tier == Tier::kDisk) from_disk.push_back(id);
  }
  // A page loaded into a frame keeps its lower copy: evicting it later is free.
  const auto take_frame = [](PageMeta& m, int64_t frame) { m.frame = static_cast<int32_t>(frame); };
  move_batch<FrameSlotMove>(
      from_host, frames_,
      [this](PageId id, int64_t frame) { return FrameSlotMove{frame, meta(id).host_slot}; },
      [this](const std::vector<FrameSlotMove>& moves) { mover_.host_to_gpu(moves); }, take_frame,
      Direction::kHostToGpu);

  if (from_disk.empty()) return;
  if (!mover_.needs_bounce_slots()) {
    move_batch<DiskFrameMove>(
        from_disk, frames_,
        [this](PageId id, int64_t frame) {
          DiskFrameMove move;
          move.disk_slot = meta(id).disk_slot;
          move.frame = frame;
          move.bounce_slot = -1;
          move.tag = tag_of(id);
          return move;
        },
        [this](const std::vector<DiskFrameMove>& moves) { mover_.disk_to_gpu(moves); }, take_frame,
        Direction::kDiskToGpu);
    return;
  }
  // Disk pages pass through host slots lent for the call, as many at a time as are free (at
  // least one is made free). The Mover keeps calls in order, so the next batch may reuse them.
  if (host_slots_.num_free() == 0) {
    make_free_host_slots(1, "a bounce slot for " + std::to_string(from_disk.size()) +
                                " pages read from disk");
  }
  const size_t batch = static_cast<size_t>(host_slots_.num_free());
  for (size_t begin = 0; begin < from_disk.size(); begin += batch) {
    const size_t end = std::min(from_disk.size(), begin + batch);
    std::vector<DiskFrameMove> moves;
    moves.reserve(end - begin);
    for (size_t i = begin; i < end; ++i) {
      const PageId id = from_disk[i];
      DiskFrameMove move;
      move.disk_slot = meta(id).disk_slot;
      move.frame = frames_.allocate(owner_key(id));
      move.bounce_slot = host_slots_.allocate(kBounceOwner);
      move.tag = tag_of(id);
      moves.push_back(move);
    }
    try {
      mover_.disk_to_gpu(moves);
    } catch (...) {
      for (size_t i = begin; i < end; ++i) {
        frame_tenant_[moves[i - begin].frame] = meta(from_disk[i]).tenant;  // may hold part of it
        frames_.release(moves[i - begin].frame, owner_key(from_disk[i]));
        host_slots_.release(moves[i - begin].bounce_slot, kBounceOwner);
      }
      throw;
    }
    moves_pending_ = true;
    for (size_t i = begin; i < end; ++i) {
      host_slots_.release(moves[i - begin].bounce_slot, kBounceOwner);
      meta(from_disk[i]).frame = static_cast<int32_t>(moves[i - begin].frame);
      refresh(from_disk[i]);  // the disk copy stays valid
    }
    count_move(Direction::kDiskToGpu, static_cast<int64_t>(end - begin));
  }
}

void Pager::make_gpu_resident(const std::vector<PageId>& pages, const std::string& why) {
  std::vector<PageId> missing;
  for (const PageId& id : pages) {
    if (meta(id).current_tier() != Tier::kGpu) missing.push_back(id);
  }
  if (missing.empty()) return;
  make_quota_room(Tier::kGpu, tenants_of(missing), why);
  make_free_frames(static_cast<int64_t>(missing.size()), why);
  load_into_frames(missing);
}

void Pager::demote_to_host(const std::vector<PageId>& pages, const std::string& why) {
  std::vector<PageId> write_backs;
  for (const PageId& id : pages) {
    PageMeta& m = meta(id);
    if (m.current_tier() != Tier::kGpu) continue;
    if (m.host_valid()) {
      drop_frame(id, m);
      refresh(id);
    } else {
      write_backs.push_back(id);
    }
  }
  if (write_backs.empty()) return;
  make_free_host_slots(static_cast<int64_t>(write_backs.size()), why);
  write_back_to_host(write_backs);
  for (const PageId& id : write_backs) {
    drop_frame(id, meta(id));
    refresh(id);
  }
}

// ---- the public calls ----

int64_t Pager::max_serviceable() const { return frame_room(); }

int64_t Pager::service(const std::vector<PageId>& pages) {
  const auto start = std::chrono::steady_clock::now();
  const std::vector<PageId> distinct = distinct_pages(pages, "service");
  int64_t missing = 0;
  for (const PageId& id : distinct) missing += meta(id).current_tier() != Tier::kGpu ? 1 : 0;
  {
    CallScope scope(*this, distinct);
    make_gpu_resident(distinct, "service of " + std::to_string(distinct.size()) + " pages");
    flush_moves();
  }
  ++stats_.service_calls;
  stats_.faults_serviced += missing;
  stats_.service_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(
                           std::chrono::steady_clock::now() - start).count();
  return missing;
}

void Pager::promote(const std::vector<PageId>& pages, Tier tier) {
  if (tier != Tier::kGpu && tier != Tier::kHost) {
    throw std::invalid_argument(std::string("paged_kv pager: promote: the tier must be the GPU or "
                                            "the host, got ") + tier_name(tier));
  }
  const std::vector<PageId> distinct = distinct_pages(pages, "promote");
  const std::string why = "promote of " + std::to_string(distinct.size()) + " pages to the " +
                          (tier == Tier::kGpu ? "GPU" : "host");
  CallScope scope(*this, distinct);
  if (tier == Tier::kGpu) {
    make_gpu_resident(distinct, why);
  } else {
    std::vector<PageId> from_disk;
    for (const PageId& id : distinct) {
      if (meta(id).current_tier() == Tier::kDisk) from_disk.push_back(id);
    }
    if (!from_disk.empty()) {
      make_free_host_slots(static_cast<int64_t>(from_disk.size()), why);
      load_into_host(from_disk);
    }
  }
  flush_moves();
}

void Pager::demote(const std::vector<PageId>& pages, Tier tier) {
  if (tier != Tier::kHost && tier != Tier::kDisk) {
    throw std::invalid_argument(std::string("paged_kv pager: demote: the tier must be the host or "
                                            "the disk, got ") + tier_name(tier));
  }
  const std::vector<PageId> distinct = distinct_pages(pages, "demote");
  for (const PageId& id : distinct) {
    const PageMeta& m = meta(id);
    if (!m.sealed()) {
      throw std::invalid_argument("paged_kv pager: demote: " + words_of(id) +
                                  " is open (still being written); seal it first");
    }
    if (m.pins > 0) {
      throw std::invalid_argument("paged_kv pager: demote: " + words_of(id) + " is pinned");
    }
  }
  if (tier == Tier::kDisk && config_.num_disk_slots == 0) {
    throw std::invalid_argument("paged_kv pager: demote: the pager has no disk slots");
  }
  if (config_.num_host_slots == 0) {  // also the way down to the disk
    throw std::invalid_argument("paged_kv pager: demote: the pager has no host slots");
  }
  const std::string why = "demote of " + std::to_string(distinct.size()) + " pages to the " +
                          (tier == Tier::kHost ? "host" : "disk");
  CallScope scope(*this, distinct);
  if (tier == Tier::kHost) {
    demote_to_host(distinct, why);
  } else {
    // Pages with a disk copy just give up their frames and host slots.
    std::vector<PageId> rest;
    for (const PageId& id : distinct) {
      PageMeta& m = meta(id);
      if (m.current_tier() == Tier::kDisk) continue;
      if (m.disk_valid()) {
        if (m.frame >= 0) drop_frame(id, m);
        if (m.host_slot >= 0) drop_host_copy(id, m);
        refresh(id);
      } else {
        rest.push_back(id);
      }
    }
    // The rest reach the disk through the host.
    demote_to_host(rest, why);
    if (!rest.empty()) {
      make_free_disk_slots(static_cast<int64_t>(rest.size()), why);
      write_back_to_disk(rest);
      for (const PageId& id : rest) {
        drop_host_copy(id, meta(id));
        refresh(id);
      }
    }
  }
  flush_moves();
}

}  // namespace paged_kv::engine
