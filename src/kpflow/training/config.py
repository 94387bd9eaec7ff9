"""Run configuration: a validated schema read from YAML or TOML, with defaults printable on request.

Every invalid value is reported as ``key = value: what is allowed`` (``ConfigError``), and unknown
task / model / optimizer names list the valid ones. The schema's defaults are the default study (GRU-64
on 3-bit flip-flop, ``kpflow run --print-defaults``): an empty config file means exactly that study.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ConfigError(ValueError):
    """An invalid configuration; the message names each offending key, its value and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TaskConfig(_Section):
    """Which task to train on (``name``) and its constructor parameters (``params``)."""

    name: str = "flipflop"
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known_task(cls, v):
        from kpflow.tasks import task_names

        if v not in task_names():
            raise ValueError(f"unknown task; valid tasks: {', '.join(task_names())}")
        return v

    @field_validator("params")
    @classmethod
    def _known_params(cls, v, info):
        from kpflow.tasks import task_parameters

        name = info.data.get("name")
        if name is None or name == "neurogym":
            return v
        allowed = task_parameters(name)
        unknown = [k for k in v if k not in allowed]
        if unknown:
            raise ValueError(f"task {name!r} has no parameter(s) {', '.join(unknown)}; "
                             f"valid parameters: {', '.join(allowed)}")
        return v


class ModelConfig(_Section):
    """The model: ``name`` (a recurrent cell, ``transformer`` or ``mlp``), its size ``hidden`` (state size;
    ``d_model`` of a transformer; width of an MLP), initial recurrent weight scale ``g`` (recurrent cells
    only) and its own ``params`` (see ``kpflow.training.models``)."""

    name: str = "gru"
    hidden: int = Field(64, ge=1)
    g: float = Field(1.0, ge=0.0, description="multiplies the recurrent weight matrix at initialisation")
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v):
        from .models import model_names

        if v.lower() not in model_names():
            raise ValueError(f"unknown model; valid models: {', '.join(model_names())}")
        return v.lower()

    @field_validator("params")
    @classmethod
    def _known_model_params(cls, v, info):
        from .models import model_parameters, unknown_parameters_message

        name = info.data.get("name")
        allowed = None if name is None else model_parameters(name)
        if allowed is not None:
            unknown = [k for k in v if k not in allowed]
            if unknown:
                raise ValueError(unknown_parameters_message(name, unknown, allowed))
        return v


class OptimizerConfig(_Section):
    """Any ``torch.optim`` optimizer (lower-case class name) or a registered one, its ``lr`` and options."""

    name: str = "adam"
    lr: float = Field(1e-2, gt=0.0)
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known_optimizer(cls, v):
        from .optimizers import optimizer_names

        if v.lower() not in optimizer_names():
            raise ValueError(f"unknown optimizer; valid optimizers: {', '.join(optimizer_names())}")
        return v.lower()

    @field_validator("params")
    @classmethod
    def _known_options(cls, v, info):
        from .optimizers import optimizer_options

        name = info.data.get("name")
        allowed = None if name is None else optimizer_options(name)
        if allowed is not None:
            unknown = [k for k in v if k not in allowed or k == "lr"]
            if unknown:
                raise ValueError(f"optimizer {name!r} has no option(s) {', '.join(unknown)} in params "
                                 f"(set lr with optimizer.lr); valid options: "
                                 f"{', '.join(k for k in allowed if k != 'lr')}")
        return v


class TrainConfig(_Section):
    """Training loop settings."""

    steps: int = Field(600, ge=0, description="optimizer steps (a finished run is extended by asking for more)")
    batch_size: int = Field(64, ge=1)
    checkpoint_every: int = Field(60, ge=1, description="write a checkpoint every k steps (and at 0 and the end)")
    loss: Literal["auto", "mse", "ce"] = "auto"
    early_stop_loss: float | None = Field(None, ge=0.0,
                                          description="stop when the mean loss since the last checkpoint is below")
    grad_clip: float | None = Field(None, gt=0.0, description="clip the gradient norm to this value")


