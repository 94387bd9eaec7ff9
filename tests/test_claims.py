"""Claim registry, verdicts and `kpflow reproduce`: synthetic measurements on both sides of every
criterion flip its verdict; tasks resume; a tiny smoke run of the command on two cheap claims."""

import dataclasses
import json
import math

import pytest
from typer.testing import CliRunner

from kpflow.cli import app
from kpflow.experiments.claims import (
    ClaimTask,
    all_of,
    claim_ids,
    get_claim,
    plan,
    registry,
    run_task,
    threshold_verdict,
)

# ------------------------------------------------------------------------------------- the verdict rule


def test_threshold_verdict_agree_disagree_inconclusive():
    assert threshold_verdict([3.0, 3.1, 2.9], 1.0).verdict == "agree"
    assert threshold_verdict([-3.0, -3.1, -2.9], 1.0).verdict == "disagree"
    assert threshold_verdict([0.0, 2.0, 1.0], 1.0).verdict == "inconclusive"  # within 2 SE
    assert threshold_verdict([3.0, 3.1, 2.9], 1.0, "below").verdict == "disagree"
    assert threshold_verdict([5.0], 1.0).verdict == "inconclusive"  # one seed has no standard error
    v = threshold_verdict([1.0, 2.0, math.nan, 3.0], 0.0)
    assert v.n == 3 and v.effect == pytest.approx(2.0) and v.se == pytest.approx(1 / math.sqrt(3))
    with pytest.raises(ValueError, match="direction"):
        threshold_verdict([1.0, 2.0], 0.0, "sideways")


def test_all_of_combines_parts():
    a = threshold_verdict([3.0, 3.1], 1.0)
    d = threshold_verdict([-3.0, -3.1], 1.0)
    i = threshold_verdict([0.0, 2.0], 1.0)
    assert all_of(a, a).verdict == "agree"
    assert all_of(a, d).verdict == "disagree"
    assert all_of(a, i).verdict == "inconclusive"
    assert all_of(a, i).effect == a.effect and len(all_of(a, i).parts) == 2


# ----------------------------------------------------------------- synthetic measurements per claim
# For each claim: measurements that satisfy its criterion (agree) and that contradict it (disagree),
# built from the keys its verdict reads, on both sides of the threshold fixed in its module.


def _seeds(n=5, **cols):
    """n measurements; each keyword is a value (or a per-seed list)."""
    out = []
    for k in range(n):
        out.append({key: (v[k] if isinstance(v, list) else v + 0.01 * k) for key, v in cols.items()})
    return out


SYNTHETIC = {
    "kp_gradient_flow": (_seeds(log10_rel_err=-9.0), _seeds(log10_rel_err=-1.0)),
    "kronecker_core": (_seeds(log10_worst_rel_err=-14.0), _seeds(log10_worst_rel_err=-2.0)),
    "first_bifurcation_pitchfork": (_seeds(pitchfork=1.0, log10_sharpness=1.5, nf_correlation=0.98),
                                    _seeds(pitchfork=[0.0, 0.0, 0.0, 0.0, 0.0], log10_sharpness=1.5,
                                           nf_correlation=0.98)),
    "first_bifurcation_orthogonal": (_seeds(pitchfork=1.0, log10_sharpness=1.5, nf_correlation=0.98),
                                     _seeds(pitchfork=1.0, log10_sharpness=-0.5, nf_correlation=0.98)),
    "collapse_over_gd": (_seeds(collapse_pr=3.0, collapse_modes95=2.0, K_erank_over_bound_max=0.01),
                         _seeds(collapse_pr=3.0, collapse_modes95=2.0, K_erank_over_bound_max=0.5)),
    "gain_shapes_collapse": (_seeds(collapse_difference=1.0, log2_K_pr_ratio=1.0),
                             _seeds(collapse_difference=-1.0, log2_K_pr_ratio=1.0)),
    "space_time_rank": (_seeds(rho_temporal=0.9, rho_spatial=0.9), _seeds(rho_temporal=0.9, rho_spatial=-0.2)),
    "self_referential_bias": (_seeds(log10_quad_ratio=1.0, log10_residual_ratio=0.3),
                              _seeds(log10_quad_ratio=-1.0, log10_residual_ratio=0.3)),
    "onesided_low_budget": (_seeds(A_log10_err_ratio=0.5, B_log10_err_ratio=0.3, A_log10_speedup_1pct=2.0),
                            _seeds(A_log10_err_ratio=0.5, B_log10_err_ratio=-0.3, A_log10_speedup_1pct=2.0)),
    "natural_gradient_spike": (_seeds(spike_reduction=0.3, cost_ratio=1.2),
                               _seeds(spike_reduction=0.3, cost_ratio=3.0)),
    "multitask_prediction": (_seeds(prediction_gain=0.8, rho_interference=0.7),
                             _seeds(prediction_gain=-0.8, rho_interference=0.7)),
    "init_dynamics_bias": (_seeds(log10_loss_ratio=0.5, log10_alignment_ratio=0.2),
                           _seeds(log10_loss_ratio=-0.5, log10_alignment_ratio=0.2)),
    "transformer_lowrank": tuple([{"largest_token_fraction": f + 0.01 * k,
                                   "rows": [{"d": d, "T": 25, "ntk_token_fraction": f + 0.01 * k} for d in (1, 16)]}
                                  for k in range(3)] for f in (0.1, 0.7)),
    "bifurcation_channel": (_seeds(amplification_rho=0.95, excess_rank_ratio=0.01),
                            _seeds(amplification_rho=0.95, excess_rank_ratio=0.5)),
    "lm_rich_lazy": (_seeds(effect=0.3, rich_ce_drop=1.0), _seeds(effect=-0.2, rich_ce_drop=1.0)),
    "lm_ntk_distillation": (_seeds(effect=0.2), _seeds(effect=-0.2)),
}


