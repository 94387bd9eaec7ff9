"""Checkpoints: model and optimizer tensors in safetensors plus a JSON sidecar, written atomically.

A checkpoint ``step_000100`` is two files in the checkpoint folder: ``step_000100.safetensors`` (model
tensors under ``model.*``, optimizer state tensors under ``optim.<param index>.<key>``) and
``step_000100.json`` (step, loss, seed, config, optimizer hyper-parameters, the SHA-256 of the tensor
file and ``record_sha256``, the SHA-256 of the sidecar's own content in canonical JSON without that key).
The tensor file is written first and the sidecar last, each to a temporary file renamed into place, so
a checkpoint is *complete* exactly when its sidecar exists and both hashes match. Anything else —
missing file, bad JSON, an edited sidecar, hash mismatch, unreadable safetensors — is reported by file
name and never loaded. A write that fails (full disk, permissions) raises ``CheckpointWriteError`` and
leaves no part of that checkpoint behind. Files get the usual mode (0o666 less the umask). Nothing here
unpickles.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kpflow.files import atomic_write_bytes, atomic_write_text, file_mode, sha256_file, temporary_beside  # noqa: F401

FORMAT = "kpflow-checkpoint-2"
#: readable too: version 1 sidecars carry no ``record_sha256`` (written before the sidecar was checksummed)
LEGACY_FORMATS = ("kpflow-checkpoint-1",)
_NAME = re.compile(r"step_(\d{6,})\.json$")


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file is incomplete or damaged; the message names the file."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. no space left on device); nothing of it was left behind."""


class CorruptCheckpointWarning(UserWarning):
    """A damaged checkpoint was skipped (named in the message)."""


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    tensors: Path
    sidecar: Path
    meta: dict


def checkpoint_stem(step: int) -> str:
    return f"step_{int(step):06d}"


