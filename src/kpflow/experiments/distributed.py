"""Scale-out on Dask: many independent runs (sweeps, claim studies) as tasks on a cluster.

All of kpflow's Dask glue lives here. The engine is Dask distributed (``distributed.Client``), not a pool of
our own; where the work runs is chosen by one string:

* ``local``: a ``LocalCluster`` of single-threaded worker *processes* on this machine (``workers`` of them,
  default one per available core); the default when more than one core is available and there is more than
  one run to do;
* ``tcp://host:port``: an existing cluster (``dask scheduler`` + ``dask worker tcp://host:port``);
* ``slurm``: a ``dask_jobqueue.SLURMCluster`` from the ``slurm`` section of a cluster config file (queue,
  cores, memory, walltime, ...; see ``SlurmSettings`` and docs/scale_out.md), scaled to ``workers``;
* ``serial``: no Dask at all, every run in this process, one after another.

Runs are ``RunTask``s. Each writes only into its own run folder and, once finished, an atomic marker
``done.json`` holding the task's fingerprint (a hash of its configuration); ``run_tasks`` skips a task whose
marker matches, so a sweep killed half-way resumes where it stopped (and a run interrupted inside resumes
from its last checkpoint, which the pipeline already does). A worker process that dies (killed, out of
memory) is restarted by its nanny and the scheduler re-runs its task on a live worker, up to
``ALLOWED_FAILURES`` times (Dask's ``distributed.scheduler.allowed-failures``). A run that *raises* is not
retried (the same code would raise again): the other runs finish, then ``RunFailures`` names every failed run.

Where GPUs are visible and the runs ask for ``device="cuda"``, the local cluster gives each worker its own
device (``CUDA_VISIBLE_DEVICES`` per worker process, round robin), so ``cuda`` on a worker means that
worker's GPU. See docs/scale_out.md for the pattern on clusters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kpflow.files import atomic_write_text

#: Scheduler kinds accepted besides ``tcp://host:port``.
SCHEDULERS = ("local", "slurm", "serial")
#: Name of the marker a finished task leaves in its run folder.
DONE_FILE = "done.json"
#: Times a task may lose its worker (the process dies under it) before the task is declared failed.
ALLOWED_FAILURES = 3
#: Seconds to wait for a ``tcp://`` scheduler (and for ``--workers`` workers to join it).
CONNECT_TIMEOUT = 10.0

_ADDRESS = re.compile(r"(tcp|tls)://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):(?P<port>\d{1,5})")


class SchedulerError(ValueError):
    """A scheduler that cannot be used: an unknown kind, a malformed address, one that does not answer, or a
    missing/invalid SLURM configuration. The message names the problem and what would be valid."""


class RunFailures(RuntimeError):
    """Some runs raised (or lost their worker too often). The others finished and are marked done, so running
    the same command again re-runs only the failed ones. ``failures`` maps each run's key to its error text."""

    def __init__(self, failures: dict[str, str], done: int, what: str = "run"):
        self.failures = dict(failures)
        lines = "\n".join(f"  {k}: {v}" for k, v in self.failures.items())
        super().__init__(f"{len(self.failures)} {what}(s) failed ({done} finished and are kept; re-running the same "
                         f"command retries only the failed ones):\n{lines}")


