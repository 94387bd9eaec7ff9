"""Built-in studies and their registry, the standard pipeline (train → analyze → report) and sweeps."""

from .pipeline import prepare_run_dir, run_pipeline, run_study, run_sweep, sweep_configs
from .registry import STUDIES, Study, get_study, register_study, study_names

__all__ = ["STUDIES", "Study", "get_study", "prepare_run_dir", "register_study", "run_pipeline", "run_study",
           "run_sweep", "study_names", "sweep_configs"]
