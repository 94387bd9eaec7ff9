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

from .checkpoints import (
    CheckpointInfo,
    CorruptCheckpointError,
    CorruptCheckpointWarning,
    atomic_write_bytes,
    atomic_write_text,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from .config import (
    ConfigError,
    ModelConfig,
    OptimizerConfig,
    RunConfig,
    TaskConfig,
    TrackConfig,
    TrainConfig,
    dump_config,
    load_config,
    validate_config,
)
from .models import build_model, model_names, recurrent_weight_names, register_model, scale_recurrent_weight
from .optimizers import OPTIMIZERS, make_optimizer, optimizer_names, optimizer_options, register_optimizer
from .trainer import TrainResult, step_seed, train

__all__ = [
    "CheckpointInfo", "CorruptCheckpointError", "CorruptCheckpointWarning", "atomic_write_bytes",
    "atomic_write_text", "list_checkpoints", "load_checkpoint", "save_checkpoint", "verify_checkpoint",
    "ConfigError", "ModelConfig", "OptimizerConfig", "RunConfig", "TaskConfig", "TrackConfig", "TrainConfig",
    "dump_config", "load_config", "validate_config", "build_model", "model_names", "recurrent_weight_names",
    "register_model", "scale_recurrent_weight", "OPTIMIZERS", "make_optimizer", "optimizer_names",
    "optimizer_options", "register_optimizer", "TrainResult", "step_seed", "train",
]
