"""Checkpoint integrity (issue 26): checksums, fallback to the newest good tag, pruning that keeps what a
relaunch needs, milestones, rollback, marks for diverged saves, and a full disk. Tiny real runs (in-process,
one fp32 CPU process, dropout off so a resumed run repeats the straight run's losses bit for bit)."""

import json
import os
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import xxhash
from fixtures_train import ROOT, losses, make_setup, run_env, train_args

from common.errors import UserError, run_cli
from pretrain import export
from pretrain.data_config import DataConfig
from pretrain.models.bert import BertForPreTraining
from pretrain.runtime import checkpoint, integrity, safe_load, weights
from pretrain.train import main
from pretrain.train_config import TrainConfig

MODEL_FILE = "mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("integrity"), stage=0, dropout=0.0, lr=0.1)


def config(setup: dict, save: Path, steps: int, **kw) -> TrainConfig:
    data = DataConfig([setup["prefix"]], seq_len=48, eval_fraction=0.1, num_workers=0)
    base = dict(deepspeed_config=setup["ds"], model=setup["model"], data=data, save=str(save), train_steps=steps)
    return TrainConfig(**{**base, "log_every": 0, **kw})


@pytest.fixture(scope="module")
def straight(setup, tmp_path_factory):
    """straight(steps): the losses of an uninterrupted run of `steps` steps (the schedule depends on them), which
    a resumed run of as many steps must repeat."""
    cache = {}

    def run(steps: int) -> dict[int, float]:
        if steps not in cache:
            save = tmp_path_factory.mktemp("straight") / "run"
            main(config(setup, save, steps=steps))
            cache[steps] = losses(save)
        return cache[steps]

    return run


