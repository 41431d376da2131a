// The pager: which tier holds each page, who owns every frame and slot, what to evict, and the
// page-table entries that say so (torch-free).
//
// Sequences are page-table rows. A sequence's pages are appended at its end; the newest pages
// are open (being written: GPU-resident, never evicted) until seal() seals them, or a later
// append that is asked to seal them first; the open pages are always a suffix of the sequence.
// Sealed pages move between the GPU frames, the host slots and the disk slots:
//   - service() makes a set of pages GPU-resident (the fault path), evicting least recently
//     used pages; an evicted page with a valid lower copy just gives up its frame (its PTE then
//     names that copy), any other is written back to a host slot, and the host makes room the
//     same way by moving its least recently used pages to disk. A sealed page is written to each
//     lower tier at most once.
//   - promote() and demote() move pages up or down explicitly.
// Every PTE change is mirrored into an int32 [max_sequences * max_pages] host array in PTE
// encoding (core/pte.h), and its row is marked dirty so the caller can copy just those rows to
// the device page table.
//
// Every public call either completes (its moves flushed) or raises and leaves the pager in a
// consistent state: check_invariants() holds after every call. A pager is not thread-safe: one
// thread (or a lock around it) drives it.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/pte.h"
#include "engine/index_allocator.h"
#include "engine/lru_list.h"
#include "engine/mover.h"
#include "engine/page_meta.h"
#include "engine/pager_stats.h"

namespace paged_kv::engine {

// How the GPU tier picks victims. kLru: least recently used first. kSpan: span-aware: pages
// ranked by how often attention came back to them (record_attention: the decayed share of steps
// in which a page drew at least `share` of its fair share of the mass), least first, ties by
// recency; a sequence's first sink_pages and last window_pages are taken only
// when nothing else is left. The host and disk tiers stay LRU.
enum class Replacement { kLru, kSpan };

struct SpanPolicy {
  double decay = 0.995;      // each step's weight in a page's score decays by this factor
  double share = 0.3;        // a step counts for a page drawing >= share * (step's mass / pages)
  int64_t sink_pages = 1;    // leading pages of each sequence kept (attention sinks)
  int64_t window_pages = 4;  // trailing pages of each sequence kept (the local window)
};

struct PagerConfig {
  int64_t num_frames = 0;      // GPU frames the pager may use
  int64_t num_host_slots = 0;  // host slots (0: no host tier)
  int64_t num_disk_slots = 0;  // disk slots (0: no disk tier)
  int64_t max_sequences = 0;   // page-table rows
  int64_t max_pages = 0;       // page-table columns (pages per sequence)
  bool write_through = false;  // seal() writes the page to a host slot at once
  int64_t page_bytes = 0;      // bytes of one page, for the byte counters only
};

class Pager {
 public:
  // Raises std::invalid_argument for a bad configuration. `mover` must outlive the pager.
  Pager(const PagerConfig& config, Mover& mover);

  const PagerConfig& config() const { return config_; }

  // Sequences.
  // Takes a free row (the lowest free one when row < 0) for `tenant` (>= 0); returns it.
  int64_t add_sequence(int32_t tenant, int64_t row = -1);
  // Frees the row and every frame and slot of its pages; its PTEs become unmapped.
  void remove_sequence(int64_t row);
  // Appends n open pages in GPU frames (evicting as needed). With seal_open, the row's open
  // pages are sealed first (and, with write_through, written to host slots); without it they
  // stay open beside the new ones, still being written, until seal() seals them. Returns the
  // first new page's index. Raises PagerError, appending nothing, when the frames cannot be
  // found; without seal_open that check comes before any change.
  int64_t append_pages(int64_t row, int64_t n, bool seal_open = true);
  // Takes back the row's last n pages, which must be open and unpinned (pages appended for
  // tokens that will not come: a refused decode reservation); their frames are freed and their
  // PTEs become unmapped. Raises std::invalid_argument, changing nothing, otherwise.
  void drop_open_pages(int64_t row, int64_t n);
  // Seals an open page and the open pages before it (a no-op for a sealed page); with
  // write_through, writes them to host slots.
  void seal(int64_t row, int64_t page);
  // Fork (pager_fork.cpp): a new sequence of the parent's tenant (in `row`, or the lowest free
  // row when row < 0) with the parent's pages: its sealed pages are shared, not copied (the
  // child's PTEs name the same frames and slots, and a page moves for both), and its open pages
  // are copied into new frames, since the parent goes on writing them. Sealed pages never
  // change, so nothing is ever copied on a later write. A shared page lives while any of its
  // sequences does. Returns the child's row. Raises PagerError when no row or frame is free.
  int64_t fork(int64_t parent, int64_t row = -1);
  // How many sequences hold the page (1 unless shared by forks).
  int64_t sharers(int64_t row, int64_t page) const;
  // The tag the page's disk copy carries (or would carry): its tenant, the sequence and page
  // that first held it, and its generation.
  store::SlotTag disk_tag(int64_t row, int64_t page) const;
  bool is_live(int64_t row) const;
  int64_t num_pages(int64_t row) const;
  int32_t tenant(int64_t row) const;

