"""The recipe (issue 28, items 1 and 3; silent cases 2, 5 and 6): a preset brings its family's objective, a recipe
file sits between the preset and the command line, the resolved recipe is printed with its provenance, and a
resume may change only what RESUMABLE names (the learning rate then takes effect)."""

import json
import shutil
from pathlib import Path

import pytest
from fixtures_train import ds_config_json, losses, make_dataset, tiny_model_json

from common.errors import UserError
from pretrain import recipe
from pretrain.train import main
from pretrain.train_config import TrainConfig


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recipe")
    make_dataset(root / "data")
    tiny_model_json(root / "model.json", vocab_size=200, max_positions=64)
    ds_config_json(root / "ds.json", micro_batch=2)
    return root


def argv(root: Path, save: Path, *extra: str, model: str | None = None) -> list[str]:
    args = ["--deepspeed_config", str(root / "ds.json"), "--model", model or str(root / "model.json")]
    args += ["--data", str(root / "data" / "corpus"), "--save", str(save), "--seq-len", "32"]
    return args + ["--eval-fraction", "0.1", "--num-workers", "0", "--log-every", "1", *extra]


def printed(root: Path, capsys, *extra: str, model: str | None = None) -> dict:
    main(TrainConfig.from_args(argv(root, root / "unused", "--print-recipe", *extra, model=model)))
    return json.loads(capsys.readouterr().out)


def test_a_modernbert_preset_brings_its_objective_and_bert_keeps_nsp(root, capsys):
    """Silent case 2: `--model modernbert-tiny` trained NSP pairs at 15% unless the user remembered three flags."""
    objective = ("pair_task", "packing", "mask_prob")
    modern = printed(root, capsys, "--model-set", "vocab_size=256", model="modernbert-tiny")
    family = recipe.FAMILY_RECIPES["modernbert"]
    assert {k: modern["train"]["data"][k] for k in objective} == {k: family[k] for k in objective}
    assert modern["origin"]["mask_prob"].startswith("modernbert recipe")
    bert = printed(root, capsys)
    assert {k: bert["train"]["data"][k] for k in objective} == recipe.FAMILY_RECIPES["bert"]
    assert not (root / "unused").exists()  # --print-recipe trains nothing


def test_the_command_line_wins_even_with_the_default_value(root, capsys):
    out = printed(root, capsys, "--model-set", "vocab_size=256", "--mask-prob", "0.15", model="modernbert-tiny")
    assert out["train"]["data"]["mask_prob"] == 0.15 and out["origin"]["mask_prob"] == "command line"
    out = printed(root, capsys, "--model-set", "vocab_size=256", "--pair-task", "nsp", model="modernbert-tiny")
    assert out["train"]["data"]["pair_task"] == "nsp" and not out["train"]["data"]["packing"]  # NSP: unpacked


def test_recipe_file_sits_between_preset_and_command_line_with_phases(root, capsys, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("mask_prob: 0.2\nseq_len: 48\nphases:\n  context:\n    seq_len: 64\n    seed: 7\n")
    out = printed(root, capsys, "--recipe", str(path), "--seq-len", "40")
    assert (out["train"]["data"]["mask_prob"], out["train"]["data"]["seq_len"]) == (0.2, 40)
    assert out["origin"]["mask_prob"] == f"recipe {path}" and out["origin"]["seq_len"] == "command line"
    out = printed(root, capsys, "--recipe", str(path), "--phase", "context")
    assert (out["train"]["data"]["seq_len"], out["train"]["data"]["seed"]) == (32, 7)  # --seq-len 32 is in argv
    assert out["origin"]["seed"] == f"recipe {path} phase context"


def test_recipe_file_errors_are_one_line(root, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("mask_probability: 0.2\n")
    with pytest.raises(UserError, match="unknown recipe field 'mask_probability'; did you mean mask_prob"):
        main(TrainConfig.from_args(argv(root, tmp_path / "s", "--recipe", str(bad))))
    good = tmp_path / "r.json"
    good.write_text(json.dumps({"seed": 3}))
    with pytest.raises(UserError, match="--phase two: .* has phases none"):
        main(TrainConfig.from_args(argv(root, tmp_path / "s", "--recipe", str(good), "--phase", "two")))


def test_the_recipe_and_its_provenance_are_saved_with_every_checkpoint(root, tmp_path):
    from pretrain.runtime import checkpoint

    main(TrainConfig.from_args(argv(root, tmp_path / "run", "--train-steps", "1")))
    saved = checkpoint.newest(tmp_path / "run")[1].config
    assert saved["provenance"]["git_commit"] and saved["provenance"]["torch"]
    assert saved["provenance"]["command"] and saved["origin"]["seq_len"] == "command line"


@pytest.fixture(scope="module")
def two_steps(root, tmp_path_factory) -> Path:
    save = tmp_path_factory.mktemp("resume") / "run"
    main(TrainConfig.from_args(argv(root, save, "--train-steps", "2")))
    return save


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--seq-len", "48"], "seq_len 32 -> 48"),
        (["--mask-prob", "0.3"], "mask_prob 0.15 -> 0.3"),
        (["--pair-task", "sop"], "pair_task 'nsp' -> 'sop'"),
        (["--seed", "5"], "seed 1234 -> 5"),
        (["--precision", "bf16"], "precision fp32 -> bf16"),  # the saved optimizer state is fp32's
    ],
)
def test_a_resume_that_changes_the_recipe_is_refused_naming_the_field(root, two_steps, tmp_path, flags, named):
    """Silent case 5: a resume with another --seq-len, mask rate, pair task or seed reshaped the run."""
    save = tmp_path / "run"
    shutil.copytree(two_steps, save)
    with pytest.raises(UserError, match="holds a run whose recipe differs: ") as e:
        main(TrainConfig.from_args(argv(root, save, "--train-steps", "3", *flags)))
    assert named in str(e.value) and "\n" not in str(e.value)


