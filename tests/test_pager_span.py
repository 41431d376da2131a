"""Span-aware replacement of the GPU tier: attention scores (the decayed share of steps in which
a page drew its share of the mass), the victim order (lowest score first, sinks and the window
kept), scores kept across eviction, and the content of every page preserved."""

from __future__ import annotations

import random

import pytest
import torch

from paged_kv import Tier

from pager_helpers import append_written, make_pager, read_any_copy, pattern, tier

GPU, HOST = Tier.GPU, Tier.HOST


def _filled(frames, pages, **span):
    pager = make_pager(frames=frames, host=2 * pages, max_pages=pages + 4)
    pager.set_replacement("span", **span)
    row = pager.add_sequence(0)
    tags = {}
    for _ in range(pages):
        append_written(pager, row, 1, tags)
    pager.seal(row, pages - 1)
    return pager, row, tags


def test_scores_are_decayed_shares_of_the_steps_a_page_drew_on():
    """A step counts for a page whose mass reaches `share` of its fair share (the step's mass
    over the pages reported); the score is the decayed count of such steps over the decayed
    count of all its steps, so a page with one step behind it is not diluted."""
    pager, row, _ = _filled(frames=4, pages=3, decay=0.5, share=1.0, sink_pages=0, window_pages=0)
    assert pager.attention_scores(row).tolist() == [0, 0, 0]
    pager.record_attention(row, torch.tensor([1.0, 0.0]))  # bar 0.5: page 0 draws; page 2 not counted
    torch.testing.assert_close(pager.attention_scores(row), torch.tensor([1.0, 0.0, 0.0]))
    pager.record_attention(row, torch.tensor([1.0, 4.0, 2.0], dtype=torch.float64))  # bar 7/3: page 1
    torch.testing.assert_close(pager.attention_scores(row), torch.tensor([1 / 3, 2 / 3, 0.0]))
    pager.record_attention(row, torch.zeros(3))  # a step that read nothing is not counted
    torch.testing.assert_close(pager.attention_scores(row), torch.tensor([1 / 3, 2 / 3, 0.0]))


def test_scores_count_steps_not_mass():
    """One step of a huge mass does not outrank many steps of a modest one: with a long memory,
    a page drawing its share on every step of ten beats one that drew 90% of a single step."""
    pager, row, _ = _filled(frames=8, pages=4, decay=0.99, share=1.0, sink_pages=0, window_pages=0)
    pager.record_attention(row, torch.tensor([0.0, 0.05, 0.9, 0.05]))
    for _ in range(9):
        pager.record_attention(row, torch.tensor([0.0, 0.5, 0.0, 0.5]))
    scores = pager.attention_scores(row)
    # Page 1 drew on nine steps of ten, page 2 on one (the oldest, which weighs most at decay 0.99).
    assert 0.85 < float(scores[1]) < 0.95 and 0.05 < float(scores[2]) < 0.15


def test_kept_pages_do_not_gather_scores():
    """The sinks and the window draw mass for where they sit; those steps are not counted, so a
    page that leaves the window is scored from the steps after it left."""
    pager, row, tags = _filled(frames=8, pages=6, decay=0.5, share=1.0, sink_pages=1, window_pages=2)
    pager.record_attention(row, torch.tensor([8.0, 6.0, 1.0, 1.0, 8.0, 8.0]))  # bar 32/6: page 1 draws
    torch.testing.assert_close(pager.attention_scores(row), torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 0.0]))
    append_written(pager, row, 1, tags)  # page 4 leaves the window
    pager.record_attention(row, torch.tensor([8.0, 0.0, 0.0, 0.0, 6.0, 8.0, 8.0]))  # bar 30/7
    torch.testing.assert_close(pager.attention_scores(row),
                               torch.tensor([0.0, 1 / 3, 0.0, 0.0, 1.0, 0.0, 0.0]))


def test_victims_are_the_lowest_scores_and_never_the_sinks_or_window():
    pager, row, tags = _filled(frames=8, pages=8, decay=0.5, share=1.0, sink_pages=1, window_pages=2)
    # Touch in an order that LRU would follow instead: page 6 last used, page 1 first.
    for tick, page in enumerate([1, 2, 3, 4, 5, 0, 7, 6]):
        pager.touch([(row, page)], tick)
    # Steps drawn on: pages 1 and 3 every step, page 5 the first and last, page 2 the first two,
    # page 4 never: scores 1, 1, 5/7, 3/7, 0.
    pager.record_attention(row, torch.tensor([0.0, 3.0, 3.0, 3.0, 0.0, 3.0, 0.0, 0.0]))
    pager.record_attention(row, torch.tensor([0.0, 3.0, 3.0, 3.0, 0.0, 0.0, 0.0, 0.0]))
    pager.record_attention(row, torch.tensor([0.0, 3.0, 0.0, 3.0, 0.0, 3.0, 0.0, 0.0]))
    torch.testing.assert_close(pager.attention_scores(row)[1:6], torch.tensor([1.0, 3 / 7, 1.0, 0.0, 5 / 7]))
    assert all(tier(pager, row, p) == GPU for p in range(8))
    other = pager.add_sequence(0)
    append_written(pager, other, 3, tags)  # three frames: evicts pages 4, 2 and 5 of `row`
    on_gpu = [p for p in range(8) if tier(pager, row, p) == GPU]
    assert on_gpu == [0, 1, 3, 6, 7]
    for p in range(8):
        assert torch.equal(read_any_copy(pager, row, p), pattern(pager, tags[(row, p)]))
    pager.check_invariants()