# --------------------------------------------------------------------------------------------------- schedulers
def available_cores() -> int:
    """Cores this process may run on (the CPU affinity mask where the OS has one, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_scheduler(scheduler: str) -> str:
    """``local``, ``slurm``, ``serial`` or a ``tcp://host:port`` / ``tls://host:port`` address, else
    ``SchedulerError`` saying what is valid."""
    s = str(scheduler).strip()
    if s in SCHEDULERS:
        return s
    m = _ADDRESS.fullmatch(s)
    if m and 0 < int(m["port"]) < 65536:
        return s
    hint = ""
    if re.fullmatch(r"[A-Za-z0-9_.\-]+:\d+", s):
        hint = f" (did you mean tcp://{s}?)"
    raise SchedulerError(f"--scheduler {s!r} is not valid{hint}; valid: local (worker processes on this machine), "
                         "tcp://host:port (an existing Dask scheduler), slurm (dask-jobqueue, from the slurm "
                         "section of --cluster-config) or serial (no Dask, one run after another)")


def default_scheduler(n_tasks: int = 2) -> str:
    """``local`` when more than one core is available and there is more than one task, else ``serial``."""
    return "local" if available_cores() > 1 and n_tasks > 1 else "serial"


def check_workers(workers) -> int | None:
    if workers is None:
        return None
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise SchedulerError(f"--workers must be a positive integer (worker processes), got {workers!r}")
    return workers


class SlurmSettings(BaseModel):
    """The ``slurm`` section of a cluster config: what each SLURM job (one ``dask worker`` batch job) asks for.

    ``cores``/``memory``/``walltime`` are per job; a job runs ``processes`` worker processes (default: one per
    core, each single-threaded, since one kpflow run is one task); ``workers`` (``--workers``) is the total
    number of worker processes, so ``ceil(workers / processes)`` jobs are submitted.
    """

    model_config = ConfigDict(extra="forbid")

    queue: str = Field(..., min_length=1, description="partition (sbatch -p)")
    cores: int = Field(..., ge=1, description="CPU cores per job")
    memory: str = Field(..., description="memory per job, e.g. '16GB'")
    walltime: str = Field(..., description="time limit per job, [D-]HH:MM:SS")
    processes: int | None = Field(None, ge=1, description="worker processes per job (default: cores)")
    account: str | None = Field(None, description="sbatch -A")
    job_extra_directives: list[str] = Field(default_factory=list,
                                            description="extra #SBATCH lines, e.g. ['--gres=gpu:1']")
    job_script_prologue: list[str] = Field(default_factory=list,
                                           description="shell lines before the worker starts, e.g. "
                                                       "['module load cuda', 'source ~/venv/bin/activate']")
    python: str | None = Field(None, description="python executable on the compute nodes (default: this one)")
    local_directory: str | None = Field(None, description="worker scratch folder on the compute nodes")
    log_directory: str | None = Field(None, description="folder for the jobs' stdout/stderr")

    @field_validator("memory")
    @classmethod
    def _memory(cls, v):
        if not re.fullmatch(r"\d+(\.\d+)?\s*([KMGT]i?B|[KMGT])", v.strip(), flags=re.IGNORECASE):
            raise ValueError("must be an amount with a unit, e.g. '16GB' or '512MB'")
        return v.strip()

    @field_validator("walltime")
    @classmethod
    def _walltime(cls, v):
        if not re.fullmatch(r"(\d+-)?\d{1,3}:\d{2}(:\d{2})?", v.strip()):
            raise ValueError("must be [D-]HH:MM[:SS], e.g. '02:00:00' or '1-00:00:00'")
        return v.strip()

    @field_validator("processes")
    @classmethod
    def _processes(cls, v, info):
        cores = info.data.get("cores")
        if v is not None and cores is not None and v > cores:
            raise ValueError(f"must not exceed cores ({cores}): each worker process needs at least one core")
        return v


def load_slurm_settings(path: str | Path | None) -> SlurmSettings:
    """The ``slurm`` section of a YAML/TOML/JSON cluster config file, validated (``SchedulerError`` otherwise)."""
    example = ("slurm:\n  queue: normal\n  cores: 8\n  memory: 16GB\n  walltime: '02:00:00'")
    if path is None:
        raise SchedulerError("--scheduler slurm needs --cluster-config FILE with a 'slurm' section, e.g.\n" + example)
    p = Path(path)
    if not p.is_file():
        raise SchedulerError(f"cluster config {p} does not exist; it needs a 'slurm' section, e.g.\n" + example)
    text = p.read_text()
    try:
        if p.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        elif p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as err:  # noqa: BLE001 - any parser error is reported the same way
        raise SchedulerError(f"cluster config {p} could not be read: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("slurm"), dict):
        raise SchedulerError(f"cluster config {p} has no 'slurm' section; expected e.g.\n" + example)
    try:
        return SlurmSettings.model_validate(data["slurm"])
    except ValidationError as err:
        lines = [f"slurm.{'.'.join(str(x) for x in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
                 + ("" if e["type"] == "missing" else f" (got {e['input']!r})") for e in err.errors()]
        raise SchedulerError(f"invalid cluster config {p}:\n  " + "\n  ".join(lines)) from None


def slurm_cluster(settings: SlurmSettings, **cluster_options):
    """A ``dask_jobqueue.SLURMCluster`` (no jobs submitted until ``scale``) for these settings."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise SchedulerError("--scheduler slurm needs dask-jobqueue: pip install 'kpflow[slurm]'") from None
    kw: dict[str, Any] = dict(queue=settings.queue, cores=settings.cores, memory=settings.memory,
                              walltime=settings.walltime, processes=settings.processes or settings.cores,
                              account=settings.account, job_extra_directives=list(settings.job_extra_directives),
                              job_script_prologue=list(settings.job_script_prologue),
                              scheduler_options={"dashboard_address": ":0"}, job_name="kpflow-worker")
    for key in ("python", "local_directory", "log_directory"):
        if getattr(settings, key) is not None:
            kw[key] = getattr(settings, key)
    kw.update(cluster_options)
    return SLURMCluster(**kw)


