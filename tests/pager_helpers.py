"""Helpers for the pager tests: small CPU pools and a recognisable pattern per page."""

from __future__ import annotations

import itertools

import torch

import paged_kv
from paged_kv.store import DiskStore

LAYERS, HEADS, PAGE_SIZE, HEAD_DIM = 1, 1, 16, 8
_TAGS = itertools.count(1)


def make_pager(frames=4, host=4, disk=0, folder=None, max_sequences=4, max_pages=32, **kwargs):
    """A pager over NaN-filled float32 CPU pools of `frames` frames and `host` slots and, when
    disk > 0, a disk store of `disk` slots in `folder`."""
    pool = paged_kv.new_pool(frames, LAYERS, HEADS, PAGE_SIZE, HEAD_DIM, torch.float32).fill_(float("nan"))
    host_pool = paged_kv.new_pool(host, LAYERS, HEADS, PAGE_SIZE, HEAD_DIM, torch.float32).fill_(float("nan"))
    disk_store = None
    if disk:
        page_bytes = pool[0].numel() * pool.element_size()
        disk_store = DiskStore(str(folder), disk, page_bytes, io_threads=2)
    return paged_kv.Pager(pool, host_pool, disk_store=disk_store, max_sequences=max_sequences,
                          max_pages=max_pages, **kwargs)


def read_any_copy(pager, row, page):
    """The int32 words of the copy the page's PTE names, read where it is (disk included)."""
    info = pager.page_info(row, page)
    if info["tier"] == paged_kv.Tier.GPU:
        return pager.pool.view(torch.int32)[info["frame"]]
    if info["tier"] == paged_kv.Tier.HOST:
        return pager.host_pool.view(torch.int32)[info["host_slot"]]
    out = torch.empty_like(pager.pool[0]).view(torch.int32)
    return pager.disk_store.read_page(info["disk_slot"], info["disk_tag"], out)


def pattern(pager, tag):
    """The int32 words of a page labelled `tag`: unique to the tag, different in every word."""
    words = pager.pool[0].numel()
    return tag * 65536 + torch.arange(words, dtype=torch.int32).reshape(pager.pool.shape[1:])


def new_tag():
    """A tag no page has had yet."""
    return next(_TAGS)


def write_page(pager, row, page, tag):
    """Write the pattern of `tag` into the GPU frame of an open page."""
    info = pager.page_info(row, page)
    assert info["tier"] == paged_kv.Tier.GPU and not info["sealed"]
    pager.pool.view(torch.int32)[info["frame"]] = pattern(pager, tag)


def frame_words(pager, row, page):
    """The int32 words of the page's GPU frame (it must be GPU-resident)."""
    info = pager.page_info(row, page)
    assert info["tier"] == paged_kv.Tier.GPU, info
    return pager.pool.view(torch.int32)[info["frame"]]


def append_written(pager, row, n, tags, seal_open=True):
    """Append n pages to `row` (sealing its open pages first unless seal_open is False) and write
    a fresh tag's pattern into each; records it in `tags`."""
    first = pager.append_pages(row, n, seal_open=seal_open)
    for page in range(first, first + n):
        tags[(row, page)] = new_tag()
        write_page(pager, row, page, tags[(row, page)])
    return first


def sealed_sequence(pager, pages, tags):
    """A new sequence of `pages` written and sealed pages (recorded in `tags`); returns its row."""
    row = pager.add_sequence()
    append_written(pager, row, pages, tags)
    pager.seal(row, pages - 1)
    return row


def tier(pager, row, page):
    return paged_kv.Tier(pager.page_info(row, page)["tier"])


def service_some(pager, rng, row, k=3):
    """Fault in up to k random pages of `row`: as many, from the front, as one service() can take."""
    pages = [(row, p) for p in range(pager.num_pages(row))]
    want = rng.sample(pages, min(len(pages), k))
    take = pager.serviceable_prefix(want)
    if take:
        pager.service(want[:take])