@pytest.mark.parametrize("replacement", ["span", "lru"])
def test_a_page_attention_keeps_returning_to_survives_a_recent_low_mass_one(replacement):
    """Page 1 drew its share on twenty steps, then was evicted; its score stays with it. Faulted
    back in and used least recently, it outlives pages touched after it that never drew their
    share: under "span" one of those goes, under LRU page 1 does."""
    pager, row, tags = _filled(frames=6, pages=6, decay=0.9, share=1.0, sink_pages=0, window_pages=0)
    pager.set_replacement(replacement, decay=0.9, share=1.0, sink_pages=0, window_pages=0)
    for _ in range(20):
        pager.record_attention(row, torch.tensor([1.0, 5.0, 1.0, 1.0, 1.0, 1.0]))  # bar 10/6
    pager.demote([(row, 1)], HOST)
    assert tier(pager, row, 1) == HOST
    for _ in range(5):  # while evicted, attention goes elsewhere; page 1's history is kept
        pager.record_attention(row, torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 5.0]))
    assert float(pager.attention_scores(row)[1]) > 0.5
    assert pager.service([(row, 1)]) == 1
    for tick, page in enumerate([1, 0, 2, 3, 4, 5]):  # page 1 least recently used
        pager.touch([(row, page)], tick)
    other = pager.add_sequence(0)
    append_written(pager, other, 1, tags)
    if replacement == "span":
        assert tier(pager, row, 1) == GPU and tier(pager, row, 0) == HOST
    else:
        assert tier(pager, row, 1) == HOST and tier(pager, row, 0) == GPU
    pager.check_invariants()


def test_protected_pages_go_last_when_nothing_else_is_left():
    pager, row, tags = _filled(frames=4, pages=4, sink_pages=1, window_pages=2)
    pager.record_attention(row, torch.tensor([0.0, 9.0, 0.0, 0.0]))
    other = pager.add_sequence(0)
    append_written(pager, other, 2, tags)  # page 1 (unprotected, high score) first, then page 0
    assert [tier(pager, row, p) for p in range(4)] == [HOST, HOST, GPU, GPU]
    pager.check_invariants()


def test_ties_follow_recency():
    pager, row, tags = _filled(frames=5, pages=5, sink_pages=0, window_pages=0)
    for tick, page in enumerate([3, 1, 4, 0, 2]):
        pager.touch([(row, page)], tick)
    other = pager.add_sequence(0)
    append_written(pager, other, 2, tags)  # equal (zero) scores: least recently used first
    assert [tier(pager, row, p) for p in range(5)] == [GPU, HOST, GPU, HOST, GPU]


def test_lru_is_unchanged_and_scores_are_kept_under_it():
    pager = make_pager(frames=3, host=8)
    assert pager.replacement == "lru"
    pager.set_replacement("lru", sink_pages=0, window_pages=0)  # no kept pages: every page scores
    row = pager.add_sequence(0)
    tags = {}
    append_written(pager, row, 3, tags)
    pager.seal(row, 2)
    pager.record_attention(row, torch.tensor([0.0, 0.0, 9.0]))
    pager.touch([(row, 2)], 1)
    pager.touch([(row, 1)], 2)
    append_written(pager, row, 1, tags)  # LRU: page 0 goes, whatever the scores
    assert tier(pager, row, 0) == HOST and tier(pager, row, 2) == GPU
    assert pager.attention_scores(row)[2] > 0


@pytest.mark.parametrize("args, match", [
    (("fifo",), "replacement must be 'lru' or 'span'"),
    (("span",), None),
])
def test_set_replacement_checks(args, match):
    pager = make_pager()
    if match:
        with pytest.raises(ValueError, match=match):
            pager.set_replacement(*args)
    else:
        pager.set_replacement(*args)
        assert pager.replacement == "span"
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)"):
        pager.set_replacement("span", decay=1.0)
    with pytest.raises(ValueError, match="must be >= 0"):
        pager.set_replacement("span", window_pages=-1)
    for share in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="share must be a finite number > 0"):
            pager.set_replacement("span", share=share)


def test_record_attention_checks():
    pager, row, _ = _filled(frames=4, pages=2)
    with pytest.raises(ValueError, match="3 values for sequence 0, which has 2 pages"):
        pager.record_attention(row, torch.ones(3))
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        pager.record_attention(row, torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        pager.record_attention(row, torch.tensor([-1.0]))
    with pytest.raises(RuntimeError, match="1-D floating CPU tensor"):
        pager.record_attention(row, torch.ones(1, 2))
    with pytest.raises(ValueError):
        pager.record_attention(3, torch.ones(1))


def test_random_workload_keeps_every_page_and_the_invariants():
    """Random appends, scores, touches and faults under span replacement: every page reads back
    its pattern and the invariants hold after each step."""
    rng = random.Random(7)
    pager = make_pager(frames=6, host=64, max_sequences=3, max_pages=24)
    pager.set_replacement("span", decay=0.8, sink_pages=1, window_pages=1)
    rows = [pager.add_sequence(0) for _ in range(3)]
    tags = {}
    for step in range(200):
        row = rng.choice(rows)
        n = pager.num_pages(row)
        action = rng.random()
        if action < 0.3 and n < 24:
            append_written(pager, row, 1, tags)
        elif action < 0.6 and n:
            pager.record_attention(row, torch.rand(rng.randint(1, n)))
        elif n:
            sealed = [p for p in range(n) if pager.page_info(row, p)["sealed"]]
            wanted = rng.sample(sealed, min(len(sealed), rng.randint(1, 3)))
            if wanted and len(wanted) <= pager.max_serviceable():
                pager.service([(row, p) for p in wanted])
                assert all(tier(pager, row, p) == GPU for p in wanted)
            pager.touch([(row, p) for p in wanted], step)
        pager.check_invariants()
    for (row, page), tag in tags.items():
        assert torch.equal(read_any_copy(pager, row, page), pattern(pager, tag))
