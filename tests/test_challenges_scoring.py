"""Scoring programs: metrics against brute-force definitions, and every way predictions can be wrong."""

from __future__ import annotations

import itertools
import json
import statistics

import numpy as np
import pytest

from kpflow.challenges import scoring
from kpflow.challenges.bundle import reference_predictions
from kpflow.challenges.common import write_csv
from kpflow.challenges.scoring import ScoringError

# ----------------------------------------------------------------------------- metrics


def _brute_average_precision(scores, labels):
    """Σ over distinct thresholds t (descending) of (R(t) − R(prev)) P(t), P/R of 'score >= t'."""
    total, prev_recall = 0.0, 0.0
    for t in sorted(set(scores), reverse=True):
        called = scores >= t
        tp = (called & labels).sum()
        precision, rec = tp / called.sum(), tp / labels.sum()
        total += (rec - prev_recall) * precision
        prev_recall = rec
    return total


@pytest.mark.parametrize("seed", range(5))
def test_average_precision_and_auc_match_definitions(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, 40).astype(float)  # many ties on purpose
    labels = rng.random(40) < 0.4
    assert scoring.average_precision(scores, labels) == pytest.approx(_brute_average_precision(scores, labels))
    pairs = [(p, n) for p in scores[labels] for n in scores[~labels]]
    auc = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs])
    assert scoring.roc_auc(scores, labels) == pytest.approx(auc)


def test_tnr_at_signal_efficiency_counts_background_below_the_10th_signal_percentile():
    signal = np.arange(10, 20, dtype=float)          # 10th percentile (linear) = 10.9
    background = np.array([0, 5, 10.5, 10.95, 30], dtype=float)
    scores = np.r_[background, signal]
    labels = np.r_[np.zeros(5), np.ones(10)]
    assert scoring.true_negative_rate_at_signal_efficiency(scores, labels, 0.9) == pytest.approx(3 / 5)
    with pytest.raises(ScoringError, match="both background"):
        scoring.true_negative_rate_at_signal_efficiency(signal, np.ones(10), 0.9)


@pytest.mark.parametrize("seed", range(4))
def test_recall_threshold_is_the_lowest_score_reaching_95_percent_non_hybrid_recall(seed):
    rng = np.random.default_rng(seed)
    scores, labels = rng.normal(size=60).round(1), rng.random(60) < 0.3
    t = scoring.recall_threshold(scores, labels, 0.95)
    neg = scores[~labels]
    assert np.mean(neg <= t) >= 0.95
    lower = [u for u in np.unique(scores) if u < t]
    assert all(np.mean(neg <= u) < 0.95 for u in lower)  # nothing lower qualifies


def test_f1_and_harmonic_mean_match_definitions():
    rng = np.random.default_rng(0)
    for pred, true in itertools.islice(zip(rng.random((20, 30)) < 0.5, rng.random((20, 30)) < 0.3,
                                           strict=True), 20):
        tp, fp, fn = (pred & true).sum(), (pred & ~true).sum(), (~pred & true).sum()
        assert scoring.f1(pred, true) == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert scoring.harmonic_mean([0.2, 0.5, 0.9]) == pytest.approx(statistics.harmonic_mean([0.2, 0.5, 0.9]))
    assert scoring.harmonic_mean([0.0, 0.5, 0.9]) == 0.0


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture
def gw_ref(tmp_path):
    rng = np.random.default_rng(1)
    kinds = ["background"] * 30 + ["glitch"] * 5 + ["bbh"] * 10 + ["sglf"] * 10
    rows = [(f"id{i:03d}", int(k in ("bbh", "sglf")), k) for i, k in enumerate(rng.permutation(kinds))]
    write_csv(tmp_path / "ref" / "labels.csv", rows, ["id", "label", "kind"])
    return tmp_path