  // Use and pinning.
  // Records `tick` as the pages' last use and makes them the most recently used in their tiers.
  // Ticks are expected to grow; the LRU order is the order of touches.
  void touch(const std::vector<PageId>& pages, int64_t tick);
  // A pinned page stays in its current tier until unpinned (pins nest).
  void pin(const std::vector<PageId>& pages);
  void unpin(const std::vector<PageId>& pages);

  // Fault service: makes every listed page GPU-resident (duplicates allowed) and returns how
  // many were not. The pages are pinned for the call, so they never evict each other. Raises
  // PagerError, naming the tiers, when more pages are asked for than max_serviceable() or when
  // no tier below has room for a page that must be written back.
  int64_t service(const std::vector<PageId>& pages);
  // How many GPU frames can be made free now: free frames, frames of sealed unpinned pages
  // with a lower copy, and as many of the other sealed unpinned pages' frames as the host and
  // disk tiers can take written back. A service() of that many pages succeeds unless the
  // batch's own host-resident pages are what fills the host tier (pinned for the call, their
  // slots cannot be reused). A caller with more faults streams them in batches.
  int64_t max_serviceable() const;

  // Tenant quotas (pager_quota.cpp): at most `pages` frames, host slots or disk slots of `tier`
  // for the tenant's pages (-1: no quota). A move that would take the tenant past its quota
  // first evicts that tenant's own pages from the tier (its least recently used, or by span
  // under kSpan); when they cannot go (open, pinned, or no room below), it raises PagerError
  // and the tenant keeps what it had. Setting a quota below the tenant's use evicts down to it
  // at once (raising, with the old quota kept, when it cannot).
  void set_quota(int32_t tenant, Tier tier, int64_t pages);
  int64_t quota(int32_t tenant, Tier tier) const;
  // Frames, host slots or disk slots the tenant's pages hold now.
  int64_t usage(int32_t tenant, Tier tier) const;
  // How many of `pages`, from the front, one service() call can take: as max_serviceable(),
  // and within each tenant's GPU quota once its open and pinned frames are counted.
  int64_t serviceable_prefix(const std::vector<PageId>& pages) const;

  // Replacement policy of the GPU tier (pager_span.cpp). Raises std::invalid_argument for a
  // decay outside [0, 1), a share that is not a finite number > 0, or a negative page count.
  void set_replacement(Replacement replacement, const SpanPolicy& span = SpanPolicy());
  Replacement replacement() const { return replacement_; }
  const SpanPolicy& span_policy() const { return span_; }
  // Folds one step's attention mass of the row's pages 0 .. mass.size() - 1 into their scores
  // (recorded under either policy; kSpan reads them): each page's decayed count of steps in
  // which it drew at least span.share * (the step's total mass / mass.size()), and its decayed
  // count of steps. The pages the span policy keeps anyway (sinks and window) are skipped, and a
  // step whose mass is all zero is not counted. Raises std::invalid_argument for a dead row,
  // more values than pages, or a value that is negative or not finite.
  void record_attention(int64_t row, const std::vector<float>& mass);
  // The scores of the row's pages: for each, the decayed share of its counted steps in which it
  // drew at least span.share of its fair share, in [0, 1] (0 before any step was counted).
  std::vector<float> attention_scores(int64_t row) const;

  // Moves pages up to `tier` (kGpu or kHost); pages already there or higher stay.
  void promote(const std::vector<PageId>& pages, Tier tier);
  // Moves sealed, unpinned pages down to `tier` (kHost or kDisk); pages already there or lower
  // stay. Raises std::invalid_argument for an open or pinned page.
  void demote(const std::vector<PageId>& pages, Tier tier);

