// Span-aware replacement of the GPU tier: attention scores and the victim order.
//
// A page's score is the share of recent steps in which it drew at least `share` of its fair
// share of the attention mass: decayed counts of those steps over decayed counts of all the
// steps it was ranked on (so a page with few steps behind it is not ranked as if it had drawn
// nothing before). Scores live with the page, not with its frame: an evicted page keeps its
// history, and when attention retrieves it again it comes back with the score it earned.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <tuple>

#include "engine/pager.h"

namespace paged_kv::engine {

void Pager::set_replacement(Replacement replacement, const SpanPolicy& span) {
  if (!(span.decay >= 0.0 && span.decay < 1.0)) {
    throw std::invalid_argument("paged_kv pager: set_replacement: decay must be in [0, 1), got " +
                                std::to_string(span.decay));
  }
  if (!(std::isfinite(span.share) && span.share > 0.0)) {
    throw std::invalid_argument("paged_kv pager: set_replacement: share must be a finite number > 0, got " +
                                std::to_string(span.share));
  }
  if (span.sink_pages < 0 || span.window_pages < 0) {
    throw std::invalid_argument("paged_kv pager: set_replacement: sink_pages and window_pages must be "
                                ">= 0, got " + std::to_string(span.sink_pages) + " and " +
                                std::to_string(span.window_pages));
  }
  replacement_ = replacement;
  span_ = span;
}

void Pager::record_attention(int64_t row, const std::vector<float>& mass) {
  check_row(row, "record_attention");
  Row& r = rows_[row];
  if (mass.size() > r.pages.size()) {
    throw std::invalid_argument("paged_kv pager: record_attention: " + std::to_string(mass.size()) +
                                " values for sequence " + std::to_string(row) + ", which has " +
                                std::to_string(r.pages.size()) + " pages");
  }
  double total = 0.0;
  for (size_t p = 0; p < mass.size(); ++p) {
    if (!(std::isfinite(mass[p]) && mass[p] >= 0.f)) {
      throw std::invalid_argument("paged_kv pager: record_attention: the mass of page " + std::to_string(p) +
                                  " of sequence " + std::to_string(row) + " is " + std::to_string(mass[p]) +
                                  "; it must be finite and >= 0");
    }
    total += mass[p];
  }
  if (total <= 0.0) return;  // a step that read nothing says nothing about any page
  // A page draws on the step when its mass reaches `share` of its fair share (the step's mass
  // over the pages reported). Counting steps rather than summing mass keeps a short burst of
  // retrieval (a span drawing a quarter of the step) from outweighing a page attention returns
  // to step after step with a modest mass; and a share relative to the pages' count needs no
  // calibration of what the kernel's mass adds up to.
  const double bar = span_.share * total / static_cast<double>(mass.size());
  // The sinks and the window are kept whatever their rank, and the mass they draw comes from
  // where they sit, not from what they hold: counted, it made a page that just left the window
  // outrank the pages attention keeps coming back to. Their steps are not counted at all, so a
  // page's share is over the steps it was ranked on.
  const float keep = static_cast<float>(span_.decay);
  const int64_t n = static_cast<int64_t>(r.pages.size());
  for (size_t p = 0; p < mass.size(); ++p) {
    const int64_t page = static_cast<int64_t>(p);
    if (page < span_.sink_pages || page >= n - span_.window_pages) continue;
    const float drew = static_cast<double>(mass[p]) >= bar ? 1.f : 0.f;
    r.scores[p] = keep * r.scores[p] + (1.f - keep) * drew;
    r.score_weights[p] = keep * r.score_weights[p] + (1.f - keep);
  }
}

float Pager::attention_score(const Row& r, int64_t page) const {
  const float weight = r.score_weights[page];
  return weight > 0.f ? r.scores[page] / weight : 0.f;
}

std::vector<float> Pager::attention_scores(int64_t row) const {
  check_row(row, "attention_scores");
  const Row& r = rows_[row];
  std::vector<float> scores(r.pages.size());
  for (size_t p = 0; p < scores.size(); ++p) scores[p] = attention_score(r, static_cast<int64_t>(p));
  return scores;
}

// Protected pages (sinks and the window) last; among the rest the lowest score first; ties in
// LRU order (the sort is stable over the list's order).
std::vector<int64_t> Pager::span_victim_order() const {
  const std::vector<int64_t> lru = gpu_lru_.order();
  std::vector<std::tuple<bool, float, int64_t>> keyed;
  keyed.reserve(lru.size());
  for (const int64_t frame : lru) {
    const PageId id = page_of_owner(frames_.owner(frame));
    const Row& r = rows_[id.row];
    const int64_t n = static_cast<int64_t>(r.pages.size());
    const bool kept = id.page < span_.sink_pages || id.page >= n - span_.window_pages;
    keyed.emplace_back(kept, attention_score(r, id.page), frame);
  }
  std::stable_sort(keyed.begin(), keyed.end(), [](const auto& a, const auto& b) {
    return std::tie(std::get<0>(a), std::get<1>(a)) < std::tie(std::get<0>(b), std::get<1>(b));
  });
  std::vector<int64_t> order;
  order.reserve(keyed.size());
  for (const auto& k : keyed) order.push_back(std::get<2>(k));
  return order;
}

}  // namespace paged_kv::engine