@pytest.fixture
def butterfly_ref(tmp_path):
    rows = []
    for group, n_nonhyb, n_hyb in (("major", 20, 10), ("minor", 20, 5), ("mimic", 20, 8)):
        rows += [(f"{group}_n{i}.png", 0, group, "x") for i in range(n_nonhyb)]
        rows += [(f"{group}_h{i}.png", 1, group, "x") for i in range(n_hyb)]
    write_csv(tmp_path / "ref" / "ref.csv", rows, ["filename", "hybrid_stat", "ssp_indicator", "subspecies"])
    return tmp_path


@pytest.fixture
def sealevel_ref(tmp_path):
    rng = np.random.default_rng(2)
    stations = [f"S{k}" for k in range(12)]
    labels = (rng.random((40, 12)) < 0.15).astype(int)
    labels[0] = 0  # at least one quiet day
    rows = [(f"2000-01-{d + 1:02d}" if d < 31 else f"2000-02-{d - 30:02d}", *labels[d]) for d in range(40)]
    write_csv(tmp_path / "ref" / "labels.csv", rows, ["date", *stations])
    return tmp_path


REFS = {"gw": "gw_ref", "butterfly": "butterfly_ref", "sealevel": "sealevel_ref"}
PRIMARY = {"gw": "TNR", "butterfly": "challenge_score", "sealevel": "Final Grade"}


def _score(name, root):
    return scoring.score_folder(name, str(root / "res"), str(root / "ref"))


@pytest.mark.parametrize("name", list(REFS))
def test_all_correct_scores_one_and_all_wrong_scores_zero(name, request):
    root = request.getfixturevalue(REFS[name])
    reference_predictions(name, root / "ref", root / "res", "correct")
    correct = _score(name, root)
    assert correct[PRIMARY[name]] == pytest.approx(1.0)
    reference_predictions(name, root / "ref", root / "res", "wrong")
    wrong = _score(name, root)
    if name == "sealevel":  # every station-day flipped: per-station F1 = 0, but most days still "any"
        assert wrong["F1-Score with location"] == 0.0
        assert wrong["Final Grade"] == pytest.approx(0.3 * wrong["F1-Score"])
    else:
        assert wrong[PRIMARY[name]] == pytest.approx(0.0)


@pytest.mark.parametrize("name", list(REFS))
def test_constant_predictions_score_zero(name, request):
    root = request.getfixturevalue(REFS[name])
    reference_predictions(name, root / "ref", root / "res", "constant")
    scores = _score(name, root)
    assert scores[PRIMARY[name]] == pytest.approx(0.0)
    if name == "gw":
        assert scores["ROC_AUC"] == pytest.approx(0.5)


def test_butterfly_recalls_by_group(butterfly_ref):
    """Score hybrids of 'major' and 'mimic' above every non-hybrid, 'minor' hybrids at the bottom."""
    import csv

    with open(butterfly_ref / "ref" / "ref.csv") as handle:
        rows = list(csv.DictReader(handle))
    preds = [(r["filename"], 2.0 if r["hybrid_stat"] == "1" and r["ssp_indicator"] != "minor" else
              -1.0 if r["hybrid_stat"] == "1" else float(i) / 100) for i, r in enumerate(rows)]
    write_csv(butterfly_ref / "res" / "predictions.csv", preds, ["filename", "score"])
    scores = _score("butterfly", butterfly_ref)
    assert scores["A_score_major_recall"] == 1.0 and scores["mimic_recall"] == 1.0
    assert scores["A_score_minor_recall"] == 0.0 and scores["challenge_score"] == 0.0
    assert scores["A_PRC_AUC_major"] == pytest.approx(1.0)


def test_sealevel_grade_combines_day_and_station_f1(sealevel_ref):
    import csv

    with open(sealevel_ref / "ref" / "labels.csv") as handle:
        rows = list(csv.DictReader(handle))
    stations = [c for c in rows[0] if c != "date"]
    truth = np.array([[int(r[s]) for s in stations] for r in rows])
    predicted = truth.copy()
    predicted[:, :6] = 0  # half the stations never flagged
    write_csv(sealevel_ref / "res" / "predictions.csv", [(r["date"], *p) for r, p in zip(rows, predicted, strict=True)],
              ["date", *stations])
    scores = _score("sealevel", sealevel_ref)
    per_station = [scoring.f1(predicted[:, j], truth[:, j]) for j in range(12)]
    day = scoring.f1(predicted.any(1), truth.any(1))
    assert scores["F1-Score with location"] == pytest.approx(np.mean(per_station))
    assert scores["Final Grade"] == pytest.approx(0.3 * day + 0.7 * np.mean(per_station))