def test_a_resume_with_another_optimizer_is_refused(root, two_steps, tmp_path):
    """The checkpoint's optimizer state belongs to its optimizer: another type or weight decay refuses."""
    ds = json.loads((root / "ds.json").read_text())
    for change, named in (({"type": "AdamW"}, "optimizer lamb -> adamw"), ({"weight_decay": 0.5}, "optimizer params ")):
        save = tmp_path / f"run{len(named)}"
        shutil.copytree(two_steps, save)
        other = json.loads(json.dumps(ds))
        if "type" in change:
            other["optimizer"]["type"] = change["type"]
        else:
            other["optimizer"]["params"].update(change)
        (tmp_path / "other.json").write_text(json.dumps(other))
        args = argv(root, save, "--train-steps", "3")
        args[args.index("--deepspeed_config") + 1] = str(tmp_path / "other.json")
        with pytest.raises(UserError, match="holds a run whose recipe differs: ") as e:
            main(TrainConfig.from_args(args))
        assert named in str(e.value) and "\n" not in str(e.value)


def test_a_resume_on_another_dataset_is_refused(root, two_steps, tmp_path):
    save = tmp_path / "run"
    shutil.copytree(two_steps, save)
    for ext in ("bin", "idx", "json"):  # the same data under another name: the tokenizer check passes
        shutil.copy(root / "data" / f"corpus.{ext}", root / "data" / f"other.{ext}")
    args = argv(root, save, "--train-steps", "3")
    args[args.index("--data") + 1] = str(root / "data" / "other")
    with pytest.raises(UserError, match=r"prefixes \[.*corpus'\] -> \[.*other'\]"):
        main(TrainConfig.from_args(args))


def test_a_resume_with_a_lower_learning_rate_uses_it(root, two_steps, tmp_path):
    """Silent case 6: the scheduler restored its base rate from the checkpoint and ignored the JSON's new one;
    now steps 3-4 of the resumed run use the rate of a run started with the lower one."""
    save, straight = tmp_path / "run", tmp_path / "straight"
    shutil.copytree(two_steps, save)
    lower = ds_config_json(tmp_path / "lower.json", micro_batch=2, lr=0.001)
    args = argv(root, save, "--train-steps", "4")
    args[args.index("--deepspeed_config") + 1] = lower
    main(TrainConfig.from_args(args))
    args = argv(root, straight, "--train-steps", "4")
    args[args.index("--deepspeed_config") + 1] = lower
    main(TrainConfig.from_args(args))
    rates = {}
    for name in (save, straight):
        rows = [json.loads(line) for line in (name / "metrics.jsonl").read_text().splitlines()]
        rates[name] = {r["step"]: r["lr"] for r in rows if "split" not in r}
    assert rates[save][3] == pytest.approx(rates[straight][3]) and rates[save][4] == pytest.approx(rates[straight][4])
    assert rates[save][3] > 0 and sorted(losses(save)) == [1, 2, 3, 4]


def test_relaunching_a_finished_run_says_it_is_complete(root, two_steps, tmp_path, capsys):
    save = tmp_path / "run"
    shutil.copytree(two_steps, save)
    assert main(TrainConfig.from_args(argv(root, save, "--train-steps", "2")))["step"] == 2
    assert f"{save} is complete: step 2 of --train-steps 2" in capsys.readouterr().out


def test_a_command_shows_a_warning_as_one_line_without_its_source(capfd):
    import subprocess
    import sys

    code = "import warnings; from common.errors import run_cli; run_cli(lambda a: warnings.warn('careful'))"
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert err == "warning: careful\n"


def test_mlm_only_log_lines_have_no_nsp_column(root, tmp_path, capsys):
    main(TrainConfig.from_args(argv(root, tmp_path / "run", "--train-steps", "1", "--pair-task", "none")))
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("step 1/1"))
    assert " mlm " in line and "nsp" not in line


