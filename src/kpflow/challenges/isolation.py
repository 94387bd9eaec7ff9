"""Run an untrusted program behind an operating-system isolation boundary (bubblewrap, rlimits, cgroups).

The boundary is built by the Linux kernel, not by Python, with bubblewrap (``bwrap``, Debian package
``bubblewrap``; https://github.com/containers/bubblewrap), the sandbox tool of Flatpak:

* **user namespace**: the program runs as uid/gid 65534 inside, with every capability dropped,
  ``no_new_privs`` set and further user namespaces disabled (``--disable-userns``);
* **mount namespace**: the only files are the read-only binds the caller lists (for a challenge
  submission: its code, the phase's inputs and the Python environment, i.e. ``/usr`` and the
  interpreter's prefixes), the writable *files* the caller lists (never a writable host folder), a
  size-capped tmpfs scratch folder that is also ``/tmp``, a private ``/proc`` and a minimal ``/dev``;
* **PID namespace** with the program as PID 1: ``/proc`` shows only the sandbox's own processes, and
  when PID 1 exits or is killed the kernel kills every other process of the namespace, so nothing
  (``setsid`` and double forks included) outlives the run;
* **network namespace** with no interface but a down loopback, and IPC and UTS namespaces of its own;
* **rlimits** (inherited through ``bwrap``): CPU seconds, address space, file size, open files, no core
  dumps, and processes (``RLIMIT_NPROC``, which the kernel does not apply to root);
* **cgroups** (v1 or v2, where this process may create one): ``pids`` and ``memory`` limits for the
  whole sandbox, and a cgroup-wide kill when it ends.

stdout and stderr go to pipes that the parent drains: it keeps the last ``TAIL_BYTES`` of each and
stops the run once their total passes ``Limits.log_bytes``. Nothing the program writes is trusted;
:func:`read_regular_file` reads an output file without following symbolic links and with a size cap.

Where bubblewrap is missing or user namespaces are disabled, :func:`unavailable_reason` says why, and
callers refuse to run untrusted code (:func:`run_unisolated` exists for code the user declares
trusted; it applies the same rlimits and log caps but no namespaces).
"""

from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import site
import subprocess
import sys
import time
import unicodedata
import uuid
from dataclasses import dataclass, field
from pathlib import Path

SANDBOX_UID = 65534
SCRATCH = "/app/scratch"
TAIL_BYTES = 64 * 1024
NAMESPACES = ("user", "mount", "pid", "network", "ipc", "uts")


class IsolationUnavailable(RuntimeError):
    """No isolation mechanism works on this machine; the message says why and what to do."""


