"""A recipe file decides the whole run (issue 28, item 1): it may name what used to be required flags (the
DeepSpeed JSON, the data, --save), and the optimizer, schedule and precision, which are merged into the JSON
the engine gets (pretrain.recipe_deepspeed): a JSON may leave them out, a disagreement names both sides, and a
ModernBERT preset brings its optimizer and schedule to a JSON without them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_train import ROOT, ds_config_json, losses, make_dataset, run_env, tiny_model_json

import ds_configs
from common.errors import UserError
from pretrain import recipe
from pretrain.recipe_deepspeed import apply_to_deepspeed
from pretrain.train import main
from pretrain.train_config import TrainConfig


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recipe_ds")
    make_dataset(root / "data")
    tiny_model_json(root / "model.json", vocab_size=200, max_positions=64)
    ds_config_json(root / "ds.json", micro_batch=2)
    bare = json.loads((root / "ds.json").read_text())
    del bare["optimizer"], bare["scheduler"]
    (root / "bare.json").write_text(json.dumps(bare))
    return root


def write_recipe(path: Path, **fields) -> str:
    """A YAML recipe file (JSON is YAML) of `fields`."""
    path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in fields.items()) + "\n")
    return str(path)


def whole_run(root: Path, save: Path, **fields) -> dict:
    """The fields of a recipe that decides a whole 2-step run by itself."""
    run = dict(deepspeed_config=str(root / "ds.json"), data=str(root / "data" / "corpus"), save=str(save))
    run |= dict(model=str(root / "model.json"), seq_len=32, train_steps=2, eval_fraction=0.1, num_workers=0)
    return run | dict(log_every=1) | fields


def printed(capsys, *argv: str) -> dict:
    main(TrainConfig.from_args([*argv, "--print-recipe"]))
    return json.loads(capsys.readouterr().out)


def test_a_recipe_file_alone_trains_and_flags_override_it(root, tmp_path, capsys):
    path = write_recipe(tmp_path / "run.yaml", **whole_run(root, tmp_path / "run"))
    cmd = [sys.executable, "-m", "pretrain.train", "--recipe", path]  # bert-pretrain --recipe run.yaml alone
    subprocess.run(cmd, env=run_env(), cwd=ROOT, check=True, capture_output=True, timeout=300)
    assert sorted(losses(tmp_path / "run")) == [1, 2]
    out = printed(capsys, "--recipe", path, "--save", str(tmp_path / "other"))
    assert out["train"]["save"] == str(tmp_path / "other") and out["origin"]["save"] == "command line"
    assert out["train"]["data"]["prefixes"] == [str(root / "data" / "corpus")]  # `data: PREFIX`: a list of one
    assert out["origin"]["prefixes"] == out["origin"]["deepspeed_config"] == f"recipe {path}"


@pytest.mark.parametrize(
    ("missing", "message"),
    [
        ("save", "--save is required: pass --save DIR or set save: in a --recipe file"),
        ("data", "--data is required: pass --data PREFIX or set data: in a --recipe file"),
        ("deepspeed_config", "--deepspeed_config is required: pass --deepspeed_config X.json or set"),
    ],
)
def test_a_value_neither_file_nor_flag_gives_is_one_line_naming_both_ways(root, tmp_path, missing, message):
    fields = whole_run(root, tmp_path / "run")
    del fields[missing]
    with pytest.raises(UserError) as e:
        main(TrainConfig.from_args(["--recipe", write_recipe(tmp_path / "r.yaml", **fields)]))
    assert message in str(e.value) and "\n" not in str(e.value) and not (tmp_path / "run").exists()


def test_a_recipe_value_of_the_wrong_type_is_one_line(root, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", **whole_run(root, tmp_path / "run", seq_len="long"))
    with pytest.raises(UserError, match=f"recipe {path}: seq_len takes int, not 'long'"):
        main(TrainConfig.from_args(["--recipe", path]))


def test_a_yaml_number_with_an_exponent_is_a_number(tmp_path):
    """PyYAML (YAML 1.1) reads `1e-3` as the string '1e-3'; a recipe reads it as YAML 1.2 and JSON do."""
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text("lr: 1e-3\noptimizer: {eps: 1E-6, betas: [0.9, .98], type: Lamb}\nsave: 1e3x\n")
    assert yaml.safe_load(path.read_text())["lr"] == "1e-3"
    data = recipe.read_file(str(path))
    assert data == {"lr": 0.001, "optimizer": {"eps": 1e-6, "betas": [0.9, 0.98], "type": "Lamb"}, "save": "1e3x"}


def demo_sections() -> dict:
    """ds_configs/modernbert_demo.json's optimizer and scheduler, read from the file."""
    demo = json.loads(ds_configs.path("modernbert_demo.json").read_text())
    return {k: demo[k] for k in ("optimizer", "scheduler")}


def test_the_modernbert_family_optimizer_is_the_demo_json_s():
    family = recipe.FAMILY_RECIPES["modernbert"]
    for name, section in recipe.SECTIONS.items():
        want = demo_sections()[section]
        assert family[name] == {"type": want["type"], **want["params"]}


