"""Training: run configuration, optimizers by name, the trainer and its checkpoints.

```python
from kpflow.tasks import make_task
from kpflow.training import build_model, train, validate_config
cfg = validate_config({"train": {"steps": 300}})
task = make_task(cfg.task.name, **cfg.task.params)
model = build_model(cfg.model.name, task.input_dim, cfg.model.hidden, task.output_dim, g=cfg.model.g, seed=cfg.seed)
result = train(model, task, cfg, out_dir="runs/mine")      # checkpoints in runs/mine/checkpoints, resumable
```
"""

import importlib

#: public name -> the submodule that defines it (imported on first use, so ``import kpflow.training`` and
#: ``kpflow --help`` do not import torch)
_EXPORTS = {
    **dict.fromkeys(["CheckpointInfo", "CheckpointWriteError", "CorruptCheckpointError", "CorruptCheckpointWarning",
                     "atomic_write_bytes", "atomic_write_text", "list_checkpoints", "load_checkpoint",
                     "save_checkpoint", "verify_checkpoint"], "checkpoints"),
    **dict.fromkeys(["ConfigError", "ModelConfig", "OptimizerConfig", "RunConfig", "TaskConfig", "TrackConfig",
                     "TrainConfig", "config_differences", "dump_config", "load_config", "validate_config"], "config"),
    **dict.fromkeys(["build_model", "model_names", "recurrent_weight_names", "register_model",
                     "scale_recurrent_weight"], "models"),
    **dict.fromkeys(["OPTIMIZERS", "make_optimizer", "optimizer_names", "optimizer_options", "register_optimizer"],
                    "optimizers"),
    **dict.fromkeys(["TrainResult", "step_seed", "train"], "trainer"),
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
