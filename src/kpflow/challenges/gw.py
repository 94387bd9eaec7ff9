"""Gravitational-wave anomaly challenge: two-detector whitened strain windows, background vs signals.

Recipe (the organisers' recipe, with Gaussian noise standing in for real O3 strain):

1. Coloured Gaussian noise with the analytic Advanced-LIGO design PSD (Ajith 2011 fit to the
   zero-detuned high-power curve): ``S(f) = 1e-49 [x^-4.14 - 5 x^-2 + 111 (1 - x^2 + x^4/2)/(1 + x^2/2)]``,
   ``x = f / 245.4 Hz``, on 0.25 s segments at 4096 Hz, independently per detector (H1, L1).
2. Signals in strain, projected on both detectors with antenna patterns ``F+ h+ + Fx hx`` and an
   inter-site delay ``U(-10, 10) ms``; signal strength set by the optimal network SNR.
   * BBH: an approximate inspiral-merger-ringdown chirp (Newtonian inspiral frequency sweep with
     ``A ∝ f^{2/3}`` up to the ISCO frequency, a linear frequency ramp to the l=m=2 quasi-normal-mode
     frequency of the remnant (Berti et al. 2006 fits), then an exponentially damped ringdown).
   * SGLF: sine-Gaussian bursts, f ~ U(64, 512) Hz, Q ~ U(25, 75), τ = Q / (√2 π f).
   * Glitches (part of *background*): single-detector short sine-Gaussians, f ~ U(30, 400) Hz, Q ~ U(2, 10).
3. Whitening by the same PSD and a 30-1500 Hz band-pass (frequency domain), crop of 200 samples.

Files: the organisers' public training files ``train/background.npz`` (key ``data``),
``train/bbh_for_challenge.npy``, ``train/sglf_for_challenge.npy``, each ``(N, 2, 200)`` float32 (the
class is the file, as theirs; ``train/windows.csv`` indexes them with labels); hidden
``input_data/<phase>/data.npz`` with ``data`` and string ``ids`` (not the labels: the organisers'
``ligo_bb_50.npz`` keeps the 0/1 labels in ``ids`` beside the data, which would hand them to the
submission); labels in ``reference_data/<phase>/labels.csv`` (``id,label,kind``, in input order). The
ingestion program divides each sample by its per-detector standard deviation and transposes to
``(N, 200, 2)`` before ``Model.predict``, as theirs; it writes the raw scores, and the trusted scorer
makes the organisers' binarised ``test.predictions`` (their ingestion cuts with the labels).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from kpflow.challenges.common import (
    ChallengeSpec,
    ScoreColumn,
    atomic_write_bytes,
    child_rngs,
    scaled,
    write_csv,
)

SAMPLE_RATE = 4096.0
SEGMENT = 1024
WINDOW = 200
BAND = (30.0, 1500.0)
G_MSUN_OVER_C3 = 4.925491e-6  # seconds
DEFAULT_COUNTS = {
    "train": {"background": 4000, "bbh": 2000, "sglf": 2000},
    "val": {"background": 1500, "bbh": 750, "sglf": 750},
    "test": {"background": 1500, "bbh": 750, "sglf": 750},
}
GLITCH_FRACTION = 0.1
SNR_RANGE = (6.0, 20.0)
#: The organisers' public training files, one per class (also this kit's ``train/`` names).
TRAIN_FILES = {"background": "background.npz", "bbh": "bbh_for_challenge.npy", "sglf": "sglf_for_challenge.npy"}
GLITCH_SNR_RANGE = (6.0, 30.0)


def aligo_psd(f: np.ndarray, f_low: float = 10.0) -> np.ndarray:
    """One-sided analytic aLIGO design PSD (Ajith 2011), ``inf`` below ``f_low``."""
    f = np.asarray(f, dtype=np.float64)
    x = np.where(f > 0, f, 1.0) / 245.4
    s = 1e-49 * (x ** -4.14 - 5 * x ** -2 + 111 * (1 - x ** 2 + x ** 4 / 2) / (1 + x ** 2 / 2))
    return np.where(f >= f_low, s, np.inf)


def _frequencies() -> np.ndarray:
    return np.fft.rfftfreq(SEGMENT, 1.0 / SAMPLE_RATE)


def coloured_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """``(n, 2, SEGMENT)`` Gaussian noise with one-sided PSD ``aligo_psd`` (strain units)."""
    f = _frequencies()
    psd = aligo_psd(f)
    amp = np.sqrt(np.where(np.isfinite(psd), psd, 0.0) * SEGMENT * SAMPLE_RATE / 4.0)
    spec = (rng.standard_normal((n, 2, f.size)) + 1j * rng.standard_normal((n, 2, f.size))) * amp
    spec[..., 0] = 0.0
    spec[..., -1] = spec[..., -1].real * np.sqrt(2)
    return np.fft.irfft(spec, n=SEGMENT, axis=-1)


def whiten(strain: np.ndarray) -> np.ndarray:
    """Divide by the amplitude spectral density and band-pass ``BAND`` (unit-variance white noise in)."""
    f = _frequencies()
    psd = aligo_psd(f)
    scale = np.where(np.isfinite(psd) & (f >= BAND[0]) & (f <= BAND[1]),
                     1.0 / np.sqrt(np.where(np.isfinite(psd), psd, 1.0) * SAMPLE_RATE / 2.0), 0.0)
    return np.fft.irfft(np.fft.rfft(strain, axis=-1) * scale, n=SEGMENT, axis=-1)


def antenna_patterns(theta, phi, psi):
    """F+, Fx of an L-shaped interferometer with arms along x and y (source at θ, φ; polarisation ψ)."""
    a = 0.5 * (1 + np.cos(theta) ** 2) * np.cos(2 * phi)
    b = np.cos(theta) * np.sin(2 * phi)
    return a * np.cos(2 * psi) - b * np.sin(2 * psi), a * np.sin(2 * psi) + b * np.cos(2 * psi)


def bbh_polarisations(t: np.ndarray, total_mass, mass_ratio, inclination, phase0):
    """Approximate IMR chirp ``(h+, hx)`` at times ``t`` (s, 0 = peak), arbitrary amplitude units.

    Inspiral: f(τ) = (1/π) (5 / (256 τ))^{3/8} (G Mc / c³)^{-5/8} up to f_ISCO = 1/(6^{3/2} π G M/c³);
    merger: linear ramp to f_QNM over 20 G M / c³; ringdown: A e^{-t/τ}, τ = Q / (π f_QNM).
    """
    m = np.asarray(total_mass, dtype=np.float64)[:, None]
    q = np.asarray(mass_ratio, dtype=np.float64)[:, None]
    eta = q / (1 + q) ** 2
    tm = m * G_MSUN_OVER_C3
    tc_chirp = tm * eta ** 0.6
    f_isco = 1.0 / (6 ** 1.5 * np.pi * tm)
    final_mass = tm * (1 - (1 - np.sqrt(8 / 9)) * eta - 0.498 * eta ** 2)
    spin = np.clip(2 * np.sqrt(3) * eta - 3.871 * eta ** 2 + 4.028 * eta ** 3, 0.0, 0.99)
    f_qnm = (1.5251 - 1.1568 * (1 - spin) ** 0.1292) / (2 * np.pi * final_mass)
    quality = 0.7 + 1.4187 * (1 - spin) ** -0.4990
    tau_ring = quality / (np.pi * f_qnm)
    t_merge = 20 * tm                                   # merger ramp duration
    tau_isco = 5.0 / 256.0 * (np.pi * f_isco) ** (-8 / 3) * tc_chirp ** (-5 / 3)
    t_isco = -t_merge                                   # ISCO reached t_merge before the peak
    tau = np.maximum(t_isco + tau_isco - t, 1e-9)      # time to Newtonian coalescence
    f_insp = (1 / np.pi) * (5 / (256 * tau)) ** 0.375 * tc_chirp ** -0.625
    ramp = f_isco + (f_qnm - f_isco) * np.clip((t - t_isco) / t_merge, 0, 1)
    freq = np.where(t < t_isco, np.minimum(f_insp, f_isco), ramp)
    amp = (freq / f_qnm) ** (2 / 3)
    amp = np.where(t > 0, np.exp(-np.maximum(t, 0) / tau_ring), amp)
    amp = amp * (freq > 15.0)
    dt = t[:, 1:2] - t[:, 0:1]
    phase = 2 * np.pi * np.cumsum(freq, axis=1) * dt + np.asarray(phase0)[:, None]
    ci = np.cos(np.asarray(inclination))[:, None]
    return amp * 0.5 * (1 + ci ** 2) * np.cos(phase), amp * ci * np.sin(phase)


def sine_gaussian_polarisations(t: np.ndarray, frequency, quality, phase0):
    """``(h+, hx)`` of a sine-Gaussian centred at t = 0: e^{-t²/τ²} (cos, sin)(2π f t + φ), τ = Q/(√2 π f)."""
    f = np.asarray(frequency)[:, None]
    tau = np.asarray(quality)[:, None] / (np.sqrt(2) * np.pi * f)
    env = np.exp(-(t / tau) ** 2)
    arg = 2 * np.pi * f * t + np.asarray(phase0)[:, None]
    return env * np.cos(arg), env * np.sin(arg)


def _segment_times(rng, n):
    """Times (s) of each segment sample relative to the event peak, peak inside the central window."""
    start = (SEGMENT - WINDOW) // 2
    peak = rng.uniform(start + 0.25 * WINDOW, start + 0.75 * WINDOW, size=n)
    return (np.arange(SEGMENT)[None, :] - peak[:, None]) / SAMPLE_RATE


def _project(rng, n, polarisations):
    """Two-detector strain from ``polarisations(t) -> (h+, hx)``, random sky, delay U(-10, 10) ms."""
    t = _segment_times(rng, n)
    theta = np.arccos(rng.uniform(-1, 1, n))
    phi, psi = rng.uniform(0, 2 * np.pi, n), rng.uniform(0, np.pi, n)
    delay = rng.uniform(-0.010, 0.010, n)
    out = np.empty((n, 2, SEGMENT))
    for det, (shift, rot) in enumerate(((0.0, 0.0), (1.0, np.pi / 2))):
        fp, fc = antenna_patterns(theta, phi + rot, psi)
        hp, hc = polarisations(t - shift * delay[:, None])
        out[:, det] = fp[:, None] * hp + fc[:, None] * hc
    return out


def _scale_to_snr(rng, strain, snr_range, detectors=(0, 1)):
    """Rescale so that the optimal SNR (‖whitened strain‖ over ``detectors``) is U(snr_range)."""
    white = whiten(strain)
    norm = np.sqrt((white[:, list(detectors)] ** 2).sum(axis=(1, 2)))
    target = rng.uniform(*snr_range, size=strain.shape[0])
    return strain * (target / np.maximum(norm, 1e-30))[:, None, None]


def signal_strain(rng, kind: str, n: int) -> np.ndarray:
    """``(n, 2, SEGMENT)`` strain of ``kind`` in {'bbh', 'sglf'} at the chosen SNR."""
    if kind == "bbh":
        mass, ratio = rng.uniform(20, 80, n), rng.uniform(0.25, 1.0, n)
        incl, ph = np.arccos(rng.uniform(-1, 1, n)), rng.uniform(0, 2 * np.pi, n)
        strain = _project(rng, n, lambda t: bbh_polarisations(t, mass, ratio, incl, ph))
    elif kind == "sglf":
        freq, quality, ph = rng.uniform(64, 512, n), rng.uniform(25, 75, n), rng.uniform(0, 2 * np.pi, n)
        strain = _project(rng, n, lambda t: sine_gaussian_polarisations(t, freq, quality, ph))
    else:
        raise ValueError(f"unknown signal kind {kind!r}; valid: 'bbh', 'sglf'")
    return _scale_to_snr(rng, strain, SNR_RANGE)


def glitch_strain(rng, n: int) -> np.ndarray:
    """Single-detector short sine-Gaussian glitches (uncorrelated between sites)."""
    t = _segment_times(rng, n)
    hp, _ = sine_gaussian_polarisations(t, rng.uniform(30, 400, n), rng.uniform(2, 10, n),
                                        rng.uniform(0, 2 * np.pi, n))
    det = rng.integers(0, 2, n)
    strain = np.zeros((n, 2, SEGMENT))
    strain[np.arange(n), det] = hp
    out = np.empty_like(strain)
    for d in (0, 1):  # SNR measured in the detector that has the glitch
        sel = det == d
        out[sel] = _scale_to_snr(rng, strain[sel], GLITCH_SNR_RANGE, detectors=(d,))
    return out


def windows(rng, kind: str, n: int, chunk: int = 1000) -> np.ndarray:
    """``(n, 2, WINDOW)`` float32 whitened windows of ``kind`` (background, glitch, bbh, sglf)."""
    start = (SEGMENT - WINDOW) // 2
    parts = []
    for lo in range(0, n, chunk):
        m = min(chunk, n - lo)
        strain = coloured_noise(rng, m)
        if kind == "glitch":
            strain = strain + glitch_strain(rng, m)
        elif kind != "background":
            strain = strain + signal_strain(rng, kind, m)
        parts.append(whiten(strain)[..., start:start + WINDOW].astype(np.float32))
    return np.concatenate(parts) if parts else np.zeros((0, 2, WINDOW), np.float32)


def background_windows(rng, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Background windows with a fraction ``GLITCH_FRACTION`` of glitches; returns (data, is_glitch)."""
    n_glitch = int(round(GLITCH_FRACTION * n))
    data = np.concatenate([windows(rng, "background", n - n_glitch), windows(rng, "glitch", n_glitch)])
    is_glitch = np.r_[np.zeros(n - n_glitch, bool), np.ones(n_glitch, bool)]
    order = rng.permutation(n)
    return data[order], is_glitch[order]


