"""`bert-embed`: sentence embeddings from a pretrained encoder. Subcommands: train (contrastive fine-tuning to a
sentence-transformers model), eval (BEIR-format retrieval next to BM25), mine (hard negatives with a model),
task (a retrieval task from local documentation),
index and search (a FAISS index of a corpus). Each is one config dataclass; its fields are the flags.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from common.errors import run_cli
from common.flags import accept_launcher_arguments, add_command
from embed import evaluate, index, mine, tasks, train
from pretrain.runtime import dist


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bert-embed",
        description="Turn a pretrained BERT or ModernBERT into a sentence-embedding model and measure its retrieval.",
    )
    accept_launcher_arguments(p)  # the deepspeed launcher puts --local_rank before the subcommand
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_command(sub, "train", train.EmbedTrainConfig, train.main)
    add_command(sub, "eval", evaluate.EvalConfig, evaluate.evaluate)
    add_command(sub, "mine", mine.MineConfig, mine.mine)
    add_command(sub, "task", tasks.TaskConfig, tasks.build_task)
    add_command(sub, "index", index.IndexConfig, index.build)
    add_command(sub, "search", index.SearchConfig, index.search)
    return p


def _main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.func(args)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: one-line errors (exit 2); after training, the engine's bounded shutdown."""
    return run_cli(_main, argv, after_success=dist.shutdown)


if __name__ == "__main__":
    raise SystemExit(main())
