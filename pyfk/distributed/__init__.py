"""pyfk on torch.distributed: sharded top-k, selection, acquisition and the label audit (DESIGN.md section 9)."""

from pyfk.distributed.acquire import acquire
from pyfk.distributed.audit import audit
from pyfk.distributed.search import select, topk

__all__ = ["acquire", "audit", "select", "topk"]
