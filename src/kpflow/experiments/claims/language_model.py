"""Claim 16a (Hazelden, NTK trace estimation, arXiv 2511.10796, language-model application): the alignment of the
hidden-state NTK with its initial value separates rich from lazy training of a language model.

Setting: a small GPT-2 (Hugging Face ``GPT2LMHeadModel`` through ``kpflow.models.hf``: 2 layers, d_model 32,
2 heads, MLP 64, float32) trained on next-token prediction over a corpus the code generates (seeded
sentences of a small grammar, character tokens). The output scale α sets the regime (Chizat, Oyallon &
Bach 2019, "lazy training"): the trained model is ``α (f_θ − f_θ₀)`` with loss ``CE / α²`` and plain SGD at
one learning rate (``LR`` = 0.3), so that the function moves at the same initial rate for every α while the
parameters move ∝ 1/α. Rich: α = 1; lazy: α = 100. After training, the hidden-state NTK ``Θ_T = J_T J_T*`` (``J =
∂h/∂θ``, the hidden states of every layer on a fixed evaluation batch) is compared with ``Θ_0`` by
``cos(Θ_0, Θ_T)`` (``factor_alignment``: VJPs only, jackknife standard error).

Criterion (fixed here before any data): per seed the effect is ``cos_lazy − cos_rich``; the claim's side is
``> 0.05`` (the rich regime's NTK turns away from its initial value by at least 0.05 more than the lazy
regime's), judged with ``threshold_verdict`` (mean beyond the threshold by more than ``Z_CRIT`` standard
errors across seeds). A second part requires that training did something in the rich regime (cross-entropy
drop > 0.1 nats), else the comparison is void.

Claim 16b (the same paper's second application): NTK alignment as a regulariser for data-scarce knowledge
distillation. A teacher GPT-2 (as above) is trained on the generated corpus (Adam, lr 3e-3); a student of the
same architecture from another initialisation sees only ``N_DISTILL`` windows of 24 tokens. Plain distillation
minimises ``KL(teacher ‖ student)`` of the next-token distributions on those windows; the regularised one adds
``λ (1 − cos(R Θ_s Rᵀ, R Θ_t Rᵀ))``, the alignment of the student's and the teacher's hidden-state NTKs sketched
on ``SKETCH`` fresh Gaussian directions ``R`` of the hidden-state space per step (``R J`` by ``SKETCH`` VJPs, the
student's kept differentiable), λ = ``LAMBDA`` fixed here. Both use Adam, lr 3e-3, the same steps and batches.
Effect per seed: held-out ``KL_plain − KL_reg`` on windows neither saw (nats per token); claim side ``> 0``.
"""

from __future__ import annotations

import math

import torch

from .common import pick
from .registry import Claim, all_of, column, register_claim, threshold_verdict

ALPHAS = {"rich": 1.0, "lazy": 100.0}
THRESHOLD = 0.05  # cos_lazy − cos_rich
# SGD learning rate of both regimes. Changed from 1.0 after the first two quick runs (before any verdict was
# computed over seeds): at 1.0 the rich run of seed 1 diverged (non-finite weights) and the lazy run of seed 0
# raised its held-out cross-entropy; 0.3 was chosen for stability, not for the effect (seed 0 at 1.0: 0.98)
LR = 0.3
N_DISTILL = 4  # training windows the student sees
SKETCH = 8  # random directions of the sketched NTK alignment
LAMBDA = 1.0  # weight of the alignment regulariser
DISTILL_THRESHOLD = 0.0  # held-out KL_plain − KL_reg (nats per token)
LOSS_DROP = 0.1  # nats: the rich run must have learned something

WORDS = {
    "det": ["the", "a", "every", "no"],
    "adj": ["red", "small", "quiet", "old", "bright"],
    "noun": ["cat", "river", "robot", "tree", "child", "song"],
    "verb": ["sees", "follows", "hears", "likes", "finds"],
}


def generated_corpus(n_sentences: int, seed: int) -> str:
    """``n_sentences`` sentences ``det adj noun verb det noun.`` drawn with a seeded generator."""
    g = torch.Generator().manual_seed(seed)

    def pick_word(kind):
        words = WORDS[kind]
        return words[int(torch.randint(len(words), (1,), generator=g))]

    return " ".join(f"{pick_word('det')} {pick_word('adj')} {pick_word('noun')} {pick_word('verb')} "
                    f"{pick_word('det')} {pick_word('noun')}." for _ in range(n_sentences))


class CharTokenizer:
    """The characters of a text as tokens."""

    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def __len__(self):
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        return [self.index[c] for c in text]


def _windows(ids: torch.Tensor, batch: int, length: int, g: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(ids) - length, (batch,), generator=g)
    return torch.stack([ids[s:s + length] for s in starts.tolist()])


def _build(vocab: int, length: int, seed: int):
    from kpflow.models.hf import build_lm, lm_config

    cfg = lm_config("gpt2", n_embd=32, n_layer=2, n_head=2, n_inner=64, vocab_size=vocab, n_positions=length,
                    bos_token_id=0, eos_token_id=0)
    return build_lm(cfg, dtype=torch.float32, seed=seed)


