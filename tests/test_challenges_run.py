"""Running submissions: good ones score, bad ones become clear failed entries, the leaderboard survives.

These runs pass ``trusted=True``: isolated where bubblewrap works (as in CI), and run plainly where it
does not, so that the runner's other behaviour is tested everywhere. The attacks on the isolation
boundary are in ``test_challenges_isolation.py``.
"""

from __future__ import annotations

import functools
import json
import textwrap
import zipfile

import numpy as np
import pytest

from kpflow.challenges import make_challenge
from kpflow.challenges import runner as runner_module
from kpflow.challenges.runner import format_leaderboard, ranked, read_leaderboard

run_submission = functools.partial(runner_module.run_submission, trusted=True)

GOOD = """
import numpy as np

class Model:
    def load(self):
        pass

    def predict(self, X):
        return (np.asarray(X) ** 2).mean(axis=2).max(axis=1)
"""


@pytest.fixture(scope="module")
def gw_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("challenges") / "gw"
    make_challenge("gw", folder, seed=3, scale=0.01)
    return folder


def _submission(tmp_path, name, code):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "model.py").write_text(textwrap.dedent(code))
    return folder


def _predict_body(body):
    return f"""
import numpy as np

class Model:
    def load(self):
        pass

    def predict(self, X):
{textwrap.indent(textwrap.dedent(body), '        ')}
"""


def test_good_submission_scores_and_zip_equals_folder(gw_dir, tmp_path):
    folder = _submission(tmp_path, "good", GOOD)
    entry = run_submission(gw_dir, folder, phase="val", timeout_s=120, record=False)
    assert entry["status"] == "ok", entry.get("error")
    assert set(entry["scores"]) == {"TNR", "TNR_bbh", "TNR_sglf", "ROC_AUC"}
    assert 0.0 <= entry["scores"]["TNR"] <= 1.0
    archive = tmp_path / "good.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.write(folder / "model.py", "model.py")
    zipped = run_submission(gw_dir, archive, phase="val", timeout_s=120, record=False)
    assert zipped["scores"] == entry["scores"]
    assert zipped["submission_sha256"] == entry["submission_sha256"]


BAD = {
    "crash": (_predict_body("raise RuntimeError('boom from the submission')"),
              r"submission crashed: RuntimeError: boom from the submission"),
    "hang": (_predict_body("while True:\n    pass"), r"timed out after 4 s"),
    "wrong_length": (_predict_body("return np.zeros(3)"), r"predict\(X\) returned 3 values; expected"),
    "nan": (_predict_body("return np.full(len(X), np.nan)"), r"non-finite values"),
    "strings": (_predict_body("return ['a'] * len(X)"), r"not numeric"),
    "memory": (_predict_body("return np.ones(3 * 2**30 // 8) [:len(X)]"), r"MemoryError|memory limit"),
    "no_model_class": ("class Other:\n    pass\n", r"does not define a class named Model"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_misbehaving_submissions_are_contained_and_reported(gw_dir, tmp_path, kind):
    code, message = BAD[kind]
    folder = _submission(tmp_path, kind, code)
    entry = run_submission(gw_dir, folder, phase="val", timeout_s=4 if kind == "hang" else 120,
                           memory_gb=1.0, record=False)
    assert entry["status"] == "failed"
    assert entry["scores"] is None
    import re

    assert re.search(message, entry["error"]), entry["error"]


def test_missing_model_py_and_unreadable_submission(gw_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    entry = run_submission(gw_dir, empty, phase="val", record=False)
    assert entry["status"] == "failed" and "no model.py" in entry["error"]
    entry = run_submission(gw_dir, tmp_path / "does_not_exist", phase="val", record=False)
    assert entry["status"] == "failed" and "neither a folder nor a zip" in entry["error"]


def test_submission_names_are_cleaned_for_the_leaderboard_and_the_run_folder(gw_dir, tmp_path):
    entry = run_submission(gw_dir, _submission(tmp_path, "good", GOOD), phase="val",
                           name="evil\nTNR=1.0\x1b[2J/../x")
    assert entry["submission"] == "evil TNR=1.0/../x"
    assert "/" not in entry["run_folder"].split("/", 1)[1] and (gw_dir / entry["run_folder"]).is_dir()
    table = format_leaderboard([entry], ["TNR"])
    assert len(table.splitlines()) == 2


def test_leaderboard_records_failures_without_breaking(gw_dir, tmp_path):
    good = run_submission(gw_dir, _submission(tmp_path, "good", GOOD), phase="val", name="good")
    bad = run_submission(gw_dir, _submission(tmp_path, "bad", BAD["crash"][0]), phase="val", name="bad")
    also_good = run_submission(gw_dir, _submission(tmp_path, "good2", GOOD), phase="test", name="good2")
    entries = read_leaderboard(gw_dir)
    assert [e["submission"] for e in entries][-3:] == ["good", "bad", "good2"]
    assert json.loads((gw_dir / "leaderboard.json").read_text()) == entries
    assert not list(gw_dir.glob(".leaderboard.json.*"))  # no temp files left behind
    order = ranked(entries, "TNR", phase="val")
    assert order[-1]["status"] == "failed" and order[0]["status"] == "ok"
    table = format_leaderboard(order, ["TNR"])
    assert "FAILED: submission crashed" in table
    assert good["status"] == also_good["status"] == "ok" and bad["status"] == "failed"
    run_folder = gw_dir / good["run_folder"]
    assert json.loads((run_folder / "scores.json").read_text()) == good["scores"]


def test_phase_and_folder_errors_are_clear(gw_dir, tmp_path):
    with pytest.raises(ValueError, match="phase must be one of"):
        run_submission(gw_dir, tmp_path, phase="final", record=False)
    with pytest.raises(FileNotFoundError, match="kpflow challenge make"):
        run_submission(tmp_path, tmp_path, record=False)


def test_predictions_written_by_ingestion_match_direct_scoring(gw_dir, tmp_path):
    """The sandboxed run gives the same scores as computing the submission's scores in-process."""
    from kpflow.challenges.gw import normalise
    from kpflow.challenges.scoring import true_negative_rate_at_signal_efficiency

    entry = run_submission(gw_dir, _submission(tmp_path, "good", GOOD), phase="val", record=False)
    with np.load(gw_dir / "input_data" / "val" / "data.npz") as archive:
        x, ids = normalise(archive["data"]), archive["ids"]
    scores = (x.astype(np.float64) ** 2).mean(2).max(1)
    import csv

    with open(gw_dir / "reference_data" / "val" / "labels.csv") as handle:
        label = {r["id"]: int(r["label"]) for r in csv.DictReader(handle)}
    labels = np.array([label[i] for i in ids])
    assert entry["scores"]["TNR"] == pytest.approx(true_negative_rate_at_signal_efficiency(scores, labels), abs=1e-6)
