"""Training metrics of rank 0: SAVE/metrics.jsonl, the console, TensorBoard and Weights & Biases.

Design choices:
- A resumed run continues the same records: metrics.jsonl is cut back to the resumed step, TensorBoard
  purges the events after it (`purge_step`), and wandb resumes the run whose id is kept in SAVE/wandb_run_id,
  so a preempted and relaunched run reads as one run everywhere, without replayed steps twice.
- Keys are the same everywhere: a training record `{"step", "loss", ...}` is logged as `train/loss`, an
  evaluation record (`"split": "eval"`) as `eval/mlm_acc`, at the record's step.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from pretrain.runtime import dist

WANDB_ID_FILE = "wandb_run_id"


class Metrics:
    """Rank 0 writes; on every other rank each call does nothing."""

    def __init__(self, save: str, start_step: int, resolved: dict, tensorboard: bool, wandb_project: str | None):
        self.enabled = dist.is_rank0()
        self.path = Path(save) / "metrics.jsonl"
        self.tb = self.wandb = None
        if not self.enabled:
            return
        Path(save).mkdir(parents=True, exist_ok=True)
        self._cut_back(start_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(save) / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        if wandb_project:
            self.wandb = _wandb_run(save, wandb_project, resolved)

    def _cut_back(self, start_step: int) -> None:
        """Drop what a killed or stopped run logged after the checkpoint it resumes from."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            record = json.loads(line) if line else None
            if record and (record["step"] < start_step or (record["step"] == start_step and "split" not in record)):
                keep.append(line)
        self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        prefix = "eval/" if record.get("split") == "eval" else "train/"
        scalars = {prefix + k: v for k, v in record.items() if isinstance(v, int | float) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _wandb_run(save: str, project: str, resolved: dict):
    """A wandb run that a relaunch with the same --save resumes (offline without WANDB_API_KEY)."""
    import wandb

    id_file = Path(save) / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return wandb.init(project=project, dir=save, config=resolved, mode=mode, id=run_id, resume="allow")