@pytest.mark.parametrize("claim_id", sorted(SYNTHETIC))
def test_verdict_flips_across_the_criterion(claim_id):
    good, bad = SYNTHETIC[claim_id]
    claim = get_claim(claim_id)
    assert claim.verdict(good).verdict == "agree"
    assert claim.verdict(bad).verdict == "disagree"
    assert claim.verdict(good[:1]).verdict == "inconclusive"


def test_every_registered_claim_has_a_synthetic_verdict_test():
    assert sorted(claim_ids()) == sorted(SYNTHETIC)


# ---------------------------------------------------------------------------------- plan / run / resume


def test_plan_orders_claims_and_seeds_and_rejects_bad_input():
    tasks = plan(["kronecker_core", "kp_gradient_flow"], 2, quick=True)
    assert tasks == [ClaimTask("kronecker_core", 0, "quick"), ClaimTask("kronecker_core", 1, "quick"),
                     ClaimTask("kp_gradient_flow", 0, "quick"), ClaimTask("kp_gradient_flow", 1, "quick")]
    assert [t.seed for t in plan(["kp_gradient_flow"], [3, 7])] == [3, 7]
    assert all(t.size == "full" for t in plan(["kp_gradient_flow"], 1))
    with pytest.raises(ValueError, match="valid claims"):
        plan(["no_such_claim"], 1)
    with pytest.raises(ValueError, match="at least 1"):
        plan(None, 0)


def test_run_task_writes_atomically_and_resumes(tmp_path, monkeypatch):
    task = ClaimTask("kp_gradient_flow", 0, "quick")
    calls = []
    claim = get_claim("kp_gradient_flow")
    fake = dataclasses.replace(claim, measure=lambda s, z: calls.append((s, z)) or {"log10_rel_err": -9.0})
    monkeypatch.setitem(registry.CLAIMS, "kp_gradient_flow", fake)
    rec = run_task(task, tmp_path)
    assert calls == [(0, "quick")] and rec["measurement"] == {"log10_rel_err": -9.0}
    path = task.path(tmp_path)
    assert json.loads(path.read_text())["task"] == {"claim": "kp_gradient_flow", "seed": 0, "size": "quick"}
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary file left
    run_task(task, tmp_path)
    assert len(calls) == 1  # finished: skipped
    path.write_text("{not json")
    run_task(task, tmp_path)
    assert len(calls) == 2  # damaged: measured again


def test_reproduce_command_smoke(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["reproduce", "--quick", "--only", "kp_gradient_flow,kronecker_core", "--seeds", "2",
                              "--out", str(tmp_path), "--quiet"])
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("claim=")]
    assert [ln.split()[0] for ln in lines] == ["claim=kp_gradient_flow", "claim=kronecker_core"]
    for ln in lines:
        fields = dict(kv.split("=") for kv in ln.split())
        assert fields["verdict"] in ("agree", "disagree", "inconclusive")
        float(fields["effect"]), float(fields["se"])
    page = (tmp_path / "report.html").read_text()
    assert "kp_gradient_flow" in page and "data:image/png;base64" in page
    summary = json.loads((tmp_path / "claims.json").read_text())
    assert set(summary["claims"]) == {"kp_gradient_flow", "kronecker_core"}
    assert "reproduce" in runner.invoke(app, ["--help"]).output  # registered on the app
    bad = runner.invoke(app, ["reproduce", "--only", "nope", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "valid ids" in bad.output


def test_planted_teacher_has_one_real_mode_at_one_visible_in_the_readout():
    import torch

    from kpflow.tasks import make_task

    task = make_task("student_teacher", hidden=12, teacher_spectrum="planted", rest_radius=0.4, teacher_seed=3)
    w = task.teacher_weights()
    lam, vec = torch.linalg.eig(w["W_base"].double())
    order = lam.abs().argsort(descending=True)
    assert abs(complex(lam[order[0]]) - 1.0) < 1e-5  # the planted mode: real, at +1
    assert torch.allclose(lam[order[1:]].abs(), torch.full((11,), 0.4, dtype=torch.float64), atol=1e-5)
    q = vec[:, order[0]].real
    u = w["W_out"][0].double() / w["W_out"][0].double().norm()
    assert abs(float(q @ u)) / float(q.norm()) == pytest.approx(2 ** -0.5, abs=1e-5)  # 45° to the readout
    ortho = make_task("student_teacher", hidden=12, teacher_seed=3).teacher_weights()
    assert torch.equal(ortho["W_in"], w["W_in"]) and torch.equal(ortho["W_out"], w["W_out"])
    with pytest.raises(ValueError, match="teacher_spectrum"):
        make_task("student_teacher", teacher_spectrum="random")
    with pytest.raises(ValueError, match="rest_radius"):
        make_task("student_teacher", teacher_spectrum="planted", rest_radius=1.5)
