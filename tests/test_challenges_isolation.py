"""Hostile submissions against the isolation boundary: each attack is contained and the leaderboard unchanged.

Every hostile submission tries one attack inside ``predict``. If the attack yields the hidden labels
it scores with them (a perfect TNR = 1) and prints ``LEAKED``; if the attack fails it prints
``CONTAINED: <why>`` and returns zeros (TNR = 0). Each test asserts the attack was contained — by
the log, the score, and where possible by looking at the host from outside (processes, files,
sockets) — and that the leaderboard holds exactly the earlier entries plus the runner's own entry.
"""

from __future__ import annotations

import json
import os
import socket
import textwrap
import time
import uuid
import zipfile

import numpy as np
import pytest
from typer.testing import CliRunner

from kpflow.challenges import isolation, make_challenge
from kpflow.challenges.runner import read_leaderboard, run_submission, unpack_submission

REASON = isolation.unavailable_reason()
needs_isolation = pytest.mark.skipif(REASON is not None, reason=f"no isolation mechanism here: {REASON}")
SEED, HIDDEN, SCALE = 3, 987654321, 0.01

ATTACK = '''
import json
import os
import sys

import numpy as np

CHALLENGE = {challenge!r}
LABELS = {labels!r}
LEADERBOARD = {leaderboard!r}


def attack(X):
{body}


class Model:
    def load(self):
        pass

    def predict(self, X):
        try:
            leaked = attack(X)
        except BaseException as err:
            print("CONTAINED:", type(err).__name__, err, file=sys.stderr, flush=True)
            return np.zeros(len(X))
        if leaked:
            print("LEAKED", file=sys.stderr, flush=True)
            rows = [line.split(",") for line in leaked.splitlines()[1:] if line]
            return np.array([float(r[1]) for r in rows])
        print("CONTAINED: the attack found nothing", file=sys.stderr, flush=True)
        return np.zeros(len(X))
'''


@pytest.fixture(scope="module")
def gw_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile") / "gw"
    make_challenge("gw", folder, seed=SEED, scale=SCALE, hidden_seed=HIDDEN)
    honest = tmp_path_factory.mktemp("honest") / "honest"
    honest.mkdir()
    (honest / "model.py").write_text(ATTACK.format(challenge="", labels="", leaderboard="",
                                                   body="    return None"))
    if REASON is None:
        assert run_submission(folder, honest, name="honest", timeout_s=120)["status"] == "ok"
    return folder


def _labels(gw_dir):
    return gw_dir / "reference_data" / "val" / "labels.csv"


def _hostile(gw_dir, tmp_path, body, name="hostile", **kwargs):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "model.py").write_text(ATTACK.format(
        challenge=str(gw_dir), labels=str(_labels(gw_dir)), leaderboard=str(gw_dir / "leaderboard.json"),
        body=textwrap.indent(textwrap.dedent(body), "    ")))
    before = read_leaderboard(gw_dir)
    entry = run_submission(gw_dir, folder, phase="val", name=name, **{"timeout_s": 120, **kwargs})
    assert read_leaderboard(gw_dir) == before + [entry]  # nothing forged, nothing lost
    assert entry["isolation"].startswith("bubblewrap"), entry["isolation"]
    return entry


def _contained(entry):
    assert entry["status"] == "ok", entry.get("error")
    assert "LEAKED" not in entry["log_tail"], entry["log_tail"]
    assert "CONTAINED" in entry["log_tail"], entry["log_tail"]
    assert entry["scores"]["TNR"] == 0.0  # zeros, not the labels (which would give TNR = 1)


@needs_isolation
def test_ctypes_read_of_the_labels_is_contained(gw_dir, tmp_path):
    _contained(_hostile(gw_dir, tmp_path, """
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.open(LABELS.encode(), os.O_RDONLY)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "libc open() of the labels failed")
        buf = ctypes.create_string_buffer(1 << 20)
        return buf.raw[:libc.read(fd, buf, len(buf))].decode()
    """))


@needs_isolation
def test_os_open_with_dir_fd_is_contained(gw_dir, tmp_path):
    _contained(_hostile(gw_dir, tmp_path, """
        folder = os.open(CHALLENGE, os.O_RDONLY | os.O_DIRECTORY)
        fd = os.open("reference_data/val/labels.csv", os.O_RDONLY, dir_fd=folder)
        return os.read(fd, 1 << 20).decode()
    """))


