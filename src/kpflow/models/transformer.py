"""A small self-attention transformer as a site model (positions = tokens).

Per block l (torch's ``nn.TransformerEncoderLayer`` layout, dropout 0, ``batch_first``):

* post-LN (``norm_first=False``, torch's default): ``x = LN1(h + SA(h))``, ``h' = LN2(x + FF(x))``;
* pre-LN (``norm_first=True``): ``x = h + SA(LN1(h))``, ``h' = x + FF(LN2(x))``;
* ``SA(u) = W_O concat_heads(softmax(q kᵀ/√d_h + mask) v) + b_O`` with ``[q; k; v] = W_in u + b_in``
  (``nn.MultiheadAttention``'s ``in_proj_weight [3D, D]``), causal or bidirectional;
* ``FF(u) = W_2 act(W_1 u + b_1) + b_2`` (GELU by default).

Weight sites (slots of the joint state, every token a position): ``embed`` (input projection or
token embedding, plus the learned positional embedding — both write the same pre-activation),
``block{l}.qkv`` (site variable: the block input, or LN1 of it), ``block{l}.o`` (the concatenated head outputs),
``block{l}.ff1``, ``block{l}.ff2``, and with LayerNorm ``block{l}.norm1``/``block{l}.norm2``
(elementwise weights on the normalised activations). The visible states are the residual stream
before the first block (``h0``) and after every block (``block{l}.h``): ``[B, T, (L + 1) · D]``.
The readout is linear on the last block's output.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .base import Params
from .sites import SiteModel, Sites

_ACT = {"gelu": F.gelu, "relu": torch.relu}


class _Block(nn.Module):
    """Parameter container with the names of ``nn.TransformerEncoderLayer``."""

    def __init__(self, d_model, n_heads, d_ff, bias, layer_norm, dtype, device):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, bias=bias, batch_first=True, dtype=dtype,
                                               device=device)
        self.linear1 = nn.Linear(d_model, d_ff, bias=bias, dtype=dtype, device=device)
        self.linear2 = nn.Linear(d_ff, d_model, bias=bias, dtype=dtype, device=device)
        if layer_norm:
            self.norm1 = nn.LayerNorm(d_model, bias=bias, dtype=dtype, device=device)
            self.norm2 = nn.LayerNorm(d_model, bias=bias, dtype=dtype, device=device)


class Transformer(SiteModel):
    """Self-attention transformer (see module docstring).

    Args:
        input_dim: width I of real-valued inputs ``[B, T, I]`` (input projection); ignored with ``vocab_size``.
        d_model, n_heads, n_layers, d_ff: sizes (``d_model`` divisible by ``n_heads``).
        output_dim: readout width (per token).
        max_len: number of rows of the learned positional embedding (longest sequence).
        vocab_size: if given, inputs are integer tokens ``[B, T]`` and ``embed`` is a lookup table.
        causal: mask attention to earlier tokens (else bidirectional).
        layer_norm: include LayerNorm (torch's layout); norm_first: pre-LN instead of post-LN.
        activation: ``"gelu"`` or ``"relu"`` in the feed-forward part.
        bias: biases in every linear map (and LayerNorm).
        pos_std: scale of the initial positional embedding (0.02 as in the papers' experiment).
        dtype, device: of the parameters.

    Raises:
        ValueError: sizes that do not fit or an unknown activation.
    """

    def __init__(self, input_dim: int = 1, d_model: int = 64, n_heads: int = 4, n_layers: int = 1,
                 d_ff: int = 128, output_dim: int = 1, max_len: int = 512, *, vocab_size: int | None = None,
                 causal: bool = False, layer_norm: bool = True, norm_first: bool = False,
                 activation: str = "gelu", bias: bool = True, pos_std: float = 0.02, dtype=None, device=None):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        if min(d_model, n_heads, n_layers, d_ff, output_dim, max_len) < 1:
            raise ValueError("d_model, n_heads, n_layers, d_ff, output_dim and max_len must be >= 1")
        if activation not in _ACT:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(_ACT)}")
        self.input_dim, self.d_model, self.n_heads, self.n_layers = int(input_dim), d_model, n_heads, n_layers
        self.d_ff, self.output_dim, self.max_len, self.vocab_size = d_ff, output_dim, max_len, vocab_size
        self.causal, self.layer_norm, self.norm_first = bool(causal), bool(layer_norm), bool(norm_first)
        self.activation, self.bias = activation, bool(bias)
        if vocab_size is not None:
            self.embed = nn.Embedding(vocab_size, d_model, dtype=dtype, device=device)
        else:
            self.embed = nn.Linear(self.input_dim, d_model, bias=bias, dtype=dtype, device=device)
        self.pos = nn.Parameter(pos_std * torch.randn(max_len, d_model, dtype=dtype, device=device))
        self.blocks = nn.ModuleList(_Block(d_model, n_heads, d_ff, bias, layer_norm, dtype, device)
                                    for _ in range(n_layers))
        self.readout = nn.Linear(d_model, output_dim, dtype=dtype, device=device)

    @property
    def state_dim(self) -> int:
        """The width of the visible state: the residual streams ``h0, ..., h_L`` side by side."""
        return (self.n_layers + 1) * self.d_model

    # ------------------------------------------------------------------ inputs
    def check_inputs(self, inputs) -> None:
        """Refuse inputs the transformer cannot take.

        Args:
            inputs: ``[B, T, input_dim]`` reals, or ``[B, T]`` integer tokens with ``vocab_size``.

        Raises:
            ValueError: a list of sequences (pad them), another shape or dtype, tokens out of range, an
                empty batch, more tokens than ``max_len``.
        """
        if isinstance(inputs, (list, tuple)):
            lengths = [int(x.shape[0]) for x in inputs]
            raise ValueError(f"inputs is a list of {len(inputs)} sequences of lengths {lengths}; pass one tensor "
                             "[B, T, I] (or [B, T] tokens): pad the sequences to one length and mask the padding "
                             "out of the loss with mask=[B, T]")
        if not isinstance(inputs, torch.Tensor):
            raise ValueError(f"inputs must be a tensor, got {type(inputs).__name__}")
        if self.vocab_size is not None:
            if inputs.dim() != 2 or inputs.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"with vocab_size={self.vocab_size} the inputs are integer tokens [B, T], got "
                                 f"{tuple(inputs.shape)} {inputs.dtype}")
            if inputs.numel() and (int(inputs.min()) < 0 or int(inputs.max()) >= self.vocab_size):
                raise ValueError(f"tokens must lie in [0, {self.vocab_size}), got [{int(inputs.min())}, "
                                 f"{int(inputs.max())}]")
        elif inputs.dim() != 3 or inputs.shape[-1] != self.input_dim:
            raise ValueError(f"inputs must be [B, T, {self.input_dim}], got {tuple(inputs.shape)}")
        if inputs.shape[0] < 1 or inputs.shape[1] < 1:
            raise ValueError(f"inputs {tuple(inputs.shape)} have no sequence or no token (B, T must be >= 1)")
        if inputs.shape[1] > self.max_len:
            raise ValueError(f"sequences of {inputs.shape[1]} tokens are longer than max_len={self.max_len} "
                             "(the rows of the positional embedding)")

    def positions(self, inputs) -> tuple[int, int]:
        """The position space ``(B, T)``: sequences × tokens.

        Args:
            inputs: as for ``forward``.

        Returns:
            ``(B, T)``.
        """
        return int(inputs.shape[0]), int(inputs.shape[1])

    # ------------------------------------------------------------------ forward pass
    def _norm(self, sites: Sites, slot: str, prefix: str, h: torch.Tensor) -> torch.Tensor:
        n = F.layer_norm(h, (self.d_model,), eps=1e-5)
        return sites.scale(slot, prefix + ".weight", n, prefix + ".bias" if self.bias else None)

    def _attention(self, sites: Sites, l: int, u: torch.Tensor) -> torch.Tensor:
        pre = f"blocks.{l}.self_attn."
        B, T, D = u.shape
        Hh, dh = self.n_heads, D // self.n_heads
        qkv = sites.linear(f"block{l}.qkv", pre + "in_proj_weight", u, pre + "in_proj_bias" if self.bias else None)
        q, k, v = (t.reshape(B, T, Hh, dh).transpose(1, 2) for t in qkv.split(D, -1))
        scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
        if self.causal:
            future = torch.ones(T, T, dtype=torch.bool, device=u.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D)
        return sites.linear(f"block{l}.o", pre + "out_proj.weight", ctx, pre + "out_proj.bias" if self.bias else None)

    def _feedforward(self, sites: Sites, l: int, u: torch.Tensor) -> torch.Tensor:
        pre = f"blocks.{l}."
        f1 = sites.linear(f"block{l}.ff1", pre + "linear1.weight", u, pre + "linear1.bias" if self.bias else None)
        return sites.linear(f"block{l}.ff2", pre + "linear2.weight", _ACT[self.activation](f1),
                            pre + "linear2.bias" if self.bias else None)

    def run_sites(self, params: Params, inputs: torch.Tensor, sites: Sites) -> None:
        """Embedding, then every block (module docstring), each residual stream marked visible.

        Args:
            params: the model's parameters by name (the θ of the operators).
            inputs: as for ``forward``.
            sites: the recorder every weight site and visible state is written to.
        """
        B, T = self.positions(inputs)
        pos = torch.arange(T, device=inputs.device)
        if self.vocab_size is not None:
            h = sites.affine("embed", {}, lookups={"embed.weight": inputs, "pos": pos})
        else:
            terms = {"embed.weight": inputs} | ({"embed.bias": None} if self.bias else {})
            h = sites.affine("embed", terms, lookups={"pos": pos})
        h = sites.state("h0", h)
        for l in range(self.n_layers):
            pre = f"blocks.{l}."
            if not self.layer_norm:
                x = h + self._attention(sites, l, h)
                h = x + self._feedforward(sites, l, x)
            elif self.norm_first:
                x = h + self._attention(sites, l, self._norm(sites, f"block{l}.norm1", pre + "norm1", h))
                h = x + self._feedforward(sites, l, self._norm(sites, f"block{l}.norm2", pre + "norm2", x))
            else:
                x = self._norm(sites, f"block{l}.norm1", pre + "norm1", h + self._attention(sites, l, h))
                h = self._norm(sites, f"block{l}.norm2", pre + "norm2", x + self._feedforward(sites, l, x))
            h = sites.state(f"block{l}.h", h)

    def output(self, states: torch.Tensor, readout_params: Params | None = None) -> torch.Tensor:
        """The per-token linear readout of the last block's residual stream.

        Args:
            states: the visible states ``[B, T, Hv]``.
            readout_params: the readout's parameters (None: the model's own).

        Returns:
            ``[B, T, O]``.
        """
        p = self.readout_params() if readout_params is None else readout_params
        out = states[..., -self.d_model:] @ p["weight"].T
        return out + p["bias"] if "bias" in p else out

    # ------------------------------------------------------------------ torch layouts
    def to_torch(self) -> TorchTransformer:
        """The same network built from torch's own layers, with copies of the parameters.

        Returns:
            The ``TorchTransformer`` (``nn.TransformerEncoderLayer`` blocks, dropout 0).

        Raises:
            ValueError: without LayerNorm (torch's encoder layer always has it).
        """
        if not self.layer_norm:
            raise ValueError("nn.TransformerEncoderLayer always has LayerNorm; build with layer_norm=True, or use "
                             "the blocks' self_attn (nn.MultiheadAttention) directly")
        p = self.pos
        ref = TorchTransformer(self.input_dim, self.d_model, self.n_heads, self.n_layers, self.d_ff, self.output_dim,
                               self.max_len, vocab_size=self.vocab_size, causal=self.causal,
                               norm_first=self.norm_first, activation=self.activation, bias=self.bias,
                               dtype=p.dtype, device=p.device)
        ref.load_state_dict(self.state_dict())
        return ref

    @classmethod
    def from_torch(cls, module: TorchTransformer | nn.TransformerEncoder | list, input_dim: int | None = None,
                   output_dim: int = 1, max_len: int = 512, causal: bool = False) -> Transformer:
        """A ``Transformer`` with copies of torch's parameters.

        ``module`` is a ``TorchTransformer`` (everything copied), or an ``nn.TransformerEncoder`` / a list of
        ``nn.TransformerEncoderLayer`` (the blocks are copied; embedding, positions and readout are drawn
        fresh, ``input_dim`` is then required).

        Args:
            module: the torch network.
            input_dim: width of the inputs (for encoder layers alone).
            output_dim: readout width (for encoder layers alone).
            max_len: rows of the positional embedding (for encoder layers alone).
            causal: causal attention (torch's layers do not store it).

        Returns:
            The ``Transformer``.

        Raises:
            TypeError: other modules.
            ValueError: no ``input_dim`` for encoder layers, not ``batch_first``, dropout > 0, an activation
                other than GELU/ReLU.
        """
        if isinstance(module, TorchTransformer):
            c = module.config
            w = module.readout.weight
            model = cls(**c, dtype=w.dtype, device=w.device)
            model.load_state_dict(module.state_dict())
            return model
        layers = list(module.layers) if isinstance(module, nn.TransformerEncoder) else list(module)
        if not layers or not all(isinstance(m, nn.TransformerEncoderLayer) for m in layers):
            raise TypeError("from_torch expects a TorchTransformer, an nn.TransformerEncoder or a list of "
                            "nn.TransformerEncoderLayer")
        if input_dim is None:
            raise ValueError("give input_dim: the encoder layers do not say the width of the inputs")
        first = layers[0]
        attn = first.self_attn
        if not attn.batch_first:
            raise ValueError("the encoder layers must be built with batch_first=True")
        if any(m.dropout.p > 0 or m.self_attn.dropout > 0 for m in layers):
            raise ValueError("dropout must be 0 (the operators linearise a deterministic network)")
        act = getattr(first.activation, "__name__", type(first.activation).__name__).lower()
        act = {"gelu": "gelu", "relu": "relu"}.get(act)
        if act is None:
            raise ValueError(f"unsupported activation {first.activation!r}; use 'gelu' or 'relu'")
        w = first.linear1.weight
        model = cls(input_dim, attn.embed_dim, attn.num_heads, len(layers), first.linear1.out_features, output_dim,
                    max_len, causal=causal, norm_first=first.norm_first, activation=act,
                    bias=attn.in_proj_bias is not None, dtype=w.dtype, device=w.device)
        for mine, theirs in zip(model.blocks, layers, strict=False):
            mine.load_state_dict(theirs.state_dict())
        return model


class TorchTransformer(nn.Module):
    """The reference network in torch's own layers.

    Embedding (+ positions), ``nn.TransformerEncoderLayer`` blocks (dropout 0, ``batch_first``), linear
    readout. Its ``forward(inputs)`` returns the readout ``[B, T, O]``; ``encode(inputs)`` the last block's
    output.
    """

    def __init__(self, input_dim, d_model, n_heads, n_layers, d_ff, output_dim, max_len, *, vocab_size=None,
                 causal=False, norm_first=False, activation="gelu", bias=True, dtype=None, device=None):
        super().__init__()
        self.config = dict(input_dim=input_dim, d_model=d_model, n_heads=n_heads, n_layers=n_layers, d_ff=d_ff,
                           output_dim=output_dim, max_len=max_len, vocab_size=vocab_size, causal=causal,
                           layer_norm=True, norm_first=norm_first, activation=activation, bias=bias)
        self.causal = causal
        self.embed = (nn.Embedding(vocab_size, d_model, dtype=dtype, device=device) if vocab_size is not None
                      else nn.Linear(input_dim, d_model, bias=bias, dtype=dtype, device=device))
        self.pos = nn.Parameter(torch.zeros(max_len, d_model, dtype=dtype, device=device))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, n_heads, d_ff, dropout=0.0, activation=activation, batch_first=True,
                                       norm_first=norm_first, bias=bias, dtype=dtype, device=device)
            for _ in range(n_layers))
        self.readout = nn.Linear(d_model, output_dim, dtype=dtype, device=device)

    def encode(self, inputs):
        """The last block's output.

        Args:
            inputs: ``[B, T, I]`` (or ``[B, T]`` tokens).

        Returns:
            ``[B, T, d_model]``.
        """
        T = inputs.shape[1]
        h = self.embed(inputs) + self.pos[:T]
        mask = nn.Transformer.generate_square_subsequent_mask(T, dtype=h.dtype, device=h.device) if self.causal \
            else None
        for blk in self.blocks:
            h = blk(h, src_mask=mask, is_causal=self.causal)
        return h

    def forward(self, inputs):
        """The readout of ``encode(inputs)``.

        Args:
            inputs: ``[B, T, I]`` (or ``[B, T]`` tokens).

        Returns:
            ``[B, T, O]``.
        """
        return self.readout(self.encode(inputs))
