"""The package works installed like a library: a wheel, no source tree.

The wheel is built from a copy of the source tree (the checkout stays clean) and installed with `pip install
--no-deps` into a fresh virtualenv made with `--system-site-packages`, as on a cluster whose python already has
torch: the dependencies come from outside the new venv, never from the source tree. Where this test itself runs
in a virtualenv (the dev one, whose base python has no torch), a .pth file in the new venv stands for the system's
packages: it adds the dev venv's site-packages after the new venv's own, and only as a path (the editable
install's .pth hooks there are not run). The venv's `bert-finetune` script, with no PYTHONPATH, from a directory
outside any source tree, fine-tunes a tiny model with its default DeepSpeed config (package data, found through
importlib.resources), and every module it ran came from the new venv, not from the checkout.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from fixtures_finetune import build_tokenizer, classify_rows, tiny_checkpoint, write_csv

ROOT = Path(__file__).resolve().parents[1]


def source_copy(dst: Path) -> Path:
    """The source tree without what runs and builds leave in it (virtualenvs, outputs, caches, git)."""
    leftovers = (".git", ".venv", "runs", "out", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "wandb")
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(*leftovers, "gpu_check_out", ".gpu_data", ".whl"))
    return dst


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh virtualenv that holds the wheel, installed by pip with no index to reach."""
    root = tmp_path_factory.mktemp("wheel")
    src = source_copy(root / "src")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # no build isolation: the venv's setuptools builds it, with no index to reach
    build = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(src)])
    assert build.returncode == 0
    (wheel,) = (root / "dist").glob("*.whl")
    env = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(env)], check=True)
    if sys.prefix != sys.base_prefix:  # the dev venv's packages stand for the system's (module docstring)
        (site_packages(env) / "system_stand_in.pth").write_text(sysconfig.get_path("purelib") + "\n")
    install = [*pip, "--python", str(env / "bin" / "python"), "install", "--no-deps", "--no-index", str(wheel)]
    assert subprocess.run(install).returncode == 0  # pip runs on the new venv's python: its scripts, its metadata
    return env


def site_packages(env: Path) -> Path:
    where = "import sysconfig; print(sysconfig.get_path('purelib'))"
    return Path(subprocess.check_output([str(env / "bin" / "python"), "-c", where], text=True).strip())


def clean_env(env: Path) -> dict:
    """The environment of a shell with the venv activated: no PYTHONPATH, its bin/ first on PATH."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "RANK", "WORLD_SIZE", "MASTER_"))}
    path = os.pathsep.join([str(env / "bin"), kept.get("PATH", "")])
    return dict(kept, PATH=path, VIRTUAL_ENV=str(env), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")


@pytest.mark.slow
def test_the_wheel_ships_every_deepspeed_config(venv):
    site = site_packages(venv)
    shipped = sorted(p.name for p in (site / "ds_configs").glob("*.json"))
    assert shipped == sorted(p.name for p in (ROOT / "ds_configs").glob("*.json"))
    assert all(filecmp.cmp(site / "ds_configs" / n, ROOT / "ds_configs" / n, shallow=False) for n in shipped)
    assert not (site / "tests").exists() and not (site / "scripts").exists()


@pytest.mark.slow
def test_an_installed_wheel_fine_tunes_with_the_default_config(venv, tmp_path):
    work = tmp_path / "elsewhere"  # no source tree here or above (pytest's tmp is outside the checkout)
    work.mkdir()
    assert not (work / "ds_configs").exists() and ROOT not in work.parents
    tok = build_tokenizer(tmp_path / "tok")
    ckpt = tiny_checkpoint(tmp_path / "ckpt", tok)
    train = write_csv(tmp_path / "train.csv", classify_rows(60, seed=1))
    dev = write_csv(tmp_path / "dev.csv", classify_rows(30, seed=2))
    script = venv / "bin" / "bert-finetune"  # the console script pip wrote, on the new venv's python
    assert script.read_text().splitlines()[0] == f"#!{venv / 'bin' / 'python'}"
    flags = ["--task", "classify", "--train", str(train), "--eval", str(dev), "--init-from", str(ckpt)]
    flags += ["--output", str(tmp_path / "out"), "--epochs", "1", "--seq-len", "32"]
    run = subprocess.run([str(script), *flags], cwd=work, env=clean_env(venv), capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (tmp_path / "out" / "eval_report.json").is_file()
    python = str(venv / "bin" / "python")
    where = subprocess.run(
        [python, "-c", "import ds_configs, finetune.run as r, pretrain.runtime.engine as e, common.flags as f; "
         "print(ds_configs.__file__, r.__file__, e.__file__, f.__file__, r.DEFAULT_DS_CONFIG, "
         "ds_configs.shipped('ds_configs/demo.json'), sep='\\n')"],
        cwd=work, env=clean_env(venv), capture_output=True, text=True,
    )  # fmt: skip
    assert where.returncode == 0, where.stderr
    site = site_packages(venv).resolve()
    for path in where.stdout.split():
        assert Path(path).resolve().is_relative_to(site), f"{path} is not from the installed wheel"


def test_a_shipped_config_is_found_from_any_directory_and_a_local_file_wins(tmp_path, monkeypatch):
    from common.errors import UserError
    from pretrain.runtime.ds_config import load_ds_config

    monkeypatch.chdir(tmp_path)  # no ds_configs/ here
    demo = json.loads((ROOT / "ds_configs" / "demo.json").read_text())
    assert load_ds_config("ds_configs/demo.json") == demo and load_ds_config("demo.json") == demo
    (tmp_path / "ds_configs").mkdir()
    (tmp_path / "ds_configs" / "demo.json").write_text(json.dumps({"train_batch_size": 2}))
    assert load_ds_config("ds_configs/demo.json") == {"train_batch_size": 2}  # the user's own file
    with pytest.raises(UserError, match="does not exist"):
        load_ds_config("elsewhere/demo.json")  # a path into another directory is never swapped for ours
    with pytest.raises(UserError, match="does not exist"):
        load_ds_config("ds_configs/nope.json")