# ----------------------------------------------------------------------------- malformed predictions
def _write_pred(root, header, rows):
    write_csv(root / "res" / "predictions.csv", rows, header)


def _gw_rows(root):
    import csv

    with open(root / "ref" / "labels.csv") as handle:
        return [(r["id"], r["label"]) for r in csv.DictReader(handle)]


def test_missing_ids_are_named(gw_ref):
    rows = _gw_rows(gw_ref)
    _write_pred(gw_ref, ["id", "score"], rows[1:])
    with pytest.raises(ScoringError, match=rf"missing 1 id.*{rows[0][0]}"):
        _score("gw", gw_ref)


def test_duplicated_ids_are_named(gw_ref):
    rows = _gw_rows(gw_ref)
    _write_pred(gw_ref, ["id", "score"], rows + [rows[3]])
    with pytest.raises(ScoringError, match=rf"duplicated id.*{rows[3][0]}"):
        _score("gw", gw_ref)


def test_unknown_ids_are_named(gw_ref):
    _write_pred(gw_ref, ["id", "score"], _gw_rows(gw_ref) + [("intruder", 1)])
    with pytest.raises(ScoringError, match="unknown id.*intruder"):
        _score("gw", gw_ref)


@pytest.mark.parametrize("bad", ["nan", "abc", "inf", ""])
def test_non_numeric_or_non_finite_scores_are_named(gw_ref, bad):
    rows = _gw_rows(gw_ref)
    rows[2] = (rows[2][0], bad)
    _write_pred(gw_ref, ["id", "score"], rows)
    with pytest.raises(ScoringError, match=rf"prediction for '{rows[2][0]}'"):
        _score("gw", gw_ref)


def test_wrong_header_and_missing_file(gw_ref):
    _write_pred(gw_ref, ["identifier", "value"], _gw_rows(gw_ref))
    with pytest.raises(ScoringError, match=r"lacks column\(s\) \['id', 'score'\]"):
        _score("gw", gw_ref)
    (gw_ref / "res" / "predictions.csv").unlink()
    with pytest.raises(ScoringError, match="predictions file not found"):
        _score("gw", gw_ref)


def test_sealevel_flags_must_be_binary_and_stations_complete(sealevel_ref):
    import csv

    with open(sealevel_ref / "ref" / "labels.csv") as handle:
        rows = list(csv.DictReader(handle))
    stations = [c for c in rows[0] if c != "date"]
    body = [(r["date"], *([2] + [0] * 11)) for r in rows]
    _write_pred(sealevel_ref, ["date", *stations], body)
    with pytest.raises(ScoringError, match="flags must be 0 or 1"):
        _score("sealevel", sealevel_ref)
    _write_pred(sealevel_ref, ["date", *stations[:-1]], [(r["date"], *([0] * 11)) for r in rows])
    with pytest.raises(ScoringError, match=stations[-1]):
        _score("sealevel", sealevel_ref)


def test_codabench_entry_point_writes_scores_json_or_fails_clearly(gw_ref, capsys):
    reference_predictions("gw", gw_ref / "ref", gw_ref / "res", "correct")
    out = gw_ref / "out"
    assert scoring.main([str(gw_ref), str(out), "--challenge", "gw"]) == 0
    assert json.loads((out / "scores.json").read_text())["TNR"] == 1.0
    (gw_ref / "res" / "predictions.csv").write_text("id,score\n")
    assert scoring.main([str(gw_ref), str(out), "--challenge", "gw"]) == 1
    assert "missing" in capsys.readouterr().err