def _train(hf, alpha: float, ids: torch.Tensor, steps: int, lr: float, batch: int, length: int, seed: int):
    """SGD on ``CE(α (f_θ − f_θ₀)) / α²``; returns (initial CE, final CE) on a fixed held-out batch."""
    import copy

    from torch.nn import functional as F

    ref = copy.deepcopy(hf).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(10_000 + seed)
    held = _windows(ids, 16, length, torch.Generator().manual_seed(20_000 + seed))
    opt = torch.optim.SGD(hf.parameters(), lr=lr)

    def loss_of(x):
        logits = alpha * (hf(x, use_cache=False).logits - ref(x, use_cache=False).logits)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))

    with torch.no_grad():
        first = float(loss_of(held))
    hf.train(False)  # dropout is off in the config; eval mode keeps the model deterministic
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        (loss_of(_windows(ids, batch, length, g)) / alpha ** 2).backward()
        opt.step()
    with torch.no_grad():
        last = float(loss_of(held))
    return first, last


def measure_rich_lazy(seed: int, size: str) -> dict:
    """One seed: train the same initial model in both regimes and compare their final NTKs with the initial one."""
    import copy

    from kpflow.estimators import factor_alignment
    from kpflow.kernels import record
    from kpflow.models.hf import HFLanguageModel

    from ..language_model import hidden_jacobian

    length, batch = 24, 8
    steps, pairs = pick(size, 150, 600), pick(size, 12, 30)
    text = generated_corpus(pick(size, 300, 1000), seed)
    tok = CharTokenizer(text)
    ids = torch.tensor(tok.encode(text), dtype=torch.int64)
    torch.manual_seed(seed)
    hf0 = _build(len(tok), length, seed)
    evalb = _windows(ids, 2, 12, torch.Generator().manual_seed(30_000 + seed))
    J0 = hidden_jacobian(record(HFLanguageModel(hf0), evalb))
    out = {"steps": steps, "vocab": len(tok), "parameters": sum(p.numel() for p in hf0.parameters())}
    for regime, alpha in ALPHAS.items():
        hf = copy.deepcopy(hf0)
        first, last = _train(hf, alpha, ids, steps, lr=LR, batch=batch, length=length, seed=seed)
        JT = hidden_jacobian(record(HFLanguageModel(hf.eval()), evalb))
        cos = factor_alignment(J0, JT, 4 * pairs, seed=40_000 + seed)
        with torch.no_grad():
            moved = math.sqrt(sum(float((p - q).pow(2).sum()) for p, q in zip(hf.parameters(), hf0.parameters(),
                                                                                 strict=True)))
        out |= {f"{regime}_cos": float(cos.value), f"{regime}_cos_se": float(cos.stderr),
                f"{regime}_ce_first": first, f"{regime}_ce_last": last, f"{regime}_param_distance": moved}
    out["effect"] = out["lazy_cos"] - out["rich_cos"]
    out["rich_ce_drop"] = out["rich_ce_first"] - out["rich_ce_last"]
    out["lazy_ce_drop"] = out["lazy_ce_first"] - out["lazy_ce_last"]
    return out


def verdict_rich_lazy(measurements):
    main = threshold_verdict(column(measurements, "effect"), THRESHOLD, "above", name="cos_lazy − cos_rich")
    learned = threshold_verdict(column(measurements, "rich_ce_drop"), LOSS_DROP, "above",
                                name="rich-regime cross-entropy drop (nats)")
    return all_of(main, learned)


register_claim(Claim(
    id="lm_rich_lazy", number=16,
    quote="we apply our estimators to ... rich versus lazy training regimes [of a natural-language Transformer], "
          "measured by the alignment of the hidden-state NTK with its initial value",
    paper="Hazelden, Fast Generalized NTK Statistics via Trace Estimation (arXiv 2511.10796), LM application",
    criterion=f"cos(Θ_0, Θ_T) of the hidden-state NTK is higher in the lazy regime (output scale α = "
              f"{ALPHAS['lazy']:g}) than in the rich one (α = {ALPHAS['rich']:g}) by more than {THRESHOLD:g}, and "
              f"the rich run lowered the held-out cross-entropy by more than {LOSS_DROP:g} nats",
    measure=measure_rich_lazy, verdict=verdict_rich_lazy,
    setting="Hugging Face GPT-2, 2 layers × d_model 32, generated grammar corpus (character tokens), windows of 24 "
            "tokens, batch 8, SGD lr 0.3 on CE(α(f−f₀))/α², 150 (quick) / 600 (full) steps; alignment on 2 × 12 "
            "tokens with 12 (quick) / 30 (full) probe pairs; float32",
    seeds=3, quick_seeds=3,
))


# ----------------------------------------------------------------------------- distillation
def _kl(t_logits, s_logits):
    """Mean over tokens of KL(teacher ‖ student) of the next-token distributions."""
    from torch.nn import functional as F

    t = F.log_softmax(t_logits, -1)
    return (t.exp() * (t - F.log_softmax(s_logits, -1))).sum(-1).mean()


