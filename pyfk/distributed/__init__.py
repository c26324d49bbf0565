"""pyfk on torch.distributed: sharded top-k, selection and acquisition (DESIGN.md section 9)."""

from pyfk.distributed.acquire import acquire
from pyfk.distributed.search import select, topk

__all__ = ["acquire", "select", "topk"]
