"""Baselines of the three challenges, each written as a real code submission folder.

Per challenge: a *trivial* baseline (constant scores / the organisers' demo rule), a *classical* one
(numpy only: PCA residual of simple features, or per-station thresholds), and a *kpflow* one built
from kpflow recurrent models and gradient (empirical-NTK) features:

* ``SequenceAutoencoder``: kpflow ``GRU`` encoder -> code (its readout) -> kpflow ``GRU`` decoder
  fed the code at every step -> readout = reconstruction. Sequences: GW windows as 20 frames of 10
  samples x 2 detectors; butterfly images as 16 rows of 16 RGB pixels. Trained on normal data
  (background / non-hybrids); for GW also a GWAK-style autoencoder of the signal classes, whose
  negated reconstruction error is the score (windows it reconstructs well look like signals).
* Scores of a window x with scalar loss ``f(x; θ) = mean (x − x̂)²``:
  ``recon`` = f(x); ``ntk_diag`` = Θ(x, x) = ‖∂f/∂θ‖² (the empirical NTK diagonal, GradNorm-like);
  ``ntk_residual`` = ‖(I − V_k V_kᵀ) φ(x)‖² / ‖φ(x)‖² with φ = ∂f/∂θ and V_k the top-k eigen-directions
  of the background NTK (right singular vectors of the background gradient-feature matrix Φ, whose
  Gram Φ Φᵀ is the NTK Gram matrix) — the GradPCA idea (Seleznova et al. 2025). θ here is the
  decoder's parameters (features stop at the code, which keeps them cheap).
* Sea level: a kpflow ``GRU`` classifier over the last 7 days of station-local SLA, thresholds per
  station tuned for F1 on the training years.

``build_baselines(challenge_dir, out_dir)`` trains everything on ``train/`` and writes one submission
folder per baseline; run them with :func:`kpflow.challenges.runner.run_submission`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from kpflow.challenges.common import atomic_write_json, atomic_write_text

# ----------------------------------------------------------------------------- shared numpy tools


def pca_fit(features: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Mean, scale and top-k principal directions of standardised ``features`` [N, D]."""
    mean, std = features.mean(0), features.std(0) + 1e-8
    z = (features - mean) / std
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    return {"mean": mean, "std": std, "components": vt[:k]}


def pca_residual(features: np.ndarray, model: dict[str, np.ndarray]) -> np.ndarray:
    """Squared norm of the standardised features outside the PCA subspace: ‖(I − V Vᵀ) z‖²."""
    z = (features - model["mean"]) / model["std"]
    return ((z - (z @ model["components"].T) @ model["components"]) ** 2).sum(1)


def gw_band_features(x: np.ndarray, bands: int = 25) -> np.ndarray:
    """Log band powers per detector and the zero-lag H1-L1 correlation of normalised windows [N, T, 2]."""
    spec = np.abs(np.fft.rfft(x, axis=1)) ** 2                     # [N, F, 2]
    edges = np.linspace(0, spec.shape[1], bands + 1).astype(int)
    power = np.stack([spec[:, a:b].mean(1) for a, b in zip(edges[:-1], edges[1:], strict=True)], 1)
    corr = (x[..., 0] * x[..., 1]).mean(1, keepdims=True)
    peak = np.log((x ** 2).mean(2).max(1, keepdims=True))
    return np.concatenate([np.log(power.reshape(len(x), -1) + 1e-8), corr, peak], 1)


