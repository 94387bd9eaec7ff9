"""Tracking over training: the operators of learning measured at every checkpoint on a fixed batch.

``measure_checkpoint(model, task, batch)`` returns the metric rows of one model; ``analyze_run(run_dir)``
measures every checkpoint of a run and writes the tidy ``metrics.csv``.
"""

from .analyze import (
    COLUMNS,
    analyze_run,
    build_from_config,
    read_metrics_csv,
    run_config,
    training_losses,
    write_metrics_csv,
)
from .measure import VIEWS, Reference, interference_matrix, measure_checkpoint, participation_ratio
from .summaries import Stat, alignment_stat, psd_stats

__all__ = ["COLUMNS", "analyze_run", "build_from_config", "read_metrics_csv", "run_config", "training_losses",
           "write_metrics_csv", "VIEWS", "Reference", "interference_matrix", "measure_checkpoint",
           "participation_ratio", "Stat", "alignment_stat", "psd_stats"]
