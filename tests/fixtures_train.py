"""A tiny English-like pretraining dataset for the training tests, built the way `bert-prep` builds one.

Documents are generated from a small grammar (subject, verb, object, place) with per-document topics, so
MLM has something to learn (the loss must fall) and NSP has real continuations. The vocabulary is trained
with Hugging Face `tokenizers`' WordPiece trainer and saved as vocab.txt; sentences are encoded with
`transformers.BertTokenizer` loaded from that directory and written with `IndexedDatasetWriter` + manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np

from data_prep import integrity
from data_prep.indexed import IndexedDataset, token_dtype
from data_prep.indexed_writer import IndexedDatasetWriter

SUBJECTS = [
    "the farmer",
    "a young teacher",
    "my neighbour",
    "the old sailor",
    "our doctor",
    "the little girl",
    "a tired soldier",
]
VERBS = [
    "carried",
    "painted",
    "repaired",
    "sold",
    "bought",
    "cleaned",
    "found",
    "watched",
    "borrowed",
    "described",
]
OBJECTS = [
    "the wooden boat",
    "a red bicycle",
    "the broken window",
    "an old map",
    "the heavy basket",
    "a silver clock",
]
PLACES = [
    "near the river",
    "in the morning",
    "behind the school",
    "at the market",
    "during the storm",
    "before dinner",
]
TOPICS = ["weather", "harbour", "garden", "village", "kitchen", "railway", "library", "mountain"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _documents(num_docs: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    docs = []
    for _ in range(num_docs):
        topic = rng.choice(TOPICS)
        subject = rng.choice(SUBJECTS)
        sentences = []
        for _ in range(rng.randint(4, 10)):
            sentences.append(
                f"{subject} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)} "
                f"and talked about the {topic}."
            )
        docs.append(sentences)
    return docs


def build_tokenizer(directory: Path, texts: list[str], vocab_size: int = 200, min_frequency: int = 0) -> Path:
    """Train a WordPiece vocabulary on `texts` with `bert-prep vocab` (the same on every run) into `directory`."""
    from data_prep.vocab import SPECIALS, VocabConfig, train_vocab

    assert SPECIALS == SPECIAL
    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory.parent / f"{directory.name}_texts.txt"
    corpus.write_text("".join(t.replace("\n", " ") + "\n" for t in texts), encoding="utf-8")
    cfg = VocabConfig([str(corpus)], vocab_size, str(directory), min_frequency=min_frequency, progress=False)
    return train_vocab(cfg)


def make_dataset(root: Path, num_docs: int = 60, seed: int = 0, name: str = "corpus") -> str:
    """Write `root/name.{bin,idx,json}` and `root/tokenizer/`; return the prefix."""
    from transformers import BertTokenizer

    docs = _documents(num_docs, seed)
    tok_dir = build_tokenizer(root / "tokenizer", [s for d in docs for s in d])
    tokenizer = BertTokenizer.from_pretrained(str(tok_dir))
    vocab_size = len(tokenizer)
    prefix = str(root / name)
    n_sent = n_tok = 0
    with IndexedDatasetWriter(prefix, token_dtype(vocab_size)) as w:
        for doc in docs:
            for sentence in doc:
                ids = tokenizer(sentence, add_special_tokens=False)["input_ids"]
                w.add_sequence(np.asarray(ids))
                n_sent, n_tok = n_sent + 1, n_tok + len(ids)
            w.end_document()
    vocab_txt = tok_dir / "vocab.txt"
    manifest = {
        "format": "mmidx-bert",
        "format_version": 2,
        "tool_version": "0.1.0",
        "dtype": str(token_dtype(vocab_size)),
        "tokenizer": {
            "path": str(tok_dir),
            "sha256": hashlib.sha256(vocab_txt.read_bytes()).hexdigest(),
            "vocab_size": vocab_size,
            "lowercase": True,
            "special_tokens": {n: tokenizer.convert_tokens_to_ids(f"[{n.upper()}]") for n in SPECIAL_NAMES},
        },
        "counts": {"documents": num_docs, "sentences": n_sent, "tokens": n_tok, "invalid_utf8_replaced": 0},
        "sources": [],
        "split_sentences": True,
    }
    manifest["integrity"] = integrity.record(IndexedDataset(prefix))
    Path(prefix + ".json").write_text(json.dumps(manifest))
    return prefix


SPECIAL_NAMES = ["pad", "unk", "cls", "sep", "mask"]


def tiny_model_json(path: Path, vocab_size: int = 256, max_positions: int = 64, **overrides) -> str:
    """A 2-layer, 64-wide BERT config (our JSON), dropout on, so resume tests also cover the RNG state."""
    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        num_layers=2,
        num_heads=2,
        intermediate_size=128,
        max_position_embeddings=max_positions,
    )
    cfg.update(overrides)
    path.write_text(json.dumps(cfg))
    return str(path)


def ds_config_json(path: Path, micro_batch: int = 4, world: int = 1, stage: int = 0, lr: float = 0.01, **extra) -> str:
    """A small CPU DeepSpeed config: fp32, LAMB, warmup + polynomial decay."""
    cfg = {
        "train_batch_size": micro_batch * world * extra.pop("grad_accum", 1),
        "train_micro_batch_size_per_gpu": micro_batch,
        "optimizer": {"type": "Lamb", "params": {"lr": lr, "weight_decay": 0.01, "betas": [0.9, 0.999]}},
        "scheduler": {"type": "WarmupPolyDecay", "params": {"warmup_proportion": 0.1, "power": 1.0}},
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    cfg.update(extra)
    path.write_text(json.dumps(cfg))
    return str(path)


ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A rendezvous port nothing listens on now (fixed ports collide with anything else on the machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STRICT_COLLECTIVES = ROOT / "tests" / "strict_collectives"


def run_env() -> dict:
    """Environment for training subprocesses: CPU DeepSpeed, one thread (bitwise-reproducible sums), and the
    check that every torch.distributed collective gets tensors on the accelerator's device (its sitecustomize)."""
    path = f"{ROOT}{os.pathsep}{STRICT_COLLECTIVES}"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=path, PYTHONUNBUFFERED="1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # left by in-process runs of module-scoped fixtures; a launcher sets its own
    return env