def slurm_job_script(settings: SlurmSettings) -> str:
    """The sbatch script one worker job would run (built without submitting anything)."""
    cluster = slurm_cluster(settings)
    try:
        return cluster.job_script()
    finally:
        cluster.close()


def gpu_worker_env(n_workers: int, n_gpus: int) -> list[dict[str, str]]:
    """Per-worker environments giving worker i the GPU ``i mod n_gpus`` as its only visible device."""
    return [{"CUDA_VISIBLE_DEVICES": str(i % n_gpus)} for i in range(n_workers)] if n_gpus > 0 else [
        {} for _ in range(n_workers)]


def local_cluster(n_workers: int, *, gpus: int = 0):
    """A ``LocalCluster``-like cluster of ``n_workers`` single-threaded worker processes, each behind a nanny
    (which restarts it if it dies). With ``gpus > 0`` worker i sees only GPU ``i mod gpus``."""
    import dask
    from distributed import LocalCluster, Nanny, Scheduler, SpecCluster

    opts = dict(silence_logs=logging.ERROR)
    with dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES}):
        if gpus <= 0:
            return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                                **opts)
        workers = {f"gpu-worker-{i}": {"cls": Nanny, "options": {"nthreads": 1, "env": env,
                                                                   "silence_logs": logging.ERROR}}
                   for i, env in enumerate(gpu_worker_env(n_workers, gpus))}
        return SpecCluster(workers=workers, scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0"}},
                           **opts)


@contextmanager
def open_client(scheduler: str | None = None, workers: int | None = None, *, cluster_config: str | Path | None = None,
                gpus: int = 0, timeout: float = CONNECT_TIMEOUT) -> Iterator[Any]:
    """A ``distributed.Client`` for ``scheduler`` (closed, with any cluster it started, on exit), or ``None`` for
    ``serial``.

    Args:
        scheduler: ``local``, ``tcp://host:port``, ``slurm``, ``serial``, or ``None`` for ``default_scheduler()``.
        workers: worker processes: the size of a local cluster (default: the available cores), the number of
            SLURM worker processes (default: one job's ``processes``), or for ``tcp://`` the number of workers
            to wait for (default: none).
        cluster_config: file with the ``slurm`` section (``--scheduler slurm`` only).
        gpus: for ``local``: give each worker one of this many GPUs (``gpu_worker_env``); 0 for none.
        timeout: seconds to wait for a ``tcp://`` scheduler and for its workers.

    Raises:
        SchedulerError: unknown scheduler, malformed or unreachable address, bad ``workers`` or SLURM config.
    """
    kind = check_scheduler(scheduler if scheduler is not None else default_scheduler())
    n = check_workers(workers)
    if kind == "serial":
        yield None
        return
    from distributed import Client

    cluster = None
    if kind == "local":
        cluster = local_cluster(n or available_cores(), gpus=gpus)
        client = Client(cluster)
    elif kind == "slurm":
        settings = load_slurm_settings(cluster_config)
        cluster = slurm_cluster(settings)
        cluster.scale(n=n or settings.processes or settings.cores)
        client = Client(cluster)
    else:
        try:
            client = Client(kind, timeout=f"{timeout}s")
        except (OSError, TimeoutError) as err:
            raise SchedulerError(f"no Dask scheduler answered at {kind} within {timeout:g} s ({err}). Start one "
                                 "there (`dask scheduler`, then `dask worker <address>` on each machine), check "
                                 "host and port, or use --scheduler local") from None
        if n:
            try:
                client.wait_for_workers(n, timeout=timeout)
            except TimeoutError:
                have = len(client.scheduler_info().get("workers", {}))
                client.close()
                raise SchedulerError(f"the scheduler at {kind} has {have} worker(s); --workers {n} were not there "
                                     f"within {timeout:g} s (start more workers, or drop --workers)") from None
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


