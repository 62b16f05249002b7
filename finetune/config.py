"""`bert-finetune`'s flags: one config object (`FinetuneConfig`), composed of what the loop reads and each task
kind's own options.

Design choices:
- It sits above the task kinds (finetune/kinds/) and below the loop (finetune/run.py): a kind's options
  (`ClassifyColumns`, `QAOptions`) live with the kind and are nested here, a group of flags each; a kind is
  made from `inputs()` and its own options only. `--metric`'s choices are the kinds' metrics, so finetune.run
  adds them to the parser, and `main` checks the value against the task's own.
- The default DeepSpeed JSON is package data (ds_configs), found in a wheel install too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import ds_configs
from common.errors import UserError
from common.flags import option
from finetune.kinds import Inputs
from finetune.kinds.classify import ClassifyColumns
from finetune.kinds.glue import TaskName
from finetune.kinds.qa import QAOptions

DEFAULT_DS_CONFIG = str(ds_configs.path("finetune_cpu.json"))  # package data: found in a wheel install too


@dataclass(kw_only=True)
class FinetuneConfig:
    """One fine-tuning run: every field is a flag of `bert-finetune` (common.flags)."""

    task: Literal["classify", "tag", "qa"] | None = None
    """classify (one label per text or text pair), tag (a BIO tag per word) or qa (extractive, SQuAD JSON)."""
    glue_task: TaskName | None = None
    """A GLUE task, its files read from --data-dir (instead of --task, --train and --eval)."""
    train: str | None = None
    """Training file: CSV/TSV/JSONL (classify), CoNLL (tag) or SQuAD v1.1/v2.0 JSON (qa)."""
    eval: str | None = None
    """Evaluation file, same format; it decides early stopping and the report."""
    data_dir: str | None = None
    """--glue-task: the GLUE directory (glue_data/ with CoLA/, SST-2/, ...) or the task's own directory."""
    init_from: str
    """Pretraining --save directory, one checkpoint tag directory, or a Hugging Face directory (BERT or
    ModernBERT: `bert-export`'s, or one transformers wrote)."""
    trust_checkpoint: bool = False
    """Load --init-from without the weights_only check (docs/CHECKPOINTS.md): only for files of known origin."""
    output: str
    """Directory for the best model (HF format, with tokenizer), eval_report.json and prediction files."""
    epochs: int = 3
    """Maximum passes over the training file."""
    lr: float | None = None
    """Peak learning rate (default: the DeepSpeed JSON's if it sets one, else 5e-5 x 768 / hidden size)."""
    batch: int | None = None
    """Micro batch per process (default: the one in the DeepSpeed JSON)."""
    seq_len: int = 128
    """Longest input in tokens; longer ones are truncated and counted (or rejected with --strict); qa: the
    window length."""
    deepspeed_config: str = option(DEFAULT_DS_CONFIG, flag="--deepspeed_config", aliases=("--deepspeed-config",))
    """DeepSpeed JSON: optimizer, schedule, precision, ZeRO stage."""
    tokenizer: str | None = None
    """Tokenizer directory (default: the one in --init-from, else the pretraining dataset's)."""
    allow_tokenizer_change: bool = False
    """Fine-tune with a --tokenizer whose fingerprint differs from the one --init-from was trained with."""
    columns: ClassifyColumns = field(default_factory=ClassifyColumns)
    """classify options: which columns of the files hold what."""
    metric: str | None = None
    """Eval metric for early stopping and model selection (default: the task's first: accuracy for classify,
    f1 for tag and qa, score for GLUE)."""
    patience: int = 2
    """Stop after this many epochs without a better eval metric."""
    strict: bool = False
    """Reject sequences longer than --seq-len instead of truncating them."""
    random_init: bool = False
    """Use the architecture of --init-from with random weights (the baseline that shows what pretraining buys)."""
    seed: int = 42
    """Seed for the head's initialization, dropout and data order."""
    predict: bool = False
    """--glue-task: write the best model's test-set predictions to OUTPUT/submission/ in GLUE's format."""
    qa: QAOptions = field(default_factory=QAOptions)
    """qa options: windows and answer decoding."""

    def validate(self) -> None:
        if (self.task is None) == (self.glue_task is None):
            raise UserError("pass either --task with --train and --eval, or --glue-task with --data-dir")
        if self.task and not (self.train and self.eval):
            raise UserError(f"--task {self.task} needs --train and --eval files")
        if self.glue_task and (not self.data_dir or self.train or self.eval):
            raise UserError("--glue-task reads its files from --data-dir; pass --data-dir and no --train/--eval")
        if self.predict and not self.glue_task:
            raise UserError("--predict writes GLUE test-set predictions; use it with --glue-task")
        if min(self.epochs, self.patience, self.batch or 1) < 1 or self.seq_len < 4:
            raise UserError("--epochs, --patience and --batch must be at least 1 and --seq-len at least 4")
        self.qa.validate()

    def inputs(self) -> Inputs:
        """What every task kind reads of this run."""
        return Inputs(self.train, self.eval, self.seq_len, self.strict)