@dataclass(frozen=True)
class Limits:
    """Resource caps of one sandboxed run.

    Attributes:
        wall_s: wall-clock seconds; then the whole sandbox (its PID namespace) is killed.
        cpu_s: CPU seconds per process (``RLIMIT_CPU``); ``None`` = ``wall_s`` times ``threads``.
        memory_bytes: address space per process (``RLIMIT_AS``) and, with a memory cgroup, in total.
        file_bytes: largest file the program may write (``RLIMIT_FSIZE``).
        processes: processes and threads (pids cgroup; else ``RLIMIT_NPROC`` unless running as root).
        open_files: open file descriptors per process (``RLIMIT_NOFILE``).
        log_bytes: stdout + stderr in total; past it the run is stopped.
        scratch_bytes: size of the tmpfs scratch folder (also ``/tmp``).
        threads: threads the program is asked to use (``OMP_NUM_THREADS`` and friends).
    """

    wall_s: float = 600.0
    cpu_s: float | None = None
    memory_bytes: int = 8 * 2 ** 30
    file_bytes: int = 256 * 2 ** 20
    processes: int = 256
    open_files: int = 1024
    log_bytes: int = 16 * 2 ** 20
    scratch_bytes: int = 1 * 2 ** 30
    threads: int = 2

    def __post_init__(self):
        for name in ("wall_s", "memory_bytes", "file_bytes", "processes", "open_files", "log_bytes",
                     "scratch_bytes", "threads"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Limits.{name} must be > 0, got {getattr(self, name)!r}")
        if self.cpu_s is not None and not self.cpu_s > 0:
            raise ValueError(f"Limits.cpu_s must be > 0 or None, got {self.cpu_s!r}")

    @property
    def cpu_seconds(self) -> int:
        return int(max(1, round(self.cpu_s if self.cpu_s is not None else self.wall_s * self.threads)))


@dataclass(frozen=True)
class Mount:
    """A bind of host path ``source`` at ``target`` inside the sandbox (read-only unless ``writable``;
    a writable mount must be a regular file, so the program can never create files on the host)."""

    source: Path
    target: str
    writable: bool = False


@dataclass
class Outcome:
    """What happened to a sandboxed program.

    ``returncode`` is ``None`` when the parent stopped it (``stopped`` = 'time' or 'log'); negative
    values are signals. ``stdout``/``stderr`` are the last ``TAIL_BYTES`` bytes of each (raw, untrusted).
    """

    returncode: int | None
    stopped: str | None
    stdout: bytes
    stderr: bytes
    log_bytes: int
    seconds: float
    isolation: str
    limits: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- text and files
_CONTROL = {"Cc", "Cf", "Cs", "Co", "Cn"}


def clean_text(text: str | bytes, limit: int = 2000, newlines: bool = False, keep: str = "tail") -> str:
    """``text`` without control or format characters (ANSI escapes, carriage returns, bidi overrides),
    cut to ``limit`` characters (its ``keep`` = 'tail' or 'head'). Newlines and tabs survive only with
    ``newlines``; otherwise they become spaces, so the result is one line."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = re.sub(r"\x1b\[[0-?]*[ -/]*[@-~]", "", text)  # whole ANSI CSI sequences, not just the ESC
    allowed = "\n\t" if newlines else ""
    out = "".join(c if c in allowed else " " if c in "\n\t\r" else c for c in text
                  if c in allowed or c in "\n\t\r" or unicodedata.category(c) not in _CONTROL)
    if len(out) > limit:
        out = ("…" + out[-(limit - 1):]) if keep == "tail" else (out[:limit - 1] + "…")
    return out


def read_regular_file(path: Path, max_bytes: int) -> bytes:
    """Bytes of ``path``, refusing symbolic links (``O_NOFOLLOW``), anything but a regular file, and
    files larger than ``max_bytes``.

    Raises:
        OSError: the file is missing, a symbolic link (``ELOOP``) or not a regular file.
        ValueError: it is larger than ``max_bytes``.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        import stat

        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path} is not a regular file")
        if info.st_size > max_bytes:
            raise ValueError(f"{path} has {info.st_size} bytes; the limit is {max_bytes}")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise ValueError(f"{path} has more than {max_bytes} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- bubblewrap
def bwrap_path() -> str | None:
    """The bubblewrap executable, or None."""
    return shutil.which("bwrap")


def python_mounts() -> list[Path]:
    """Host folders the interpreter needs outside ``/usr``: its prefixes, site-packages, and the folder
    holding the ``kpflow`` package (outermost folders only, resolved)."""
    import kpflow

    candidates = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                  os.path.dirname(os.path.realpath(sys.executable)), *site.getsitepackages(),
                  str(Path(kpflow.__file__).resolve().parent.parent)}
    paths = sorted({Path(os.path.realpath(p)) for p in candidates if p and os.path.isdir(p)},
                   key=lambda p: len(p.parts))
    out: list[Path] = []
    for p in paths:
        if p == Path("/usr") or Path("/usr") in p.parents:
            continue
        if not any(q == p or q in p.parents for q in out):
            out.append(p)
    return out


def kpflow_root() -> Path:
    """The folder that holds the ``kpflow`` package (put on ``PYTHONPATH`` inside the sandbox)."""
    import kpflow

    return Path(kpflow.__file__).resolve().parent.parent


