"""Scoring programs of the three challenges: predictions + reference labels -> ``scores.json``.

This file is *standalone* (standard library + numpy only) so that it is copied verbatim into a
Codabench bundle as ``scoring_program/scoring.py``. Codabench calls it as::

    python3 scoring.py INPUT_DIR OUTPUT_DIR --challenge NAME

with the reference labels in ``INPUT_DIR/ref`` and the ingestion output in ``INPUT_DIR/res``.

Metrics (same definitions as the organisers' scoring programs of the 2024-25 NSF HDR challenge):

* ``gw``: background rejection at 90 % signal efficiency. The threshold is the 10th percentile of
  the signal scores (so TPR = 0.9); ``TNR = TN / (TN + FP)`` with ``score >= threshold`` called
  signal.
* ``butterfly``: for Species A and for the mimic set separately, the threshold is the lowest
  predicted score ``t`` such that calling ``score > t`` a hybrid keeps recall of non-hybrids
  >= 0.95. ``challenge_score`` is the harmonic mean of the recalls of signal hybrids, non-signal
  hybrids and mimic hybrids; average precision (PR-AUC) alongside.
* ``sealevel``: ``Final Grade = 0.3 * F1-Score + 0.7 * F1-Score with location``, where ``F1-Score`` is the F1
  of 'any station anomalous that day' and ``F1-Score with location`` the mean per-station F1 (the
  organisers' keys).
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from collections.abc import Sequence

import numpy as np

#: The predictions files each challenge scores, in order of preference: first the one this kit's ingestion
#: writes (the butterflies' ``predictions.txt``, header-less, is the organisers'), then other accepted
#: files: the organisers' gw ``test.predictions`` (binarised) and a header'd butterfly ``predictions.csv``.
PREDICTION_FILES = {"gw": ("predictions.csv", "test.predictions"), "butterfly": ("predictions.txt", "predictions.csv"),
                    "sealevel": ("predictions.csv",)}
MAX_FILE_BYTES = 256 * 2 ** 20  # a predictions or reference file larger than this is refused


class ScoringError(ValueError):
    """Predictions or reference labels that cannot be scored (the message says why)."""


# ----------------------------------------------------------------------------- metrics
def true_negative_rate_at_signal_efficiency(scores, labels, efficiency: float = 0.9) -> float:
    """TNR = TN/(TN+FP) at the threshold keeping a fraction ``efficiency`` of signals (label 1).

    The threshold is the ``(1 - efficiency)`` quantile of the signal scores (numpy's linear
    interpolation, as in the organisers' ``tp_cut``); ``score >= threshold`` is called signal.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    if not labels.any() or labels.all():
        raise ScoringError("TNR at fixed signal efficiency needs both background (0) and signal (1) labels")
    threshold = np.percentile(scores[labels], 100.0 * (1.0 - efficiency))
    background = scores[~labels]
    return float(np.mean(background < threshold))


def recall_threshold(scores, labels, min_negative_recall: float = 0.95) -> float:
    """Lowest predicted score ``t`` with recall of negatives (label 0) >= ``min_negative_recall``
    when ``score > t`` is called positive (the organisers' scan over sorted unique scores)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    negatives = np.sort(scores[~labels])
    if negatives.size == 0:
        raise ScoringError("the threshold at fixed non-hybrid recall needs at least one non-hybrid")
    for t in np.unique(scores):
        # recall of negatives = fraction of negatives with score <= t
        if np.searchsorted(negatives, t, side="right") / negatives.size >= min_negative_recall:
            return float(t)
    return float(scores.max())  # unreachable: at t = max every negative is <= t


def recall(predicted, labels) -> float:
    """TP / (TP + FN) of boolean predictions (0 when there are no positives, as sklearn)."""
    predicted, labels = np.asarray(predicted).astype(bool), np.asarray(labels).astype(bool)
    return float((predicted & labels).sum() / labels.sum()) if labels.any() else 0.0


def f1(predicted, labels) -> float:
    """F1 = 2 TP / (2 TP + FP + FN) (0 when TP + FP + FN = 0, as sklearn's zero_division=0)."""
    predicted, labels = np.asarray(predicted).astype(bool), np.asarray(labels).astype(bool)
    tp = float((predicted & labels).sum())
    denominator = 2 * tp + float((predicted & ~labels).sum()) + float((~predicted & labels).sum())
    return 2 * tp / denominator if denominator > 0 else 0.0


def average_precision(scores, labels) -> float:
    """PR-AUC as a step sum: AP = Σ_k (R_k − R_{k−1}) P_k over distinct score thresholds (sklearn's
    ``average_precision_score``); 0 when there are no positives."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    if not labels.any():
        return 0.0
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last_of_tie = np.r_[np.diff(s) != 0, True]
    tp = np.cumsum(y)[last_of_tie]
    fp = np.cumsum(~y)[last_of_tie]
    precision = tp / (tp + fp)
    rec = tp / labels.sum()
    return float(np.sum(np.diff(np.r_[0.0, rec]) * precision))


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve = P(score_pos > score_neg) + ½ P(tie) (Mann-Whitney U / n₊n₋)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ScoringError("ROC-AUC needs both classes in the reference labels")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(scores.size)
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def harmonic_mean(values: Sequence[float]) -> float:
    """n / Σ 1/v, and 0 as soon as one value is 0 (as ``statistics.harmonic_mean``)."""
    values = [float(v) for v in values]
    if any(v < 0 for v in values):
        raise ScoringError(f"harmonic mean of negative values {values}")
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


# ----------------------------------------------------------------------------- files
def read_text_file(path: str, what: str, max_bytes: int = MAX_FILE_BYTES, decode: bool = True) -> str | bytes:
    """UTF-8 text (bytes if not ``decode``) of the regular file ``path``: never read through a symbolic
    link (``O_NOFOLLOW``), never a FIFO or device, at most ``max_bytes``; otherwise a ScoringError."""
    import stat

    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ScoringError(f"{what} file not found: {path}") from None
    except OSError as err:
        raise ScoringError(f"{what} file {path} cannot be opened ({err.strerror}); it must be a regular file, "
                           "not a symbolic link") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ScoringError(f"{what} file {path} is not a regular file")
        if info.st_size > max_bytes:
            raise ScoringError(f"{what} file {path} has {info.st_size} bytes; at most {max_bytes} are accepted")
        chunks, size = [], 0
        while size <= max_bytes:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        data = b"".join(chunks)
        if size > max_bytes:
            raise ScoringError(f"{what} file {path} has more than {max_bytes} bytes")
    finally:
        os.close(fd)
    if not decode:
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ScoringError(f"{what} file {path} is not UTF-8 text ({err})") from None


def read_csv_table(path: str, required: Sequence[str], what: str) -> list[dict]:
    """Rows of a header'd CSV file, checking the file (see ``read_text_file``) and its ``required`` columns."""
    import io

    reader = csv.DictReader(io.StringIO(read_text_file(path, what), newline=""))
    header = reader.fieldnames or []
    missing = [c for c in required if c not in header]
    if missing:
        raise ScoringError(
            f"{what} file {path} lacks column(s) {missing}; its header is {header[:20]}, "
            f"expected a header line containing {list(required)}"
        )
    return list(reader)


def align_by_id(pred_rows: list[dict], ref_rows: list[dict], key: str) -> list[tuple[dict, dict]]:
    """Pairs (prediction, reference) joined on column ``key``; every id exactly once."""
    def index(rows, what):
        seen: dict[str, dict] = {}
        duplicated = []
        for row in rows:
            k = (row.get(key) or "").strip()
            if k in seen:
                duplicated.append(k)
            seen[k] = row
        if duplicated:
            raise ScoringError(f"{what} have duplicated {key}(s): {sorted(set(duplicated))[:10]}"
                               f" ({len(duplicated)} duplicate rows); each {key} must appear once")
        return seen

    preds, refs = index(pred_rows, "predictions"), index(ref_rows, "reference labels")
    missing = [k for k in refs if k not in preds]
    extra = [k for k in preds if k not in refs]
    if missing:
        raise ScoringError(f"predictions are missing {len(missing)} {key}(s) of the reference, e.g. "
                           f"{missing[:5]}; predict every input exactly once")
    if extra:
        raise ScoringError(f"predictions contain {len(extra)} unknown {key}(s), e.g. {extra[:5]}; "
                           "only ids of the inputs may appear")
    return [(preds[k], refs[k]) for k in refs]


def parse_score(value, row_id: str) -> float:
    """A finite float from a prediction cell, or a ScoringError naming the row."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ScoringError(f"prediction for {row_id!r} is {value!r}, not a number") from None
    if not math.isfinite(x):
        raise ScoringError(f"prediction for {row_id!r} is {value!r}; scores must be finite numbers")
    return x


def parse_flag(value, row_id: str, column: str) -> int:
    """A 0/1 flag from a prediction cell ('0', '1', '0.0', '1.0', 'True', 'False')."""
    text = (value or "").strip()
    table = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "false": 0, "true": 1}
    if text.lower() not in table:
        raise ScoringError(f"prediction for {row_id!r}, column {column!r} is {value!r}; flags must be 0 or 1")
    return table[text.lower()]


# ----------------------------------------------------------------------------- programs
def score_gw(pred_path: str, ref_path: str) -> dict[str, float]:
    """Gravitational waves: TNR at 90 % signal efficiency overall and per signal kind, ROC-AUC."""
    preds = read_csv_table(pred_path, ["id", "score"], "predictions")
    refs = read_csv_table(ref_path, ["id", "label", "kind"], "reference labels")
    pairs = align_by_id(preds, refs, "id")
    scores = np.array([parse_score(p["score"], p["id"]) for p, _ in pairs])
    labels = np.array([int(r["label"]) for _, r in pairs])
    kinds = np.array([r["kind"] for _, r in pairs])
    out = {"TNR": true_negative_rate_at_signal_efficiency(scores, labels, 0.9)}
    for kind in ("bbh", "sglf"):
        keep = (labels == 0) | (kinds == kind)
        out[f"TNR_{kind}"] = (true_negative_rate_at_signal_efficiency(scores[keep], labels[keep], 0.9)
                              if (kinds == kind).any() else 0.0)
    out["ROC_AUC"] = roc_auc(scores, labels)
    return out


def _hybrid_set_scores(scores, labels, min_negative_recall=0.95):
    t = recall_threshold(scores, labels, min_negative_recall)
    return scores > t


def score_gw_binarised(pred_path: str, labels: np.ndarray) -> dict[str, float]:
    """The organisers' gw scoring of their ``test.predictions``: one 0/1 line per input window, in input
    order, already cut at 90 % signal efficiency by their ingestion; ``TNR = TN / (TN + FP)`` (0 when
    there is no background). Only ``TNR`` can be computed from binarised predictions."""
    lines = [line.strip() for line in read_text_file(pred_path, "predictions").splitlines() if line.strip()]
    if len(lines) != len(labels):
        raise ScoringError(f"predictions file {pred_path} has {len(lines)} lines; the reference has {len(labels)} "
                           "windows (one 0/1 line per window, in input order)")
    predicted = np.array([parse_flag(v, f"line {k + 1}", "prediction") for k, v in enumerate(lines)])
    background = labels == 0
    tn, fp = int(((predicted == 0) & background).sum()), int(((predicted == 1) & background).sum())
    return {"TNR": tn / (tn + fp) if tn + fp else 0.0}


def gw_binarised_predictions(pred_path: str, ref_path: str) -> list[int]:
    """The organisers' ``test.predictions`` made from this kit's raw ``predictions.csv``: one 0/1 line per
    window in input order (the reference's row order), ``score >= threshold`` at the 10th percentile of
    the signal scores, as their ingestion's ``tp_cut`` does. The cut needs the labels, so here the trusted
    scorer makes it, not the ingestion (which never sees labels); rescoring the file with
    ``score_gw_binarised`` gives the same ``TNR``."""
    pairs = align_by_id(read_csv_table(pred_path, ["id", "score"], "predictions"),
                        read_csv_table(ref_path, ["id", "label"], "reference labels"), "id")
    scores = np.array([parse_score(p["score"], p["id"]) for p, _ in pairs])
    labels = np.array([int(r["label"]) for _, r in pairs])
    if not labels.any():
        raise ScoringError("the 90 % signal-efficiency cut needs signal (label 1) windows in the reference")
    threshold = np.percentile(scores[labels == 1], 10.0)
    return (scores >= threshold).astype(int).tolist()


def _organiser_gw_labels(path: str) -> np.ndarray:
    """The 0/1 labels of the organisers' ``ligo_bb_50.npz`` (key ``ids``), in input order."""
    import io

    try:
        with np.load(io.BytesIO(read_text_file(path, "reference labels", decode=False)), allow_pickle=False) as f:
            return np.asarray(f["ids"]).astype(int).reshape(-1)
    except (KeyError, ValueError, OSError) as err:
        raise ScoringError(f"reference labels {path} are not an .npz with an 'ids' array of 0/1 labels: "
                           f"{err}") from None


def score_butterfly(pred_path: str, ref_path: str) -> dict[str, float]:
    """Butterflies: recalls of signal / non-signal / mimic hybrids at 95 % non-hybrid recall, their
    harmonic mean (``challenge_score``), and PR-AUCs. ``pred_path`` is this kit's ``predictions.csv``
    (header ``filename,score``) or the organisers' header-less ``predictions.txt``."""
    if os.path.basename(pred_path) == PREDICTION_FILES["butterfly"][0]:
        rows = list(csv.reader(read_text_file(pred_path, "predictions").splitlines()))
        rows = rows[1:] if rows and [c.strip() for c in rows[0]] == ["filename", "score"] else rows  # a header
        bad = [k + 1 for k, r in enumerate(rows) if r and len(r) != 2]
        if bad:
            raise ScoringError(f"predictions file {pred_path}: lines {bad[:5]} are not 'filename,score'")
        preds = [{"filename": r[0], "score": r[1]} for r in rows if r]
    else:
        preds = read_csv_table(pred_path, ["filename", "score"], "predictions")
    refs = read_csv_table(ref_path, ["filename", "hybrid_stat", "ssp_indicator"], "reference labels")
    pairs = align_by_id(preds, refs, "filename")
    scores = np.array([parse_score(p["score"], p["filename"]) for p, _ in pairs])
    labels = np.array([int(r["hybrid_stat"]) for _, r in pairs])
    group = np.array([r["ssp_indicator"] for _, r in pairs])
    unknown = sorted(set(group) - {"major", "minor", "mimic"})
    if unknown:
        raise ScoringError(f"reference ssp_indicator values {unknown} are not major/minor/mimic")
    species_a, mimic = group != "mimic", group == "mimic"
    called_a = _hybrid_set_scores(scores[species_a], labels[species_a])
    called_mimic = _hybrid_set_scores(scores[mimic], labels[mimic])
    ga, la, sa = group[species_a], labels[species_a], scores[species_a]
    major, minor = ga == "major", ga == "minor"
    out = {
        "A_score_major_recall": recall(called_a[major], la[major]),
        "A_score_minor_recall": recall(called_a[minor], la[minor]),
        "mimic_recall": recall(called_mimic, labels[mimic]),
        "A_PRC_AUC": average_precision(sa, la),
        "A_PRC_AUC_major": average_precision(sa[major], la[major]),
        "A_PRC_AUC_minor": average_precision(sa[minor], la[minor]),
        "mimic_PRC_AUC": average_precision(scores[mimic], labels[mimic]),
    }
    out["challenge_score"] = harmonic_mean(
        [out["A_score_major_recall"], out["A_score_minor_recall"], out["mimic_recall"]])
    return out


def score_sealevel(pred_path: str, ref_path: str) -> dict[str, float]:
    """Sea level: 0.3 · F1 of 'any station anomalous that day' + 0.7 · mean per-station F1."""
    refs = read_csv_table(ref_path, ["date"], "reference labels")
    stations = [c for c in refs[0].keys() if c != "date"] if refs else []
    if not stations:
        raise ScoringError(f"reference labels {ref_path} have no station columns")
    preds = read_csv_table(pred_path, ["date", *stations], "predictions")
    pairs = align_by_id(preds, refs, "date")
    predicted = np.array([[parse_flag(p[s], p["date"], s) for s in stations] for p, _ in pairs])
    truth = np.array([[int(r[s]) for s in stations] for _, r in pairs])
    f1_day = f1(predicted.any(1), truth.any(1))
    per_station = [f1(predicted[:, j], truth[:, j]) for j in range(len(stations))]
    out = {"Final Grade": 0.3 * f1_day + 0.7 * float(np.mean(per_station)),
           "F1-Score": f1_day, "F1-Score with location": float(np.mean(per_station)),
           "precision_day": float((predicted.any(1) & truth.any(1)).sum() / max(predicted.any(1).sum(), 1)),
           "recall_day": recall(predicted.any(1), truth.any(1))}
    return out


SCORERS = {"gw": (score_gw, "labels.csv"), "butterfly": (score_butterfly, "ref.csv"),
           "sealevel": (score_sealevel, "labels.csv")}


#: The organisers' reference files.
ORGANISER_REFERENCES = {"gw": "ligo_bb_50.npz", "butterfly": "ref_*.csv"}


def _reference_file(challenge: str, ref_dir: str) -> str:
    """This kit's reference file in ``ref_dir``, else the organisers' (``ligo_bb_50.npz``, ``ref_*.csv``)."""
    import glob

    ours = os.path.join(ref_dir, SCORERS[challenge][1])
    if os.path.isfile(ours) or challenge not in ORGANISER_REFERENCES:
        return ours
    theirs = sorted(glob.glob(os.path.join(glob.escape(ref_dir), ORGANISER_REFERENCES[challenge])))
    if len(theirs) > 1:
        raise ScoringError(f"{ref_dir} holds several reference files {[os.path.basename(t) for t in theirs]}; "
                           "keep the one of this phase")
    return theirs[0] if theirs else ours


def score_folder(challenge: str, res_dir: str, ref_dir: str) -> dict[str, float]:
    """Score the predictions in ``res_dir`` against the reference labels in ``ref_dir``.

    Predictions: the first of ``PREDICTION_FILES[challenge]`` present (this kit's ingestion output, or the
    organisers' gw ``test.predictions``); reference: this kit's file, or the organisers' (gw
    ``ligo_bb_50.npz``, butterfly ``ref_*.csv``). An organiser's prediction file scores as on Codabench.
    """
    if challenge not in SCORERS:
        raise ScoringError(f"unknown challenge {challenge!r}; valid: {sorted(SCORERS)}")
    scorer, _ = SCORERS[challenge]
    names = PREDICTION_FILES[challenge]
    pred = next((os.path.join(res_dir, n) for n in names if os.path.lexists(os.path.join(res_dir, n))),
                os.path.join(res_dir, names[0]))
    ref = _reference_file(challenge, ref_dir)
    if challenge == "gw" and (pred.endswith(PREDICTION_FILES["gw"][1]) or ref.endswith(".npz")):
        if not pred.endswith(PREDICTION_FILES["gw"][1]):
            raise ScoringError("the organisers' ligo_bb_50.npz holds labels but no ids, so it scores only their "
                               "binarised test.predictions, not a predictions.csv")
        if ref.endswith(".npz"):
            labels = _organiser_gw_labels(ref)
        else:
            labels = np.array([int(r["label"]) for r in read_csv_table(ref, ["id", "label"], "reference labels")])
        return score_gw_binarised(pred, labels)
    return scorer(pred, ref)


def write_json_atomic(path: str, payload) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    """Codabench entry point: ``scoring.py INPUT_DIR OUTPUT_DIR --challenge NAME``."""
    args = list(sys.argv[1:] if argv is None else argv)
    challenge = None
    if "--challenge" in args:
        i = args.index("--challenge")
        challenge = args[i + 1]
        del args[i:i + 2]
    if len(args) != 2 or challenge is None:
        print("usage: scoring.py INPUT_DIR OUTPUT_DIR --challenge {gw,butterfly,sealevel}", file=sys.stderr)
        return 2
    input_dir, output_dir = args
    try:
        scores = score_folder(challenge, os.path.join(input_dir, "res"), os.path.join(input_dir, "ref"))
    except ScoringError as err:
        print(f"scoring failed: {err}", file=sys.stderr)
        return 1
    os.makedirs(output_dir, exist_ok=True)
    res = os.path.join(input_dir, "res", PREDICTION_FILES["gw"][0])
    ref = _reference_file(challenge, os.path.join(input_dir, "ref"))
    if challenge == "gw" and os.path.lexists(res) and not ref.endswith(".npz"):
        flags = gw_binarised_predictions(res, ref)  # the organisers' binarised file, beside the scores
        tmp = os.path.join(output_dir, f"{PREDICTION_FILES['gw'][1]}.tmp{os.getpid()}")
        with open(tmp, "w") as handle:
            handle.write("\n".join(str(v) for v in flags) + "\n")
        os.replace(tmp, os.path.join(output_dir, PREDICTION_FILES["gw"][1]))
    write_json_atomic(os.path.join(output_dir, "scores.json"), scores)
    print(json.dumps(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
