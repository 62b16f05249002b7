"""SIGTERM-to-exit of a pretraining launch with long gradient accumulation: does a stop fit the launcher's grace?

DeepSpeed's launch.py kills the ranks 30 s after it passes a SIGTERM on (Slurm's KillWait is 30 s by default
too). A stop waits for the current micro-batch (the flag is read before each one), then every rank saves the
last completed step and exits. This times that, from the signal to the last process's exit, on a real
`deepspeed --num_gpus N` launch with `--accum` micro-batches per step, and reports what the checkpoint cost.

    python scripts/bench_stop.py --workdir /tmp/benchstop [--model mini] [--accum 32] [--trials 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], **kw) -> None:
    subprocess.run(cmd, check=True, cwd=ROOT, **kw)


def prepare(work: Path, corpus_mb: float) -> str:
    """The built-in corpus, a vocabulary and a dataset (skipped when already there)."""
    prefix = work / "data" / "corpus"
    if not Path(f"{prefix}.idx").exists():
        run(["bert-prep", "corpus", "--output", str(work / "corpus.txt"), "--max-mb", str(corpus_mb)])
        run(
            [
                "bert-prep",
                "vocab",
                "--input",
                str(work / "corpus.txt"),
                "--vocab-size",
                "8192",
                "--output",
                str(work / "tokenizer"),
            ]
        )
        run(
            [
                "bert-prep",
                "build",
                "--input",
                str(work / "corpus.txt"),
                "--tokenizer",
                str(work / "tokenizer"),
                "--output",
                str(prefix),
                "--workers",
                "2",
                "--no-progress",
            ]
        )
    return str(prefix)


def steps_logged(save: Path) -> list[dict]:
    path = save / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line and "split" not in line]


def trial(args, prefix: str, ds: Path, save: Path, seed: int) -> dict:
    """One launch, stopped by SIGTERM at a random point of a step once two steps are logged."""
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), PYTHONPATH=str(ROOT))
    cmd = [
        "deepspeed",
        "--num_gpus",
        str(args.procs),
        "--master_port",
        str(29600 + seed),
        "--module",
        "pretrain.train",
        "--deepspeed_config",
        str(ds),
        "--model",
        args.model,
        "--model-set",
        "vocab_size=8192",
        "--data",
        prefix,
        "--seq-len",
        str(args.seq_len),
        "--train-steps",
        "100000",
        "--save",
        str(save),
        "--log-every",
        "1",
        "--seed",
        str(seed),
    ]
    log = open(f"{save}.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    while len(steps_logged(save)) < 2:
        if proc.poll() is not None:
            raise SystemExit(f"the launch ended early; see {save}.log")
        time.sleep(0.05)
    records = steps_logged(save)
    step_s = statistics.median(args.global_batch / r["seq_per_s"] for r in records[1:])
    time.sleep(random.Random(seed).uniform(0, step_s))
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler does: every process of the launch
    proc.wait()
    while True:  # the runner exits first; the launch is over when its last process is
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.02)
    exit_s = time.monotonic() - t0
    text = Path(f"{save}.log").read_text()
    saved = re.findall(r"saved (\S+) \(([\d.]+) GB in ([\d.]+) s\)", text)
    return {"rc": proc.returncode, "step_s": step_s, "exit_s": exit_s, "saved": saved[-1] if saved else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="corpus, dataset and runs go here")
    p.add_argument("--model", default="mini", help="model preset (default mini)")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per micro-batch (default 8)")
    p.add_argument("--accum", type=int, default=32, help="micro-batches per optimizer step (default 32)")
    p.add_argument("--procs", type=int, default=2, help="processes (default 2)")
    p.add_argument("--seq-len", type=int, default=128, help="sequence length (default 128)")
    p.add_argument("--trials", type=int, default=3, help="launches, each stopped once (default 3)")
    p.add_argument("--corpus-mb", type=float, default=2.0, help="size of the built-in corpus (default 2)")
    args = p.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    prefix = prepare(work, args.corpus_mb)
    args.global_batch = args.micro_batch * args.accum * args.procs
    ds = work / "ds.json"
    ds.write_text(
        json.dumps(
            {
                "train_batch_size": args.global_batch,
                "train_micro_batch_size_per_gpu": args.micro_batch,
                "optimizer": {"type": "Lamb", "params": {"lr": 1e-3, "weight_decay": 0.01}},
                "scheduler": {"type": "WarmupPolyDecay", "params": {"warmup_proportion": 0.01}},
                "gradient_clipping": 1.0,
                "zero_optimization": {"stage": 1},
                "steps_per_print": 10**9,
            }
        )
    )
    results = []
    for i in range(args.trials):
        save = work / f"run{i}"
        subprocess.run(["rm", "-rf", str(save)], check=True)
        results.append(trial(args, prefix, ds, save, seed=i))
        r = results[-1]
        print(
            f"trial {i}: exit code {r['rc']}, step {r['step_s']:.1f} s ({args.accum} micro-batches), "
            f"SIGTERM to exit {r['exit_s']:.1f} s, checkpoint {r['saved']}",
            flush=True,
        )
    exits = [r["exit_s"] for r in results]
    print(
        f"SIGTERM-to-exit: median {statistics.median(exits):.1f} s, max {max(exits):.1f} s; one step takes "
        f"{statistics.median(r['step_s'] for r in results):.1f} s ({args.model}, {args.procs} processes, micro-batch "
        f"{args.micro_batch} x {args.accum} accumulation, seq {args.seq_len})"
    )


if __name__ == "__main__":
    sys.exit(main())
