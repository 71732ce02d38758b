"""The Pareto report: read a study from its Optuna storage and show the sparsity/accuracy trade-off.

``write_report(study, out_dir)`` writes one self-contained HTML page plus the front as Markdown and CSV;
``pick(study, max_drop=..., min_sparsity=...)`` chooses a trial (a lambda) from the front (the knee by default);
``at_equal_epochs(study, against)`` compares two studies' fronts at an equal budget in epochs.
Nothing here trains: it reads what the sweep stored on the study and its trials, through sweeps.records.
"""
from .budget import EqualBudget, Within, at_equal_epochs
from .pick import PickError, describe_pick, knee, pick, recommend
from .report import write_report
from .table import front_table, hypervolume_history, trials_table

__all__ = ["EqualBudget", "PickError", "Within", "at_equal_epochs", "describe_pick", "front_table",
           "hypervolume_history", "knee", "pick", "recommend", "trials_table", "write_report"]