class TrackConfig(_Section):
    """What to measure at each checkpoint, on a fixed evaluation batch."""

    eval_batch: int = Field(8, ge=1, description="trials in the fixed evaluation batch")
    eval_seed: int = Field(1234, ge=0)
    probes: int = Field(16, ge=4, description="random probes per randomized estimate")
    every: int = Field(1, ge=1, description="analyse every n-th checkpoint (the first and last always)")
    param_names: list[str] | None = Field(None, description="cell parameters K is built from (default: all)")
    axes: bool = Field(True, description="also measure temporal / spatial / trial effective ranks")


class RunConfig(_Section):
    """A whole study: task, model, optimizer, training and tracking."""

    name: str = Field("flipflop", description="the run folder is <out>/<name>")
    seed: int = Field(0, ge=0)
    device: str = "cpu"
    dtype: Literal["float32", "float64"] = "float32"
    out: str = "runs"
    task: TaskConfig = Field(default_factory=TaskConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    track: TrackConfig = Field(default_factory=TrackConfig)

    @field_validator("name")
    @classmethod
    def _folder_name(cls, v):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", v):
            raise ValueError("must be a folder name of letters, digits, '_', '.', '-' (e.g. 'flipflop_g2')")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v):
        if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", v):
            raise ValueError("must be 'cpu', 'cuda', 'cuda:N' or 'mps'")
        return v

    @property
    def run_dir(self) -> Path:
        return Path(self.out) / self.name

    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key (value {e['input']!r})")
        elif e["type"] == "missing":
            lines.append(f"{key}: required")
        else:
            lines.append(f"{key} = {e['input']!r}: {msg}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def validate_config(data: dict | RunConfig | None = None, **overrides) -> RunConfig:
    """A ``RunConfig`` from a nested dict plus dotted overrides (``{"train.steps": 10}``)."""
    if isinstance(data, RunConfig):
        data = data.model_dump()
    data = json.loads(json.dumps(data or {}, default=list))
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def config_differences(old: RunConfig, new: RunConfig, exclude: tuple[str, ...] = ()) -> dict[str, tuple]:
    """``{dotted key: (old value, new value)}`` for every leaf where two configs differ, skipping the
    top-level sections or keys in ``exclude``."""

    def leaves(data, prefix=""):
        out = {}
        for k, v in data.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and v:
                out.update(leaves(v, key + "."))
            else:
                out[key] = v
        return out

    a = leaves(old.model_dump(mode="json", exclude=set(exclude)))
    b = leaves(new.model_dump(mode="json", exclude=set(exclude)))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k not in a or k not in b or a[k] != b[k]}


def load_config(path: str | Path, **overrides) -> RunConfig:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) config file and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # pragma: no cover - python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"config file {str(path)!r}: unknown format {suffix!r}; use .yaml, .yml, .toml or .json")
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(f"config file {str(path)!r} could not be parsed: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(data).__name__}")
    return validate_config(data, **overrides)


def dump_config(config: RunConfig, fmt: str = "yaml") -> str:
    """The config as YAML, TOML or JSON text (None values are dropped from TOML, which has no null)."""
    data = config.model_dump(mode="json")
    if fmt == "json":
        return json.dumps(data, indent=2)
    if fmt == "yaml":
        import yaml

        return yaml.safe_dump(data, sort_keys=False)
    if fmt == "toml":
        return _to_toml(data)
    raise ValueError(f"unknown format {fmt!r}; valid formats: yaml, toml, json")


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items() if x is not None) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _to_toml(data: dict) -> str:
    top = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict) and v is not None]
    sections = [f"\n[{k}]\n" + "\n".join(f"{kk} = {_toml_value(vv)}" for kk, vv in v.items() if vv is not None)
                for k, v in data.items() if isinstance(v, dict)]
    return "\n".join(top) + "\n" + "\n".join(sections) + "\n"
