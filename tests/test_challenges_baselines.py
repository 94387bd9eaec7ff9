"""Baseline building blocks against independent references, and one baseline end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kpflow.challenges.baselines import (
    SequenceAutoencoder,
    ntk_directions,
    ntk_scores,
    pca_fit,
    pca_residual,
    single_thread,
    train_autoencoder,
)


@pytest.fixture
def small_ae():
    return SequenceAutoencoder(input_dim=2, hidden=4, code=2, seed=0, dtype=torch.float64)


@pytest.mark.parametrize("prefixes", [("dec", "dec_ro"), ("enc", "enc_ro", "dec", "dec_ro")])
def test_gradient_features_equal_per_sample_autograd(small_ae, prefixes):
    """φ(x) from vmap(grad) equals torch.autograd.grad of each sample's loss, one at a time (float64)."""
    x = torch.randn(5, 6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    params = small_ae.params()
    features = small_ae.gradient_features(params, x, chunk=2, prefixes=prefixes)
    names = [k for k in params if k.split(".", 1)[0] in prefixes]
    for i in range(x.shape[0]):
        loss = small_ae.losses(params, x[i:i + 1])[0]
        grads = torch.autograd.grad(loss, [params[k] for k in names])
        reference = torch.cat([g.reshape(-1) for g in grads])
        torch.testing.assert_close(features[i], reference, rtol=1e-10, atol=1e-12)


def test_gradient_features_match_finite_differences(small_ae):
    """⟨φ(x), v⟩ equals the central difference of f(x; θ + h v) along a random direction v."""
    x = torch.randn(1, 6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    params = {k: v.detach() for k, v in small_ae.params().items()}
    phi = small_ae.gradient_features(params, x)[0]
    names = [k for k in params if k.split(".", 1)[0] in ("dec", "dec_ro")]
    v = torch.randn(phi.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    h = 1e-6

    def shifted(sign):
        out, offset = dict(params), 0
        for k in names:
            n = params[k].numel()
            out[k] = params[k] + sign * h * v[offset:offset + n].reshape(params[k].shape)
            offset += n
        return small_ae.losses(out, x)[0]

    fd = (shifted(1) - shifted(-1)) / (2 * h)
    assert float(phi @ v) == pytest.approx(float(fd), rel=1e-6, abs=1e-9)


def test_ntk_scores_against_a_dense_eigendecomposition():
    """Directions from the SVD of Φ equal the top eigenvectors of Φᵀ Φ; residual = ‖φ‖² − ‖V_kᵀ φ‖²."""
    gen = torch.Generator().manual_seed(0)
    background = torch.randn(30, 12, dtype=torch.float64, generator=gen) @ torch.diag(
        torch.linspace(3, 0.1, 12, dtype=torch.float64))
    directions, eigenvalues = ntk_directions(background, 4)
    evals, evecs = torch.linalg.eigh(background.T @ background)
    torch.testing.assert_close(eigenvalues, evals.flip(0)[:4], rtol=1e-10, atol=1e-10)
    projector = evecs[:, -4:] @ evecs[:, -4:].T
    torch.testing.assert_close(directions @ directions.T, projector, rtol=1e-9, atol=1e-9)
    test = torch.randn(7, 12, dtype=torch.float64, generator=gen)
    scores = ntk_scores(test, directions)
    torch.testing.assert_close(scores["ntk_diag"], (test ** 2).sum(1))
    expected = ((test ** 2).sum(1) - ((test @ evecs[:, -4:]) ** 2).sum(1)) / (test ** 2).sum(1)
    torch.testing.assert_close(scores["ntk_residual"], expected, rtol=1e-9, atol=1e-12)
    # a feature vector inside the span of the background NTK has zero residual
    inside = ntk_scores(directions[:, :2].T.contiguous(), directions)["ntk_residual"]
    assert torch.all(inside < 1e-20)


def test_pca_residual_is_the_squared_distance_to_the_principal_subspace():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(200, 6)) * np.array([5, 3, 1, 0.5, 0.2, 0.1])
    model = pca_fit(data, k=2)
    z = (data[:5] - model["mean"]) / model["std"]
    v = model["components"]
    assert np.allclose(v @ v.T, np.eye(2))
    assert np.allclose(pca_residual(data[:5], model), (z ** 2).sum(1) - ((z @ v.T) ** 2).sum(1))
    on_subspace = model["mean"] + (np.array([[1.0, -2.0]]) @ v) * model["std"]
    assert pca_residual(on_subspace, model)[0] == pytest.approx(0.0, abs=1e-20)


def test_gru_autoencoder_learns_structured_sequences():
    t = torch.linspace(0, 1, 10)
    phase = torch.rand(256, 1, generator=torch.Generator().manual_seed(0)) * 6.28
    data = torch.stack([torch.sin(4 * t + phase), torch.cos(4 * t + phase)], -1)
    model = SequenceAutoencoder(2, hidden=8, code=2, seed=0)
    with single_thread():
        history = train_autoencoder(model, data, steps=40, batch=32, lr=3e-2, seed=0, progress=False)
    assert np.mean(history[-5:]) < 0.5 * np.mean(history[:5])


def test_sealevel_kpflow_baseline_runs_as_a_submission(tmp_path):
    from kpflow.challenges import make_challenge
    from kpflow.challenges.baselines import build_sealevel
    from kpflow.challenges.runner import run_submission

    folder = tmp_path / "sealevel"
    make_challenge("sealevel", folder, seed=0, scale=0.05)
    subs = build_sealevel(folder, tmp_path / "subs", quick=True, progress=False)
    assert set(subs) == {"constant", "mean_sla_rule", "station_threshold", "kpflow_gru"}
    for name in ("station_threshold", "kpflow_gru"):
        entry = run_submission(folder, subs[name], phase="val", record=False, timeout_s=300, trusted=True)
        assert entry["status"] == "ok", entry.get("error")
        assert 0.0 <= entry["scores"]["Final Grade"] <= 1.0
