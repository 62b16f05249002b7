"""Generated retrieval data for the embedding tests: passages are filler words around one keyword and a few
distractors (finetune's classify sentences); a query is the passage's non-filler words in another order, so BM25
finds its passage and a model must learn to."""

from __future__ import annotations

import json
import random
from pathlib import Path

from fixtures_finetune import FILLER, classify_rows


def pairs(n: int, seed: int, negatives: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows, out = classify_rows(n, seed), []
    texts = [r["text"] for r in rows]
    for row in rows:
        words = [w for w in row["text"].split() if w not in FILLER]
        rng.shuffle(words)
        pair = {"query": " ".join(words), "positive": row["text"]}
        if negatives:
            pair["negatives"] = rng.sample([t for t in texts if t != row["text"]], negatives)
        out.append(pair)
    return out


def write_pairs(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_beir(directory: Path, rows: list[dict], split: str = "test") -> Path:
    """A BEIR directory of `rows` (query i's relevant passage is d<i>)."""
    (directory / "qrels").mkdir(parents=True, exist_ok=True)
    corpus = [{"_id": f"d{i}", "title": "", "text": r["positive"]} for i, r in enumerate(rows)]
    queries = [{"_id": f"q{i}", "text": r["query"]} for i, r in enumerate(rows)]
    (directory / "corpus.jsonl").write_text("".join(json.dumps(c) + "\n" for c in corpus))
    (directory / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    qrels = "".join(f"q{i}\td{i}\t1\n" for i in range(len(rows)))
    (directory / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + qrels)
    return directory


def ds_config(path: Path, micro: int, accum: int = 1, lr: float = 1e-3) -> Path:
    """A CPU fp32 DeepSpeed JSON (AdamW, constant after no warmup)."""
    cfg = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.0}},
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 0},
        "steps_per_print": 1000000,
    }
    path.write_text(json.dumps(cfg))
    return path


def no_dropout_checkpoint(directory: Path, tokenizer: Path, seed: int = 0) -> Path:
    """A tiny BERT HF directory without dropout (so runs that split a batch differently compute the same thing)."""
    import torch

    from pretrain.models.bert import BertConfig, BertForPreTraining

    vocab = (tokenizer / "vocab.txt").read_text()
    torch.manual_seed(seed)
    config = BertConfig.preset(
        "tiny",
        vocab_size=len(vocab.splitlines()),
        max_position_embeddings=64,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    BertForPreTraining(config).save_hf_pretrained(str(directory))
    (directory / "vocab.txt").write_text(vocab)
    return directory