def gw_frames(x: np.ndarray, frame: int = 10) -> np.ndarray:
    """[N, 200, 2] windows -> [N, 20, 2 * frame] sequences of 10-sample frames of both detectors."""
    x = np.asarray(x, dtype=np.float32)
    n, t, d = x.shape
    return x.reshape(n, t // frame, frame * d)


def gw_spectrogram(x: np.ndarray, frame: int = 40, hop: int = 10, bands: int = 7) -> np.ndarray:
    """[N, 200, 2] windows -> [N, 17, 2 * bands] log band powers of Hann-windowed 40-sample frames."""
    x = np.asarray(x, dtype=np.float64)
    starts = range(0, x.shape[1] - frame + 1, hop)
    frames = np.stack([x[:, s:s + frame] for s in starts], 1) * np.hanning(frame)[None, None, :, None]
    power = np.abs(np.fft.rfft(frames, axis=2)) ** 2                    # [N, F, 21, 2]
    power = power[:, :, :3 * bands].reshape(len(x), len(starts), bands, 3, 2).mean(3)
    return np.log(power + 1e-6).reshape(len(x), len(starts), -1).astype(np.float32)


def image_features(image, size: int = 16) -> np.ndarray:
    """A PIL image resized to ``size`` x ``size``, RGB in [0, 1], flattened row-major."""
    return np.asarray(image.convert("RGB").resize((size, size)), dtype=np.float32).reshape(-1) / 255.0


def best_f1_threshold(values: np.ndarray, labels: np.ndarray) -> float:
    """The threshold on ``values`` (flag if >=) that maximises F1 on (values, labels)."""
    from kpflow.challenges.scoring import f1

    candidates = np.unique(np.quantile(values, np.linspace(0.5, 0.999, 200)))
    scores = [f1(values >= t, labels) for t in candidates]
    return float(candidates[int(np.argmax(scores))])


def local_sla(sla_days: np.ndarray, cells: list[tuple[int, int]], radius: int = 1) -> np.ndarray:
    """Mean SLA in a (2r+1)² box of ocean cells around each station: [D, lat, lon] -> [D, stations]."""
    out = np.empty((sla_days.shape[0], len(cells)), np.float32)
    for s, (i, j) in enumerate(cells):
        box = sla_days[:, max(i - radius, 0):i + radius + 1, max(j - radius, 0):j + radius + 1]
        out[:, s] = np.nanmean(box.reshape(len(box), -1), 1)
    return out


# ----------------------------------------------------------------------------- kpflow models
def _torch():
    import torch

    return torch


class single_thread:
    """Run small models on one intra-op thread (much faster than spinning threads for tiny ops)."""

    def __enter__(self):
        torch = _torch()
        self.before = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        _torch().set_num_threads(self.before)


class SequenceAutoencoder:
    """GRU encoder -> code -> GRU decoder autoencoder on [B, T, I] sequences (pure in its params)."""

    def __init__(self, input_dim: int, hidden: int = 16, code: int = 4, seed: int = 0, dtype=None):
        torch = _torch()
        from kpflow.models import GRU

        torch.manual_seed(seed)
        dtype = dtype or torch.float32
        self.encoder = GRU(input_dim, hidden, output_dim=code, dtype=dtype)
        self.decoder = GRU(code, hidden, output_dim=input_dim, dtype=dtype)
        self.input_dim, self.hidden, self.code = input_dim, hidden, code

    def params(self) -> dict:
        """All trainable tensors by flat name (enc.*, enc_ro.*, dec.*, dec_ro.*)."""
        out = {}
        for prefix, model in (("enc", self.encoder), ("dec", self.decoder)):
            out |= {f"{prefix}.{k}": v for k, v in model.cell_params().items()}
            out |= {f"{prefix}_ro.{k}": v for k, v in model.readout_params().items()}
        return out

    @staticmethod
    def _split(params, prefix):
        return {k.split(".", 1)[1]: v for k, v in params.items() if k.split(".", 1)[0] == prefix}

    def reconstruct(self, params: dict, x):
        """x̂ for x [B, T, I]."""
        states = self.encoder.unroll(self._split(params, "enc"), x)
        code = self.encoder.output(states[:, -1], self._split(params, "enc_ro"))
        dec_in = code[:, None, :].expand(-1, x.shape[1], -1)
        return self.decoder.output(self.decoder.unroll(self._split(params, "dec"), dec_in),
                                   self._split(params, "dec_ro"))

    def losses(self, params: dict, x):
        """Per-sequence reconstruction error f(x; θ) = mean (x − x̂)², shape [B]."""
        return ((x - self.reconstruct(params, x)) ** 2).mean(dim=(1, 2))

    def gradient_features(self, params: dict, x, chunk: int = 128, prefixes=("dec", "dec_ro")):
        """φ(x) = ∂f(x; θ)/∂θ_D for every sequence, flattened: [B, P_D] (torch.func.vmap of grad).

        θ_D = the parameters whose name starts with one of ``prefixes`` (default: the decoder), so the
        backward pass stops at the code and the features stay cheap.
        """
        torch = _torch()
        from torch.func import grad, vmap

        detached = {k: v.detach() for k, v in params.items()}
        chosen = {k: v for k, v in detached.items() if k.split(".", 1)[0] in prefixes}
        fixed = {k: v for k, v in detached.items() if k not in chosen}

        def single(p, xi):
            return self.losses({**fixed, **p}, xi[None])[0]

        per_sample = vmap(grad(single), in_dims=(None, 0))
        rows = []
        for lo in range(0, x.shape[0], chunk):
            g = per_sample(chosen, x[lo:lo + chunk])
            rows.append(torch.cat([g[k].reshape(g[k].shape[0], -1) for k in chosen], 1))
        return torch.cat(rows)

    def state_dict(self) -> dict:
        return {k: v.detach().contiguous() for k, v in self.params().items()}

    def load_state_dict(self, tensors: dict) -> None:
        torch = _torch()
        with torch.no_grad():
            for k, v in self.params().items():
                v.copy_(tensors[k])


def train_autoencoder(model: SequenceAutoencoder, data, steps: int = 300, batch: int = 32, lr: float = 1e-2,
                      seed: int = 0, progress: bool = True) -> list[float]:
    """Adam on the mean reconstruction error of random mini-batches of ``data`` [N, T, I]."""
    torch = _torch()
    from tqdm import tqdm

    params = model.params()
    optimizer = torch.optim.Adam(params.values(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    history = []
    for _ in tqdm(range(steps), desc="train GRU autoencoder", disable=not progress, leave=False):
        idx = torch.randint(0, data.shape[0], (batch,), generator=generator)
        loss = model.losses(params, data[idx]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
    return history


def ntk_directions(features, k: int):
    """Top-k eigen-directions V_k [P, k] of the background NTK Φᵀ Φ (right singular vectors of Φ)."""
    torch = _torch()
    _, s, vh = torch.linalg.svd(features, full_matrices=False)
    return vh[:k].T.contiguous(), s[:k] ** 2


def ntk_scores(features, directions) -> dict:
    """NTK diagonal ‖φ‖² and relative residual ‖(I − V Vᵀ) φ‖² / ‖φ‖² of gradient features [B, P]."""
    diag = (features ** 2).sum(1)
    residual = ((features - (features @ directions) @ directions.T) ** 2).sum(1)
    return {"ntk_diag": diag, "ntk_residual": residual / diag.clamp_min(1e-30)}


class AutoencoderScorer:
    """Loads a trained SequenceAutoencoder + background NTK directions; scores sequences [N, T, I]."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def load(self):
        from safetensors.torch import load_file

        config = json.loads((self.folder / "config.json").read_text())
        self.score_name = config["score"]
        self.model = SequenceAutoencoder(config["input_dim"], config["hidden"], config["code"])
        tensors = load_file(str(self.folder / "weights.safetensors"))
        self.model.load_state_dict(tensors)
        self.directions = tensors["ntk_directions"]
        self.input_mean, self.input_std = tensors.get("input_mean"), tensors.get("input_std")
        return self

    def scores(self, sequences: np.ndarray) -> np.ndarray:
        torch = _torch()
        torch.set_num_threads(1)  # runs inside the submission's own process
        x = torch.as_tensor(np.asarray(sequences, dtype=np.float32))
        if self.input_mean is not None:
            x = (x - self.input_mean) / self.input_std
        params = self.model.params()
        if self.score_name in ("recon", "neg_recon"):
            with torch.no_grad():
                error = self.model.losses(params, x).numpy().astype(np.float64)
            return error if self.score_name == "recon" else -error
        features = self.model.gradient_features(params, x)
        return ntk_scores(features, self.directions)[self.score_name].numpy().astype(np.float64)


# ----------------------------------------------------------------------------- submission writers
_AE_MODEL_PY = '''"""kpflow baseline ({title}): GRU autoencoder trained on normal data, score = {score}."""

import os

import numpy as np

from kpflow.challenges.baselines import AutoencoderScorer{extra_import}


class Model:
    def load(self):
        self.scorer = AutoencoderScorer(os.path.dirname(os.path.abspath(__file__))).load()

    def predict(self, {arg}):
{body}
'''

_NUMPY_MODEL_PY = '''"""Classical baseline ({title}), numpy only."""

import os

import numpy as np


class Model:
    def load(self):
        w = np.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights.npz"))
        self.w = {{k: w[k] for k in w.files}}

    def predict(self, {arg}):
{body}
'''

_CONSTANT_MODEL_PY = '''"""Trivial baseline: the same answer for every input."""


class Model:
    def load(self):
        pass

    def predict(self, x):
        {body}
'''

_GW_PCA_BODY = '''        from kpflow.challenges.baselines import gw_band_features, pca_residual

        return pca_residual(gw_band_features(np.asarray(X, dtype=np.float64)), self.w)'''

_BF_PCA_BODY = '''        from kpflow.challenges.baselines import image_features, pca_residual

        return float(pca_residual(image_features(image)[None].astype(np.float64), self.w)[0])'''

_SL_THRESHOLD_BODY = '''        from kpflow.challenges.baselines import local_sla

        cells = [tuple(c) for c in self.w["cells"]]
        values = local_sla(np.asarray(sla_day).reshape(1, *np.shape(sla_day)[-2:]), cells)[0]
        return [int(v >= t) for v, t in zip(values, self.w["thresholds"])]'''

_SL_GRU_MODEL_PY = '''"""kpflow baseline: GRU over the last days of station-local SLA, per-station thresholds."""

import os

from kpflow.challenges.baselines import StationGRUScorer


class Model:
    def load(self):
        self.scorer = StationGRUScorer(os.path.dirname(os.path.abspath(__file__))).load()

    def predict(self, sla_day):
        return self.scorer.flags(sla_day)
'''


def _write_submission(folder: Path, model_py: str, npz: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "model.py", model_py)
    if npz is not None:
        np.savez(folder / "weights.npz", **npz)
    return folder


def _save_autoencoder(folder: Path, model: SequenceAutoencoder, directions, score: str, title: str, arg: str,
                      body: str, extra_import: str = "", stats: dict | None = None) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({**model.state_dict(), "ntk_directions": directions.contiguous(), **(stats or {})},
              str(folder / "weights.safetensors"))
    atomic_write_json(folder / "config.json", {"input_dim": model.input_dim, "hidden": model.hidden,
                                               "code": model.code, "score": score})
    return _write_submission(folder, _AE_MODEL_PY.format(title=title, score=score, arg=arg, body=body,
                                                         extra_import=extra_import))


def _fit_autoencoder(sequences: np.ndarray, steps: int, n_background: int, k: int, seed: int, progress: bool):
    torch = _torch()
    data = torch.as_tensor(sequences, dtype=torch.float32)
    model = SequenceAutoencoder(data.shape[-1], hidden=16, code=4, seed=seed)
    history = train_autoencoder(model, data, steps=steps, seed=seed, progress=progress)
    subset = data[torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(seed))[:n_background]]
    directions, _ = ntk_directions(model.gradient_features(model.params(), subset), k)
    return model, directions, history


def build_gw(challenge_dir: Path, out: Path, quick: bool = False, seed: int = 0, progress: bool = True) -> dict:
    """GW baselines: constant, PCA residual of band powers, GRU-AE (recon, NTK diag, NTK residual)."""
    from kpflow.challenges.gw import TRAIN_FILES, normalise

    train = Path(challenge_dir) / "train"
    with np.load(train / "background.npz") as archive:
        background = normalise(archive["data"])
    out = Path(out)
    subs = {"constant": _write_submission(out / "constant", _CONSTANT_MODEL_PY.format(
        body="import numpy as np\n\n        return np.zeros(len(x))"))}
    features = gw_band_features(background.astype(np.float64))
    subs["pca_residual"] = _write_submission(out / "pca_residual", _NUMPY_MODEL_PY.format(
        title="PCA residual of log band powers", arg="X", body=_GW_PCA_BODY), pca_fit(features, k=8))
    steps = 40 if quick else 300
    torch = _torch()
    spec_bg = gw_spectrogram(background)
    stats = {"input_mean": torch.as_tensor(spec_bg.mean((0, 1))), "input_std": torch.as_tensor(spec_bg.std((0, 1)))}
    standardised = (spec_bg - stats["input_mean"].numpy()) / stats["input_std"].numpy()
    body = "        return self.scorer.scores(gw_spectrogram(X))"
    model, directions, _ = _fit_autoencoder(standardised, steps, 128 if quick else 384, 32, seed, progress)
    for score in ("recon", "ntk_diag", "ntk_residual"):
        subs[f"kpflow_{score}"] = _save_autoencoder(out / f"kpflow_{score}", model, directions, score,
                                                    "gravitational waves, trained on background", "X", body,
                                                    extra_import=", gw_spectrogram", stats=stats)
    # supervised: a kpflow GRU classifier of background vs the training signals (as the winning entries)
    signals = normalise(np.concatenate([np.load(train / TRAIN_FILES[k]) for k in ("bbh", "sglf")]))
    x = np.concatenate([standardised, (gw_spectrogram(signals) - stats["input_mean"].numpy())
                        / stats["input_std"].numpy()])
    y = np.r_[np.zeros(len(standardised)), np.ones(len(signals))]
    subs["kpflow_gru_classifier"] = _train_classifier(out / "kpflow_gru_classifier", x, y, steps, seed, progress,
                                                      stats, "gw_spectrogram(X)", "X", ", gw_spectrogram")
    return subs


class SequenceClassifier:
    """kpflow GRU over a sequence [B, T, I]; the readout of the last state is the logit(s)."""

    def __init__(self, input_dim: int, outputs: int = 1, hidden: int = 32, seed: int = 0):
        torch = _torch()
        from kpflow.models import GRU

        torch.manual_seed(seed)
        self.gru = GRU(input_dim, hidden, output_dim=outputs)

    def logits(self, x):
        return self.gru(x)[1][:, -1]


_CLASSIFIER_MODEL_PY = '''"""kpflow baseline: GRU sequence classifier trained on the training signals and background."""

import os

import numpy as np

from kpflow.challenges.baselines import ClassifierScorer{extra_import}


class Model:
    def load(self):
        self.scorer = ClassifierScorer(os.path.dirname(os.path.abspath(__file__))).load()

    def predict(self, {arg}):
        return self.scorer.scores({features})
'''


class ClassifierScorer:
    """Loads a SequenceClassifier (+ input standardisation); scores = its logit."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def load(self):
        from safetensors.torch import load_file

        torch = _torch()
        torch.set_num_threads(1)  # runs inside the submission's own process
        config = json.loads((self.folder / "config.json").read_text())
        tensors = load_file(str(self.folder / "weights.safetensors"))
        self.model = SequenceClassifier(config["input_dim"], 1, config["hidden"])
        with torch.no_grad():
            for k, v in self.model.gru.named_parameters():
                v.copy_(tensors[k])
        self.mean, self.std = tensors["input_mean"], tensors["input_std"]
        return self

    def scores(self, sequences) -> np.ndarray:
        torch = _torch()
        x = (torch.as_tensor(np.asarray(sequences, dtype=np.float32)) - self.mean) / self.std
        with torch.no_grad():
            return self.model.logits(x)[:, 0].numpy().astype(np.float64)


def _train_classifier(folder: Path, x: np.ndarray, y: np.ndarray, steps: int, seed: int, progress: bool,
                      stats: dict, features: str, arg: str, extra_import: str) -> Path:
    """Balanced-BCE training of a SequenceClassifier; writes a submission folder."""
    torch = _torch()
    from safetensors.torch import save_file
    from tqdm import tqdm

    clf = SequenceClassifier(x.shape[-1], 1, hidden=32, seed=seed)
    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    optimizer = torch.optim.Adam(clf.gru.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    pos_weight = torch.tensor(float((1 - y.mean()) / max(y.mean(), 1e-3)))
    for _ in tqdm(range(steps), desc="train GRU classifier", disable=not progress, leave=False):
        idx = torch.randint(0, len(xt), (64,), generator=generator)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(clf.logits(xt[idx])[:, 0], yt[idx],
                                                                    pos_weight=pos_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folder.mkdir(parents=True, exist_ok=True)
    save_file({**{k: v.detach().contiguous() for k, v in clf.gru.named_parameters()}, **stats},
              str(folder / "weights.safetensors"))
    atomic_write_json(folder / "config.json", {"input_dim": int(x.shape[-1]), "hidden": 32})
    return _write_submission(folder, _CLASSIFIER_MODEL_PY.format(extra_import=extra_import, arg=arg,
                                                                 features=features))


def _butterfly_train(challenge_dir: Path):
    from PIL import Image

    train = Path(challenge_dir) / "train"
    with open(train / "train.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    feats, labels = [], []
    for row in rows:
        with Image.open(train / "images" / row["filename"]) as image:
            feats.append(image_features(image))
        labels.append(int(row["hybrid_stat"]))
    return np.stack(feats), np.array(labels)


def build_butterfly(challenge_dir: Path, out: Path, quick: bool = False, seed: int = 0,
                    progress: bool = True) -> dict:
    """Butterfly baselines: constant, PCA residual of 16x16 pixels, GRU-AE over image rows, GRU classifier."""
    feats, labels = _butterfly_train(challenge_dir)
    normal = feats[labels == 0].astype(np.float64)
    out = Path(out)
    subs = {"constant": _write_submission(out / "constant", _CONSTANT_MODEL_PY.format(body="return 0.0"))}
    subs["pca_residual"] = _write_submission(out / "pca_residual", _NUMPY_MODEL_PY.format(
        title="PCA residual of 16x16 RGB pixels", arg="image", body=_BF_PCA_BODY), pca_fit(normal, k=16))
    rows = normal.reshape(len(normal), 16, 48).astype(np.float32)
    model, directions, _ = _fit_autoencoder(rows, 40 if quick else 300, min(len(rows), 128 if quick else 384), 32,
                                            seed, progress)
    body = ("        x = image_features(image).reshape(1, 16, 48)\n"
            "        return float(self.scorer.scores(x)[0])")
    for score in ("recon", "ntk_diag", "ntk_residual"):
        subs[f"kpflow_{score}"] = _save_autoencoder(out / f"kpflow_{score}", model, directions, score,
                                                    "butterflies", "image", body,
                                                    extra_import=", image_features")
    # supervised: a kpflow GRU over image rows, trained on non-hybrids vs the one training hybrid type
    torch = _torch()
    all_rows = feats.reshape(len(feats), 16, 48).astype(np.float32)
    stats = {"input_mean": torch.as_tensor(all_rows.mean((0, 1))), "input_std": torch.as_tensor(all_rows.std((0, 1)))}
    standardised = (all_rows - stats["input_mean"].numpy()) / stats["input_std"].numpy()
    subs["kpflow_gru_classifier"] = _train_classifier(
        out / "kpflow_gru_classifier", standardised, labels.astype(np.float64), 40 if quick else 300, seed, progress,
        stats, "image_features(image).reshape(1, 16, 48)", "image", ", image_features")
    return subs


# ----------------------------------------------------------------------------- sea level
HISTORY = 7


class StationGRUClassifier:
    """kpflow GRU over the last ``HISTORY`` days of 12 station-local SLA values -> 12 logits."""

    def __init__(self, n_stations: int, hidden: int = 32, seed: int = 0):
        torch = _torch()
        from kpflow.models import GRU

        torch.manual_seed(seed)
        self.gru = GRU(n_stations, hidden, output_dim=n_stations)

    def logits(self, x):
        states, outputs = self.gru(x)
        return outputs[:, -1]


def _windows(values: np.ndarray) -> np.ndarray:
    """[D, S] -> [D, HISTORY, S] trailing windows (the first days padded with the first value)."""
    padded = np.concatenate([np.repeat(values[:1], HISTORY - 1, 0), values])
    return np.stack([padded[d:d + HISTORY] for d in range(len(values))])


class StationGRUScorer:
    """Stateful predictor: keeps the last ``HISTORY`` days seen (the ingestion feeds days in order)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def load(self):
        from safetensors.torch import load_file

        w = np.load(self.folder / "weights.npz")
        self.cells = [tuple(c) for c in w["cells"]]
        self.mean, self.std, self.thresholds = w["mean"], w["std"], w["thresholds"]
        self.model = StationGRUClassifier(len(self.cells))
        tensors = load_file(str(self.folder / "weights.safetensors"))
        torch = _torch()
        with torch.no_grad():
            for k, v in self.model.gru.named_parameters():
                v.copy_(tensors[k])
        self.history: list[np.ndarray] = []
        torch.set_num_threads(1)  # runs inside the submission's own process
        return self

    def flags(self, sla_day) -> list[int]:
        torch = _torch()
        day = np.asarray(sla_day).reshape(1, *np.shape(sla_day)[-2:])  # (1, lat, lon) or (lat, lon)
        value = (local_sla(day, self.cells)[0] - self.mean) / self.std
        self.history = (self.history or [value] * (HISTORY - 1))[-(HISTORY - 1):] + [value]
        x = torch.as_tensor(np.stack(self.history)[None], dtype=torch.float32)
        with torch.no_grad():
            prob = torch.sigmoid(self.model.logits(x))[0].numpy()
        return [int(p >= t) for p, t in zip(prob, self.thresholds, strict=True)]


def build_sealevel(challenge_dir: Path, out: Path, quick: bool = False, seed: int = 0,
                   progress: bool = True) -> dict:
    """Sea-level baselines: all-zeros, the organisers' mean-SLA rule, per-station thresholds, GRU."""
    torch = _torch()
    from safetensors.torch import save_file
    from tqdm import tqdm

    from kpflow.challenges.sealevel import read_sla

    challenge_dir, out = Path(challenge_dir), Path(out)
    sla, _ = read_sla(challenge_dir / "train" / "sla_train.nc")
    with open(challenge_dir / "train" / "stations.csv", newline="") as handle:
        cells = [(int(r["i_lat"]), int(r["j_lon"])) for r in csv.DictReader(handle)]
    with open(challenge_dir / "train" / "labels.csv", newline="") as handle:
        labels = np.array([[int(v) for k, v in r.items() if k != "date"] for r in csv.DictReader(handle)])
    values = local_sla(sla, cells)
    subs = {"constant": _write_submission(out / "constant", _CONSTANT_MODEL_PY.format(body="return [0] * 12"))}
    mean_rule = (Path(__file__).parent / "starting_kit" / "sealevel" / "model.py").read_text()
    subs["mean_sla_rule"] = _write_submission(out / "mean_sla_rule", mean_rule)
    thresholds = np.array([best_f1_threshold(values[:, s], labels[:, s]) for s in range(len(cells))])
    subs["station_threshold"] = _write_submission(out / "station_threshold", _NUMPY_MODEL_PY.format(
        title="per-station threshold on local SLA, tuned for F1", arg="sla_day", body=_SL_THRESHOLD_BODY),
        {"cells": np.array(cells), "thresholds": thresholds})
    mean, std = values.mean(0), values.std(0) + 1e-8
    x = torch.as_tensor(_windows((values - mean) / std), dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.float32)
    clf = StationGRUClassifier(len(cells), seed=seed)
    optimizer = torch.optim.Adam(clf.gru.parameters(), lr=1e-2)
    pos_weight = ((1 - y.mean(0)) / y.mean(0).clamp_min(1e-3)).clamp(1, 20)
    generator = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(60 if quick else 400), desc="train GRU classifier", disable=not progress, leave=False):
        idx = torch.randint(0, len(x), (128,), generator=generator)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(clf.logits(x[idx]), y[idx],
                                                                    pos_weight=pos_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        prob = torch.sigmoid(clf.logits(x)).numpy()
    gru_thresholds = np.array([best_f1_threshold(prob[:, s], labels[:, s]) for s in range(len(cells))])
    folder = _write_submission(out / "kpflow_gru", _SL_GRU_MODEL_PY,
                               {"cells": np.array(cells), "mean": mean, "std": std, "thresholds": gru_thresholds})
    save_file({k: v.detach().contiguous() for k, v in clf.gru.named_parameters()},
              str(folder / "weights.safetensors"))
    subs["kpflow_gru"] = folder
    return subs


BUILDERS = {"gw": build_gw, "butterfly": build_butterfly, "sealevel": build_sealevel}


def build_baselines(challenge_dir: Path, out: Path, quick: bool = False, seed: int = 0,
                    progress: bool = True) -> dict[str, Path]:
    """Train the baselines of the challenge in ``challenge_dir`` and write their submission folders."""
    from kpflow.challenges.common import check_challenge_folder

    name = check_challenge_folder(challenge_dir)["name"]
    with single_thread():
        return BUILDERS[name](challenge_dir, out, quick=quick, seed=seed, progress=progress)
