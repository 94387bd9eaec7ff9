"""Built-in studies by name. A study is a default ``RunConfig`` plus a runner ``run(cfg, **options) -> run_dir``.

``register_study(name, default_config, run=None, description=...)`` adds one; ``kpflow run NAME`` and
``kpflow sweep NAME`` find it here. Without a custom runner a study runs the standard pipeline:
train (checkpoints) → analyze (metrics.csv) → report (figures + report.html).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kpflow.training.config import RunConfig, validate_config


@dataclass(frozen=True)
class Study:
    name: str
    default_config: Callable[[], RunConfig]
    run: Callable[..., Path] | None
    description: str


STUDIES: dict[str, Study] = {}


def register_study(name: str, default_config: Callable[[], RunConfig], run: Callable[..., Path] | None = None,
                   description: str = "") -> None:
    """Register a built-in study. ``default_config()`` returns its ``RunConfig``; ``run(cfg, *, progress,
    analyze, report, fresh, stop_after)`` (optional) replaces the standard pipeline."""
    STUDIES[str(name)] = Study(str(name), default_config, run, description)


#: modules that register studies when imported (loaded on first lookup, skipped if absent)
PLUGIN_MODULES = ["kpflow.dynamics.study", "kpflow.dynamics.studies", "kpflow.experiments.bifurcation",
                  "kpflow.experiments.transformer"]
_loaded = False


def _load_plugins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib

    for mod in PLUGIN_MODULES:
        try:
            importlib.import_module(mod)
        except ImportError:
            pass


def study_names() -> list[str]:
    _load_plugins()
    return sorted(STUDIES)


def get_study(name: str) -> Study:
    _load_plugins()
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; valid studies: {', '.join(study_names())} "
                         "(or pass a .yaml/.toml config file)")
    return STUDIES[name]


def flipflop_config() -> RunConfig:
    """GRU, 64 units, 3-bit flip-flop, Adam, 600 steps: the default study (under 5 minutes on 2 CPU cores).
    It is the schema's defaults (``RunConfig()``), so an empty config file means the same run."""
    return RunConfig()


def multitask_config() -> RunConfig:
    """GRU on the Memory-Pro/Anti, Delay-Pro/Anti mixture with a context cue; tracks task interference."""
    return validate_config({
        "name": "multitask", "seed": 0,
        "task": {"name": "multitask", "params": {"context": 5, "stim": 10, "mem": 10, "resp": 10}},
        "model": {"name": "gru", "hidden": 64, "g": 1.0},
        "optimizer": {"name": "adam", "lr": 5e-3},
        "train": {"steps": 800, "batch_size": 64, "checkpoint_every": 100},
        "track": {"eval_batch": 8, "probes": 16},
    })


def memory_pro_config() -> RunConfig:
    """Leaky tanh RNN on Memory-Pro (the KPFlow ring-attractor setting; K exact through the Kronecker core)."""
    return validate_config({
        "name": "memory_pro", "seed": 0,
        "task": {"name": "memory_pro", "params": {"stim": 10, "mem": 10, "resp": 10}},
        "model": {"name": "leaky_rnn", "hidden": 64, "g": 1.0, "params": {"dt": 0.5}},
        "optimizer": {"name": "adam", "lr": 5e-3},
        "train": {"steps": 800, "batch_size": 64, "checkpoint_every": 100},
        "track": {"eval_batch": 8, "probes": 16},
    })


def student_teacher_config() -> RunConfig:
    """Vanilla tanh RNN student learning a teacher RNN (teacher gain 1.2), SGD."""
    return validate_config({
        "name": "student_teacher", "seed": 0,
        "task": {"name": "student_teacher", "params": {"hidden": 64, "seq_len": 40, "g_teacher": 1.2}},
        "model": {"name": "rnn", "hidden": 64, "g": 0.5},
        "optimizer": {"name": "sgd", "lr": 0.05},
        "train": {"steps": 800, "batch_size": 64, "checkpoint_every": 100},
        "track": {"eval_batch": 8, "probes": 16},
    })


register_study("flipflop", flipflop_config,
               description="GRU (64 units) on 3-bit flip-flop; effective ranks of K, P P* and the NTK over training")
register_study("multitask", multitask_config,
               description="GRU on four angle-memory tasks with a context cue; task-by-task interference")
register_study("memory_pro", memory_pro_config, description="leaky RNN on Memory-Pro; exact K via Kronecker core")
register_study("student_teacher", student_teacher_config, description="tanh RNN student of a teacher RNN")
