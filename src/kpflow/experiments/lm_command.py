"""``kpflow lm``: language-model statistics (torch and transformers are imported only when a command runs)."""

from __future__ import annotations

from pathlib import Path

import typer

lm_app = typer.Typer(help="Hugging Face causal (GPT-2, GPT-NeoX/Pythia, Llama) and masked (BERT, RoBERTa) language "
                          "models: NTK statistics.",
                     no_args_is_help=True, add_completion=False, rich_markup_mode=None)

STATS_HELP = """Hidden-state NTK and logit NTK trace, ‖·‖_F and effective rank (one-sided probes, with standard
errors), the alignment of the attention and MLP NTKs, and the exact statistics of K, on windows of a text.

MODEL is a preset (gpt2-tiny, pythia-tiny, llama-tiny, bert-tiny, roberta-tiny, bert-mini, pythia-14m,
pythia-70m, pythia-410m: random weights), a config.json (random weights) or a folder with config.json and
*.safetensors weights. Nothing is downloaded. The tokenizer is UTF-8 bytes unless --tokenizer names a
local tokenizer folder. For a masked LM (BERT, RoBERTa) a seeded --mask-fraction of the tokens becomes
[MASK] (the tokenizer's mask token; with bytes the model's last id) and the logit NTK is taken over the
[MASK] positions unless --logit-positions all.

Examples:

  kpflow lm stats pythia-14m --text README.md --batch 2 --tokens 128 --probes 30

  kpflow lm stats bert-mini --text README.md --mask-fraction 0.15
"""


@lm_app.command("stats", help=STATS_HELP)
def stats_command(
    model: str = typer.Argument(..., help="Preset name, config.json, or a folder with config.json + safetensors."),
    text: Path = typer.Option(..., "--text", help="UTF-8 text file the token windows are cut from."),
    tokenizer: Path = typer.Option(None, "--tokenizer", help="Local tokenizer folder (default: UTF-8 bytes)."),
    batch: int = typer.Option(2, "--batch", help="Token windows (sequences)."),
    tokens: int = typer.Option(128, "--tokens", help="Tokens per window."),
    probes: int = typer.Option(30, "--probes", help="Probes per estimate (>= 3)."),
    chunk: int = typer.Option(1, "--chunk", help="Probes per batched VJP (each holds a parameter-sized gradient)."),
    params: list[str] = typer.Option(None, "--params", help="Glob pattern(s) of the parameters θ, e.g. '*.attn.*'."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, float64 or bfloat16."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights (configs/presets) and of the probes."),
    threads: int = typer.Option(0, "--threads", help="torch threads (0: torch's default)."),
    no_alignment: bool = typer.Option(False, "--no-alignment", help="Skip the attention/MLP alignment."),
    mask_fraction: float = typer.Option(0.15, "--mask-fraction", help="Masked LMs: share of tokens made [MASK]."),
    logit_positions: str = typer.Option("auto", "--logit-positions",
                                        help="Logit NTK positions: auto ([MASK] for masked LMs), all, masked."),
):
    try:
        import torch

        from kpflow.models.hf import (
            HFLanguageModel,
            build_lm,
            describe,
            load_lm,
            load_tokenizer,
            mask_tokens,
            param_subset,
            tokenize,
        )

        from .language_model import describe_estimate, lm_statistics

        if threads > 0:
            torch.set_num_threads(threads)
        dt = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}.get(dtype)
        if dt is None:
            raise ValueError(f"--dtype must be float32, float64 or bfloat16, got {dtype!r}")
        hf = load_lm(model, dtype=dt) if Path(model).is_dir() else build_lm(model, dtype=dt, seed=seed)
        lm = HFLanguageModel(hf)
        tok = load_tokenizer(tokenizer)
        if lm.masked and getattr(tok, "mask_token_id", None) is not None:
            lm = HFLanguageModel(hf, mask_token_id=tok.mask_token_id)
        if not text.is_file():
            raise FileNotFoundError(f"--text {text} is not a file")
        ids = tokenize(text.read_text(encoding="utf-8", errors="replace"), tok, lm, batch, tokens)
        masked_note = ""
        if lm.masked:
            ids = mask_tokens(ids, lm, mask_fraction, seed=seed)
            masked_note = f", {int(lm.masked_positions(ids).sum())} of them [MASK] (id {lm.mask_token_id})"
        names = param_subset(lm, params) if params else None
        typer.echo(describe(lm) + f"; {batch} × {tokens} tokens of {text}{masked_note}")
        out = lm_statistics(lm, ids, num_matvecs=probes, seed=seed, chunk_size=chunk, param_names=names,
                            alignment=not no_alignment, positions=logit_positions)
    except (ValueError, FileNotFoundError, ImportError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    for key, est in out.items():
        typer.echo(f"{key} = {describe_estimate(est)}")