def test_a_modernbert_preset_with_a_json_without_optimizer_trains_with_the_family_s(root, tmp_path, capsys):
    """`--model modernbert-tiny` with a JSON that has no optimizer or scheduler section gets StableAdamW and
    WarmupStableDecay: the same losses as the JSON that names them (ds_configs/modernbert_demo.json's)."""
    explicit = json.loads((root / "bare.json").read_text()) | demo_sections()
    (tmp_path / "explicit.json").write_text(json.dumps(explicit))
    common = ["--model", "modernbert-tiny", "--model-set", "vocab_size=256", "--data", str(root / "data" / "corpus")]
    common += ["--seq-len", "32", "--eval-fraction", "0.1", "--num-workers", "0", "--train-steps", "3"]
    out = printed(capsys, *common, "--deepspeed_config", str(root / "bare.json"), "--save", str(tmp_path / "x"))
    assert {k: out["deepspeed"][k] for k in ("optimizer", "scheduler")} == demo_sections()
    assert out["origin"]["optimizer.type"] == "modernbert recipe (--model modernbert-tiny)"
    for name, ds in (("bare", root / "bare.json"), ("explicit", tmp_path / "explicit.json")):
        main(TrainConfig.from_args([*common, "--deepspeed_config", str(ds), "--save", str(tmp_path / name)]))
    bare, named = losses(tmp_path / "bare"), losses(tmp_path / "explicit")
    assert sorted(bare) == [1, 2, 3] and bare == named


def resolved(root: Path, tmp_path: Path, argv: list[str], ds: dict, **fields) -> tuple[dict, list[str]]:
    """(the JSON the engine gets, the notes) for `argv` over a recipe file of `fields` and the JSON `ds`."""
    args = ["--recipe", write_recipe(tmp_path / "r.yaml", **fields), *argv] if fields else argv
    cfg = TrainConfig.from_args(args)
    cfg, origin = recipe.resolve(cfg, set(cfg.given), recipe.read_file(cfg.recipe) if cfg.recipe else None, None, "r")
    notes = apply_to_deepspeed(recipe.flat(cfg), origin, ds, "ds.json")
    return ds, notes


def lamb(root: Path) -> dict:
    return json.loads((root / "ds.json").read_text())


def test_a_json_optimizer_other_than_the_family_s_runs_with_a_note(root, tmp_path):
    ds, notes = resolved(root, tmp_path, ["--model", "modernbert-tiny"], lamb(root))
    assert ds["optimizer"] == lamb(root)["optimizer"] and ds["scheduler"] == lamb(root)["scheduler"]
    assert len(notes) == 2 and notes[0].startswith("note: ds.json sets optimizer 'Lamb', which runs instead of the")
    assert "StableAdamW" in notes[0] and "WarmupStableDecay" in notes[1]
    ds, notes = resolved(root, tmp_path, [], lamb(root))  # BERT's recipe brings no optimizer: nothing to say
    assert ds == lamb(root) and notes == []
    bare = json.loads((root / "bare.json").read_text())
    with pytest.raises(UserError, match="ds.json has no optimizer section and the recipe names none; add optimizer:"):
        resolved(root, tmp_path, [], bare)


def test_recipe_optimizer_schedule_and_precision_fill_the_json_and_a_disagreement_names_both(root, tmp_path):
    bare = json.loads((root / "bare.json").read_text())
    optimizer = {"type": "AdamW", "lr": 0.004, "betas": [0.9, 0.95], "weight_decay": 0.1}
    schedule = {"type": "WarmupPolyDecay", "warmup_proportion": 0.2}
    ds, _ = resolved(root, tmp_path, ["--lr", "0.003"], bare, optimizer=optimizer, schedule=schedule, precision="bf16")
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 0.003, "betas": [0.9, 0.95], "weight_decay": 0.1}}
    assert ds["scheduler"] == {"type": "WarmupPolyDecay", "params": {"warmup_proportion": 0.2}}
    assert ds["bf16"] == {"enabled": True}
    ds, _ = resolved(root, tmp_path, [], lamb(root), optimizer={"lr": 0.01, "type": "lamb"})  # the JSON's values
    assert ds == lamb(root)
    cases = [
        ({"optimizer": optimizer}, r"optimizer.type AdamW \(recipe .*\) but ds.json sets optimizer.type Lamb"),
        ({"schedule": {"warmup_proportion": 0.3}}, r"schedule.warmup_proportion 0.3 .* sets scheduler.params"),
        ({"precision": "bf16"}, r"--precision bf16 \(recipe .*\) but ds.json runs fp32"),
        ({"lr": 0.1, "optimizer": {"lr": 0.2}}, r"lr 0.1 and optimizer.lr 0.2 disagree; give one"),
    ]
    with_fp32 = lamb(root) | {"bf16": {"enabled": False}}
    for fields, message in cases:
        with pytest.raises(UserError, match=message):
            resolved(root, tmp_path, [], dict(with_fp32), **fields)


def test_bench_takes_what_applies_of_a_pretraining_recipe(root, tmp_path):
    from pretrain.bench import parse_args

    fields = whole_run(root, tmp_path / "run", model="tiny", seq_len=64, micro_batch=3, precision="bf16", warmup=0.1)
    cfg = parse_args(["--recipe", write_recipe(tmp_path / "r.yaml", **fields), "--micro-batch", "5"])
    assert (cfg.model, cfg.seq_len, cfg.micro_batch, cfg.precision) == ("tiny", 64, 5, "bf16")
    assert (cfg.warmup, cfg.data, cfg.deepspeed_config) == (3, None, None)  # bench's own meanings stay


def test_finetune_and_glue_take_their_required_flags_from_a_recipe(tmp_path):
    from finetune.run import parse_args as finetune_args
    from finetune.suite import parse_args as glue_args

    task = ["--task", "classify", "--train", "a.csv", "--eval", "b.csv"]
    path = write_recipe(tmp_path / "ft.yaml", init_from="ckpt", output="out")
    assert (finetune_args([*task, "--recipe", path]).init_from, glue_args(["--recipe", path]).run.output) == (
        "ckpt",
        "out",
    )
    path = write_recipe(tmp_path / "ft.yaml", init_from="ckpt")
    with pytest.raises(UserError, match="--output is required: pass --output OUTPUT or set output: in a --recipe"):
        finetune_args([*task, "--recipe", path])
