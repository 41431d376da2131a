// Pager::check_invariants and Pager::bytes_of_metadata.
#include <algorithm>
#include <sstream>

#include "engine/pager.h"
#include "engine/pager_errors.h"

namespace paged_kv::engine {

void Pager::check_invariants() const {
  std::ostringstream err;
  err << row_ids_.check() << frames_.check() << host_slots_.check() << disk_slots_.check()
      << gpu_lru_.check("GPU") << host_lru_.check("host") << disk_lru_.check("disk");

  int64_t frames_held = 0, host_held = 0, disk_held = 0, views_seen = 0;
  for (int64_t row = 0; row < config_.max_sequences; ++row) {
    const Row& r = rows_[row];
    const bool live = !row_ids_.is_free(row);
    const int64_t n = static_cast<int64_t>(r.pages.size());
    if (!live && n > 0) err << "free row " << row << " holds " << n << " pages; ";
    if (static_cast<int64_t>(r.scores.size()) != n || static_cast<int64_t>(r.score_weights.size()) != n) {
      err << "row " << row << " has " << r.scores.size() << " attention scores and " << r.score_weights.size()
          << " score weights for " << n << " pages; ";
    }
    if (live && row_ids_.owner(row) != r.tenant) {
      err << "row " << row << " is owned by tenant " << row_ids_.owner(row) << " but records tenant "
          << r.tenant << "; ";
    }
    bool open_seen = false;
    for (int64_t p = 0; p < n; ++p) {
      const PageId id{static_cast<int32_t>(row), static_cast<int32_t>(p)};
      const int64_t key = owner_key(id);
      const PageMeta& m = r.pages[p];
      std::ostringstream where;
      where << "page " << p << " of sequence " << row;
      const std::string at = where.str();
      if (m.tenant != r.tenant) err << at << " has tenant " << m.tenant << ", its row " << r.tenant << "; ";
      if (m.shared_view()) {
        ++views_seen;
        const auto it = shared_of_.find(key);
        if (it == shared_of_.end()) {
          err << at << " is a shared view of no page; ";
          continue;
        }
        const PageId target = it->second;
        const bool target_live = !row_ids_.is_free(target.row) &&
                                 target.page < static_cast<int32_t>(rows_[target.row].pages.size());
        if (!target_live) {
          err << at << " views page " << target.page << " of sequence " << target.row << ", which does not exist; ";
          continue;
        }
        const PageMeta& t = meta(target);
        if (t.shared_view() || !t.sealed() || t.tenant != m.tenant) {
          err << at << " views a page that is itself a view, open, or another tenant's; ";
        }
        const auto views = views_.find(owner_key(target));
        if (views == views_.end() || std::find(views->second.begin(), views->second.end(), id) == views->second.end()) {
          err << at << " is missing from its page's list of views; ";
        }
        if (m.frame >= 0 || m.host_slot >= 0 || m.disk_slot >= 0 || m.pins != 0) {
          err << at << " is a shared view but holds copies or pins; ";
        }
        const int32_t pte = ptes_[static_cast<size_t>(row * config_.max_pages + p)];
        if (pte != t.pte()) err << at << " has PTE " << pte << " but the page it views has " << t.pte() << "; ";
        continue;
      }
      if (m.current_tier() != m.resident_tier()) {
        err << at << " records tier " << tier_name(m.current_tier()) << " but its copies imply "
            << tier_name(m.resident_tier()) << "; ";
      }
      if (m.current_tier() == Tier::kUnmapped) err << at << " has no copy anywhere; ";
      if (!m.sealed()) {
        open_seen = true;
        if (m.frame < 0) err << at << " is open but not in a GPU frame; ";
      } else if (open_seen) {
        err << at << " is sealed after an open page; ";
      }
      if (m.frame >= 0) {
        ++frames_held;
        if (m.frame >= config_.num_frames || frames_.owner(m.frame) != key) {
          err << at << " holds GPU frame " << m.frame << ", which it does not own; ";
        } else if (gpu_lru_.contains(m.frame) != (m.sealed() && m.pins == 0)) {
          err << at << ": its frame's place in the GPU LRU list is wrong; ";
        } else if (gpu_lru_.contains(m.frame) &&
                   gpu_lru_.is_dirty(m.frame) != (!m.host_valid() && !m.disk_valid())) {
          err << at << ": its frame's dirty flag is wrong; ";
        }
      }
      if ((m.host_slot >= 0) != m.host_valid()) err << at << ": host slot and host_valid disagree; ";
      if (m.host_slot >= 0) {
        ++host_held;
        if (m.host_slot >= config_.num_host_slots || host_slots_.owner(m.host_slot) != key) {
          err << at << " holds host slot " << m.host_slot << ", which it does not own; ";
        } else if (host_lru_.contains(m.host_slot) !=
                   !(m.current_tier() == Tier::kHost && m.pins > 0)) {
          err << at << ": its host slot's place in the host LRU list is wrong; ";
        } else if (host_lru_.contains(m.host_slot) &&
                   host_lru_.is_dirty(m.host_slot) !=
                       (m.current_tier() == Tier::kHost && !m.disk_valid())) {
          err << at << ": its host slot's dirty flag is wrong; ";
        }
      }
      if ((m.disk_slot >= 0) != m.disk_valid()) err << at << ": disk slot and disk_valid disagree; ";
      if (m.disk_slot >= 0) {
        ++disk_held;
        if (m.disk_slot >= config_.num_disk_slots || disk_slots_.owner(m.disk_slot) != key) {
          err << at << " holds disk slot " << m.disk_slot << ", which it does not own; ";
        } else if (disk_lru_.contains(m.disk_slot) != (m.current_tier() != Tier::kDisk)) {
          err << at << ": its disk slot's place in the disk LRU list is wrong; ";
        }
      }
      const int32_t pte = ptes_[static_cast<size_t>(row * config_.max_pages + p)];
      if (pte != m.pte()) err << at << " has PTE " << pte << " but its metadata says " << m.pte() << "; ";
    }
    for (int64_t p = n; p < config_.max_pages; ++p) {
      if (ptes_[static_cast<size_t>(row * config_.max_pages + p)] != kPteUnmapped) {
        err << "page " << p << " of row " << row << " does not exist but its PTE is mapped; ";
        break;
      }
    }
  }
  // Every owned index is held by the page that owns it (so nothing is owned twice or orphaned,
  // and no bounce slot outlives its call).
  if (frames_held != frames_.num_owned()) {
    err << frames_.num_owned() << " GPU frames are owned but pages hold " << frames_held << "; ";
  }
  if (host_held != host_slots_.num_owned()) {
    err << host_slots_.num_owned() << " host slots are owned but pages hold " << host_held << "; ";
  }
  if (disk_held != disk_slots_.num_owned()) {
    err << disk_slots_.num_owned() << " disk slots are owned but pages hold " << disk_held << "; ";
  }
  int64_t flagged = 0;
  for (uint8_t f : row_dirty_) flagged += f;
  if (flagged != static_cast<int64_t>(dirty_rows_.size())) err << "the dirty-row set is inconsistent; ";
  for (int64_t row : dirty_rows_) {
    if (!row_dirty_[row]) err << "dirty row " << row << " is not flagged; ";
  }
  if (moves_pending_) err << "moves were left unflushed; ";
  int64_t views_listed = 0;
  for (const auto& [key, views] : views_) views_listed += static_cast<int64_t>(views.size());
  if (views_seen != static_cast<int64_t>(shared_of_.size()) || views_seen != views_listed) {
    err << views_seen << " shared views exist, " << shared_of_.size() << " are mapped and " << views_listed
        << " are listed; ";
  }
  for (const auto& [tenant, limits] : quotas_) {
    for (const Tier tier : {Tier::kGpu, Tier::kHost, Tier::kDisk}) {
      const int64_t limit = limits[static_cast<int>(tier)];
      if (limit >= 0 && usage(tenant, tier) > limit) {
        err << "tenant " << tenant << " holds " << usage(tenant, tier) << " indices of tier "
            << static_cast<int>(tier) << ", over its quota of " << limit << "; ";
      }
    }
  }

  const std::string problems = err.str();
  if (!problems.empty()) {
    throw PagerInternalError("paged_kv pager: invariants broken: " + problems);
  }
}

int64_t Pager::bytes_of_metadata() const {
  int64_t bytes = static_cast<int64_t>(sizeof(Pager));
  bytes += static_cast<int64_t>(rows_.capacity() * sizeof(Row));
  for (const Row& r : rows_) {
    bytes += static_cast<int64_t>(r.pages.capacity() * sizeof(PageMeta) + (r.scores.capacity() + r.score_weights.capacity()) * sizeof(float));
  }
  bytes += row_ids_.bytes() + frames_.bytes() + host_slots_.bytes() + disk_slots_.bytes();
  bytes += gpu_lru_.bytes() + host_lru_.bytes() + disk_lru_.bytes();
  bytes += static_cast<int64_t>(quotas_.size() * (sizeof(int32_t) + sizeof(std::array<int64_t, 3>)));
  bytes += static_cast<int64_t>((shared_of_.size() + tag_origin_.size()) * (sizeof(int64_t) + sizeof(PageId)) +
                                views_.size() * (sizeof(int64_t) + sizeof(std::vector<PageId>)));
  for (const auto& [key, views] : views_) bytes += static_cast<int64_t>(views.capacity() * sizeof(PageId));
  bytes += static_cast<int64_t>(ptes_.capacity() * sizeof(int32_t) + row_dirty_.capacity() +
                                dirty_rows_.capacity() * sizeof(int64_t));
  return bytes;
}

}  // namespace paged_kv::engine