@needs_isolation
def test_switching_off_every_python_level_guard_changes_nothing(gw_dir, tmp_path):
    _contained(_hostile(gw_dir, tmp_path, """
        import gc
        for obj in gc.get_objects():  # whatever guard object there may be: switch it off
            for attribute in ("active", "enabled"):
                try:
                    if hasattr(obj, attribute) and not isinstance(obj, type):
                        setattr(obj, attribute, False)
                except Exception:
                    pass
        return open(LABELS).read()
    """))


@needs_isolation
def test_regenerating_the_data_from_the_public_seed_gives_other_data(gw_dir, tmp_path):
    entry = _hostile(gw_dir, tmp_path, f"""
        from pathlib import Path
        from kpflow.challenges import gw
        with np.load("/app/input_data/data.npz") as archive:
            given = archive["data"]
        for seed in ({SEED}, 0):
            for hidden in (seed, 0, 1):
                out = Path("/app/scratch") / f"regen_{{seed}}_{{hidden}}"
                gw.generate(out, seed, hidden, {SCALE})
                with np.load(out / "input_data" / "val" / "data.npz") as archive:
                    if archive["data"].shape == given.shape and np.array_equal(archive["data"], given):
                        return (out / "reference_data" / "val" / "labels.csv").read_text()
        raise LookupError("data regenerated from the public seed differ from the hidden inputs")
    """)
    _contained(entry)
    assert "regenerated from the public seed differ" in entry["log_tail"]


@needs_isolation
def test_proc_shows_no_other_process_no_parent_memory_environment_or_command_line(gw_dir, tmp_path, monkeypatch):
    secret = f"kpflow-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("KPFLOW_HOSTILE_SECRET", secret)
    entry = _hostile(gw_dir, tmp_path, f"""
        pids = sorted(p for p in os.listdir("/proc") if p.isdigit())
        print("PIDS", pids, file=sys.stderr)
        found = []
        for pid in set(pids) | {{"{os.getpid()}", str(os.getppid())}}:
            for what in ("environ", "cmdline", "mem", "maps"):
                try:
                    with open(f"/proc/{{pid}}/{{what}}", "rb") as handle:
                        data = handle.read(1 << 20)
                except OSError:
                    continue
                if b"{secret}" in data or CHALLENGE.encode() in data:
                    found.append((pid, what))
        if found:
            print("LEAKED", found, file=sys.stderr)
        raise LookupError(f"nothing of the parent in /proc (visible pids {{pids}})")
    """)
    _contained(entry)
    assert "PIDS ['1']" in entry["log_tail"]  # the sandbox's PID namespace holds only the submission


@needs_isolation
def test_network_connections_fail(gw_dir, tmp_path):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]
    try:
        entry = _hostile(gw_dir, tmp_path, f"""
            import socket
            errors = []
            for address in (("127.0.0.1", {port}), ("1.1.1.1", 53), ("8.8.8.8", 443)):
                try:
                    socket.create_connection(address, timeout=3).close()
                    print("LEAKED connected to", address, file=sys.stderr)
                except OSError as err:
                    errors.append(f"{{address}}: {{err}}")
            raise ConnectionError("; ".join(errors))
        """)
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()  # the sandbox never reached the host's loopback
    finally:
        server.close()
    _contained(entry)


def _processes_with(marker: str) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(os.path.join(entry.path, "cmdline"), "rb") as handle:
                    if marker.encode() in handle.read():
                        out.append(int(entry.name))
            except OSError:
                pass
    return out


_DAEMON = """
    import subprocess
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            code = ("import time; time.sleep(1.0); "
                    f"open({{LEADERBOARD!r}}, 'w').write('[]'); open('/app/output/status.json', 'w').write('{{{{}}}}')")
            os.execv(sys.executable, [sys.executable, "-c", code, "{marker}"])
        os._exit(0)
    os.wait()
    {after}
"""


