"""paged_kv: demand-paged virtual memory for the transformer KV cache.

The ops live in torch.ops.paged_kv (typed wrappers in paged_kv.ops). If the compiled library is
missing, importing paged_kv still works; `paged_kv.LIBRARY_ERROR` says why and the ops raise it.
"""

from paged_kv import engine, ops, pager, pte, reference
from paged_kv._library import LOAD_ERROR as LIBRARY_ERROR
from paged_kv._library import build_info
from paged_kv.engine import Engine, FaultError
from paged_kv.ops import attention, append_kv, check_errors, deferred_checks, gather_kv, merge_states, set_sync_checks
from paged_kv.pager import Pager, PagerError
from paged_kv.policy import Policy
from paged_kv.pte import PAGE_SIZES, UNMAPPED, Tier, make_pte, new_page_table, new_pool
from paged_kv.slot_decode import SlotDecoder

__version__ = "0.1.0"

__all__ = [
    "Engine",
    "FaultError",
    "LIBRARY_ERROR",
    "PAGE_SIZES",
    "Pager",
    "PagerError",
    "Policy",
    "SlotDecoder",
    "Tier",
    "UNMAPPED",
    "append_kv",
    "attention",
    "build_info",
    "check_errors",
    "deferred_checks",
    "engine",
    "gather_kv",
    "make_pte",
    "merge_states",
    "new_page_table",
    "new_pool",
    "ops",
    "pager",
    "pte",
    "reference",
    "set_sync_checks",
]