def _system_args() -> list[str]:
    """``/usr`` read-only, and the merged-/usr links (or binds) of /bin, /lib, /lib64, /sbin."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = Path("/") / top
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            args += ["--ro-bind", str(path), str(path)]
    if Path("/etc/ld.so.cache").is_file():
        args += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    return args


def bwrap_command(command: list[str], mounts: list[Mount], env: dict[str, str], cwd: str, limits: Limits,
                  info_fd: int | None = None) -> list[str]:
    """The ``bwrap`` argument list that runs ``command`` in fresh user, mount, PID, network, IPC and
    UTS namespaces with only ``mounts`` (plus the Python environment) visible."""
    exe = bwrap_path()
    if exe is None:
        raise IsolationUnavailable("bubblewrap (bwrap) is not installed")
    args = [exe, "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--disable-userns", "--die-with-parent", "--new-session", "--as-pid-1",
            "--cap-drop", "ALL", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
            "--hostname", "sandbox", *_system_args()]
    env_paths = python_mounts()
    # A Python environment or source tree that lives under /tmp (a CI clone there, say) must stay visible, so /tmp
    # cannot be the symlink to the scratch folder: it becomes a size-capped tmpfs of its own, under those binds.
    tmp_held = any(Path(path).resolve().is_relative_to("/tmp") for path in env_paths)
    args += ["--proc", "/proc", "--dev", "/dev"]
    if tmp_held:
        args += ["--size", str(int(limits.scratch_bytes)), "--tmpfs", "/tmp"]
    for path in env_paths:
        args += ["--ro-bind", str(path), str(path)]
    args += ["--size", str(int(limits.scratch_bytes)), "--tmpfs", SCRATCH]
    if not tmp_held:
        args += ["--symlink", SCRATCH, "/tmp"]
    for m in mounts:
        args += ["--bind" if m.writable else "--ro-bind", str(m.source), m.target]
    args += ["--chdir", cwd, "--clearenv"]
    for key, value in env.items():
        args += ["--setenv", key, value]
    if info_fd is not None:
        args += ["--info-fd", str(info_fd)]
    return [*args, "--", *command]


def unavailable_reason() -> str | None:
    """None if bubblewrap can build the sandbox here, else why not (probed by running a tiny sandbox)."""
    if sys.platform != "linux":
        return f"Linux namespaces are needed; this is {sys.platform}"
    if bwrap_path() is None:
        return "bubblewrap (bwrap) is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    command = bwrap_command([sys.executable, "-S", "-c", ""], [], {"PATH": "/usr/bin:/bin"}, "/", Limits())
    try:
        run = subprocess.run(command, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"bubblewrap could not start: {err}"
    if run.returncode != 0:
        return ("bubblewrap failed to create the namespaces (are unprivileged user namespaces disabled, "
                f"e.g. kernel.unprivileged_userns_clone=0 or an AppArmor restriction?): "
                f"{clean_text(run.stderr, 300)}")
    return None


# ----------------------------------------------------------------------------- cgroups
class Cgroup:
    """A fresh cgroup for one run with ``pids`` and ``memory`` limits, where this process may create one
    (cgroup v2 with both controllers delegated, or the v1 ``pids`` / ``memory`` hierarchies).

    ``applied`` names the limits that are in force; ``join()`` (called in the child before ``exec``)
    moves the calling process in; ``kill()`` SIGKILLs everything inside; ``remove()`` deletes it.
    """

    def __init__(self, processes: int, memory_bytes: int):
        self.dirs: list[Path] = []
        self.applied: dict[str, str] = {}
        name = f"kpflow-sandbox-{uuid.uuid4().hex[:12]}"
        own = self._own_paths()
        root = Path("/sys/fs/cgroup")
        if (root / "cgroup.controllers").is_file():  # pure v2
            parent = root / own.get("", "/").lstrip("/")
            enabled = (parent / "cgroup.subtree_control").read_text().split() if (
                parent / "cgroup.subtree_control").is_file() else []
            if "pids" in enabled and "memory" in enabled:
                self._make(parent / name, {"pids.max": processes, "memory.max": memory_bytes},
                           {"memory.swap.max": 0})
        else:
            for controller, required, optional in (
                    ("pids", {"pids.max": processes}, {}),
                    ("memory", {"memory.limit_in_bytes": memory_bytes}, {"memory.memsw.limit_in_bytes": memory_bytes})):
                if controller in own and (root / controller).is_dir():
                    self._make(root / controller / own[controller].lstrip("/") / name, required, optional)

    @staticmethod
    def _own_paths() -> dict[str, str]:
        out = {}
        try:
            lines = Path("/proc/self/cgroup").read_text().splitlines()
        except OSError:
            return out
        for line in lines:
            _, controllers, path = line.split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                out[c] = path
        return out

    def _make(self, folder: Path, required: dict[str, int], optional: dict[str, int]) -> None:
        try:
            folder.mkdir()
        except OSError:
            return
        try:
            for key, value in required.items():
                (folder / key).write_text(str(int(value)))
        except OSError:
            try:
                folder.rmdir()
            except OSError:
                pass
            return
        for key, value in optional.items():  # e.g. swap accounting, absent on many kernels
            try:
                (folder / key).write_text(str(int(value)))
            except OSError:
                pass
        self.dirs.append(folder)
        for key, value in required.items():
            self.applied["processes" if key.startswith("pids") else "memory"] = f"cgroup {key}={int(value)}"

    def join(self) -> None:
        pid = str(os.getpid()).encode()
        for folder in self.dirs:
            fd = os.open(folder / "cgroup.procs", os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)

    def pids(self) -> set[int]:
        out: set[int] = set()
        for folder in self.dirs:
            try:
                out |= {int(p) for p in (folder / "cgroup.procs").read_text().split()}
            except OSError:
                pass
        return out

    def kill(self) -> None:
        for _ in range(50):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.02)

    def remove(self) -> None:
        self.kill()
        for folder in self.dirs:
            for _ in range(50):
                try:
                    folder.rmdir()
                    break
                except OSError:
                    time.sleep(0.02)


def _user_tasks(uid: int) -> int:
    """Processes plus threads owned by real uid ``uid`` now (what RLIMIT_NPROC counts)."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            status = Path(entry.path, "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            total += int(fields.get("Threads", "1").strip())
    return total