def _split_optimizer_state(optimizer: torch.optim.Optimizer | None):
    if optimizer is None:
        return {}, None
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, val in state.items():
            if isinstance(val, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = val.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = val
    meta = {"param_groups": sd["param_groups"], "scalar_state": scalars, "class": type(optimizer).__name__}
    try:
        json.dumps(meta)
    except TypeError as err:
        raise TypeError(f"optimizer {type(optimizer).__name__} has state that is not tensors or JSON values: {err}") \
            from None
    return tensors, meta


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of the tensors that share memory with an earlier one (safetensors refuses shared storage, e.g.
    an optimizer state that keeps the same basis under two names, or tied weights)."""
    seen, out = set(), {}
    for key, t in tensors.items():
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        out[key] = t.clone() if ptr is not None and ptr in seen else t
        seen.add(ptr)
    return out


def record_digest(record: dict) -> str:
    """SHA-256 of a sidecar record in canonical JSON (sorted keys, no spaces), ``record_sha256`` excluded."""
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _write_error(path: Path, err: BaseException) -> CheckpointWriteError:
    text = str(err)
    full = getattr(err, "errno", None) == errno.ENOSPC or "No space left" in text or "code: 28" in text
    if full:
        return CheckpointWriteError(errno.ENOSPC, f"no space left on device while writing checkpoint {path}; "
                                    "free some space or choose another --out, then run the same command to "
                                    "resume from the last complete checkpoint")
    code = getattr(err, "errno", None) or errno.EIO
    return CheckpointWriteError(code, f"could not write checkpoint {path}: {text}")


def save_checkpoint(folder: str | Path, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, **meta) -> CheckpointInfo:
    """Write checkpoint ``step`` of ``model`` (and ``optimizer``) with extra JSON ``meta`` (loss, seed, config)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _write_error(folder, err) from err
    stem = checkpoint_stem(step)
    tensors = {f"model.{k}": v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _split_optimizer_state(optimizer)
    tensors.update(opt_tensors)
    tensors = _unshared(tensors)
    tensor_path, sidecar_path = folder / f"{stem}.safetensors", folder / f"{stem}.json"
    tmp = None
    try:
        tmp = temporary_beside(tensor_path)
        save_file(tensors, tmp, metadata={"format": FORMAT, "step": str(int(step))})
        os.chmod(tmp, file_mode())  # the safetensors writer re-creates the file with mode 0o600
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        digest = sha256_file(Path(tmp))
        os.replace(tmp, tensor_path)
    except Exception as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise _write_error(tensor_path, err) from err
    except BaseException:  # interrupted: no partial file under any name
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    record = {"format": FORMAT, "step": int(step), "tensors": tensor_path.name, "sha256": digest,
              "optimizer": opt_meta, **meta}
    record = json.loads(json.dumps(record, default=str))  # exactly what the sidecar will hold
    record["record_sha256"] = record_digest(record)
    try:
        atomic_write_text(sidecar_path, json.dumps(record, indent=1))
    except BaseException as err:  # without its sidecar the tensor file is not a checkpoint: remove it
        tensor_path.unlink(missing_ok=True)
        if isinstance(err, Exception):
            raise _write_error(sidecar_path, err) from err
        raise
    return CheckpointInfo(int(step), tensor_path, sidecar_path, record)


def verify_checkpoint(sidecar: str | Path) -> CheckpointInfo:
    """Check a checkpoint's sidecar and tensor file; raises ``CorruptCheckpointError`` naming the bad file."""
    sidecar = Path(sidecar)
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError) as err:
        raise CorruptCheckpointError(f"checkpoint sidecar {sidecar} is unreadable or not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") not in (FORMAT, *LEGACY_FORMATS) or "sha256" not in meta:
        raise CorruptCheckpointError(f"checkpoint sidecar {sidecar} is not a {FORMAT} record")
    if meta["format"] == FORMAT and meta.get("record_sha256") != record_digest(meta):
        raise CorruptCheckpointError(f"checkpoint sidecar {sidecar} was modified after it was written (its content "
                                     "does not match its record_sha256)")
    tensors = sidecar.with_name(str(meta.get("tensors", "")))
    if not tensors.is_file():
        raise CorruptCheckpointError(f"checkpoint tensor file {tensors} is missing")
    if sha256_file(tensors) != meta["sha256"]:
        raise CorruptCheckpointError(f"checkpoint tensor file {tensors} is corrupted (SHA-256 does not match "
                                     f"its sidecar {sidecar.name})")
    return CheckpointInfo(int(meta["step"]), tensors, sidecar, meta)


def list_checkpoints(folder: str | Path, *, on_corrupt: str = "warn") -> list[CheckpointInfo]:
    """Complete checkpoints in ``folder`` sorted by step. Damaged ones are skipped with a
    ``CorruptCheckpointWarning`` naming the file (``on_corrupt="warn"``), or raise (``"raise"``)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for sidecar in sorted(folder.iterdir()):
        if not _NAME.fullmatch(sidecar.name):
            continue
        try:
            found.append(verify_checkpoint(sidecar))
        except CorruptCheckpointError as err:
            if on_corrupt == "raise":
                raise
            warnings.warn(f"skipping damaged checkpoint: {err}", CorruptCheckpointWarning, stacklevel=2)
    for orphan in folder.glob("step_*.safetensors"):
        if not orphan.with_suffix(".json").exists():
            warnings.warn(f"skipping incomplete checkpoint {orphan} (no sidecar: interrupted while writing)",
                          CorruptCheckpointWarning, stacklevel=2)
    return sorted(found, key=lambda c: c.step)


def load_checkpoint(checkpoint: CheckpointInfo | str | Path, model: torch.nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None) -> CheckpointInfo:
    """Verify, then load a checkpoint into ``model`` (and ``optimizer``). A damaged checkpoint raises
    ``CorruptCheckpointError`` and nothing is loaded. ``checkpoint`` may be the sidecar or tensor path."""
    if not isinstance(checkpoint, CheckpointInfo):
        path = Path(checkpoint)
        checkpoint = verify_checkpoint(path.with_suffix(".json") if path.suffix == ".safetensors" else path)
    else:
        checkpoint = verify_checkpoint(checkpoint.sidecar)
    try:
        tensors = load_file(str(checkpoint.tensors))
    except Exception as err:
        raise CorruptCheckpointError(f"checkpoint tensor file {checkpoint.tensors} cannot be read: {err}") from None
    if model is not None:
        state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        ref = model.state_dict()
        missing, extra = sorted(set(ref) - set(state)), sorted(set(state) - set(ref))
        if missing or extra:
            raise ValueError(f"checkpoint {checkpoint.tensors} does not fit the model: missing {missing}, "
                             f"unexpected {extra}")
        model.load_state_dict({k: v.to(device=ref[k].device, dtype=ref[k].dtype) for k, v in state.items()})
    if optimizer is not None:
        opt_meta = checkpoint.meta.get("optimizer")
        if opt_meta is None:
            raise ValueError(f"checkpoint {checkpoint.sidecar} holds no optimizer state")
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, idx, key = k.split(".", 2)
                state.setdefault(int(idx), {})[key] = v
        for idx, extra in opt_meta.get("scalar_state", {}).items():
            state.setdefault(int(idx), {}).update(extra)
        optimizer.load_state_dict({"state": state, "param_groups": opt_meta["param_groups"]})
    return checkpoint