def train_args(setup: dict, save: Path, steps: int, *extra: str) -> list[str]:
    """`pretrain.train` flags for a `setup` made by `make_setup`."""
    args = ["--deepspeed_config", setup["ds"], "--model", setup["model"], "--data", setup["prefix"]]
    args += ["--seq-len", "48", "--train-steps", str(steps), "--save", str(save), "--eval-fraction", "0.1"]
    return args + ["--num-workers", "1", "--log-every", "1", *extra]


def make_setup(
    root: Path, stage: int = 0, dropout: float = 0.1, micro_batch: int = 4, world: int = 1, lr: float = 0.01
) -> dict:
    """Dataset, model JSON and DeepSpeed JSON under `root` (dataset shared between setups in one root)."""
    prefix = root / "data" / "corpus"
    if not Path(str(prefix) + ".json").exists():
        make_dataset(root / "data")
    tag = f"s{stage}_d{dropout}_w{world}"
    model = tiny_model_json(
        root / f"model_{tag}.json", vocab_size=200, hidden_dropout=dropout, attention_dropout=dropout
    )
    ds = ds_config_json(root / f"ds_{tag}.json", micro_batch=micro_batch, world=world, stage=stage, lr=lr)
    return {"prefix": str(prefix), "model": model, "ds": ds}


def losses(save: Path) -> dict[int, float]:
    """step -> training loss from SAVE/metrics.jsonl."""
    out = {}
    for line in (save / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "split" not in r:
            out[r["step"]] = r["loss"]
    return out


def finish(proc: subprocess.Popen, save: Path, timeout: float = 240) -> None:
    rc = proc.wait(timeout=timeout)
    assert rc == 0, (save.parent / f"{save.name}.log").read_text()[-4000:]


def interrupt_when(proc: subprocess.Popen, save: Path, min_step: int) -> None:
    """SIGTERM every process of the launch (as a batch scheduler does) once `min_step` steps are logged;
    return when all of them have exited."""
    metrics = save / "metrics.jsonl"
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(losses(save)) >= min_step:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be interrupted; raise STEPS"
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=120)
    while time.monotonic() < deadline:  # the deepspeed runner exits at once; its launcher and ranks follow
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError("the interrupted launch did not exit")