def _sketched_ntk(hf, x, R, create_graph):
    """``(R J)(R J)ᵀ`` ``[c, c]`` with ``J = ∂h/∂θ`` (hidden states of every layer), from ``c`` VJPs."""
    params = [p for p in hf.parameters() if p.requires_grad]
    h = torch.cat(hf(x, output_hidden_states=True, use_cache=False).hidden_states, -1)
    rows = []
    for r in R:
        g = torch.autograd.grad(h, params, r, retain_graph=True, create_graph=create_graph)
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    RJ = torch.stack(rows)
    return RJ @ RJ.T


def _cos(A, B):
    return (A * B).sum() / (A.norm() * B.norm())


def _distil(student, teacher, data, steps, lam, seed):
    g = torch.Generator().manual_seed(50_000 + seed)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    with torch.no_grad():
        t_logits = teacher(data, use_cache=False).logits
    shape = torch.cat(teacher(data[:2], output_hidden_states=True, use_cache=False).hidden_states, -1).shape
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        idx = torch.randint(0, len(data), (2,), generator=g)
        loss = _kl(t_logits[idx], student(data[idx], use_cache=False).logits)
        if lam:
            R = torch.randn(SKETCH, *shape, generator=g)
            with torch.enable_grad():
                Kt = _sketched_ntk(teacher, data[idx], R, create_graph=False).detach()  # teacher's θ not stepped
            loss = loss + lam * (1 - _cos(_sketched_ntk(student, data[idx], R, create_graph=True), Kt))
        loss.backward()
        opt.step()


def measure_distillation(seed: int, size: str) -> dict:
    """One seed: a trained teacher, then plain and NTK-alignment-regularised distillation from the same student
    initialisation on ``N_DISTILL`` windows; held-out KL and the final NTK alignment with the teacher."""
    import copy

    from torch.nn import functional as F

    from kpflow.estimators import factor_alignment
    from kpflow.kernels import record
    from kpflow.models.hf import HFLanguageModel

    from ..language_model import hidden_jacobian

    length = 24
    t_steps, s_steps, pairs = pick(size, 200, 600), pick(size, 60, 200), pick(size, 10, 30)
    text = generated_corpus(pick(size, 300, 1000), seed)
    tok = CharTokenizer(text)
    ids = torch.tensor(tok.encode(text), dtype=torch.int64)
    teacher = _build(len(tok), length, 1000 + seed)
    opt = torch.optim.Adam(teacher.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(60_000 + seed)
    for _ in range(t_steps):
        x = _windows(ids, 8, length, g)
        opt.zero_grad(set_to_none=True)
        logits = teacher(x, use_cache=False).logits
        F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).backward()
        opt.step()
    teacher.eval()
    data = _windows(ids, N_DISTILL, length, torch.Generator().manual_seed(70_000 + seed))
    held = _windows(ids, 16, length, torch.Generator().manual_seed(80_000 + seed))
    evalb = held[:2, :12]
    Jt = hidden_jacobian(record(HFLanguageModel(teacher), evalb))
    student0 = _build(len(tok), length, 2000 + seed)
    out = {"teacher_steps": t_steps, "student_steps": s_steps, "vocab": len(tok)}
    with torch.no_grad():
        t_held = teacher(held, use_cache=False).logits
        out["kl_init"] = float(_kl(t_held, student0(held, use_cache=False).logits))
    for name, lam in (("plain", 0.0), ("reg", LAMBDA)):
        student = copy.deepcopy(student0)
        _distil(student, teacher, data, s_steps, lam, seed)
        student.eval()
        with torch.no_grad():
            out[f"{name}_kl_held"] = float(_kl(t_held, student(held, use_cache=False).logits))
        Js = hidden_jacobian(record(HFLanguageModel(student), evalb))
        out[f"{name}_ntk_cos"] = float(factor_alignment(Js, Jt, 4 * pairs, seed=90_000 + seed).value)
    out["effect"] = out["plain_kl_held"] - out["reg_kl_held"]
    return out


def verdict_distillation(measurements):
    return threshold_verdict(column(measurements, "effect"), DISTILL_THRESHOLD, "above",
                             name="held-out KL plain − regularised (nats/token)")


register_claim(Claim(
    id="lm_ntk_distillation", number=16,
    quote="NTK alignment as a regulariser for knowledge distillation in the data-scarce regime",
    paper="Hazelden, Fast Generalized NTK Statistics via Trace Estimation (arXiv 2511.10796), LM application",
    criterion=f"with {N_DISTILL} training windows, distillation regularised by λ = {LAMBDA:g} × (1 − cos) of the "
              f"student's and teacher's sketched hidden-state NTKs ({SKETCH} directions) ends with a lower held-out "
              "KL(teacher ‖ student) than plain distillation (KL_plain − KL_reg > 0)",
    measure=measure_distillation, verdict=verdict_distillation,
    setting="Hugging Face GPT-2 teacher and student, 2 layers × d_model 32, generated grammar corpus (character "
            "tokens); teacher 200 (quick) / 600 (full) Adam steps; student 60 / 200 Adam steps on 4 windows of 24 "
            "tokens, batch 2; held-out KL on 16 unseen windows; float32",
    seeds=3, quick_seeds=3,
))