@needs_isolation
@pytest.mark.slow
@pytest.mark.parametrize("hang", [False, True], ids=["exits", "hangs-until-timeout"])
def test_setsid_double_fork_does_not_survive_the_run(gw_dir, tmp_path, hang):
    marker = f"kpflow-daemon-{uuid.uuid4().hex}"
    after = "import time\n    while True:\n        time.sleep(1)" if hang else "raise LookupError('daemon left')"
    entry = _hostile(gw_dir, tmp_path, _DAEMON.format(marker=marker, after=after), timeout_s=4 if hang else 120)
    assert _processes_with(marker) == []  # killed with the PID namespace, at once
    before = read_leaderboard(gw_dir)
    time.sleep(1.5)  # the daemon would have written by now
    assert read_leaderboard(gw_dir) == before
    if hang:
        assert entry["status"] == "failed" and "timed out after 4 s" in entry["error"]
        assert "every process of the sandbox was killed" in entry["error"]
    else:
        _contained(entry)


@needs_isolation
def test_forged_leaderboard_entries_and_status_are_ignored(gw_dir, tmp_path):
    entry = _hostile(gw_dir, tmp_path, """
        forged = [{"submission": "forged", "phase": "val", "status": "ok", "scores": {"TNR": 1.0}}]
        for path in (LEADERBOARD, CHALLENGE + "/runs/forged.json", "/app/output/leaderboard.json"):
            try:
                with open(path, "w") as handle:
                    json.dump(forged, handle)
                print("LEAKED wrote", path, file=sys.stderr)
            except OSError as err:
                print("CONTAINED:", path, err, file=sys.stderr)
        # forge the ingestion's own report and stop before ingestion can overwrite it
        with open("/app/output/status.json", "w") as handle:
            json.dump({"ok": True, "scores": {"TNR": 1.0, "ROC_AUC": 1.0}, "n_predictions": len(X)}, handle)
        with open("/app/output/predictions.csv", "w") as handle:
            handle.write("id,score\\n" + "".join(f"val_{k:06d},0\\n" for k in range(len(X))))
        sys.stderr.flush()
        os._exit(0)
    """)
    assert entry["status"] == "ok" and entry["scores"]["TNR"] == 0.0  # scored from the predictions, not the claim
    assert "LEAKED" not in entry["log_tail"] and "CONTAINED" in entry["log_tail"]
    assert not (gw_dir / "runs" / "forged.json").exists()
    assert all(e["submission"] != "forged" for e in read_leaderboard(gw_dir))


@needs_isolation
def test_symlinks_to_the_labels_never_reach_the_run_folder(gw_dir, tmp_path):
    entry = _hostile(gw_dir, tmp_path, """
        for link in ("/app/output/stderr.txt", "/app/output/predictions.csv", "/app/output/status.json"):
            try:
                if os.path.lexists(link):
                    os.unlink(link)
                os.symlink(LABELS, link)
                print("LEAKED linked", link, file=sys.stderr)
            except OSError as err:
                print("CONTAINED:", link, err, file=sys.stderr)
        os.symlink(LABELS, "/app/scratch/log.txt")  # allowed in scratch, which the parent never reads
        sys.stderr = open("/app/scratch/log.txt", "a")
        return None
    """)
    assert entry["status"] == "ok", entry.get("error")
    labels = _labels(gw_dir).read_text()
    secret_rows = [line for line in labels.splitlines()[1:] if line]
    run_folder = gw_dir / entry["run_folder"]
    for path in run_folder.iterdir():
        assert not path.is_symlink()
        text = path.read_text(errors="replace")
        assert not any(row in text for row in secret_rows[:5]), path
        assert ",background" not in text and ",bbh" not in text, path
    assert ",background" not in entry["log_tail"]


