"""Hugging Face causal language models (GPT-2, GPT-NeoX/Pythia, Llama) as site models.

``HFLanguageModel`` runs the Hugging Face model's *own* forward pass and sees it as the global implicit
constraint of ``kpflow.models.sites``: while it runs, every parameterised submodule of the base model
writes its output through the ``sites`` recorder instead of computing it itself —

* ``nn.Linear`` (``W u + b``) and GPT-2's ``Conv1D`` (``u W + b``: a linear with the weight stored
  transposed, ``sites.linear(..., transposed=True)``) are weight sites whose site variable is the
  layer's input;
* ``nn.Embedding`` (token and learned position tables) is a lookup site (one-hot site variable);
* ``nn.LayerNorm`` and ``LlamaRMSNorm`` are elementwise weight sites ``γ ⊙ n(u) + β`` on the
  normalised input ``n(u)`` (``sites.scale``);

and the **visible state** is the hidden state of every layer, exactly Hugging Face's
``output_hidden_states``: ``h_0`` (the embeddings, the input of the first block), the input of every
later block, and the final-norm output ``h_L = norm(block_L(...))``, i.e. ``[B, T, (L + 1) · D]`` with
positions = sequences × tokens. The readout is the language-model head (``logits = h_L Wᵀ``; for GPT-2
the tied token embedding), held fixed as for every kpflow model: the parameters θ of the operators are
those of the base model (embeddings included; with tied weights the embedding's use as the input
table only), ``cell_params()``. Then (``kpflow.kernels``):

* ``ntk(traj)``: the hidden-state NTK ``Θ = J J*``, ``J = ∂h/∂θ`` (``path="parameters"``) or
  ``C P K P* C*`` through the joint state (``path="joint"``);
* ``output_ntk(traj)``: the logit NTK ``C_out Θ C_out*`` (``C_out = ∂logits/∂h``);
* ``hidden_jacobian`` / ``logit_jacobian``: the factors ``J`` and ``C_out J`` for the one-sided
  estimators (``J* v`` is one VJP through a kept graph, ``J w`` one JVP);
* ``kronecker_core(traj)``: the exact statistics of ``K = Jθ Jθ*`` over every linear layer, embedding
  and norm, no probes.

Memory and precision (the choices, stated): the recorded trajectory keeps a float copy of θ, the joint
state (every site output) and every site variable — for Pythia-410M at batch 2 × 128 tokens about
3.5 GB in float32; each reverse-mode probe materialises one parameter-sized gradient, so the estimators'
``chunk_size`` (probes per batched VJP) is the memory knob (``suggested_chunk``). The VJP graph of the
forward pass is kept between probes (recomputing it per probe would cost one forward each and save
its activations, a few hundred MB at this size: it does not pay). float32 is the default; float64 for
tests; bfloat16 models run, but the estimators then accumulate in bfloat16 (≈3 significant digits) —
measure in float32. Attention runs in Hugging Face's ``eager`` implementation (differentiable by
``torch.func`` in both modes); dropout must be off (``model.eval()``).

Masked language models (``bert``: ``BertForMaskedLM``; ``roberta``: ``RobertaForMaskedLM``) go through the
same adapter, with bidirectional attention. Their inputs are ``[B, T]`` token ids or ``[B, T, 3]``
(ids, attention mask, token-type ids; ``masked_inputs``). Padding is respected exactly: at a padded
position (attention mask 0) every site variable is set to 0 (a weight site then outputs its bias only)
and the visible state to 0, so nothing of θ reaches a padded position, real positions compute exactly
what Hugging Face computes (padded keys get softmax weight 0), and Θ, the logit NTK and ``K`` do not
depend on the ids at padded positions. Their readout is the whole MLM head (transform dense, activation,
LayerNorm, decoder), held fixed as C: its decoder is tied to the word embeddings, and the tie is handled
by keeping the decoder in the fixed readout (a copy in the snapshot) — θ holds the word embeddings in
their input-table use only, so no weight appears at two sites and the exact Kronecker core ``K`` covers
the base model's sites only (the decoder enters the logit NTK through ``C = ∂logits/∂h``, not through K).
The logit NTK of a masked model is taken over the ``[MASK]`` positions or over all positions
(``kpflow.experiments.language_model.logit_jacobian(..., positions=)``; ``mask_tokens`` masks a seeded
fraction of the tokens).

Supported: ``model_type`` ``gpt2``, ``gpt_neox``, ``llama`` with a causal-LM head (``*ForCausalLM`` /
``GPT2LMHeadModel``) and ``bert``, ``roberta`` with a masked-LM head (``*ForMaskedLM``). Anything else is
refused with the list.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from .base import Params
from .sites import SiteModel, Sites

#: family -> (layers path in the base model, final norm path (None: the last layer's ``output.LayerNorm``),
#: position-limit config key, objective: ``"causal"`` or ``"masked"``)
FAMILIES = {
    "gpt2": ("h", "ln_f", "n_positions", "causal"),
    "gpt_neox": ("layers", "final_layer_norm", "max_position_embeddings", "causal"),
    "llama": ("layers", "norm", "max_position_embeddings", "causal"),
    "bert": ("encoder.layer", None, "max_position_embeddings", "masked"),
    "roberta": ("encoder.layer", None, "max_position_embeddings", "masked"),
}

#: masked families -> the attribute of the ``*ForMaskedLM`` model holding its MLM head (transform + decoder)
MLM_HEADS = {"bert": "cls", "roberta": "lm_head"}

#: named sizes (random weights from the config; nothing is downloaded). Pythia sizes from EleutherAI's configs.
PRESETS: dict[str, tuple[str, dict]] = {
    "gpt2-tiny": ("gpt2", dict(n_embd=8, n_layer=2, n_head=2, n_inner=16, vocab_size=13, n_positions=8,
                               bos_token_id=0, eos_token_id=0)),
    "pythia-tiny": ("gpt_neox", dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
                                     vocab_size=13, max_position_embeddings=8, rotary_pct=0.5)),
    "llama-tiny": ("llama", dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                 intermediate_size=16, vocab_size=13, max_position_embeddings=8)),
    "bert-tiny": ("bert", dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
                               vocab_size=13, max_position_embeddings=8, type_vocab_size=2)),
    "roberta-tiny": ("roberta", dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
                                     vocab_size=13, max_position_embeddings=10, type_vocab_size=1, pad_token_id=1,
                                     bos_token_id=0, eos_token_id=2)),
    "bert-mini": ("bert", dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                               vocab_size=30522, max_position_embeddings=512, type_vocab_size=2)),
    "pythia-14m": ("gpt_neox", dict(hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
                                    intermediate_size=512, vocab_size=50304, max_position_embeddings=2048,
                                    rotary_pct=0.25)),
    "pythia-70m": ("gpt_neox", dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                                    intermediate_size=2048, vocab_size=50304, max_position_embeddings=2048,
                                    rotary_pct=0.25)),
    "pythia-410m": ("gpt_neox", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                     intermediate_size=4096, vocab_size=50304, max_position_embeddings=2048,
                                     rotary_pct=0.25)),
}

_NO_DROPOUT = {
    "gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "gpt_neox": dict(attention_dropout=0.0, hidden_dropout=0.0),
    "llama": dict(attention_dropout=0.0),
    "bert": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "roberta": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
}


def _transformers():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("the Hugging Face adapter needs the 'transformers' package: pip install 'kpflow[lm]'") \
            from exc
    return transformers


def _unsupported(kind: str) -> str:
    causal = sorted(k for k, v in FAMILIES.items() if v[3] == "causal")
    masked = sorted(k for k, v in FAMILIES.items() if v[3] == "masked")
    return (f"unsupported architecture {kind!r}; kpflow's language-model adapter supports the causal LM "
            f"families {causal} (GPT-2, GPT-NeoX/Pythia, Llama-style: *ForCausalLM) and the masked LM "
            f"families {masked} (BERT, RoBERTa: *ForMaskedLM)")


def lm_config(family: str, **sizes):
    """A Hugging Face config of ``family`` (``FAMILIES``) with dropout off and eager attention.

    Args:
        family: the ``model_type``.
        **sizes: config fields (``hidden_size``, ``num_hidden_layers``, ... in the family's own names).

    Returns:
        The ``PretrainedConfig``.

    Raises:
        ValueError: an unsupported family (the message names the supported ones).
        ImportError: ``transformers`` is not installed.
    """
    tf = _transformers()
    classes = {"gpt2": tf.GPT2Config, "gpt_neox": tf.GPTNeoXConfig, "llama": tf.LlamaConfig, "bert": tf.BertConfig,
               "roberta": tf.RobertaConfig}
    if family not in classes:
        raise ValueError(_unsupported(family))
    cfg = classes[family](**(_NO_DROPOUT[family] | sizes))
    cfg._attn_implementation = "eager"
    return cfg


def build_lm(config, *, dtype: torch.dtype = torch.float32, seed: int | None = 0, device=None) -> nn.Module:
    """A causal or masked LM with random initial weights from a config (nothing is downloaded), in eval mode.

    Args:
        config: a ``PretrainedConfig``, a preset name (``PRESETS``: ``gpt2-tiny``, ``pythia-tiny``,
            ``llama-tiny``, ``bert-tiny``, ``roberta-tiny``, ``bert-mini``, ``pythia-14m``, ``pythia-70m``,
            ``pythia-410m``) or a path to a ``config.json``.
        dtype: of the parameters (float32 default; float64 for tests; bfloat16 allowed).
        seed: for the initial weights (None: torch's global state).
        device: where to build it.

    Returns:
        The Hugging Face ``*ForCausalLM`` (``*ForMaskedLM`` for the masked families) module.

    Raises:
        ValueError: an unknown preset or an unsupported architecture.
    """
    tf = _transformers()
    if isinstance(config, (str, Path)):
        if str(config) in PRESETS:
            family, sizes = PRESETS[str(config)]
            config = lm_config(family, **sizes)
        elif Path(config).is_file():
            config = _read_config(Path(config))
        else:
            raise ValueError(f"{str(config)!r} is neither a preset ({sorted(PRESETS)}) nor a config.json file")
    kind = _check_family(config)
    config._attn_implementation = "eager"
    if seed is not None:
        torch.manual_seed(seed)
    model = _auto_class(tf, kind).from_config(config, dtype=dtype)
    return model.to(device).eval() if device is not None else model.eval()


def _auto_class(tf, kind: str):
    return tf.AutoModelForMaskedLM if FAMILIES[kind][3] == "masked" else tf.AutoModelForCausalLM


def _check_family(config) -> str:
    kind = getattr(config, "model_type", None)
    if kind not in FAMILIES:
        raise ValueError(_unsupported(kind))
    return kind


def _read_config(path: Path):
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read a model config from {path}: {exc}") from exc
    kind = data.get("model_type")
    if kind not in FAMILIES:
        raise ValueError(_unsupported(kind))
    data = {k: v for k, v in data.items() if k != "model_type"}
    return lm_config(kind, **data)


def load_lm(path, *, dtype: torch.dtype = torch.float32, device=None) -> nn.Module:
    """A causal or masked LM from a local folder with ``config.json`` and safetensors weights (no network, no pickle).

    Args:
        path: the folder (as written by ``save_pretrained(..., safe_serialization=True)``).
        dtype: of the loaded parameters.
        device: where to put them (None: CPU).

    Returns:
        The model, in eval mode.

    Raises:
        FileNotFoundError: no folder, no ``config.json``, or a config without ``*.safetensors`` weights (the
            message says how to get a randomly initialised model from the config instead).
        ValueError: an unsupported architecture.
    """
    tf = _transformers()
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder (give a model folder, a config.json or a preset name)")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; a model folder holds config.json and *.safetensors")
    config = _read_config(cfg_file)
    if not list(folder.glob("*.safetensors")):
        others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
        hint = f" (found {others}: pickled weights are not loaded; convert them to safetensors)" if others else ""
        raise FileNotFoundError(f"{folder} has a config.json but no *.safetensors weights{hint}; pass "
                                f"{cfg_file} itself to start from random initial weights")
    model = _auto_class(tf, config.model_type).from_pretrained(folder, config=config, dtype=dtype,
                                                               local_files_only=True,
                                                    use_safetensors=True)
    return model.to(device).eval() if device is not None else model.eval()


# ----------------------------------------------------------------------------- tokenizers
class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0–255): a tokenizer the code makes, for any model with ``vocab_size ≥ 256``."""

    vocab_size = 256

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text``.

        Args:
            text: the string.

        Returns:
            Its bytes as ids in [0, 256).
        """
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        """The text of byte ids (invalid UTF-8 replaced by U+FFFD).

        Args:
            ids: byte ids.

        Returns:
            The decoded string.
        """
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def load_tokenizer(path=None):
    """``ByteTokenizer()`` (``path=None``) or a tokenizer from a local folder (``AutoTokenizer``, no network).

    Args:
        path: a local tokenizer folder, or None for UTF-8 bytes.

    Returns:
        The tokenizer (``len(tok)`` its vocabulary size, ``tok.encode(text)`` its ids).

    Raises:
        FileNotFoundError: ``path`` is not a folder.
        ImportError: ``transformers`` is not installed (a folder given).
    """
    if path is None:
        return ByteTokenizer()
    tf = _transformers()
    if not Path(path).is_dir():
        raise FileNotFoundError(f"tokenizer folder {path} does not exist")
    return tf.AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def tokenize(text: str, tokenizer, model: HFLanguageModel, batch: int, length: int, *, offset: int = 0) -> torch.Tensor:
    """``batch`` windows of ``length`` consecutive tokens of ``text`` (``[batch, length]`` int64).

    Args:
        text: the text.
        tokenizer: ``ByteTokenizer`` or a Hugging Face tokenizer (``len``, ``encode``).
        model: the adapted model (its vocabulary and positions are checked).
        batch: windows (sequences).
        length: tokens per window.
        offset: first token used.

    Returns:
        Token ids ``[batch, length]``.

    Raises:
        ValueError: the tokenizer's vocabulary is larger than the model's, the windows are longer than the
            model's positions, or the text is too short.
    """
    vocab = len(tokenizer)
    if vocab > model.vocab_size:
        raise ValueError(f"the tokenizer has {vocab} tokens but the model's vocabulary has {model.vocab_size}: its "
                         "ids would index past the embedding table (use a tokenizer of at most that size or a model "
                         f"with vocab_size >= {vocab})")
    model.check_length(length)
    ids = tokenizer.encode(text)
    need = offset + batch * length
    if len(ids) < need:
        raise ValueError(f"the text has {len(ids)} tokens; {batch} windows of {length} tokens (from token {offset}) "
                         f"need {need}")
    return torch.tensor(ids[offset:need], dtype=torch.int64).reshape(batch, length)


# ----------------------------------------------------------------------------- the adapter
class HFLanguageModel(SiteModel):
    """A Hugging Face causal or masked LM as a site model (see module docstring).

    Parameters are named as in the Hugging Face model (``transformer.h.0.attn.c_attn.weight``,
    ``gpt_neox.layers.3.mlp.dense_h_to_4h.weight``, ``model.layers.0.self_attn.q_proj.weight``,
    ``bert.encoder.layer.0.attention.self.query.weight``); select subsets with ``param_subset(model, patterns)``.

    Inputs: token ids ``[B, T]`` (int64/int32); for a masked model also ``[B, T, 3]`` = (ids, attention
    mask 1/0, token-type ids), see ``masked_inputs``. The masked positions of a masked model are those
    whose id is ``mask_token_id``.

    Args:
        hf_model: a ``GPT2LMHeadModel`` / ``GPTNeoXForCausalLM`` / ``LlamaForCausalLM`` (or another
            ``*ForCausalLM`` of those families) or a ``BertForMaskedLM`` / ``RobertaForMaskedLM``, in eval mode.
        mask_token_id: the ``[MASK]`` id of a masked model (None: the config's ``mask_token_id`` if it has
            one, else the last id ``vocab_size - 1``, which byte-tokenised text never uses when
            ``vocab_size >= 256``: byte 0xFF is not UTF-8; give the tokenizer's ``mask_token_id`` for a real
            vocabulary).

    Raises:
        TypeError: not a Hugging Face model.
        ValueError: an unsupported architecture (the supported families are named), a model without the
            family's LM head, a parameterised submodule the adapter cannot see as a weight site, a
            ``mask_token_id`` outside the vocabulary or given for a causal model.
    """

    batch_independent = True  # every sequence is its own forward pass (its padding mask is its own)

    def __init__(self, hf_model: nn.Module, mask_token_id: int | None = None):
        super().__init__()
        config = getattr(hf_model, "config", None)
        if config is None or not hasattr(hf_model, "base_model"):
            raise TypeError(f"HFLanguageModel wraps a Hugging Face PreTrainedModel, got {type(hf_model).__name__}")
        self.family = _check_family(config)
        layers_path, norm_path, pos_key, objective = FAMILIES[self.family]
        self.masked = objective == "masked"
        if self.masked:
            head = getattr(hf_model, MLM_HEADS[self.family], None)
            if not isinstance(head, nn.Module) or hf_model.base_model is hf_model:
                raise ValueError(f"{type(hf_model).__name__} has no masked-LM head; the adapter needs a masked LM "
                                 "(BertForMaskedLM, RobertaForMaskedLM)")
        else:
            if mask_token_id is not None:
                raise ValueError(f"mask_token_id is for masked LMs; {type(hf_model).__name__} is a causal LM")
            head = hf_model.get_output_embeddings() if hasattr(hf_model, "get_output_embeddings") else None
            if not isinstance(head, nn.Linear):
                raise ValueError(f"{type(hf_model).__name__} has no linear language-model head; the adapter needs a "
                                 "causal LM (GPT2LMHeadModel, GPTNeoXForCausalLM, LlamaForCausalLM)")
        config._attn_implementation = "eager"
        self.hf = hf_model
        self.config = config
        self.base = hf_model.base_model
        self.prefix = hf_model.base_model_prefix + "."
        self.head = head
        self.layers = list(_get(self.base, layers_path))
        self.final_norm = _get(self.base, norm_path) if norm_path else self.layers[-1].output.LayerNorm
        self.vocab_size = int(config.vocab_size)
        # RoBERTa's positions start after its padding index
        self._position_offset = int(config.pad_token_id) + 1 if self.family == "roberta" else 0
        self.max_positions = int(getattr(config, pos_key)) - self._position_offset
        self.d_model = int(config.hidden_size)
        self.n_layers = len(self.layers)
        self.state_dim = (self.n_layers + 1) * self.d_model
        self.mask_token_id = None
        if self.masked:
            mid = getattr(config, "mask_token_id", None) if mask_token_id is None else mask_token_id
            self.mask_token_id = int(self.vocab_size - 1 if mid is None else mid)
            if not 0 <= self.mask_token_id < self.vocab_size:
                raise ValueError(f"mask_token_id {self.mask_token_id} lies outside the vocabulary [0, "
                                 f"{self.vocab_size})")
        conv1d = _conv1d_type()
        self._sited: dict[str, tuple[nn.Module, str]] = {}
        for name, mod in self.base.named_modules():
            own = list(mod.named_parameters(recurse=False))
            if not own:
                continue
            if isinstance(mod, nn.Linear):
                kind = "linear"
            elif conv1d is not None and isinstance(mod, conv1d):
                kind = "conv1d"
            elif isinstance(mod, nn.Embedding):
                kind = "embedding"
            elif isinstance(mod, nn.LayerNorm):
                kind = "layernorm"
            elif type(mod).__name__ == "LlamaRMSNorm":
                kind = "rmsnorm"
            else:
                raise ValueError(f"submodule {name!r} ({type(mod).__name__}) has parameters {[n for n, _ in own]} the "
                                 "adapter cannot see as weight sites (it knows nn.Linear, Conv1D, nn.Embedding, "
                                 "nn.LayerNorm and LlamaRMSNorm)")
            self._sited[name] = (mod, kind)
        base_names = {self.prefix + n for n, _ in self.base.named_parameters()}
        self._names = [n for n, _ in hf_model.named_parameters() if n in base_names]

    # ------------------------------------------------------------------ parameters
    def cell_params(self) -> dict[str, torch.Tensor]:
        """The base model's parameters by their Hugging Face names (θ of the operators; the head excluded).

        Returns:
            ``{name: live parameter}`` in model order.
        """
        live = dict(self.hf.named_parameters())
        return {n: live[n] for n in self._names}

    def readout_params(self) -> dict[str, torch.Tensor]:
        """The language-model head's parameters, named inside the head (held fixed: the readout C).

        A causal head is ``weight`` ``[V, D]`` (and ``bias``; GPT-2's is the tied token embedding); a
        masked head is the whole MLM head (``predictions.transform.dense.weight``, ...,
        ``predictions.decoder.weight`` — tied to the word embeddings — and the decoder bias).

        Returns:
            ``{name: live parameter}``.
        """
        return dict(self.head.named_parameters())

    # ------------------------------------------------------------------ inputs
    def check_length(self, length: int) -> None:
        """Refuse sequences longer than the model's positions.

        Args:
            length: tokens per sequence.

        Raises:
            ValueError: ``length`` exceeds the positions of the config.
        """
        if length > self.max_positions:
            raise ValueError(f"sequences of {length} tokens are longer than the model's {self.max_positions} positions "
                             f"({FAMILIES[self.family][2]} of its config)")

    def check_inputs(self, inputs) -> None:
        """Refuse inputs the model cannot take (see the class docstring for what it takes).

        Args:
            inputs: token ids ``[B, T]`` or, for a masked model, ``[B, T, 3]``.

        Raises:
            ValueError: not integer ids of those shapes, empty, too long, ids outside the vocabulary, an
                attention mask that is not 0/1 or leaves a sequence without a real token, token types outside
                the config's ``type_vocab_size``, padding given to a causal model, or a model in train mode
                with dropout.
        """
        ok = isinstance(inputs, torch.Tensor) and inputs.dtype in (torch.int64, torch.int32) and (
            inputs.dim() == 2 or (inputs.dim() == 3 and inputs.shape[-1] == 3))
        if not ok:
            got = (f"{tuple(inputs.shape)} {inputs.dtype}" if isinstance(inputs, torch.Tensor)
                   else type(inputs).__name__)
            what = " or [B, T, 3] (ids, attention mask, token types; masked_inputs)" if self.masked else ""
            raise ValueError(f"a language model takes integer token ids [B, T]{what}, got {got}")
        if inputs.dim() == 3 and not self.masked:
            raise ValueError("attention masks and token types ([B, T, 3] inputs) are taken by masked LMs only; a "
                             "causal LM takes token ids [B, T] (every sequence full length)")
        if inputs.shape[0] < 1 or inputs.shape[1] < 1:
            raise ValueError(f"token ids {tuple(inputs.shape)} have no sequence or no token (B, T must be >= 1)")
        self.check_length(int(inputs.shape[1]))
        ids, attn, types = _unpack(inputs)
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}) (the model's vocabulary), got "
                             f"[{int(ids.min())}, {int(ids.max())}]; is the tokenizer the model's?")
        if attn is not None:
            if not bool(((attn == 0) | (attn == 1)).all()):
                raise ValueError("the attention mask must be 1 (real token) or 0 (padding)")
            empty = (attn.sum(1) == 0).nonzero()
            if len(empty):
                raise ValueError(f"sequence {int(empty[0])} is all padding (its attention mask is 0 everywhere)")
            n_types = int(getattr(self.config, "type_vocab_size", 1))
            if int(types.min()) < 0 or int(types.max()) >= n_types:
                raise ValueError(f"token-type ids must lie in [0, {n_types}) (type_vocab_size), got "
                                 f"[{int(types.min())}, {int(types.max())}]")
        if self.hf.training and _has_dropout(self.hf):
            raise ValueError("the model is in train mode with dropout: the operators linearise one deterministic "
                             "network; call model.eval()")

    def positions(self, inputs) -> tuple[int, int]:
        """The position space ``(B, T)``: sequences × tokens.

        Args:
            inputs: as for ``check_inputs``.

        Returns:
            ``(B, T)``.
        """
        return int(inputs.shape[0]), int(inputs.shape[1])

    def masked_positions(self, inputs: torch.Tensor) -> torch.Tensor:
        """Where the logit NTK of a masked model is taken with ``positions="masked"``.

        Args:
            inputs: as for ``check_inputs``.

        Returns:
            ``[B, T]`` bool: the real (unpadded) positions whose id is ``mask_token_id``.

        Raises:
            ValueError: a causal model (it has no ``[MASK]`` positions).
        """
        if not self.masked:
            raise ValueError(f"{self.family} is a causal LM: it has no [MASK] positions (use positions='all')")
        ids, attn, _ = _unpack(inputs)
        sel = ids == self.mask_token_id
        return sel if attn is None else sel & (attn == 1)

    # ------------------------------------------------------------------ forward pass
    def _forward_for(self, name: str, mod: nn.Module, kind: str, sites: Sites, m: torch.Tensor | None):
        """The site-writing forward of one submodule; ``m`` ``[B, T, 1]`` zeroes site variables at padding."""
        full = self.prefix + name
        w, b = full + ".weight", full + ".bias"
        has_bias = getattr(mod, "bias", None) is not None
        final = mod is self.final_norm
        L = self.n_layers

        def finish(out):
            return sites.state(f"h{L}", out if m is None else out * m) if final else out

        def masked(u):
            return u if m is None else u * m

        if kind in ("linear", "conv1d"):
            def fwd(x):
                return sites.linear(name, w, masked(x), b if has_bias else None, transposed=kind == "conv1d")
        elif kind == "embedding":
            def fwd(index):
                if index.shape[0] != sites.B:  # position ids [1, T], broadcast over the batch by the model
                    index = index.expand(sites.B, *index.shape[1:])
                if m is None:
                    return sites.lookup(name, w, index)
                table = sites.param(w)  # padded: the one-hot site variable is 0 there
                onehot = F.one_hot(index.long(), table.shape[0]).to(table.dtype) * m
                return sites.linear(name, w, onehot, transposed=True)
        elif kind == "layernorm":
            def fwd(x):
                n = F.layer_norm(x, mod.normalized_shape, None, None, mod.eps)
                return finish(sites.scale(name, w, masked(n), b if has_bias else None))
        else:  # LlamaRMSNorm: x / rms(x) in at least float32, then γ ⊙ ·
            def fwd(x):
                x32 = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
                n = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + mod.variance_epsilon)).to(x.dtype)
                return finish(sites.scale(name, w, n))
        return fwd

    def run_sites(self, params: Params, inputs: torch.Tensor, sites: Sites) -> None:
        """Hugging Face's forward pass of the base model, its submodules writing through ``sites``.

        Args:
            params: θ by Hugging Face name (others keep the module's values).
            inputs: as for ``check_inputs``.
            sites: the recorder.
        """
        ids, attn, types = _unpack(inputs)
        dtype = next(iter(params.values())).dtype
        m = None if attn is None or bool((attn == 1).all()) else attn.to(dtype).unsqueeze(-1)
        handles = []

        def mark(l):
            def hook(mod, args, kwargs):
                if args:
                    x = args[0] if m is None else args[0] * m
                    return (sites.state(f"h{l}", x), *args[1:]), kwargs
                x = kwargs["hidden_states"] if m is None else kwargs["hidden_states"] * m
                return args, kwargs | {"hidden_states": sites.state(f"h{l}", x)}
            return hook

        if self.masked:
            kwargs = {"attention_mask": attn if attn is not None else torch.ones_like(ids),
                      "token_type_ids": types if types is not None else torch.zeros_like(ids)}
            if self.family == "roberta":  # positions from the attention mask (HF counts non-pad ids: the same)
                a = kwargs["attention_mask"]
                kwargs["position_ids"] = (torch.cumsum(a, 1) * a + self._position_offset - 1).long()
        else:
            kwargs = {"use_cache": False}
        for name, (mod, kind) in self._sited.items():
            mod.forward = self._forward_for(name, mod, kind, sites, m)
        try:
            for l, layer in enumerate(self.layers):
                handles.append(layer.register_forward_pre_hook(mark(l), with_kwargs=True))
            n = len(self.prefix)
            functional_call(self.base, {k[n:]: v for k, v in params.items() if k.startswith(self.prefix)},
                            (ids,), kwargs, strict=False)
        finally:
            for h in handles:
                h.remove()
            for mod, _ in self._sited.values():
                del mod.forward

    def output(self, states: torch.Tensor, readout_params: Params | None = None) -> torch.Tensor:
        """Logits ``[B, T, V]`` of the (fixed) LM head on the last visible block ``h_L``.

        Args:
            states: the visible states ``[B, T, (L + 1) D]``.
            readout_params: the head's parameters (None: the live ones), as ``readout_params()``.

        Returns:
            ``head(h_L)``: ``h_L Wᵀ (+ b)`` for a causal LM, the MLM head (dense, activation, LayerNorm,
            tied decoder + bias) for a masked one.
        """
        p = self.readout_params() if readout_params is None else readout_params
        h = states[..., -self.d_model:]
        if not self.masked:
            out = h @ p["weight"].T
            return out + p["bias"] if "bias" in p else out
        return functional_call(self.head, dict(p), (h,))

    def hidden_states(self, inputs: torch.Tensor) -> torch.Tensor:
        """The visible states (Hugging Face's hidden states side by side; 0 at padded positions).

        Args:
            inputs: as for ``check_inputs``.

        Returns:
            ``[B, T, (L + 1) · D]``.
        """
        self.check_inputs(inputs)
        with torch.no_grad():
            return self.visible_states(self.cell_params(), inputs)


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _unpack(inputs: torch.Tensor):
    """``(ids [B, T], attention mask or None, token types or None)`` of ``[B, T]`` / ``[B, T, 3]`` inputs."""
    if inputs.dim() == 2:
        return inputs, None, None
    return inputs[..., 0], inputs[..., 1], inputs[..., 2]


def masked_inputs(ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Pack a masked LM's inputs into one ``[B, T, 3]`` integer tensor (what ``record`` and the operators take).

    Args:
        ids: token ids ``[B, T]``.
        attention_mask: ``[B, T]``, 1 for real tokens and 0 for padding (None: all real).
        token_type_ids: ``[B, T]`` segment ids (None: all 0).

    Returns:
        ``[B, T, 3]`` int64: (ids, attention mask, token types).

    Raises:
        ValueError: ids that are not integer ``[B, T]``, or a mask / token types of another shape.
    """
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"ids must be integer token ids [B, T], got "
                         f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}")
    parts = [ids.long()]
    for what, t, default in (("attention_mask", attention_mask, 1), ("token_type_ids", token_type_ids, 0)):
        if t is None:
            parts.append(torch.full_like(parts[0], default))
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(ids.shape):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{what} must have the ids' shape [B, T] = {list(ids.shape)}, got {got}")
        parts.append(t.long().to(ids.device))
    return torch.stack(parts, -1)


def mask_tokens(inputs: torch.Tensor, model: HFLanguageModel, fraction: float = 0.15, *,
                seed: int = 0) -> torch.Tensor:
    """Replace a seeded random ``fraction`` of the real tokens by ``model.mask_token_id`` (at least one a sequence).

    BERT's masking (Devlin et al. 2019) without its 80/10/10 split: every chosen token becomes ``[MASK]``.

    Args:
        inputs: ``[B, T]`` ids or ``[B, T, 3]`` (``masked_inputs``) of a masked model.
        model: the adapted masked LM.
        fraction: share of the real tokens of each sequence to mask, in (0, 1].
        seed: of the choice.

    Returns:
        The inputs with the chosen ids replaced (same shape; padding untouched).

    Raises:
        ValueError: a causal model or a fraction outside (0, 1].
    """
    if not model.masked:
        raise ValueError(f"{model.family} is a causal LM; only masked LMs take [MASK] tokens")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    ids, attn, _ = _unpack(inputs)
    real = torch.ones_like(ids, dtype=torch.bool) if attn is None else attn == 1
    g = torch.Generator().manual_seed(seed)
    score = torch.rand(ids.shape, generator=g).to(ids.device).masked_fill(~real, 2.0)
    k = (real.sum(1).double() * fraction).ceil().clamp_min(1).long()
    rank = score.argsort(1).argsort(1)
    chosen = (rank < k[:, None]) & real
    out = inputs.clone()
    if out.dim() == 2:
        out[chosen] = model.mask_token_id
    else:
        out[..., 0][chosen] = model.mask_token_id
    return out


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return None
    return Conv1D


def _has_dropout(model: nn.Module) -> bool:
    if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        return True
    cfg = model.config
    return any(float(getattr(cfg, k, 0.0) or 0.0) > 0 for k in ("attention_dropout", "attn_pdrop",
                                                                  "attention_probs_dropout_prob"))


def param_subset(model: HFLanguageModel, patterns: str | Sequence[str]) -> tuple[str, ...]:
    """The parameter names of ``model`` that match any of the glob ``patterns`` (``fnmatch``), in model order.

    Examples: ``"*.attn.*"`` (GPT-2 attention), ``"*.attention.*"`` (Pythia), ``"*self_attn*"`` (Llama),
    ``"*.layers.0.*"`` (one layer), ``"*mlp*"``, ``"*.attention.*"`` (BERT/RoBERTa attention; their MLP is
    ``"*.intermediate.*"`` and ``"*[0-9].output.*"``).

    Args:
        model: the adapted model.
        patterns: one glob pattern or several.

    Returns:
        The matching names of θ.

    Raises:
        ValueError: a pattern that matches nothing (the message lists a few names).
    """
    patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    names = list(model.cell_params())
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            raise ValueError(f"parameter pattern {p!r} matches none of the model's {len(names)} parameters, e.g. "
                             f"{names[:3] + names[-2:]}")
    return tuple(n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns))


def suggested_chunk(model: HFLanguageModel, memory_bytes: float = 4e9) -> int:
    """Probes per batched reverse-mode application so that their parameter-sized gradients fit in ``memory_bytes``.

    Args:
        model: the adapted model.
        memory_bytes: what the gradients of one batched application may take.

    Returns:
        Probes per application, in [1, 64].
    """
    p = next(iter(model.cell_params().values()))
    size = sum(v.numel() for v in model.cell_params().values()) * p.element_size()
    return max(1, min(64, int(memory_bytes // max(size, 1))))


def num_parameters(model: HFLanguageModel, names: Sequence[str] | None = None) -> int:
    """Number of parameters in θ (or in ``names``).

    Args:
        model: the adapted model.
        names: a subset of θ's names (None: all of θ).

    Returns:
        The count of scalars.
    """
    params = model.cell_params()
    return sum(params[n].numel() for n in (params if names is None else names))


def describe(model: HFLanguageModel) -> str:
    """One line: family, layers, width, parameters, dtype.

    Args:
        model: the adapted model.

    Returns:
        The line.
    """
    p = next(iter(model.cell_params().values()))
    return (f"{model.family}: {model.n_layers} layers × d_model {model.d_model}, vocab {model.vocab_size}, "
            f"{num_parameters(model) / 1e6:.2f}M parameters (θ, head excluded), {p.dtype}")


__all__ = ["HFLanguageModel", "FAMILIES", "MLM_HEADS", "PRESETS", "lm_config", "build_lm", "load_lm",
           "ByteTokenizer", "load_tokenizer", "tokenize", "masked_inputs", "mask_tokens", "param_subset",
           "suggested_chunk", "num_parameters", "describe"]