def test_deepspeed_side_flags_fill_the_json_and_a_disagreement_names_both(root, capsys, tmp_path):
    bare = json.loads((root / "ds.json").read_text())
    del bare["optimizer"]["params"]["lr"], bare["train_batch_size"], bare["scheduler"]["params"]["warmup_proportion"]
    (tmp_path / "bare.json").write_text(json.dumps(bare))
    args = argv(root, root / "unused", "--print-recipe", "--lr", "0.003", "--global-batch", "4", "--warmup", "0.2")
    args[args.index("--deepspeed_config") + 1] = str(tmp_path / "bare.json")
    main(TrainConfig.from_args(args))
    ds = json.loads(capsys.readouterr().out)["deepspeed"]
    assert (ds["optimizer"]["params"]["lr"], ds["train_batch_size"]) == (0.003, 4)
    assert ds["scheduler"]["params"]["warmup_proportion"] == 0.2
    with pytest.raises(UserError, match=r"--lr 0.003 \(command line\) but .*ds.json sets optimizer.params.lr 0.01"):
        main(TrainConfig.from_args(argv(root, root / "unused", "--print-recipe", "--lr", "0.003")))
    path = tmp_path / "r.yaml"
    path.write_text("global_batch: 16\n")
    with pytest.raises(UserError, match=r"--global-batch 16 \(recipe .*r.yaml\) but .* sets train_batch_size 2"):
        main(TrainConfig.from_args(argv(root, root / "unused", "--print-recipe", "--recipe", str(path))))


@pytest.mark.parametrize("name", recipe.shipped())
def test_every_shipped_recipe_and_phase_resolves(name):
    from pretrain.data_config import DataConfig

    assert {"bert-base", "modernbert-base"} <= set(recipe.shipped())
    base = TrainConfig(deepspeed_config="ds.json", data=DataConfig(["x"]), save="s")
    file = recipe.read_file(name)
    for phase in [None, *file.get("phases", {})]:
        cfg, origin = recipe.resolve(base, set(), file, phase, name)
        assert origin["seq_len"].startswith(f"recipe {name}")
        cfg.data.validate()


@pytest.mark.parametrize("model", ["tiny", "modernbert-tiny"])
def test_bench_masks_at_the_rate_pretrain_trains_with(root, capsys, model):
    """Silent case 2: bert-bench defaulted ModernBERT to 30% while bert-pretrain trained it at 15%."""
    from pretrain.bench import parse_args

    trained = printed(root, capsys, "--model-set", "vocab_size=256", model=model)["train"]["data"]["mask_prob"]
    family = "modernbert" if model.startswith("modernbert") else "bert"
    assert parse_args(["--model", model]).mask_prob == trained == recipe.FAMILY_RECIPES[family]["mask_prob"]


def test_finetune_and_glue_read_recipe_files_the_same_way(tmp_path):
    from finetune.run import parse_args as finetune_args
    from finetune.suite import parse_args as glue_args

    path = tmp_path / "ft.yaml"
    path.write_text("lr: 0.001\nepochs: 5\n")
    base = ["--init-from", "x", "--output", "o", "--recipe", str(path)]
    cfg = finetune_args(["--task", "classify", "--train", "a.csv", "--eval", "b.csv", *base, "--epochs", "2"])
    assert (cfg.lr, cfg.epochs) == (0.001, 2)  # the command line over the file
    assert glue_args(["--data-dir", "glue", *base]).run.epochs == 5
    path.write_text("epoch: 5\n")
    with pytest.raises(UserError, match="unknown recipe field 'epoch'; did you mean epochs"):
        finetune_args(["--task", "classify", "--train", "a.csv", "--eval", "b.csv", *base])


def test_help_text_tells_the_truth(capsys):
    """Item 8: bert-glue's help is its own, units are in the flag names, both families are described."""
    from finetune.suite import build_parser as glue_parser
    from pretrain.bench import parse_args as bench_args
    from pretrain.train_config import build_parser as pretrain_parser

    glue = glue_parser().format_help()
    assert "--glue-task:" not in glue and "glue_results.json" in glue  # no bert-finetune-only wording
    pretrain = pretrain_parser().format_help()
    assert "--time-budget-hours HOURS" in pretrain and "--dist-timeout-minutes MIN" in pretrain
    assert "ModernBERT" in pretrain and "(MLM + NSP)" not in pretrain
    with pytest.raises(SystemExit):
        bench_args(["--help"])
    assert "module docstring" not in capsys.readouterr().out
    old = TrainConfig.from_args(["--deepspeed_config", "d", "--data", "p", "--save", "s", "--time-budget", "2"])
    assert old.time_budget == 2.0  # the old name stays an alias