@needs_isolation
def test_printed_result_rows_cannot_be_injected_into_the_command_output(gw_dir, tmp_path, monkeypatch):
    from kpflow.cli import app

    monkeypatch.chdir(tmp_path)
    fake = "TNR=1.000000\nTNR_bbh=1.000000\nTNR_sglf=1.000000\nROC_AUC=1.000000\n"
    printer = tmp_path / "printer"
    printer.mkdir()
    (printer / "model.py").write_text(textwrap.dedent(f"""
        import sys
        import numpy as np

        class Model:
            def load(self):
                print({fake!r}, flush=True)

            def predict(self, X):
                sys.stdout.write({fake!r})
                sys.stderr.write({fake!r})
                return np.zeros(len(X))
    """))
    runner = CliRunner()
    before = read_leaderboard(gw_dir)
    result = runner.invoke(app, ["challenge", "run", "gw", str(printer), "--dir", str(gw_dir), "--timeout", "120"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "=" in line]
    assert lines == ["TNR=0.000000", "TNR_bbh=0.000000", "TNR_sglf=0.000000", "ROC_AUC=0.500000"]
    crasher = tmp_path / "crasher"
    crasher.mkdir()
    (crasher / "model.py").write_text(textwrap.dedent(f"""
        class Model:
            def load(self):
                raise RuntimeError("boom\\n" + {fake!r} + "\\x1b[2K\\r\\u202e")

            def predict(self, X):
                return None
    """))
    result = runner.invoke(app, ["challenge", "run", "gw", str(crasher), "--dir", str(gw_dir), "--timeout", "120"])
    assert result.exit_code == 1
    out = [line for line in result.output.splitlines() if line.strip()]
    assert len(out) == 1 and out[0].startswith("FAILED: submission crashed: RuntimeError: boom"), out
    assert "\x1b" not in result.output and "\u202e" not in result.output and "\r" not in result.output
    assert len(read_leaderboard(gw_dir)) == len(before) + 2


@needs_isolation
def test_a_100_mb_log_is_cut_and_stops_the_run(gw_dir, tmp_path):
    entry = _hostile(gw_dir, tmp_path, """
        chunk = "x" * (1 << 20)
        for _ in range(100):
            sys.stdout.write(chunk)
        sys.stdout.flush()
        return None
    """)
    assert entry["status"] == "failed"
    assert "MiB to stdout/stderr (the log limit)" in entry["error"], entry["error"]
    run_folder = gw_dir / entry["run_folder"]
    kept = sum(p.stat().st_size for p in run_folder.iterdir())
    assert kept < 4 * isolation.TAIL_BYTES, kept  # a tail is kept, not the log
    assert len(entry["log_tail"]) <= 1500


@needs_isolation
def test_output_files_and_scratch_are_size_capped(gw_dir, tmp_path):
    limits = isolation.Limits(wall_s=120, file_bytes=8 * 2 ** 20, scratch_bytes=16 * 2 ** 20)
    entry = _hostile(gw_dir, tmp_path, """
        chunk = b"0" * (1 << 20)
        outcomes = []
        for path in ("/app/output/status.json", "/app/output/new.bin"):  # one file of 100 MB
            try:
                with open(path, "wb") as handle:
                    for _ in range(100):
                        handle.write(chunk)
                outcomes.append(f"LEAKED wrote 100 MB to {path}")
            except OSError as err:
                outcomes.append(f"{path}: {err.strerror}")
        for folder in ("/app/scratch", "/tmp"):  # 25 files of 4 MB, each below the file-size limit
            try:
                for k in range(25):
                    with open(f"{folder}/part{k}.bin", "wb") as handle:
                        for _ in range(4):
                            handle.write(chunk)
                outcomes.append(f"LEAKED wrote 100 MB to {folder}")
            except OSError as err:
                outcomes.append(f"{folder}: {err.strerror}")
        print(outcomes, file=sys.stderr)
        if any("LEAKED" in o for o in outcomes):
            print("LEAKED", file=sys.stderr)
        raise OSError("; ".join(outcomes))
    """, limits=limits)
    _contained(entry)
    assert "File too large" in entry["log_tail"]       # RLIMIT_FSIZE on the output file
    assert "No space left on device" in entry["log_tail"]  # the scratch tmpfs (also /tmp)
    assert "Read-only file system" in entry["log_tail"]    # no new files in the output folder


@needs_isolation
def test_only_the_submission_inputs_and_python_are_visible_and_all_read_only(gw_dir, tmp_path):
    entry = _hostile(gw_dir, tmp_path, """
        import kpflow
        seen = {"/": sorted(os.listdir("/")), "/app": sorted(os.listdir("/app")),
                "/app/input_data": sorted(os.listdir("/app/input_data"))}
        print("SEEN", seen, file=sys.stderr)
        for path in (CHALLENGE, LABELS, os.path.dirname(CHALLENGE), "/etc/passwd", "/etc/hostname",
                     os.path.expanduser("~root")):
            if os.path.exists(path) and path != "/root":
                print("LEAKED exists:", path, file=sys.stderr)
        for path in ("/app/input_data/data.npz", "/app/ingested_program/model.py", kpflow.__file__,
                     "/usr/x", os.path.join(os.path.dirname(os.__file__), "x.py")):
            try:
                open(path, "ab").close()
                print("LEAKED writable:", path, file=sys.stderr)
            except OSError as err:
                print(path, err.strerror, file=sys.stderr)
        raise LookupError("only the allowed files are visible")
    """)
    _contained(entry)
    seen = entry["log_tail"].split("SEEN ", 1)[1].splitlines()[0]
    assert "'reference_data'" not in seen and "'leaderboard.json'" not in seen
    assert "/app': ['ingested_program', 'input_data', 'output', 'program', 'scratch']" in seen
    assert "/app/input_data': ['data.npz']" in seen


@needs_isolation
def test_privilege_escalation_and_new_namespaces_are_refused(gw_dir, tmp_path):
    _contained(_hostile(gw_dir, tmp_path, """
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        CLONE_NEWUSER, CLONE_NEWNS = 0x10000000, 0x00020000
        results = {"unshare_user": libc.unshare(CLONE_NEWUSER), "unshare_mount": libc.unshare(CLONE_NEWNS),
                   "mount": libc.mount(b"none", b"/app/scratch", b"tmpfs", 0, None), "setuid0": libc.setuid(0),
                   "chroot": libc.chroot(b"/app")}
        if any(v == 0 for v in results.values()):
            print("LEAKED", results, file=sys.stderr)
        capabilities = open("/proc/self/status").read().split("CapEff:")[1].split()[0]
        if int(capabilities, 16) != 0:
            print("LEAKED capabilities", capabilities, file=sys.stderr)
        raise PermissionError(f"refused: {results}, CapEff={capabilities}")
    """))


@needs_isolation
def test_cpu_time_is_capped_and_no_descriptor_of_the_parent_leaks(gw_dir, tmp_path):
    limits = isolation.Limits(wall_s=60, cpu_s=1, threads=1)
    entry = _hostile(gw_dir, tmp_path, """
        print("FDS", sorted(os.listdir("/proc/self/fd")), file=sys.stderr, flush=True)
        while True:  # burn CPU until the kernel stops it
            pass
    """, limits=limits)
    assert entry["status"] == "failed" and "killed by signal 9" in entry["error"], entry["error"]
    assert entry["seconds"] < 30  # the CPU limit, not the wall clock, ended it
    assert "FDS ['0', '1', '2', '3']" in entry["log_tail"]  # stdio and listdir's own descriptor only


def _pids_capped() -> bool:
    group = isolation.Cgroup(8, 2 ** 30)
    try:
        return "processes" in group.applied or os.getuid() != 0
    finally:
        group.remove()


@needs_isolation
@pytest.mark.skipif(not _pids_capped(), reason="running as root without a pids cgroup: the process count is not "
                                                "capped here (RLIMIT_NPROC does not apply to root)")
def test_a_fork_bomb_hits_the_process_limit(gw_dir, tmp_path):
    limits = isolation.Limits(wall_s=60, processes=32)
    entry = _hostile(gw_dir, tmp_path, """
        import time
        children = 0
        try:
            for _ in range(200):
                pid = os.fork()
                if pid == 0:
                    time.sleep(30)
                    os._exit(0)
                children += 1
        except OSError as err:
            print(f"FORKS {children}", file=sys.stderr, flush=True)
            raise OSError(f"fork refused after {children} children: {err}") from None
        print("LEAKED", children, file=sys.stderr)
        return None
    """, limits=limits)
    _contained(entry)
    forks = int(entry["log_tail"].split("FORKS ", 1)[1].split()[0])
    assert forks < 32


def test_unavailable_isolation_refuses_unless_trusted_and_says_so(gw_dir, tmp_path, monkeypatch):
    from kpflow.cli import app

    monkeypatch.setattr(isolation, "unavailable_reason", lambda: "pretend: no bubblewrap in this test")
    sub = tmp_path / "s"
    sub.mkdir()
    (sub / "model.py").write_text(ATTACK.format(challenge="", labels="", leaderboard="", body="    return None"))
    before = read_leaderboard(gw_dir)
    with pytest.raises(isolation.IsolationUnavailable, match="--trusted"):
        run_submission(gw_dir, sub, record=False)
    runner = CliRunner()
    refused = runner.invoke(app, ["challenge", "run", "gw", str(sub), "--dir", str(gw_dir)])
    assert refused.exit_code == 2 and "refusing to run" in refused.output and "--trusted" in refused.output
    assert read_leaderboard(gw_dir) == before
    ran = runner.invoke(app, ["challenge", "run", "gw", str(sub), "--dir", str(gw_dir), "--trusted",
                              "--timeout", "120"])
    assert ran.exit_code == 0, ran.output
    assert "WARNING: NONE: run without isolation because it was declared trusted" in ran.output
    assert read_leaderboard(gw_dir)[-1]["isolation"].startswith("NONE")


def test_clean_text_strips_control_and_format_characters():
    dirty = "ok\x1b[31mred\x1b[0m\r\nTNR=1\x07\u202eevil\u200b\ttab"
    assert isolation.clean_text(dirty) == "okred  TNR=1evil tab"
    assert isolation.clean_text(dirty, newlines=True) == "okred \nTNR=1evil\ttab"
    assert isolation.clean_text("a" * 50, 10) == "…" + "a" * 9
    assert isolation.clean_text("a" * 50, 10, keep="head") == "a" * 9 + "…"
    assert isolation.clean_text(b"\xff\xfebytes") == "\ufffd\ufffdbytes"


def test_read_regular_file_refuses_links_fifos_and_oversized_files(tmp_path):
    target = tmp_path / "labels.csv"
    target.write_text("id,label\n")
    assert isolation.read_regular_file(target, 100) == b"id,label\n"
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(OSError):
        isolation.read_regular_file(tmp_path / "link", 100)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OSError, match="not a regular file"):
        isolation.read_regular_file(tmp_path / "fifo", 100)
    with pytest.raises(ValueError, match="limit is 4"):
        isolation.read_regular_file(target, 4)
    from kpflow.challenges.scoring import ScoringError, read_text_file

    with pytest.raises(ScoringError, match="not a symbolic link"):
        read_text_file(str(tmp_path / "link"), "predictions")
    with pytest.raises(ScoringError, match="at most 4 are accepted"):
        read_text_file(str(target), "predictions", max_bytes=4)