def normalise(data: np.ndarray) -> np.ndarray:
    """Ingestion preprocessing: divide each sample by its per-detector std; ``(N,2,T) -> (N,T,2)``."""
    data = np.asarray(data, dtype=np.float32)
    std = data.std(axis=-1, keepdims=True)
    return np.swapaxes(data / np.where(std > 0, std, 1.0), 1, 2)


def _npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _npy_bytes(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def generate(out: Path, seed: int, hidden_seed: int, scale: float) -> dict:
    """Write the gravitational-wave challenge data under ``out`` (see module docstring).

    The public ``seed`` draws the training split only; the hidden val/test splits come from
    ``hidden_seed``, which is kept with the reference data.
    """
    out = Path(out)
    rngs = {"train": child_rngs(seed, ["train", "val", "test"])["train"], **child_rngs(hidden_seed, ["val", "test"])}
    counts = {s: {k: scaled(v, scale) for k, v in c.items()} for s, c in DEFAULT_COUNTS.items()}
    rng = rngs["train"]
    background, _ = background_windows(rng, counts["train"]["background"])
    atomic_write_bytes(out / "train" / "background.npz", _npz_bytes(data=background))
    for kind in ("bbh", "sglf"):
        atomic_write_bytes(out / "train" / TRAIN_FILES[kind], _npy_bytes(windows(rng, kind, counts["train"][kind])))
    index = [(TRAIN_FILES[kind], row, int(kind != "background"), kind)
             for kind in ("background", "bbh", "sglf") for row in range(counts["train"][kind])]
    write_csv(out / "train" / "windows.csv", index, ["file", "row", "label", "class"])  # a table Croissant can read
    splits = {"train": f"background {counts['train']['background']} (incl. {GLITCH_FRACTION:.0%} glitches), "
                       f"bbh {counts['train']['bbh']}, sglf {counts['train']['sglf']}; (N, 2, {WINDOW}) float32"}
    for phase in ("val", "test"):
        rng, c = rngs[phase], counts[phase]
        bg, is_glitch = background_windows(rng, c["background"])
        data = np.concatenate([bg, windows(rng, "bbh", c["bbh"]), windows(rng, "sglf", c["sglf"])])
        kinds = np.r_[np.where(is_glitch, "glitch", "background"), ["bbh"] * c["bbh"], ["sglf"] * c["sglf"]]
        order = rng.permutation(len(data))
        data, kinds = data[order], kinds[order]
        ids = np.array([f"{phase}_{i:06d}" for i in range(len(data))])
        atomic_write_bytes(out / "input_data" / phase / "data.npz", _npz_bytes(data=data, ids=ids))
        write_csv(out / "reference_data" / phase / "labels.csv",
                  [(i, int(k in ("bbh", "sglf")), k) for i, k in zip(ids, kinds, strict=True)], ["id", "label", "kind"])
        splits[phase] = (f"{len(data)} windows: background {c['background']} (incl. glitches), "
                         f"bbh {c['bbh']}, sglf {c['sglf']}; ids + (N, 2, {WINDOW}) float32")
    return {"splits": splits, "counts": counts, "shapes": {"window": [2, WINDOW], "model_input": [WINDOW, 2]}}


def load_original(folder: Path) -> dict[str, np.ndarray]:
    """Read the organisers' public files (``background.npz``, ``bbh_for_challenge.npy``,
    ``sglf_for_challenge.npy``; each ``(N, 2, 200)``), or this kit's ``train/`` (the same names), into
    ``{class: (N, 2, T) float32}``.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: an array is not ``(N, 2, T)``.
    """
    folder = Path(folder)
    names = TRAIN_FILES
    out = {}
    for kind, name in names.items():
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; the original GW challenge folder holds {list(names.values())}")
        arr = np.load(path, allow_pickle=False)
        arr = arr["data"] if isinstance(arr, np.lib.npyio.NpzFile) else arr
        if arr.ndim != 3 or arr.shape[1] != 2:
            raise ValueError(f"{path} has shape {arr.shape}; expected (N, 2, T)")
        out[kind] = arr.astype(np.float32)
    return out


SPEC = ChallengeSpec(
    name="gw",
    title="Detecting anomalous gravitational-wave signals",
    summary=("Two-detector (H1, L1) whitened strain windows of 200 samples at 4096 Hz. Background is "
             "Gaussian detector noise with single-detector glitches; signals are binary-black-hole "
             "chirps and low-frequency sine-Gaussian bursts. Find the signals."),
    domain="astrophysics (A3D3 institute)",
    original="NSF HDR A3D3 challenge 'Detecting Anomalous Gravitational Wave Signals' (Codabench 2626)",
    license="CC-BY-4.0",
    citation="arXiv:2503.02112; GWAK arXiv:2309.11537",
    columns=(ScoreColumn("TNR", "Background rejection at 90% signal efficiency"),
             ScoreColumn("TNR_bbh", "TNR at 90% BBH efficiency"),
             ScoreColumn("TNR_sglf", "TNR at 90% SGLF efficiency"),
             ScoreColumn("ROC_AUC", "ROC AUC")),
    reference_file="labels.csv",
    input_description=("`input_data/<phase>/data.npz` holds `data` (N, 2, 200) float32 and `ids`. The "
                       "ingestion program divides each sample by its per-detector standard deviation, "
                       "transposes to (N, 200, 2) and calls `Model.predict(X)` once; it must return N "
                       "finite scores, higher = more signal-like."),
    predict_signature="predict(X: np.ndarray[N, 200, 2]) -> N scores",
    metric_description=("The threshold is the 10th percentile of the signal scores (90% signal efficiency); "
                        "`TNR` = fraction of background windows scored below it (the organisers' metric). "
                        "Per-signal-type TNRs and ROC-AUC are reported alongside."),
    generation=__doc__.split("Recipe", 1)[1].split("Files:", 1)[0].strip(),
    real_data_note=("Real data: `kpflow.challenges.gw.load_original(folder)` reads the organisers' public "
                    "`background.npz`, `bbh_for_challenge.npy`, `sglf_for_challenge.npy` into the same format."),
    keywords=("gravitational waves", "anomaly detection", "LIGO", "time series"),
    generate=generate,
)