def tensor_span(path: Path) -> tuple[int, int]:
    """(offset, length) in `path` of its largest stored tensor (a weight matrix), read from the zip directory."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def skipped_warnings(caught, tag: str) -> list[str]:
    return [str(w.message) for w in caught if "skipping checkpoint" in str(w.message) and tag in str(w.message)]


def test_every_file_has_a_checksum_that_an_independent_hash_confirms(setup, tmp_path):
    save = tmp_path / "run"
    main(config(setup, save, steps=2, save_every=1))
    tag_dir = save / checkpoint.tag_name(2)
    record = json.loads((tag_dir / "checksums_rank0.json").read_text())
    on_disk = {str(f.relative_to(tag_dir)) for f in tag_dir.rglob("*") if f.is_file()}
    assert set(record["files"]) == on_disk - {"COMPLETE", "checksums_rank0.json"}
    assert {"train_state.json", MODEL_FILE, "rng_rank0.pt"} <= set(record["files"])
    for name, entry in record["files"].items():
        data = (tag_dir / name).read_bytes()
        assert entry == {"size": len(data), "xxh3_128": xxhash.xxh3_128(data).hexdigest()}
    assert record["world_size"] == 1 and record["mark"] is None
    assert record["loss"] == losses(save)[2]
    assert checkpoint.problem(tag_dir) is None


def test_sixteen_flipped_bytes_in_a_weight_are_caught_and_resume_falls_back(setup, straight, tmp_path):
    """Flipped bytes inside a tensor load silently (torch reads no CRC): only the checksum can see them."""
    save = tmp_path / "run"
    main(config(setup, save, steps=6, save_every=2))
    target = save / checkpoint.tag_name(6) / MODEL_FILE
    offset, length = tensor_span(target)
    data = bytearray(target.read_bytes())
    middle = offset + length // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    target.write_bytes(bytes(data))
    safe_load.load(target)  # still loads: the damage is in the numbers, not the structure
    assert "does not match its checksum" in checkpoint.problem(target.parent)

    with pytest.warns(UserWarning) as caught:
        result = main(config(setup, save, steps=6))
    assert len(skipped_warnings(caught, "step_00000006")) == 1
    assert result["step"] == 6
    assert losses(save) == straight(6)  # resumed at step 4, exactly


def test_random_bytes_are_one_warning_line_each_and_a_fallback_not_a_traceback(setup, tmp_path):
    """The relaunch as a user runs it (a subprocess). Step 6: random bytes in the middle of its model file (the
    checksum sees them); steps 4 and 2 were written before checksums existed (their files deleted here); step 4
    has random bytes in its pickle (seen on opening). The run resumes from step 2 with one line per skipped tag
    and one line saying step 2 is unverified."""
    save = tmp_path / "run"
    main(config(setup, save, steps=6, save_every=2))
    rng = random.Random(0)
    target = save / "step_00000006" / MODEL_FILE
    with open(target, "r+b") as f:
        f.seek(target.stat().st_size // 2)
        f.write(rng.randbytes(4096))
    for tag in ("step_00000004", "step_00000002"):
        for f in (save / tag).glob("checksums_rank*.json"):
            f.unlink()
    target = save / "step_00000004" / MODEL_FILE
    with zipfile.ZipFile(target) as z:
        pickle_offset = next(i.header_offset for i in z.infolist() if i.filename.endswith("data.pkl"))
    with open(target, "r+b") as f:
        f.seek(pickle_offset + 100)
        f.write(rng.randbytes(64))
    argv = [sys.executable, "-m", "pretrain.train", *train_args(setup, save, 3)]
    proc = subprocess.run(argv, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out
    for tag in ("step_00000006", "step_00000004"):
        assert sum("skipping checkpoint" in line and tag in line for line in out.splitlines()) == 1, out[-3000:]
    assert sum("has no checksums" in line for line in out.splitlines()) == 1
    assert "at step 2 (8 samples)" in out


def test_keep_last_never_deletes_the_resumed_nor_the_newest_good_checkpoint(setup, tmp_path):
    """Issue 26, bug 1: the newest checkpoint is damaged, the relaunch resumes from an older one and then saves
    at a step below the damaged one (here: a shorter --train-steps) with --keep-last 1. Ranking the damaged tag
    first, pruning used to delete the new save and the one the run resumed from."""
    save = tmp_path / "run"
    main(config(setup, save, steps=6, save_every=2, keep_last=2))
    assert checkpoint.tags(save) == ["step_00000006", "step_00000004"]
    (save / "step_00000006" / MODEL_FILE).write_bytes(b"damaged")
    with pytest.warns(UserWarning, match="skipping checkpoint .*step_00000006"):
        main(config(setup, save, steps=5, keep_last=1))
    assert checkpoint.tags(save) == ["step_00000006", "step_00000005", "step_00000004"]
    assert checkpoint.newest_good(save, warn=False) == "step_00000005"
    with pytest.warns(UserWarning, match="skipping checkpoint .*step_00000006"):
        main(config(setup, save, steps=8, save_every=2, keep_last=1))
    # resumed from 5 (kept for this launch), step 6 saved over the damaged one, then 8; 4 and 6 pruned
    assert checkpoint.tags(save) == ["step_00000008", "step_00000005"]
    assert all(checkpoint.problem(save / t) is None for t in checkpoint.tags(save))


def test_keep_every_keeps_milestones(setup, tmp_path):
    save = tmp_path / "run"
    main(config(setup, save, steps=8, save_every=2, keep_last=1, keep_every=4))
    assert checkpoint.tags(save) == ["step_00000008", "step_00000004"]


def test_resume_from_rolls_back_once_and_sets_the_newer_tags_aside(setup, straight, tmp_path):
    save = tmp_path / "run"
    main(config(setup, save, steps=6, save_every=2))
    with pytest.raises(UserError, match="--resume-from step_00000003: no checkpoint"):
        main(config(setup, save, steps=6, resume_from="step_00000003"))
    result = main(config(setup, save, steps=6, save_every=2, resume_from="step_00000002"))
    assert result["step"] == 6
    assert losses(save) == straight(6)  # replayed from step 2 exactly
    assert sorted(p.name for p in (save / "abandoned").iterdir()) == ["step_00000004", "step_00000006"]
    assert checkpoint.tags(save) == ["step_00000006", "step_00000004", "step_00000002"]
    # the same command again (a supervisor's relaunch) resumes from the newest, it does not roll back twice
    assert main(config(setup, save, steps=8, resume_from="step_00000002"))["step"] == 8
    assert sorted(losses(save)) == list(range(1, 9))


def test_loss_watch_marks_non_finite_and_spiking_losses():
    def watch_after(history: list[float], last: float) -> str | None:
        watch = integrity.LossWatch()
        for loss in [*history, last]:
            watch.add(loss)
        return watch.mark()

    history = [6.0, 5.0] * 5  # mean 5.5
    assert integrity.LossWatch().mark() is None
    assert watch_after(history, 4 * 5.5 - 0.01) is None
    assert "loss spike (22.01 > 4 x the recent mean 5.5)" in watch_after(history, 4 * 5.5 + 0.01)
    assert "non-finite" in watch_after(history, float("nan"))
    assert "non-finite" in watch_after([], float("inf"))
    assert watch_after(history[:9], 100.0) is None  # too little history to call anything a spike
    long = [1.0] * 200 + [10.0] * 100  # only the last 100 count: their mean is 10
    assert watch_after(long, 39.0) is None and watch_after(long, 41.0) is not None


def test_a_diverged_checkpoint_is_marked_and_the_divergence_error_names_the_newest_good_one(
    setup, tmp_path, monkeypatch
):
    """Steps 1-12 train normally, 13-14 spike (loss x100, still finite: saved at 14), then NaN from 15: the error
    must name step 12, not the spiking step 14; a relaunch resumes from 12."""
    forward, calls = BertForPreTraining.forward, {"n": 0}

    def diverging(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] > 14:
                out.loss = out.loss * float("nan")
            elif calls["n"] > 12:
                out.loss = out.loss * 100
        return out

    monkeypatch.setattr(BertForPreTraining, "forward", diverging)
    save = tmp_path / "run"
    with pytest.raises(UserError, match=r"non-finite for 3 consecutive .* newest good checkpoint is .*step_00000012"):
        main(config(setup, save, steps=30, save_every=2, max_nonfinite=3))
    record = json.loads((save / "step_00000014" / "checksums_rank0.json").read_text())
    assert "loss spike" in record["mark"] and record["loss"] > 100
    assert checkpoint.newest(save)[0] == "step_00000012"
    monkeypatch.setattr(BertForPreTraining, "forward", forward)
    with pytest.warns(UserWarning, match="skipping checkpoint .*step_00000014: saved at a loss spike"):
        assert main(config(setup, save, steps=13, keep_last=1))["step"] == 13
    assert "step_00000014" in checkpoint.tags(save)  # marked, newer: not counted, not deleted


def test_export_of_a_run_falls_back_and_of_a_damaged_tag_refuses(setup, tmp_path, capsys):
    save = tmp_path / "run"
    main(config(setup, save, steps=4, save_every=2))
    (save / "step_00000004" / "rng_rank0.pt").write_bytes(b"damaged")
    with pytest.warns(UserWarning, match="skipping checkpoint .*step_00000004: rng_rank0.pt has 7 bytes"):
        assert export.main([str(save), str(tmp_path / "hf"), "--no-verify"]) == 0
    _, exported = weights.load_weights(save / "step_00000002")
    import safetensors.torch

    got = safetensors.torch.load_file(str(tmp_path / "hf" / "model.safetensors"))
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert (got[name] == exported[name]).all()
    capsys.readouterr()
    argv = [str(save), str(tmp_path / "hf4"), "--tag", "step_00000004", "--no-verify"]
    assert run_cli(export.main, argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "step_00000004 fails verification" in err


def mount_tmpfs(path: Path, size: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")


def test_a_full_disk_is_one_line_and_the_previous_checkpoint_stays_resumable(setup, straight, tmp_path):
    """A real small file system (tmpfs): saves every step until one does not fit."""
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "3m")
    try:
        save = disk / "run"
        with pytest.raises(UserError) as failed:
            main(config(setup, save, steps=8, save_every=1))
        message = str(failed.value)
        assert "\n" not in message
        assert message.startswith("no space left on device: the checkpoint needs ")
        need, free = message.split("needs ")[1].split(" free")[0].split(", ")
        assert need.endswith(" MB") and free.endswith("B") and float(need.split()[0]) > 1
        previous = checkpoint.newest_good(save, warn=False)
        assert previous is not None and checkpoint.problem(save / previous) is None
        assert checkpoint.tags(save) == checkpoint.complete_tags(save, warn=False)  # the partial tag is gone
        assert f"{previous} is intact" in message
        shutil.copytree(save, tmp_path / "moved")  # the user frees space: here, by moving the run
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    step = checkpoint.read_state(tmp_path / "moved" / previous).step
    assert main(config(setup, tmp_path / "moved", steps=8))["step"] == 8
    assert losses(tmp_path / "moved") == straight(8) and step >= 1
