"""`bert-export CHECKPOINT_DIR OUT_DIR [--tag T]`: a training checkpoint to a Hugging Face directory.

The output holds config.json, model.safetensors and the tokenizer files, and loads with
`transformers.BertForPreTraining/BertModel/BertForMaskedLM.from_pretrained(OUT_DIR)` (a ModernBERT run:
`ModernBertForMaskedLM`/`ModernBertModel`; either: `AutoModelForMaskedLM`) and
`pipeline("fill-mask", model=OUT_DIR)`. Weights come through `pretrain.runtime.weights.load_weights`, which
consolidates any ZeRO stage, takes a run directory's newest checkpoint that verifies (checksums, not marked as
diverged), refuses a named tag that does not, and loads nothing that fails `weights_only=True` unless
`--trust-checkpoint`; the tokenizer is the one the dataset was built with (the manifest's
`tokenizer.path`, found through the data prefix the run recorded) unless `--tokenizer` names another.

After writing, the export is loaded back with transformers and run next to our model on a fixed batch;
a mismatch is an error, so a directory this command leaves behind is known to give our outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from common.errors import UserError, run_cli
from common.log import get_logger
from pretrain import identity
from pretrain.models import pretraining_from_state
from pretrain.models.base import PreTrainingModel

log = get_logger(__name__)

VERIFY_ATOL = 1e-4  # fp32 logits of the same weights through two implementations


def build_model(config, state: dict[str, torch.Tensor]) -> PreTrainingModel:
    """Our model of either family holding `state` (transformers' names; the tied decoder keys may be absent)."""
    return pretraining_from_state(config, {k: v.float() for k, v in state.items()}, "the checkpoint").eval()


def recorded_data_prefixes(source: Path) -> list[str]:
    """The dataset prefixes a training run recorded in its checkpoint (`train_state.json`), if any."""
    config = identity.recorded_config(source)
    if config is None:
        return []
    data = config.get("train", {}).get("data", [])
    if isinstance(data, dict):  # TrainConfig.data is a DataConfig (older checkpoints hold the prefix list)
        data = data.get("prefixes", [])
    return [data] if isinstance(data, str) else list(data)


def _first_dataset(name: str) -> str:
    """The first dataset a --data entry stands for (itself, its first shard or glob match)."""
    from data_prep.indexed import expand

    try:
        return expand(name)[0]
    except UserError:
        return name


def tokenizer_dir(source: Path, tokenizer: str | None, data: str | None) -> str:
    """The tokenizer to ship: --tokenizer, else the manifest of --data or of the run's recorded dataset."""
    return tokenizer_source(source, tokenizer, data)[0]


def tokenizer_source(source: Path, tokenizer: str | None, data: str | None) -> tuple[str, dict[str, str]]:
    """(tokenizer directory or tokenizer.json, its special tokens by role): --tokenizer with its own config,
    else the manifest's tokenizer with the roles the dataset was built with."""
    if tokenizer:
        return tokenizer, {}
    prefixes = [data] if data else recorded_data_prefixes(source)
    for prefix in prefixes:
        manifest = Path(_first_dataset(prefix) + ".json")
        if manifest.is_file():
            entry = json.loads(manifest.read_text()).get("tokenizer", {})
            path = entry.get("path")
            if path and Path(path).exists():
                return path, dict(entry.get("special_token_strings") or {})
            raise UserError(
                f"tokenizer {path!r} named in {manifest} is no tokenizer.json and is not a directory; "
                "pass --tokenizer DIR"
            )
    raise UserError(
        f"cannot find the dataset manifest of {source}; pass --tokenizer DIR (or --data PREFIX) for the tokenizer"
    )


def save_tokenizer(src: str, out_dir: Path, config, special_tokens: dict[str, str] | None = None) -> None:
    """Write the tokenizer the dataset was built with (BERT WordPiece, or any tokenizer.json with its special
    tokens set and BERT's `cls A sep B sep` post-processor) so that AutoTokenizer loads it with the same ids."""
    from data_prep.tokenizer import load

    tok = load(src, special_tokens)
    if len(tok) > config.vocab_size:
        raise UserError(
            f"tokenizer {src} has {len(tok)} tokens but the model only {config.vocab_size}; pass the --tokenizer "
            "the dataset was built with"
        )
    tok.model_max_length = config.max_position_embeddings
    tok.save_pretrained(str(out_dir))
    if (Path(src) / "vocab.txt").is_file():  # transformers 5 writes tokenizer.json only; older tools want vocab.txt
        shutil.copyfile(Path(src) / "vocab.txt", out_dir / "vocab.txt")


@torch.no_grad()
def verify(model: PreTrainingModel, out_dir: Path, seq_len: int = 16) -> float:
    """Largest |difference| between our and transformers' MLM (and NSP) logits on a fixed batch; raises above tol."""
    import transformers

    hf = getattr(transformers, model.HF_CLASS).from_pretrained(str(out_dir)).eval()
    c, gen = model.config, torch.Generator().manual_seed(0)
    seq_len = min(seq_len, c.max_position_embeddings)
    ids = torch.randint(0, c.vocab_size - 1, (2, seq_len), generator=gen)
    ids += (ids >= c.pad_token_id).long()  # every id but the pad id
    mask = torch.ones_like(ids)
    types = {"token_type_ids": (torch.arange(seq_len) >= seq_len // 2).long().expand(2, -1)}
    ours = model(input_ids=ids, attention_mask=mask, **types)
    theirs = hf(input_ids=ids, attention_mask=mask, **types if c.model_type == "bert" else {})
    pairs = [(ours.mlm_logits, theirs.prediction_logits if c.model_type == "bert" else theirs.logits)]
    if ours.nsp_logits is not None:
        pairs.append((ours.nsp_logits, theirs.seq_relationship_logits))
    diff = max((a - b).abs().max().item() for a, b in pairs)
    if not diff <= VERIFY_ATOL:
        raise RuntimeError(f"exported model differs from ours by {diff:g} (> {VERIFY_ATOL}); export is broken")
    return diff


def export(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    tag: str | None = None,
    tokenizer: str | None = None,
    data: str | None = None,
    check: bool = True,
    trust: bool = False,
    allow_tokenizer_change: bool = False,
) -> PreTrainingModel:
    """Write the Hugging Face directory; returns our model with the exported weights (eval mode)."""
    from pretrain.runtime.weights import load_weights

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    source = checkpoint / tag if tag else checkpoint
    if not source.exists():
        raise UserError(f"checkpoint {source} does not exist; pass a training --save directory (and --tag)")
    tok_src, special_tokens = tokenizer_source(source, tokenizer, data)  # fail before the slow part
    recorded = identity.recorded_config(source)
    if recorded is not None:  # our checkpoint: is this its tokenizer? (an HF directory records none)
        current = identity.describe_tokenizer(tok_src, special_tokens)
        named = f"--tokenizer {tok_src}" if tokenizer else f"the dataset's tokenizer {tok_src}"
        identity.compare(recorded.get("tokenizer"), current, f"checkpoint {source}", named, allow_tokenizer_change)
    config, state = load_weights(str(source), trust)
    model = build_model(config, state)
    model.save_hf_pretrained(str(out_dir))
    save_tokenizer(tok_src, out_dir, config, special_tokens)
    if check:
        verify(model, out_dir)
    return model


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bert-export",
        description="Export a pretraining checkpoint (any ZeRO stage) to a Hugging Face directory: config.json, "
        "model.safetensors and the tokenizer files, loadable by transformers' BertForPreTraining, BertModel, "
        "BertForMaskedLM (a ModernBERT run: ModernBertForMaskedLM, ModernBertModel; either: AutoModelForMaskedLM) "
        "and the fill-mask pipeline. The tokenizer must be the one the checkpoint was trained with (its fingerprint "
        "is compared).",
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="training --save directory or checkpoint tag dir")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="directory to write (created if missing)")
    parser.add_argument("--tag", default=None, help="checkpoint tag inside CHECKPOINT_DIR (default: the newest)")
    parser.add_argument(
        "--tokenizer", default=None, metavar="DIR", help="tokenizer directory (default: from the dataset manifest)"
    )
    parser.add_argument(
        "--data", default=None, metavar="PREFIX", help="dataset prefix whose manifest names the tokenizer"
    )
    parser.add_argument("--no-verify", action="store_true", help="skip reloading with transformers and comparing")
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="load the checkpoint without the weights_only check (docs/CHECKPOINTS.md): only for files of known origin",
    )
    parser.add_argument(
        identity.ALLOW_FLAG,
        action="store_true",
        help="ship a tokenizer whose fingerprint differs from the one the checkpoint was trained with",
    )
    args = parser.parse_args(argv)
    model = export(
        args.checkpoint,
        args.out_dir,
        args.tag,
        args.tokenizer,
        args.data,
        check=not args.no_verify,
        trust=args.trust_checkpoint,
        allow_tokenizer_change=args.allow_tokenizer_change,
    )
    c = model.config
    n, family = sum(p.numel() for p in model.parameters()), {"bert": "BERT", "modernbert": "ModernBERT"}[c.model_type]
    shape = f"{c.num_hidden_layers}-layer, {c.hidden_size}-wide {family} ({n / 1e6:.1f}M parameters)"
    log.info(f"exported {shape} to {args.out_dir}")
    if not args.no_verify:
        log.info(f"verified: transformers.{model.HF_CLASS} gives our logits on the exported directory")
    return 0


def cli() -> None:
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    cli()