def _rlimits(limits: Limits, nproc: int | None, cgroup: Cgroup | None):
    def apply():
        import resource

        if cgroup is not None:
            cgroup.join()
        pairs = [(resource.RLIMIT_AS, limits.memory_bytes), (resource.RLIMIT_CPU, limits.cpu_seconds),
                 (resource.RLIMIT_FSIZE, limits.file_bytes), (resource.RLIMIT_NOFILE, limits.open_files),
                 (resource.RLIMIT_CORE, 0)]
        if nproc is not None:
            pairs.append((resource.RLIMIT_NPROC, nproc))
        for which, value in pairs:
            resource.setrlimit(which, (int(value), int(value)))
    return apply


def _process_limit(limits: Limits, cgroup: Cgroup) -> tuple[int | None, dict]:
    """RLIMIT_NPROC to set (None = leave) and the description of how processes are capped."""
    applied = dict(cgroup.applied)
    nproc = None
    if "processes" not in applied:
        if os.getuid() == 0:
            applied["processes"] = "not enforced (root ignores RLIMIT_NPROC and no pids cgroup could be made)"
        else:
            nproc = _user_tasks(os.getuid()) + limits.processes
            applied["processes"] = f"RLIMIT_NPROC={nproc} (this user's tasks now + {limits.processes})"
    applied.setdefault("memory", f"RLIMIT_AS={limits.memory_bytes} per process")
    applied.update({"address_space": f"RLIMIT_AS={limits.memory_bytes}",
                    "cpu": f"RLIMIT_CPU={limits.cpu_seconds}s", "file_size": f"RLIMIT_FSIZE={limits.file_bytes}",
                    "open_files": f"RLIMIT_NOFILE={limits.open_files}",
                    "wall": f"{limits.wall_s:g}s", "log": f"{limits.log_bytes} bytes",
                    "scratch": f"tmpfs {limits.scratch_bytes} bytes"})
    return nproc, applied


# ----------------------------------------------------------------------------- supervision
def _supervise(process: subprocess.Popen, limits: Limits, kill, extra_fd: int | None = None,
               on_extra=None, stop_on_exit: bool = False) -> tuple[str | None, bytes, bytes, int]:
    """Drain stdout/stderr (keeping tails) until both close, the time or log limit is hit, or — with
    ``stop_on_exit`` — the main process exits. Returns (stopped, stdout tail, stderr tail, log bytes)."""
    selector = selectors.DefaultSelector()
    tails = {process.stdout.fileno(): bytearray(), process.stderr.fileno(): bytearray()}
    for fd in tails:
        os.set_blocking(fd, False)
        selector.register(fd, selectors.EVENT_READ)
    if extra_fd is not None:
        selector.register(extra_fd, selectors.EVENT_READ)
    deadline = time.monotonic() + limits.wall_s
    total, stopped = 0, None
    while any(key.fd in tails for key in selector.get_map().values()):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            stopped = "time"
            break
        if stop_on_exit and process.poll() is not None:
            remaining = min(remaining, 0.05)
        events = selector.select(min(remaining, 0.25))
        if not events and stop_on_exit and process.poll() is not None:
            break
        for key, _ in events:
            try:
                chunk = os.read(key.fd, 1 << 16)
            except BlockingIOError:
                continue
            if key.fd == extra_fd:
                if chunk:
                    on_extra(chunk)
                else:
                    selector.unregister(key.fd)
                continue
            if not chunk:
                selector.unregister(key.fd)
                continue
            total += len(chunk)
            tail = tails[key.fd]
            tail += chunk
            del tail[:-TAIL_BYTES]
        if total > limits.log_bytes:
            stopped = "log"
            break
    if stopped is not None:
        kill()
    selector.close()
    return stopped, bytes(tails[process.stdout.fileno()]), bytes(tails[process.stderr.fileno()]), total


