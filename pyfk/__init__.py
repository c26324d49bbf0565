"""pyfk: kernel-accelerated acquisition engine for deep active learning.

    q = pyfk.Descriptors(z=[Zq1, Zq2], g=[Gq1, Gq2])
    p = pyfk.Descriptors(z=[Zp1, Zp2], g=[Gp1, Gp2])
    scores, index = pyfk.topk(q, p, k=32)            # PFK product kernel, PCC-normalised
    chosen = pyfk.select(pool=p, val=v, budget=125, val_labels=y, val_pred=y_hat)
    sel = pyfk.acquire("badge", pyfk.PoolInputs(badge=...), budget=125, labeled=labeled)  # any strategy
    T = pyfk.calibrate(val_logits, val_labels)       # temperature scaling; pyfk.expected_calibration_error
    report = pyfk.audit(labeled_descriptors, labels, probs=oos_probs)  # which labels are probably wrong
"""

from pyfk import distributed, testing
from pyfk._version import __version__
from pyfk.al.strategies import STRATEGIES, PoolInputs, Selection, ValInputs
from pyfk.api import Audit, acquire, audit, backends, calibrate, expected_calibration_error, select, similarity, topk
from pyfk.engine.backend import BackendUnavailable
from pyfk.engine.descriptors import Descriptors
from pyfk.features.extract import extract
from pyfk.features.extraction import Extraction
from pyfk.features.sharded import ShardedStore
from pyfk.features.store import DescriptorStore, StoreLockedError

__all__ = ["distributed", "Descriptors", "Extraction", "extract", "topk", "similarity", "select", "backends",
           "BackendUnavailable", "DescriptorStore", "ShardedStore", "StoreLockedError", "acquire", "STRATEGIES",
           "PoolInputs", "ValInputs", "Selection", "calibrate", "expected_calibration_error", "audit", "Audit",
           "testing", "__version__"]