  // The page table mirror, row-major int32 [max_sequences * max_pages] in PTE encoding.
  const std::vector<int32_t>& pte_mirror() const { return ptes_; }
  int32_t pte(int64_t row, int64_t page) const;
  // Rows whose PTEs changed since the last call, sorted; clears the set.
  std::vector<int64_t> take_dirty_rows();
  // Marks every row dirty (for a fresh device table).
  void mark_all_rows_dirty();

  const PageMeta& page_meta(int64_t row, int64_t page) const;
  // The page (row, page) after checking that it exists; raises std::invalid_argument naming
  // `op` otherwise.
  PageId page_id(int64_t row, int64_t page, const char* op) const;
  const PagerStats& stats() const { return stats_; }
  void reset_stats() { stats_ = PagerStats(); }
  int64_t free_frames() const { return frames_.num_free(); }
  int64_t free_host_slots() const { return host_slots_.num_free(); }
  int64_t free_disk_slots() const { return disk_slots_.num_free(); }
  // Frames, host slots and disk slots in LRU order (least recent first) of evictable pages.
  std::vector<int64_t> lru_order(Tier tier) const;

  // Raises PagerInternalError describing every inconsistency: a frame or slot owned twice or by
  // the wrong page, a PTE that disagrees with its page's metadata, a free list out of step, an
  // open page off the GPU, an LRU list holding what it must not.
  void check_invariants() const;
  // Bytes of every structure the pager keeps (metadata, allocators, LRU links, PTE mirror).
  int64_t bytes_of_metadata() const;
  static constexpr int64_t kMetadataBytesPerPage = sizeof(PageMeta);

 private:
  class CallScope;  // pins a call's pages and flushes its moves (pager_moves.cpp)

  struct Row {
    int32_t tenant = 0;
    std::vector<PageMeta> pages;
    std::vector<float> scores;         // per page: decayed count of steps it drew its share on
    std::vector<float> score_weights;  // per page: decayed count of the steps counted for it
  };

  // Arguments.
  void check_row(int64_t row, const char* op) const;
  void check_page(PageId id, const char* op) const;
  std::vector<PageId> distinct_pages(const std::vector<PageId>& pages, const char* op) const;

  // The page that holds the copies of `id`: itself, or for a fork's shared view, the page it
  // shares.
  PageId resolve(PageId id) const;
  // Drops every copy of the page, or, for a shared page, hands its copies to one of the
  // sequences sharing it (remove_sequence).
  void release_page(PageId id);
  PageMeta& meta(PageId id) { return rows_[id.row].pages[id.page]; }
  const PageMeta& meta(PageId id) const { return rows_[id.row].pages[id.page]; }
  store::SlotTag tag_of(PageId id) const;

  // Bookkeeping after a page's copies changed: its tier and PTE, then its place in the LRU lists.
  void refresh(PageId id);
  void update_tier(PageId id, PageMeta& m);
  void relink(PageId id, const PageMeta& m);
  void unlink_all(const PageMeta& m);
  void add_pin(PageId id);
  void drop_pin(PageId id);
  void count_move(Direction d, int64_t pages);

  // Drop one copy (no bytes move); the caller refreshes.
  void drop_frame(PageId id, PageMeta& m);
  void drop_host_copy(PageId id, PageMeta& m);
  void drop_disk_copy(PageId id, PageMeta& m);

  // How many indices of each tier could be made free now: the free ones, those of evictable
  // pages with a lower copy, and as many of the dirty ones as the tiers below can take.
  int64_t disk_room() const;
  int64_t host_room() const;
  int64_t frame_room() const;
  // Room in each tier: evict until `count` indices are free, or raise PagerError. `why` names
  // the request for the message.
  void make_free_frames(int64_t count, const std::string& why);
  void make_free_host_slots(int64_t count, const std::string& why);
  void make_free_disk_slots(int64_t count, const std::string& why);
  // One tier's eviction: its LRU list and indices, how a copy there is dropped, and the tier
  // below that takes its dirty pages.
  struct EvictionTier {
    LruList& lru;
    const IndexAllocator& indices;
    int64_t& evictions;
    void (Pager::*drop)(PageId, PageMeta&);
    int64_t (Pager::*lower_room)() const;
    void (Pager::*make_lower_room)(int64_t, const std::string&);
    void (Pager::*write_back)(const std::vector<PageId>&);
  };
  EvictionTier gpu_eviction_tier();
  EvictionTier host_eviction_tier();
  // Victims are taken in the tier's LRU order, or in `order` (nodes of that list) when given.
  template <typename OutOfVictims>
  void evict_for_room(const EvictionTier& tier, int64_t count, const std::string& why,
                      const OutOfVictims& out_of_victims, const std::vector<int64_t>* order = nullptr);
  // A page's score: scores / score_weights (0 before any counted step).
  float attention_score(const Row& r, int64_t page) const;
  // The GPU tier's evictable frames in span-aware victim order (pager_span.cpp).
  std::vector<int64_t> span_victim_order() const;
  [[noreturn]] void raise_no_frames(int64_t count, const std::string& why) const;
  [[noreturn]] void raise_tiers_full(const std::string& why, const char* tier) const;