def test_submissions_with_links_or_escaping_zip_members_are_refused(tmp_path):
    folder = tmp_path / "sub"
    folder.mkdir()
    (folder / "model.py").write_text("class Model: pass\n")
    (folder / "labels.csv").symlink_to("/etc/hostname")
    with pytest.raises(ValueError, match="symbolic link labels.csv"):
        unpack_submission(folder, tmp_path / "out1")
    archive = tmp_path / "escape.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("../../evil.py", "x = 1\n")
    with pytest.raises(ValueError, match="escapes the submission folder"):
        unpack_submission(archive, tmp_path / "out2")
    linked = tmp_path / "link.zip"
    with zipfile.ZipFile(linked, "w") as handle:
        info = zipfile.ZipInfo("model.py")
        info.external_attr = (0o120777 << 16)
        handle.writestr(info, "/etc/hostname")
    with pytest.raises(ValueError, match="is a symbolic link"):
        unpack_submission(linked, tmp_path / "out3")


@needs_isolation
def test_a_challenge_folder_inside_the_visible_python_environment_is_refused(tmp_path, monkeypatch):
    from kpflow.challenges import runner

    monkeypatch.setattr(isolation, "python_mounts", lambda: [tmp_path])
    monkeypatch.setattr(isolation, "unavailable_reason", lambda: None)
    folder = tmp_path / "gw"
    folder.mkdir()
    (folder / "challenge.json").write_text(json.dumps({"name": "gw"}))
    with pytest.raises(ValueError, match="overlaps"):
        runner.run_submission(folder, tmp_path, record=False)


def test_limits_are_validated():
    with pytest.raises(ValueError, match="Limits.wall_s must be > 0"):
        isolation.Limits(wall_s=0)
    assert isolation.Limits(wall_s=10, threads=3).cpu_seconds == 30
    assert np.isclose(isolation.Limits(cpu_s=2.4).cpu_seconds, 2)
