"""Safe loading (issue 26): a checkpoint file with a planted pickle payload is refused in one line and the payload
never runs, on resume, export, --init-from and fine-tuning; --trust-checkpoint loads it; and the allow-list is
enough for the checkpoints every optimizer, precision and ZeRO stage that runs here writes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import xxhash
from fixtures_train import ROOT, ds_config_json, make_setup, run_env, train_args

from common.errors import UserError, run_cli
from pretrain import export
from pretrain.data_config import DataConfig
from pretrain.runtime import checkpoint, safe_load
from pretrain.train import main
from pretrain.train_config import TrainConfig

MODEL_FILE = "mp_rank_00_model_states.pt"


class Payload:
    """Unpickling it creates `marker` (any code would run the same way)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def config(setup: dict, save: Path, steps: int, **kw) -> TrainConfig:
    data = DataConfig([setup["prefix"]], seq_len=48, eval_fraction=0.1, num_workers=0)
    base = dict(deepspeed_config=setup["ds"], model=setup["model"], data=data, save=str(save), train_steps=steps)
    return TrainConfig(**{**base, "log_every": 0, **kw})


def plant(tag_dir: Path, marker: Path, name: str = MODEL_FILE, rehash: bool = True) -> None:
    """Add a payload to one file of a tag and, as an attacker would, update its checksum."""
    path = tag_dir / name
    states = torch.load(path, weights_only=False)
    states["innocent_looking_key"] = Payload(marker)
    torch.save(states, path)
    sums = tag_dir / "checksums_rank0.json"
    if rehash and sums.is_file():
        record = json.loads(sums.read_text())
        record["files"][name] = {
            "size": path.stat().st_size,
            "xxh3_128": xxhash.xxh3_128(path.read_bytes()).hexdigest(),
        }
        sums.write_text(json.dumps(record))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("safe"), stage=0, dropout=0.0, lr=0.1)


@pytest.fixture
def planted(setup, tmp_path):
    """A 2-step run whose newest checkpoint (step 2) carries a payload with valid checksums; step 1 is clean."""
    save = tmp_path / "run"
    main(config(setup, save, steps=2, save_every=1))
    marker = tmp_path / "payload_ran"
    plant(save / "step_00000002", marker)
    assert checkpoint.problem(save / "step_00000002") is None  # the checksums cannot tell
    return save, marker


def test_resume_refuses_a_planted_payload_in_one_line_and_trust_loads_it(setup, planted):
    save, marker = planted
    argv = [sys.executable, "-m", "pretrain.train", *train_args(setup, save, 3)]
    proc = subprocess.run(argv, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert not marker.exists(), "the payload ran"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--trust-checkpoint" in errors[0] and "step_00000002" in errors[0], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert checkpoint.tags(save) == ["step_00000002", "step_00000001"]  # no fallback: nothing trained or saved
    proc = subprocess.run(argv + ["--trust-checkpoint"], cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.exists()  # the payload is real: trusting the file ran it
    assert "resumed from" in proc.stdout + proc.stderr


def test_export_init_from_and_finetune_refuse_a_planted_payload(setup, planted, tmp_path, capsys):
    save, marker = planted
    assert run_cli(export.main, [str(save), str(tmp_path / "hf"), "--no-verify"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--trust-checkpoint" in err
    with pytest.raises(safe_load.UntrustedCheckpoint):
        main(config(setup, tmp_path / "phase2", steps=1, init_from=str(save)))
    from finetune.config import FinetuneConfig
    from finetune.run import load_pretrained

    with pytest.raises(safe_load.UntrustedCheckpoint):
        load_pretrained(FinetuneConfig(task="classify", init_from=str(save), output=str(tmp_path / "ft")))
    assert not marker.exists()
    assert export.main([str(save), str(tmp_path / "hf"), "--no-verify", "--trust-checkpoint"]) == 0
    assert marker.exists()


def test_a_checkpoint_older_than_checksums_with_a_payload_is_refused_not_skipped(setup, tmp_path):
    save = tmp_path / "run"
    main(config(setup, save, steps=2, save_every=1))
    for f in save.rglob("checksums_rank*.json"):
        f.unlink()
    marker = tmp_path / "payload_ran"
    plant(save / "step_00000002", marker, name="rng_rank0.pt")
    with pytest.raises(UserError, match="refusing to load .*rng_rank0.pt: .*(io|builtins).open.*--trust-checkpoint"):
        main(config(setup, save, steps=3))
    assert not marker.exists()


def test_our_own_loads_are_safe():
    """No weights_only=False left in our code outside safe_load's trusted branch."""
    for path in (ROOT / "pretrain").glob("*.py"):
        text = path.read_text()
        if path.name != "safe_load.py":
            assert "weights_only=False" not in text, path


@pytest.mark.parametrize(
    "optimizer, stage, bf16",
    [("Lamb", 0, False), ("Lamb", 3, True), ("StableAdamW", 1, True), ("AdamW", 2, False)],
)
def test_the_allow_list_is_enough_for_every_regime_that_runs_here(setup, tmp_path, optimizer, stage, bf16):
    extra = {"bf16": {"enabled": True}} if bf16 else {}
    ds = Path(ds_config_json(tmp_path / "ds.json", stage=stage, **extra))
    cfg = json.loads(ds.read_text())
    cfg["optimizer"]["type"] = optimizer
    ds.write_text(json.dumps(cfg))
    save = tmp_path / "run"
    main(config({**setup, "ds": str(ds)}, save, steps=1))
    files = sorted((save / "step_00000001").rglob("*.pt"))
    assert files
    names = {f"{g.__module__}.{g.__qualname__}" for g in safe_load.allowed()}
    for f in files:
        safe_load.check(f)
        assert set(torch.serialization.get_unsafe_globals_in_checkpoint(f)) <= names | {
            "numpy._core.multiarray._reconstruct"
        }, f
    assert main(config({**setup, "ds": str(ds)}, save, steps=2))["step"] == 2  # and resume loads them


def test_the_fp16_dynamic_loss_scaler_loads_safely(tmp_path):
    """fp16 does not run on CPU: DeepSpeed's dynamic loss scaler, as its ZeRO optimizers save it, round-trips."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    scaler = DynamicLossScaler(
        init_scale=2**16, scale_window=1000, min_scale=1, delayed_shift=2, consecutive_hysteresis=False
    )
    torch.save({"loss_scaler": scaler, "dynamic_loss_scale": True}, tmp_path / "optim_states.pt")
    loaded = safe_load.load(tmp_path / "optim_states.pt")["loss_scaler"]
    assert type(loaded) is DynamicLossScaler and vars(loaded) == vars(scaler)
