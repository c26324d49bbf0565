"""Active learning on top of the engine: acquisition strategies, the AL runner,
datasets and reference models.

    pyfk.al.strategies   one registry (base: PoolInputs/ValInputs/Selection, Needs, select) and
                         the families uncertainty, diversity (coreset, badge), pfk (pcc, pfk, pfk_sum)
    pyfk.al.runner       Config, run(): rounds of train/evaluate/compute what the strategy needs/select
    pyfk.al.data, imagedata, models   datasets (embedded and local), noisy annotators, LeNet/ResNet-18
    pyfk.al.stats        t-intervals over seeds and paired comparisons (runner.summarise / compare)
    pyfk.al.audit, calibration   pyfk.audit (suspect labels) and pyfk.calibrate (temperature, ECE)
"""

from pyfk.al.runner import Config, Run, compare, format_table, plot, run, summarise, write_results

__all__ = ["Config", "Run", "run", "format_table", "plot", "summarise", "compare", "write_results"]