def _wait(process: subprocess.Popen, seconds: float = 30.0) -> int | None:
    try:
        return process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def _returncode(code: int | None) -> int | None:
    """bwrap reports a child killed by signal s as exit status 128 + s; make it -s as subprocess does."""
    if code is not None and 128 < code < 128 + 65:
        return -(code - 128)
    return code


def run_isolated(command: list[str], mounts: list[Mount], env: dict[str, str], cwd: str,
                 limits: Limits) -> Outcome:
    """Run ``command`` inside a bubblewrap sandbox (see the module docstring) under ``limits``.

    Args:
        command: the program and its arguments, with paths as seen inside the sandbox.
        mounts: extra binds (read-only folders/files; writable mounts must be existing regular files).
        env: the complete environment of the program (nothing else is inherited).
        cwd: working folder inside the sandbox.
        limits: resource caps.

    Returns:
        The :class:`Outcome`; the sandbox and every process in it are gone when this returns.

    Raises:
        IsolationUnavailable: bubblewrap is missing.
        ValueError: a writable mount is not a regular file.
    """
    for m in mounts:
        if m.writable and not (Path(m.source).is_file() and not Path(m.source).is_symlink()):
            raise ValueError(f"writable mount {m.source} must be an existing regular file, not a folder or link")
    start = time.monotonic()
    cgroup = Cgroup(limits.processes, limits.memory_bytes)
    nproc, applied = _process_limit(limits, cgroup)
    info_read, info_write = os.pipe()
    info = bytearray()
    child: dict[str, int] = {}

    def on_info(chunk: bytes) -> None:
        info.extend(chunk)
        found = re.search(rb'"child-pid"\s*:\s*(\d+)', info)
        if found and "pid" not in child:
            child["pid"] = int(found.group(1))
            try:
                child["pidfd"] = os.pidfd_open(child["pid"])
            except (AttributeError, OSError):
                pass

    try:
        argv = bwrap_command(command, mounts, env, cwd, limits, info_fd=info_write)
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   pass_fds=(info_write,), preexec_fn=_rlimits(limits, nproc, cgroup),
                                   env={"PATH": "/usr/bin:/bin"}, close_fds=True)
        os.close(info_write)
        info_write = -1

        def kill() -> None:
            # SIGKILL to PID 1 of the namespace makes the kernel kill every process in it.
            if "pidfd" in child:
                try:
                    signal.pidfd_send_signal(child["pidfd"], signal.SIGKILL)
                except OSError:
                    pass
            elif "pid" in child and process.poll() is None:
                try:
                    os.kill(child["pid"], signal.SIGKILL)
                except OSError:
                    pass
            cgroup.kill()
            if process.poll() is None:
                process.kill()

        stopped, out, err, total = _supervise(process, limits, kill, info_read, on_info)
        returncode = _wait(process)
    finally:
        if info_write >= 0:
            os.close(info_write)
        os.close(info_read)
        if "pidfd" in child:
            os.close(child["pidfd"])
        cgroup.remove()
    return Outcome(None if stopped else _returncode(returncode), stopped, out, err, total,
                   round(time.monotonic() - start, 3),
                   "bubblewrap: " + ", ".join(NAMESPACES) + " namespaces", applied)


def run_unisolated(command: list[str], env: dict[str, str], cwd: str, limits: Limits) -> Outcome:
    """Run ``command`` as a plain child process (new session, the same rlimits and log caps, killed as
    a process group) — for code the user declared trusted on a machine without isolation. A child
    that leaves the session (``setsid``) escapes the group kill; files are not hidden."""
    start = time.monotonic()
    cgroup = Cgroup(limits.processes, limits.memory_bytes)
    nproc, applied = _process_limit(limits, cgroup)
    try:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   cwd=cwd, env=env, preexec_fn=_rlimits(limits, nproc, cgroup),
                                   start_new_session=True, close_fds=True)

        def kill() -> None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except OSError:
                pass
            cgroup.kill()

        stopped, out, err, total = _supervise(process, limits, kill, stop_on_exit=True)
        returncode = _wait(process)
        kill()  # leftovers of the group
    finally:
        cgroup.remove()
    return Outcome(None if stopped else returncode, stopped, out, err, total, round(time.monotonic() - start, 3),
                   "none (trusted by the user; no namespaces)", applied)