# -------------------------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class RunTask:
    """One run: ``fn(*args)`` (a module-level function, so workers can import it) writes into ``run_dir``.

    ``fingerprint`` identifies what the run computes (e.g. ``config_fingerprint(cfg)``): a finished task whose
    ``done.json`` carries the same fingerprint is skipped. ``key`` names the run in progress and errors."""

    key: str
    run_dir: Path
    fingerprint: str
    fn: Callable[..., Any]
    args: tuple = ()


@dataclass
class TaskReport:
    """What ``run_tasks`` did: keys of the tasks it ran and of those it skipped as already finished, and the
    ``done.json`` record of every task that ran (``record['result']`` is what ``fn`` returned)."""

    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    records: dict[str, dict] = field(default_factory=dict)
    scheduler: str = "serial"


def config_fingerprint(data: Any, *extra: Any) -> str:
    """SHA-256 (hex, 16 digits) of a JSON-able description (a ``RunConfig`` is dumped first) and extras."""
    if hasattr(data, "model_dump"):
        data = data.model_dump(mode="json")
    payload = json.dumps([data, *extra], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def is_finished(task: RunTask) -> bool:
    """True when ``task.run_dir/done.json`` exists and carries ``task.fingerprint``."""
    try:
        record = json.loads((Path(task.run_dir) / DONE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("fingerprint") == task.fingerprint


def execute_task(task: RunTask) -> dict:
    """Run one task here (on a worker, or in this process for ``serial``), then write its ``done.json``
    atomically. Returns that record."""
    start = time.time()
    t0 = time.perf_counter()
    result = task.fn(*task.args)
    record = {"key": task.key, "fingerprint": task.fingerprint, "seconds": time.perf_counter() - t0,
              "started": start, "finished": time.time(), "host": socket.gethostname(), "pid": os.getpid(),
              "result": json.loads(json.dumps(result, default=str))}
    Path(task.run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(task.run_dir) / DONE_FILE, json.dumps(record, indent=1))
    return record


def _call(fn: Callable[..., Any], args: tuple, threads: int):
    """``fn(*args)`` with ``threads`` torch threads in this process (0: leave torch's setting)."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    return fn(*args)


def _error_text(err: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(err), err)).strip()


def _running(client, pending_keys: set, threads_total: int) -> int:
    """Tasks of ours the workers are processing now (capped by their threads: a worker may hold a queued one)."""
    try:
        processing = client.processing()
    except Exception:  # noqa: BLE001 - progress display only
        return 0
    busy = sum(1 for keys in processing.values() for k in keys if k in pending_keys)
    return min(busy, threads_total)


def map_tasks(fn: Callable[..., Any], calls: Sequence[tuple], keys: Sequence[str], *, client=None,
              scheduler: str | None = None, workers: int | None = None, cluster_config: str | Path | None = None,
              gpus: int = 0, threads: int = 1, progress: bool = True, desc: str = "tasks", unit: str = "task",
              done_before: int = 0) -> tuple[dict[str, Any], dict[str, str], BaseException | None]:
    """``fn(*calls[i])`` for every i, each one Dask task, on the scheduler asked for; waits for all of them.

    ``fn`` must be importable by the workers (a module-level function). The progress bar counts finished tasks
    (``done_before`` of them done earlier) and shows how many are running. A task that raises does not stop the
    others; its error text is returned. A task whose worker process dies is re-run on a live worker (up to
    ``ALLOWED_FAILURES`` times on clusters this module starts).

    Args:
        fn: the function to map.
        calls: the argument tuples, one per task.
        keys: unique names of the tasks (progress, errors, Dask task keys).
        client: an existing ``distributed.Client`` (then ``scheduler``/``workers``/``cluster_config`` are unused).
        scheduler, workers, cluster_config, gpus: as for ``open_client``; ``scheduler=None`` means
            ``default_scheduler(len(calls))``; a local cluster never gets more workers than there are tasks.
        threads: torch threads inside each task (0: torch's default).
        progress, desc, unit: the progress bar, its label and unit.
        done_before: tasks counted as finished already (shown in the bar).

    Returns:
        ``(results, failures, first_error)``: ``results[key]`` what ``fn`` returned, ``failures[key]`` the error
        text of each task that raised or lost its worker too often, ``first_error`` the first such exception.

    Raises:
        ValueError: duplicate keys or ``len(keys) != len(calls)``. SchedulerError: as ``open_client``.
    """
    from tqdm.auto import tqdm

    keys = [str(k) for k in keys]
    if len(keys) != len(calls):
        raise ValueError(f"one key per call: {len(keys)} keys for {len(calls)} calls")
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"task keys must be unique; repeated: {', '.join(dupes)}")
    results: dict[str, Any] = {}
    failures: dict[str, str] = {}
    first_error: list[BaseException] = []
    if not calls:
        return results, failures, None
    bar = tqdm(total=done_before + len(calls), initial=done_before, desc=desc, unit=unit, disable=not progress,
               dynamic_ncols=True)

    def finish(key: str, get):
        try:
            results[key] = get()
        except Exception as err:  # noqa: BLE001 - collected and returned together
            failures[key] = _error_text(err)
            first_error.append(err)
        bar.update(1)

    try:
        if client is not None:
            _map_on(client, fn, calls, keys, threads, bar, finish)
        else:
            kind = check_scheduler(scheduler) if scheduler is not None else default_scheduler(len(calls))
            n = check_workers(workers)
            if kind == "local":
                n = min(n or available_cores(), len(calls))
            with open_client(kind, n, cluster_config=cluster_config, gpus=gpus) as c:
                if progress:
                    where = "this process" if c is None else f"{kind} ({len(c.nthreads())} worker(s))"
                    bar.write(f"{desc}: {len(calls)} {unit}(s) to do on {where}")
                if c is None:
                    for key, args in zip(keys, calls, strict=True):
                        bar.set_postfix_str(f"running: {key}")
                        finish(key, lambda args=args: _call(fn, args, threads))
                else:
                    _map_on(c, fn, calls, keys, threads, bar, finish)
    finally:
        bar.close()
    return results, failures, (first_error[0] if first_error else None)


def _map_on(client, fn, calls, keys, threads: int, bar, finish, poll: float = 0.25) -> None:
    tag = uuid.uuid4().hex[:8]
    futures = {client.submit(_call, fn, args, threads, key=f"kpflow-{key}-{tag}", pure=False): key
               for key, args in zip(keys, calls, strict=True)}
    threads_total = max(1, sum(client.nthreads().values()))
    pending = list(futures)
    shown = ""
    while pending:
        done = [f for f in pending if f.done()]
        for f in done:
            finish(futures[f], f.result)
        pending = [f for f in pending if f not in done]
        status = f"running: {_running(client, {f.key for f in pending}, threads_total) if pending else 0}"
        if status != shown:
            bar.set_postfix_str(status)
            shown = status
        if pending and not done:
            time.sleep(poll)


def run_tasks(tasks: Sequence[RunTask], *, client=None, scheduler: str | None = None, workers: int | None = None,
              cluster_config: str | Path | None = None, gpus: int = 0, threads: int = 1, fresh: bool = False,
              progress: bool = True, desc: str = "runs") -> TaskReport:
    """Run every task not finished yet (``map_tasks`` of ``execute_task``) and wait for all of them.

    A task counts as finished when its ``done.json`` carries its fingerprint; those are skipped, so a killed
    sweep resumes where it stopped. ``fresh=True`` removes the markers and runs everything. Tasks that raise do
    not stop the others; at the end ``RunFailures`` lists them (the finished ones keep their markers).

    Args:
        tasks: the runs (unique keys).
        client, scheduler, workers, cluster_config, gpus, threads: as for ``map_tasks``.
        fresh: re-run finished tasks too.
        progress, desc: the progress bar and its label.

    Returns:
        ``TaskReport`` with the keys run and skipped and the ``done.json`` records of the runs.

    Raises:
        ValueError: duplicate keys. SchedulerError: as ``open_client``. RunFailures: some runs failed.
    """
    keys = [t.key for t in tasks]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"run keys must be unique; repeated: {', '.join(dupes)}")
    if fresh:
        for t in tasks:
            (Path(t.run_dir) / DONE_FILE).unlink(missing_ok=True)
    todo = [t for t in tasks if not is_finished(t)]
    report = TaskReport(skipped=[t.key for t in tasks if t not in todo])
    if todo:
        report.scheduler = ("client" if client is not None else
                            check_scheduler(scheduler) if scheduler is not None else default_scheduler(len(todo)))
    records, failures, first_error = map_tasks(
        execute_task, [(t,) for t in todo], [t.key for t in todo], client=client, scheduler=report.scheduler
        if client is None and todo else None, workers=workers, cluster_config=cluster_config, gpus=gpus,
        threads=threads, progress=progress, unit="run", done_before=len(report.skipped),
        desc=f"{desc} ({len(report.skipped)} finished before)" if report.skipped else desc)
    report.ran = [t.key for t in todo if t.key in records]
    report.records = {k: records[k] for k in report.ran}
    if failures:
        raise RunFailures(failures, len(report.ran) + len(report.skipped)) from first_error
    return report


def analyze_checkpoints(run_dir: str | Path, *, every: int | None = None, force: bool = False, client=None,
                        scheduler: str | None = None, workers: int | None = None,
                        cluster_config: str | Path | None = None, threads: int = 1, progress: bool = True) -> Path:
    """``tracking.analyze_run`` fanned out: every selected checkpoint of the run measured as one task.

    The first checkpoint is measured first (here, serially: the others are compared with its NTK); the
    others are then mapped over the workers (``map_tasks`` of ``tracking.analyze.measure_step``), each caching
    its rows; finally ``analyze_run`` assembles ``metrics.csv`` from the caches (nothing left to measure).
    The rows equal those of a serial ``analyze_run`` of the same checkpoints.

    Returns:
        The path of ``metrics.csv``.

    Raises:
        SchedulerError: as ``open_client``. RunFailures: some checkpoints failed (the others stay cached).
    """
    from kpflow.tracking.analyze import analyze_run, measure_step, selected_steps

    steps = selected_steps(run_dir, every)
    _, failures, err = map_tasks(measure_step, [(str(run_dir), steps[0], every, force)], [f"step{steps[0]}"],
                                     scheduler="serial", threads=threads, progress=False)
    if not failures:
        _, failures, err = map_tasks(measure_step, [(str(run_dir), s, every, force) for s in steps[1:]],
                                     [f"step{s}" for s in steps[1:]], client=client, scheduler=scheduler,
                                     workers=workers, cluster_config=cluster_config, threads=threads,
                                     progress=progress, desc="analyze", unit="ckpt", done_before=1)
    if failures:
        raise RunFailures(failures, len(steps) - len(failures), what="checkpoint") from err
    return analyze_run(run_dir, every=every, progress=False)


__all__ = ["ALLOWED_FAILURES", "DONE_FILE", "SCHEDULERS", "RunFailures", "RunTask", "SchedulerError",
           "SlurmSettings", "TaskReport", "analyze_checkpoints", "available_cores", "check_scheduler",
           "config_fingerprint", "default_scheduler", "execute_task", "gpu_worker_env", "is_finished",
           "load_slurm_settings", "local_cluster", "map_tasks", "open_client", "run_tasks", "slurm_cluster",
           "slurm_job_script"]
