"""Where an exported encoder's attention looks: per layer and head, the attention entropy and the mean weight on
the token itself and on its previous and next token, over rows of a text file.

    python scripts/attention_stats.py HF_DIR --text corpus.txt [--rows 16] [--seq-len 128] [--offset 200000]

A model on the frequent-token plateau of masked-LM pretraining attends almost uniformly (entropy near log S, every
neighbour weight near 1/S); one that has left it has heads that look at the previous or the next token
(docs/PERFORMANCE.md, stop 30). HF_DIR is a `bert-export` directory (either family) or any transformers
masked-LM directory with its tokenizer.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.errors import UserError, run_cli  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("model", metavar="HF_DIR", help="exported model directory (config, weights, tokenizer)")
    p.add_argument("--text", required=True, help="a UTF-8 text file to take the rows from")
    p.add_argument("--rows", type=int, default=16, help="rows of --seq-len tokens")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row")
    p.add_argument("--offset", type=int, default=0, help="characters of --text to skip first")
    return p.parse_args(argv)


def attention_stats(attentions) -> list[dict]:
    """Per layer: {entropy, self, previous, next}, each a list over heads, from (B, heads, S, S) probabilities."""
    import torch

    out = []
    for a in attentions:
        a = a.double()
        S = a.shape[-1]
        i = torch.arange(S)
        entropy = -(a.clamp_min(1e-30).log() * a).sum(-1).mean((0, 2))
        out.append(
            {
                "entropy": entropy.tolist(),
                "self": a[..., i, i].mean((0, 2)).tolist(),
                "previous": a[..., i[1:], i[:-1]].mean((0, 2)).tolist(),
                "next": a[..., i[:-1], i[1:]].mean((0, 2)).tolist(),
            }
        )
    return out


def main(args: argparse.Namespace) -> None:
    import torch
    import transformers
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    if args.rows < 1 or args.seq_len < 2:
        raise UserError("--rows must be at least 1 and --seq-len at least 2")
    need = args.rows * args.seq_len
    try:  # only the characters the rows can use (a token is rarely 20 characters), not the whole corpus
        with open(args.text, encoding="utf-8") as f:
            f.read(args.offset)
            text = f.read(need * 20)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--text {args.text}: {e}") from None
    if not (Path(args.model) / "config.json").is_file():
        raise UserError(f"{args.model}: no config.json there; give a bert-export directory")
    transformers.logging.set_verbosity_error()  # no load report (an export's NSP head is unused here)
    transformers.utils.logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as e:
        raise UserError(f"{args.model}: no tokenizer there ({e})") from None
    tok.model_max_length = 1 << 30  # the rows are cut below; no warning for the long text
    ids = tok(text, add_special_tokens=False)["input_ids"][:need]
    if len(ids) < need:
        raise UserError(f"--text has {len(ids)} tokens after --offset; {need} are needed (--rows x --seq-len)")
    try:
        model = AutoModelForMaskedLM.from_pretrained(args.model, attn_implementation="eager").eval()
    except (OSError, ValueError) as e:
        raise UserError(f"{args.model}: not a masked-LM directory ({e})") from None
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids).view(args.rows, args.seq_len), output_attentions=True)
    uniform = 1 / args.seq_len
    print(
        f"{args.rows} rows of {args.seq_len} tokens; uniform attention: entropy {math.log(args.seq_len):.2f}, "
        f"weight {uniform:.3f} on each token"
    )
    for n, layer in enumerate(attention_stats(out.attentions)):
        fields = "  ".join(
            f"{k} " + " ".join(f"{v:.3f}" for v in layer[k]) for k in ("entropy", "self", "previous", "next")
        )
        print(f"layer {n}: {fields}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main, parse=parse_args))
