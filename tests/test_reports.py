"""Reports and first-hour messages (issue 14, "Reports" and "Messages"): labelled axes, a metrics table that
stays inside the page, effective ranks against the state dimension, captions for the bifurcation figures,
the sweep report's header / configuration / seed spread, the messages of `kpflow report`, its progress,
and the packaging defects. Each test names the defect it pins."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kpflow.cli import app
from kpflow.report import Dimensions, report_run, run_figures, write_report
from kpflow.report import figures as F
from kpflow.report.html import CAPTIONS, reading

ROOT = Path(__file__).resolve().parents[1]
METRICS = (["loss", "accuracy", "activity_dim", "ntk_init_alignment", "misdirection", "kernel_target_alignment"]
           + [f"{k}_{m}" for k in ("K", "PPstar", "NTK") for m in ("erank", "trace", "fro")]
           + [f"{k}_erank_{v}" for k in ("K", "PPstar", "NTK") for v in ("temporal", "spatial", "trial")]
           + [f"interference[{a},{b}]" for a in ("go", "anti") for b in ("go", "anti")])
DIMS = Dimensions(trials=3, steps=10, state=20, params=50)


def rows(steps=(0, 10, 20)):
    return [{"run": "r", "step": s, "metric": m, "value": 0.5 + 0.1 * i + 0.01 * s, "stderr": 0.01, "method": "test"}
            for s in steps for i, m in enumerate(METRICS)]


def test_every_figure_labels_its_y_axis(tmp_path, monkeypatch):
    # defect: several figures (axis ranks, trace and norm, interference) had no y-axis label
    seen = {}
    save = F._save

    def capture(fig, folder, stem):
        seen[stem] = [(ax.get_title(), ax.get_ylabel()) for ax in fig.axes]
        return save(fig, folder, stem)

    monkeypatch.setattr(F, "_save", capture)
    made = run_figures(rows(), [(1, 1.0), (2, 0.5)], tmp_path, dims=DIMS)
    assert {p.stem for p in made} == set(seen) == {"training", "effective_ranks", "axis_effective_ranks",
                                                   "trace_and_norm", "alignments", "interference"}
    unlabelled = [(stem, title) for stem, axes in seen.items() for title, ylabel in axes if not ylabel]
    assert unlabelled == []


def test_effective_ranks_are_drawn_and_read_against_the_state_dimension(tmp_path, monkeypatch):
    # defect: effective ranks were never put against the state dimension, so "low-rank" could not be judged
    texts = {}
    save = F._save

    def capture(fig, folder, stem):
        texts[stem] = [t.get_text() for ax in fig.axes for t in ax.texts]
        return save(fig, folder, stem)

    monkeypatch.setattr(F, "_save", capture)
    run_figures(rows(), [], tmp_path, dims=DIMS)
    assert "state dimension N = B·T·H = 600" in texts["effective_ranks"]
    assert "K's rank bound min(N, #params) = 50" in texts["effective_ranks"]
    assert {"dimension 30", "dimension 20", "dimension 3"} <= set(texts["axis_effective_ranks"])
    sentence = [p for p in reading(rows(), [], DIMS) if p.startswith("Against what the ranks could be")]
    assert len(sentence) == 1
    last_k = next(r["value"] for r in rows() if r["metric"] == "K_erank" and r["step"] == 20)
    assert f"K {last_k:.3g} of at most 50 ({100 * last_k / 50:.2g}%)" in sentence[0]
    assert "N = B·T·H = 3·10·20 = 600" in sentence[0]


def test_the_metrics_table_scrolls_inside_the_page(tmp_path):
    # defect: the metrics table (one column per checkpoint) overflowed the page
    doc = write_report(tmp_path / "r.html", title="t", rows=rows(steps=range(0, 400, 10)), figures=[],
                       config_text="", notes=["n"]).read_text()
    assert ".scroll{max-width:100%;overflow-x:auto}" in doc
    tables = doc.count("<table>")
    assert doc.count("<div class='scroll'><table>") + doc.count("<div class='scroll wrap'><table>") == tables - 1
    assert "<th>step 390</th>" in doc  # (the environment table is the one left: two columns)


def test_every_bifurcation_figure_has_a_caption():
    # defect: the bifurcation report's figure captions were empty
    source = (ROOT / "src" / "kpflow" / "experiments" / "bifurcation.py").read_text()
    stems = set(re.findall(r'_save\(fig, folder, "(\w+)"\)', source))
    assert stems and all(CAPTIONS.get(s) for s in stems), stems - set(CAPTIONS)


def test_sweep_report_header_configuration_and_seed_spread(tmp_path):
    # defects: the sweep table said "step 0" above initial and final values, the configuration showed one g
    from kpflow.experiments.pipeline import sweep_configs, write_sweep_report
    from kpflow.training import validate_config

    base = validate_config({"name": "sw", "out": str(tmp_path)})
    cfgs = sweep_configs(base, [0.5, 2.0], [0, 1])
    for c in cfgs:
        c.run_dir.mkdir(parents=True)
        with open(c.run_dir / "metrics.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["run", "step", "metric", "value", "stderr", "method"])
            w.writeheader()
            for step in (0, 10):
                for key in ("K_erank", "PPstar_erank", "NTK_erank"):
                    w.writerow({"run": c.name, "step": step, "metric": key, "stderr": 0.0, "method": "m",
                                "value": 1 + step + 3 * c.model.g + c.seed})
    doc = write_sweep_report(tmp_path / "sw_sweep", cfgs, base).read_text()
    table = doc[doc.index("<h2>Metrics</h2>"):doc.index("<h2>Configuration</h2>")]
    assert "step 0" not in table and "<th>g = 0.5</th>" in table and "<th>g = 2</th>" in table
    # initial K over seeds 0, 1: g = 0.5 gives 2.5 and 3.5 (mean 3), g = 2 gives 7 and 8 (mean 7.5); s/√n = 0.5
    assert "<tr><td>K_erank_initial (mean over seeds)</td><td>3 ± 0.5</td><td>7.5 ± 0.5</td></tr>" in table
    config = doc[doc.index("<h2>Configuration</h2>"):doc.index("<h2>Environment</h2>")]
    assert "model.g: [0.5, 2.0]" in config and "seed: [0, 1]" in config


# ------------------------------------------------------------------------------------------------ messages
def test_report_on_a_missing_or_untrained_folder_says_to_train(tmp_path):
    # defect: `kpflow report` on a missing folder suggested `kpflow analyze`, which then failed too
    with pytest.raises(FileNotFoundError, match="does not exist; train a run first") as err:
        report_run(tmp_path / "nope")
    assert "analyze" not in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no checkpoint to measure; train it first with `kpflow run`"):
        report_run(tmp_path / "empty")
    r = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "train a run first" in r.output


def test_report_shows_progress(tmp_path, capsys):
    # defect: `kpflow report` showed no progress
    run_figures(rows(), [], tmp_path, progress=True)
    assert re.search(r"report: 100%.*6/6", capsys.readouterr().err)


# ------------------------------------------------------------------------------------------------ packaging
def test_license_is_an_spdx_string():
    # defect: setuptools printed a license-table deprecation block into the first run
    try:
        import tomllib
    except ImportError:  # pragma: no cover - python 3.10
        import tomli as tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"
    assert any(r.startswith("setuptools>=77") for r in project["build-system"]["requires"])


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_folders_the_readme_commands_create_are_ignored():
    # defect: challenges/ made by the README's own command was not ignored by git
    def ignored(path):
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0

    assert ignored("challenges/gw/starting_kit/model.py") and ignored("runs/flipflop/config.yaml")
    assert not ignored("src/kpflow/challenges/cli.py")


def _legends_clear_of_the_data(fig) -> list[str]:
    fig.canvas.draw()
    return [ax.get_title() or ax.get_ylabel() for ax in fig.axes
            if ax.get_legend() is not None and ax.get_legend().get_window_extent().overlaps(ax.get_window_extent())]


def test_nothing_drawn_falls_outside_the_saved_figure(tmp_path, monkeypatch):
    # the figures are saved without bbox_inches="tight" (one layout pass): every artist, the legends outside
    # the axes included, must lie inside the figure the layout engine filled
    import kpflow.experiments.pipeline  # noqa: F401  (the sweep figures use the same save_figure)

    outside = {}
    save = F._save

    def capture(fig, folder, stem):
        path = save(fig, folder, stem)  # saved first: the layout is the one written to disk
        box, page = fig.get_tightbbox(), fig.bbox_inches
        outside[stem] = [round(v, 3) for v in (box.x0, box.y0, page.x1 - box.x1, page.y1 - box.y1) if v < -0.01]
        return path

    monkeypatch.setattr(F, "_save", capture)
    run_figures(rows(), [(1, 1.0), (2, 0.5)], tmp_path, dims=DIMS)
    assert set(outside) >= {"training", "effective_ranks", "axis_effective_ranks", "trace_and_norm", "alignments",
                            "interference"}
    assert {stem: v for stem, v in outside.items() if v} == {}
    assert all((tmp_path / f"{stem}.svg").stat().st_size > 0 for stem in outside)


def test_legends_do_not_cover_the_data(tmp_path, monkeypatch):
    # defect: the bifurcation report's legends overlapped the data (and so did the run report's)
    import kpflow.experiments.bifurcation as bif

    covering = {}
    for module in (F, bif):
        save = module._save

        def capture(fig, folder, stem, save=save):
            covering[stem] = _legends_clear_of_the_data(fig)
            return save(fig, folder, stem)

        monkeypatch.setattr(module, "_save", capture)
    run_figures(rows(), [(1, 1.0), (2, 0.5)], tmp_path / "run", dims=DIMS)
    metrics = ["ntk_erank", "ntk_erank_temporal", "ntk_erank_spatial", "channel_trace_fraction",
               "channel_frobenius_fraction", "top_direction_fraction", "loss",
               "origin_abs_lambda1", "origin_abs_lambda2", "origin_abs_lambda3"]
    bif_rows = [{"step": s, "metric": m, "value": 0.2 + 0.01 * s, "stderr": 0.01} for s in (0, 10, 20) for m in metrics]
    bif._figures(bif_rows, {"first_bifurcation_step": 10, "first_bifurcation_kind": "pitchfork"}, None, None,
                 tmp_path / "bif")
    assert {"bifurcation_sntk_erank", "bifurcation_origin_spectrum", "bifurcation_channel", "effective_ranks"} <= \
        set(covering)
    assert {stem: axes for stem, axes in covering.items() if axes} == {}
