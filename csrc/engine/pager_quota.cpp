// Tenant quotas: how many frames, host slots and disk slots each tenant's pages may hold.
//
// The allocators count their indices by tenant (IndexAllocator::group_count), so checking a
// quota is O(1). Only a tenant over its quota costs more: its own pages are found by walking the
// tier's eviction list, then evicted through the same path as any other eviction
// (Pager::evict_tenant, in pager_moves.cpp beside the eviction it uses).
#include <algorithm>
#include <sstream>
#include <stdexcept>

#include "engine/pager.h"
#include "engine/pager_call_scope.h"
#include "engine/pager_errors.h"

namespace paged_kv::engine {
namespace {

int tier_index(Tier tier) {
  switch (tier) {
    case Tier::kGpu: return 0;
    case Tier::kHost: return 1;
    case Tier::kDisk: return 2;
    default: throw std::invalid_argument("paged_kv pager: quotas are per GPU, host or disk tier");
  }
}

}  // namespace

const char* Pager::units_of(Tier tier) {
  return tier == Tier::kGpu ? "GPU frames" : tier == Tier::kHost ? "host slots" : "disk slots";
}

IndexAllocator& Pager::indices_of(Tier tier) {
  return const_cast<IndexAllocator&>(static_cast<const Pager*>(this)->indices_of(tier));
}

const IndexAllocator& Pager::indices_of(Tier tier) const {
  switch (tier_index(tier)) {
    case 0: return frames_;
    case 1: return host_slots_;
    default: return disk_slots_;
  }
}

int64_t Pager::quota(int32_t tenant, Tier tier) const {
  const int index = tier_index(tier);
  const auto it = quotas_.find(tenant);
  return it == quotas_.end() ? -1 : it->second[index];
}

int64_t Pager::usage(int32_t tenant, Tier tier) const { return indices_of(tier).group_count(tenant); }

void Pager::set_quota(int32_t tenant, Tier tier, int64_t pages) {
  const int index = tier_index(tier);
  if (tenant < 0) {
    throw std::invalid_argument("paged_kv pager: set_quota: tenant must be >= 0, got " + std::to_string(tenant));
  }
  if (pages < -1) {
    throw std::invalid_argument("paged_kv pager: set_quota: pages must be >= 0 (or -1 for no quota), got " +
                                std::to_string(pages));
  }
  auto it = quotas_.find(tenant);
  const int64_t before = it == quotas_.end() ? -1 : it->second[index];
  if (it == quotas_.end()) it = quotas_.emplace(tenant, std::array<int64_t, 3>{-1, -1, -1}).first;
  it->second[index] = pages;
  try {
    if (pages >= 0 && usage(tenant, tier) > pages) {
      CallScope scope(*this, {});
      evict_tenant(tier, tenant, usage(tenant, tier) - pages,
                   "set_quota of " + std::to_string(pages) + " " + units_of(tier) + " for tenant " +
                       std::to_string(tenant));
      flush_moves();
    }
  } catch (...) {
    it->second[index] = before;
    throw;
  }
  if (it->second == std::array<int64_t, 3>{-1, -1, -1}) quotas_.erase(it);
}

std::map<int32_t, int64_t> Pager::tenants_of(const std::vector<PageId>& pages) const {
  std::map<int32_t, int64_t> count;
  for (const PageId& id : pages) ++count[meta(id).tenant];
  return count;
}

void Pager::make_quota_room(Tier tier, const std::map<int32_t, int64_t>& need, const std::string& why) {
  if (quotas_.empty()) return;
  for (const auto& [tenant, n] : need) {
    const int64_t limit = quota(tenant, tier);
    if (limit < 0) continue;
    const int64_t over = usage(tenant, tier) + n - limit;
    if (over <= 0) continue;
    if (n > limit) {
      std::ostringstream m;
      m << "paged_kv pager: " << why << " needs " << n << " " << units_of(tier) << " for tenant "
        << tenant << " at once, more than its quota of " << limit << "; raise the quota or move fewer pages per call";
      throw PagerError(m.str());
    }
    evict_tenant(tier, tenant, over, why);
  }
}

std::vector<int64_t> Pager::nodes_of_tenant(const std::vector<int64_t>& nodes, const IndexAllocator& indices,
                                            int32_t tenant) const {
  std::vector<int64_t> mine;
  for (const int64_t node : nodes) {
    if (rows_[page_of_owner(indices.owner(node)).row].tenant == tenant) mine.push_back(node);
  }
  return mine;
}

int64_t Pager::serviceable_prefix(const std::vector<PageId>& pages) const {
  for (const PageId& id : pages) check_page(id, "serviceable_prefix");
  // As frame_room(), but each host-resident page taken is pinned for the call, so its slot can
  // no longer make room for a dirty GPU page written back.
  const int64_t gpu_dirty = gpu_lru_.num_dirty();
  const int64_t gpu_room = frames_.num_free() + (gpu_lru_.size() - gpu_dirty);
  int64_t host_left = host_room();
  int64_t missing_taken = 0;
  // Per tenant with a GPU quota: frames it may still take, counting its evictable frames as
  // free (pinning one for the call takes it out of reach, so it costs one too).
  std::unordered_map<int32_t, int64_t> room;
  for (const auto& [tenant, limits] : quotas_) {
    if (limits[0] >= 0) room[tenant] = limits[0] - usage(tenant, Tier::kGpu);
  }
  if (!room.empty()) {
    for (const int64_t frame : gpu_lru_.order()) {
      const auto it = room.find(rows_[page_of_owner(frames_.owner(frame)).row].tenant);
      if (it != room.end()) ++it->second;
    }
  }
  int64_t taken = 0;
  for (const PageId& view : pages) {
    const PageMeta& m = meta(resolve(view));
    const bool missing = m.current_tier() != Tier::kGpu;
    if (missing) {
      const bool pins_a_slot = m.current_tier() == Tier::kHost && host_lru_.contains(m.host_slot);
      const int64_t host_after = host_left - (pins_a_slot ? 1 : 0);
      if (missing_taken + 1 > gpu_room + std::min(gpu_dirty, std::max<int64_t>(host_after, 0))) break;
      host_left = host_after;
      ++missing_taken;
    }
    const auto it = room.find(m.tenant);
    if (it != room.end() && (missing || gpu_lru_.contains(m.frame)) && it->second-- <= 0) break;
    ++taken;
  }
  return taken;
}

}  // namespace paged_kv::engine
