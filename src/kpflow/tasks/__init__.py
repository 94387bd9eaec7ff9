"""Tasks generated from a seed, batched, with masks where a task needs them.

``make_task(name, **params)`` builds a registered task; ``register_task(name, cls)`` adds your own.
A task draws ``TaskBatch(inputs [B,T,I], targets, mask [B,T] | None, task_ids [B] | None)`` with
``task.sample(batch_size, seed)``; ``task_loss`` is the matching masked loss.
"""

from __future__ import annotations

import inspect

from .base import LOSSES, Task, TaskBatch, angle_error, task_loss
from .flipflop import FlipFlop
from .integration import ContextIntegration
from .memory import AngleMemory, DelayAnti, DelayPro, MemoryAnti, MemoryPro, MultiTask
from .student_teacher import StudentTeacher

TASKS: dict[str, type[Task]] = {}


def register_task(name: str, cls: type[Task]) -> None:
    """Make ``cls`` available as ``make_task(name, ...)`` and in configs (``task.name``)."""
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TypeError(f"register_task({name!r}, ...) needs a subclass of kpflow.tasks.Task, got {cls!r}")
    TASKS[str(name)] = cls


for _cls in (FlipFlop, MemoryPro, MemoryAnti, DelayPro, DelayAnti, MultiTask, ContextIntegration, StudentTeacher):
    register_task(_cls.name, _cls)


def _neurogym_task(**params):
    from .neurogym import NeuroGymTask

    return NeuroGymTask(**params)


def task_names() -> list[str]:
    return sorted([*TASKS, "neurogym"])


def task_parameters(name: str) -> dict[str, object]:
    """The constructor parameters of task ``name`` with their defaults."""
    cls = _lookup(name)
    sig = inspect.signature(cls.__init__)
    return {k: (None if p.default is inspect.Parameter.empty else p.default)
            for k, p in sig.parameters.items() if k != "self" and p.kind is not p.VAR_KEYWORD}


def _lookup(name: str) -> type[Task]:
    if name == "neurogym":
        from .neurogym import NeuroGymTask

        return NeuroGymTask
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(task_names())}")
    return TASKS[name]


def make_task(name: str, **params) -> Task:
    """Build the registered task ``name`` with constructor ``params``; unknown names and parameters
    raise a ValueError that lists the valid ones."""
    cls = _lookup(name)
    sig = inspect.signature(cls.__init__)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    allowed = [k for k in sig.parameters if k != "self" and sig.parameters[k].kind is not inspect.Parameter.VAR_KEYWORD]
    unknown = [k for k in params if k not in allowed]
    if unknown and not takes_any:
        raise ValueError(f"task {name!r} has no parameter(s) {', '.join(map(repr, unknown))}; "
                         f"valid parameters: {', '.join(allowed)}")
    return cls(**params)


__all__ = ["LOSSES", "TASKS", "AngleMemory", "ContextIntegration", "DelayAnti", "DelayPro", "FlipFlop",
           "MemoryAnti", "MemoryPro", "MultiTask", "StudentTeacher", "Task", "TaskBatch", "angle_error",
           "make_task", "register_task", "task_loss", "task_names", "task_parameters"]
