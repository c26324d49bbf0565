"""Public functions (DESIGN.md section 8): a thin face over the layers below.

    topk, similarity, select     pyfk.engine.search (validated there, so every caller is)
    acquire                      pyfk.al.strategies.select: any strategy, one signature
    calibrate, expected_calibration_error
                                 pyfk.al.calibration: temperature scaling (NLL) and top-label ECE
    audit                        pyfk.al.audit: which labels are probably wrong (kernel votes + confident learning)
    backends                     pyfk.engine.registry
"""

from __future__ import annotations

from pyfk.al.audit import Audit, audit
from pyfk.al.calibration import calibrate, expected_calibration_error
from pyfk.al.strategies import select as acquire
from pyfk.engine.registry import backends
from pyfk.engine.search import select, similarity, topk

__all__ = ["topk", "similarity", "select", "acquire", "backends", "calibrate", "expected_calibration_error", "audit",
           "Audit"]