  // Quotas (pager_quota.cpp): before `need` (pages per tenant) new indices of `tier` are taken,
  // evict each tenant's own pages there until they fit its quota, or raise PagerError.
  IndexAllocator& indices_of(Tier tier);
  static const char* units_of(Tier tier);  // "GPU frames", "host slots" or "disk slots"
  const IndexAllocator& indices_of(Tier tier) const;
  void make_quota_room(Tier tier, const std::map<int32_t, int64_t>& need, const std::string& why);
  void evict_tenant(Tier tier, int32_t tenant, int64_t count, const std::string& why);
  std::vector<int64_t> nodes_of_tenant(const std::vector<int64_t>& nodes, const IndexAllocator& indices,
                                       int32_t tenant) const;
  std::map<int32_t, int64_t> tenants_of(const std::vector<PageId>& pages) const;

  template <typename Move, typename MakeMove, typename Issue, typename Commit>
  void move_batch(const std::vector<PageId>& pages, IndexAllocator& to, const MakeMove& make_move,
                  const Issue& issue, const Commit& commit, Direction direction);
  // Moves (the pages are pinned by the caller and the destinations have room).
  void write_back_to_host(const std::vector<PageId>& pages);  // GPU pages without a host copy
  void write_back_to_disk(const std::vector<PageId>& pages);  // host pages without a disk copy
  void load_into_frames(const std::vector<PageId>& pages);    // host or disk pages
  void load_into_host(const std::vector<PageId>& pages);      // disk pages
  void make_gpu_resident(const std::vector<PageId>& pages, const std::string& why);
  void demote_to_host(const std::vector<PageId>& pages, const std::string& why);
  void seal_pages(const std::vector<PageId>& pages);
  void flush_moves();

  PagerConfig config_;  // first: the members below are sized from it
  Mover& mover_;
  std::vector<Row> rows_;
  IndexAllocator row_ids_;  // owner key: the tenant
  IndexAllocator frames_;
  IndexAllocator host_slots_;
  IndexAllocator disk_slots_;
  // Evictable pages, by tier: sealed unpinned GPU pages (by frame); host copies, except those
  // of pinned pages whose PTE names them (by host slot); disk copies of pages whose PTE names a
  // higher tier (by disk slot). A node is dirty when evicting it needs a write.
  LruList gpu_lru_;
  LruList host_lru_;
  LruList disk_lru_;
  // Per frame: the tenant of the last page that held it (-1: none yet). A frame going to a new
  // page of another tenant is zeroed first, since appends write only part of a page; frames
  // and slots that a move fills get a whole page of their owner's bytes.
  std::vector<int32_t> frame_tenant_;
  std::vector<int32_t> ptes_;
  std::vector<uint8_t> row_dirty_;
  std::vector<int64_t> dirty_rows_;
  uint64_t next_generation_ = 0;
  bool moves_pending_ = false;
  std::unordered_map<int32_t, std::array<int64_t, 3>> quotas_;  // per tenant, per tier (-1: none)
  // Forks (owner keys of pages): each shared view and the page holding its copies; each such
  // page and its views; and, for a page that took over the copies of a removed sequence's
  // page, that page (its disk copy carries that page's tag).
  std::unordered_map<int64_t, PageId> shared_of_;
  std::unordered_map<int64_t, std::vector<PageId>> views_;
  std::unordered_map<int64_t, PageId> tag_origin_;
  Replacement replacement_ = Replacement::kLru;
  SpanPolicy span_;
  PagerStats stats_;
};

}  // namespace paged_kv::engine
