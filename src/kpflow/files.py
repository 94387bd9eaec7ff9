"""Small, torch-free file helpers shared by the trainer, the report and the challenge kit.

Everything kpflow writes goes through a temporary file in the destination folder and an atomic rename,
so an interrupted write never leaves a half-written file under the final name.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import tempfile
from pathlib import Path


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give (0o666 less the umask); mkstemp alone gives 0o600."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def temporary_beside(path: Path) -> str:
    """A new empty temporary file in ``path``'s folder (created if needed), with the usual file mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, file_mode())
    return tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync, then rename."""
    tmp = temporary_beside(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """``atomic_write_bytes`` of UTF-8 text."""
    atomic_write_bytes(path, text.encode())


def write_csv(path: Path, rows, header=None) -> None:
    """Write a CSV table atomically, with the ``csv`` module's quoting and ``\\n`` line ends.

    Args:
        path: the destination (its folder is created if needed).
        rows: an iterable of rows: sequences of values, or dicts (a key missing from a row is written empty).
        header: the column names. Dict rows: the columns, in this order (other keys are left out); None: the
            union of the rows' keys in first-seen order. Sequence rows: the first line (None: no header line).
    """
    rows = list(rows)
    buf = io.StringIO()
    if rows and isinstance(rows[0], dict):
        columns = list(header) if header is not None else list(dict.fromkeys(k for r in rows for k in r))
        w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    else:
        w = csv.writer(buf, lineterminator="\n")
        if header is not None:
            w.writerow(header)
        w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
