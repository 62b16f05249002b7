"""GLUE as published: every task's files in their own layout (stray quotes included), the task metrics against
scikit-learn/scipy on what transformers predicts from the saved directory, the submission files, the suite
runner's table, and the learning-rate default."""

import csv
import dataclasses
import json
import statistics

import pytest
import torch
from fixtures_finetune import GLUE_LAYOUTS, build_tokenizer, tiny_checkpoint, write_glue

from common.errors import UserError
from finetune.config import FinetuneConfig
from finetune.kinds import glue
from finetune.model import TaskModel, save_hf
from finetune.run import cli, ds_config, main, make_task
from finetune.suite import SuiteConfig, format_table
from finetune.suite import main as suite_main
from pretrain.models.bert import BertConfig

pd = pytest.importorskip("pandas")
sklearn_metrics = pytest.importorskip("sklearn.metrics")
scipy_stats = pytest.importorskip("scipy.stats")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue")
    tok = build_tokenizer(root / "tok")
    return {"root": root, "ckpt": tiny_checkpoint(root / "ckpt", tok), "glue": root / "glue_data"}


def config(setup, task, out, **kw) -> FinetuneConfig:
    kw = {"epochs": 3, "lr": 1e-3, "seq_len": 48, **kw}
    return FinetuneConfig(
        glue_task=task, data_dir=str(setup["glue"]), init_from=str(setup["ckpt"]), output=str(out), **kw
    )


@pytest.mark.parametrize("task", list(glue.TASKS))
def test_every_task_reads_its_published_layout(setup, task, tmp_path):
    """Ours against pandas reading the same file with no quote processing; a default CSV reader would merge the
    rows after an unclosed quote."""
    d = write_glue(tmp_path, task, 20, 8, 5)
    spec = glue.TASKS[task]
    cfg = FinetuneConfig(glue_task=task, data_dir=str(tmp_path), init_from="x", output="y", predict=True)
    t = make_task(cfg)
    ref = pd.read_csv(d / "train.tsv", sep="\t", quoting=csv.QUOTE_NONE, header=None if spec.columns else 0, dtype=str)
    ref.columns = list(spec.columns) if spec.columns else ref.columns
    assert [ex.text for ex in t.train_examples] == list(ref[spec.text])
    assert [ex.label for ex in t.train_examples] == list(ref[spec.label])
    assert [ex.pair for ex in t.train_examples] == (list(ref[spec.pair]) if spec.pair else [None] * 20)
    assert t.train_examples[3].text.startswith('" ')  # the stray quote stayed in its row
    with open(d / "train.tsv", newline="") as f:
        assert len(list(csv.reader(f, delimiter="\t"))) < 20 + (spec.columns is None)  # what quoting would do
    assert [len(examples) for _, examples in t.dev_sets] == [8] * len(spec.dev)
    subs = [sub for sub, _, _ in t.test_sets]
    assert subs == (["MNLI-m", "MNLI-mm", "AX"] if task == "mnli" else [spec.name])
    assert [ex.index for ex in t.test_sets[0][2]] == [str(i) for i in range(5)]
    assert t.metrics[0] == "score" and GLUE_LAYOUTS[task][0] == spec.name


def test_short_rows_are_skipped_and_wrong_files_are_one_line_errors(tmp_path):
    d = write_glue(tmp_path, "qqp", 10, 4, 2)
    with open(d / "train.tsv", "a") as f:
        f.write("77\t1\t2\tonly one question\n")  # QQP's train.tsv has rows like this
    cfg = FinetuneConfig(glue_task="qqp", data_dir=str(d), init_from="x", output="y")
    assert len(make_task(cfg).train_examples) == 10
    lines = (d / "dev.tsv").read_text().splitlines()
    lines[2] = lines[2].rsplit("\t", 1)[0] + "\tyes"
    (d / "dev.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"dev.tsv:3: label 'yes' is not one of 0, 1"):
        make_task(cfg)
    with pytest.raises(UserError, match="has neither RTE/train.tsv nor train.tsv"):
        make_task(FinetuneConfig(glue_task="rte", data_dir=str(tmp_path), init_from="x", output="y"))
    with pytest.raises(UserError, match=r"STS-B/train.tsv has no column 'score'"):
        (tmp_path / "STS-B").mkdir()
        (tmp_path / "STS-B" / "train.tsv").write_text("index\tsentence1\tsentence2\n0\ta\tb\n")
        make_task(FinetuneConfig(glue_task="stsb", data_dir=str(tmp_path), init_from="x", output="y"))


def hf_predict(out, examples, regression=False):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    pairs = [ex.pair for ex in examples] if examples[0].pair is not None else None
    enc = tok([ex.text for ex in examples], pairs, padding=True, truncation=True, max_length=48, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    if regression:
        assert model.config.problem_type == "regression" and model.config.num_labels == 1
        return logits[:, 0].tolist()
    return [model.config.id2label[i] for i in logits.argmax(-1).tolist()]


def test_sst2_learns_and_its_metrics_match_sklearn_on_transformers_predictions(setup):
    write_glue(setup["glue"], "sst2", 300, 90, 10)
    out = setup["root"] / "sst2"
    result = main(config(setup, "sst2", out))
    assert result["report"]["accuracy"] >= 0.9, result["history"]
    dev = make_task(config(setup, "sst2", out)).dev_sets[0][1]
    gold, pred = [ex.label for ex in dev], hf_predict(out, dev)
    assert result["report"]["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(gold, pred))
    assert result["report"]["score"] == result["report"]["accuracy"] and result["metric"] == "score"


@pytest.mark.slow
def test_stsb_regression_matches_scipy_on_transformers_predictions(setup):
    write_glue(setup["glue"], "stsb", 300, 60, 10)
    out = setup["root"] / "stsb"
    report = main(config(setup, "stsb", out, epochs=4, lr=1e-3))["report"]
    dev = make_task(config(setup, "stsb", out)).dev_sets[0][1]
    gold, pred = [float(ex.label) for ex in dev], hf_predict(out, dev, regression=True)
    # HF's scores differ from ours in the 6th digit (another attention path), the correlations in the 5th
    assert report["pearson"] == pytest.approx(scipy_stats.pearsonr(gold, pred)[0], abs=1e-4)
    assert report["spearman"] == pytest.approx(scipy_stats.spearmanr(gold, pred)[0], abs=1e-4)
    assert report["score"] == pytest.approx((report["pearson"] + report["spearman"]) / 2)
    assert report["pearson"] > 0.4, report  # an untrained model: about 0 +- 0.13 on 60 pairs


def test_mnli_predict_writes_glue_submission_files(setup, tmp_path):
    write_glue(setup["glue"], "mnli", 60, 20, 7)
    out = tmp_path / "out"
    report = main(config(setup, "mnli", out, epochs=1, predict=True))["report"]
    assert set(report) == {"score", "accuracy", "accuracy_mm"}
    for name in ("MNLI-m", "MNLI-mm", "AX"):
        lines = (out / "submission" / f"{name}.tsv").read_text().splitlines()
        assert lines[0] == "index\tprediction" and [ln.split("\t")[0] for ln in lines[1:]] == [str(i) for i in range(7)]
        assert {ln.split("\t")[1] for ln in lines[1:]} <= {"contradiction", "entailment", "neutral"}


def test_saved_regression_directory_matches_transformers(tmp_path):
    import transformers

    torch.manual_seed(0)
    ours = TaskModel(BertConfig.preset("tiny", vocab_size=99, max_position_embeddings=64), "sequence", regression=True)
    ours.eval()
    save_hf(ours, ours.state_dict(), str(tmp_path))
    theirs = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    ids, mask = torch.randint(5, 99, (2, 10)), torch.tensor([[1] * 10, [1] * 6 + [0] * 4])
    scores = torch.tensor([1.5, 4.2])
    with torch.no_grad():
        a, b = ours(ids, None, mask, labels=scores), theirs(input_ids=ids, attention_mask=mask, labels=scores)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=1e-5)


def test_suite_runs_tasks_and_seeds_and_prints_the_table(setup, tmp_path, capsys):
    write_glue(setup["glue"], "rte", 120, 30, 5, seed=3)
    write_glue(setup["glue"], "mrpc", 120, 30, 5, seed=4)
    run = config(setup, None, tmp_path, epochs=2)
    result = suite_main(SuiteConfig(tasks=["rte", "mrpc"], seeds=[1, 2], lrs=[1e-3], run=run))
    assert [(r["task"], r["seed"]) for r in result["runs"]] == [("rte", 1), ("rte", 2), ("mrpc", 1), ("mrpc", 2)]
    saved = json.loads((tmp_path / "glue_results.json").read_text())
    for row in saved["rows"]:  # recomputed from each run's own eval_report.json
        lr_dir = f"lr{row['lr']:g}"
        values = [
            json.loads((tmp_path / row["task"] / lr_dir / f"seed{s}" / "eval_report.json").read_text())["report"]
            for s in (1, 2)
        ]
        values = [v[row["metric"]] for v in values]
        assert row["mean"] == pytest.approx(statistics.mean(values)) and row["seeds"] == 2
        assert row["std"] == pytest.approx(statistics.stdev(values)) and row["min"] == min(values)
    assert [(r["task"], r["metric"]) for r in saved["rows"]] == [
        ("rte", "accuracy"),
        ("mrpc", "score"),
        ("mrpc", "f1"),
        ("mrpc", "accuracy"),
    ]
    means = {(r["task"], r["metric"]): r["mean"] for r in saved["rows"]}
    assert saved["average"] == pytest.approx((means["rte", "accuracy"] + means["mrpc", "score"]) / 2)
    printed = capsys.readouterr().out
    assert format_table(saved) in printed and "GLUE average (dev sets, 2 tasks)" in printed


def test_a_relaunched_suite_skips_the_runs_an_earlier_launch_completed(setup, tmp_path, capsys):
    write_glue(setup["glue"], "rte", 120, 30, 5, seed=3)
    suite = SuiteConfig(tasks=["rte"], seeds=[1, 2], lrs=[1e-3], run=config(setup, None, tmp_path, epochs=1))
    first = suite_main(suite)
    reports = [tmp_path / "rte" / "lr0.001" / f"seed{s}" / "eval_report.json" for s in (1, 2)]
    kept = reports[0].stat().st_mtime_ns
    reports[1].unlink()  # as if the launch was stopped during the second run
    capsys.readouterr()
    again = suite_main(suite)
    out = capsys.readouterr().out
    assert "rte, lr 0.001, seed 1: done by an earlier launch" in out and "rte, lr 0.001, seed 2 ->" in out
    assert reports[0].stat().st_mtime_ns == kept and reports[1].exists()
    assert again["runs"][0] == first["runs"][0]
    # other flags: nothing is reused
    changed = dataclasses.replace(suite, run=dataclasses.replace(suite.run, epochs=2))
    suite_main(changed)
    assert "done by an earlier launch" not in capsys.readouterr().out
    assert reports[0].stat().st_mtime_ns != kept


def test_suite_command_line_parses_the_run_flags(setup):
    from common.flags import from_args
    from finetune.suite import build_parser

    argv = ["--tasks", "cola", "stsb", "--seeds", "3", "--lr", "1e-4", "5e-5", "--data-dir", "G", "--init-from", "C"]
    cfg = from_args(SuiteConfig, build_parser().parse_args([*argv, "--output", "O", "--deepspeed_config", "d.json"]))
    assert (cfg.tasks, cfg.seeds, cfg.lrs) == (["cola", "stsb"], [3], [1e-4, 5e-5])
    assert (cfg.run.data_dir, cfg.run.init_from, cfg.run.output, cfg.run.deepspeed_config) == ("G", "C", "O", "d.json")
    assert cfg.run.lr is None and cfg.run.glue_task is None


def test_learning_rate_default_follows_the_model_width(tmp_path):
    """--lr wins; else the JSON's lr; else 5e-5 x 768 / hidden (the shipped JSON sets none)."""
    base = FinetuneConfig(task="classify", train="t", eval="e", init_from="x", output="y")
    assert ds_config(base, 128)[1] == pytest.approx(3e-4) and ds_config(base, 768)[1] == pytest.approx(5e-5)
    ds, lr = ds_config(FinetuneConfig(task="classify", train="t", eval="e", init_from="x", output="y", lr=2e-5), 128)
    assert lr == 2e-5 == ds["optimizer"]["params"]["lr"]
    own = json.loads(open(base.deepspeed_config).read())
    own["optimizer"]["params"]["lr"] = 7e-5
    (tmp_path / "ds.json").write_text(json.dumps(own))
    mine = FinetuneConfig(
        task="tag", train="t", eval="e", init_from="x", output="y", deepspeed_config=str(tmp_path / "ds.json")
    )
    assert ds_config(mine, 128)[1] == 7e-5


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--glue-task", "rte", "--data-dir", "D", "--train", "t.csv"], "no --train/--eval"),
        (["--task", "classify", "--glue-task", "rte"], "either --task"),
        (["--task", "qa", "--train", "t.json"], "needs --train and --eval"),
        (["--task", "tag", "--train", "a", "--eval", "b", "--predict"], "use it with --glue-task"),
    ],
)
def test_inconsistent_flags_are_one_line_errors(argv, match, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli([*argv, "--init-from", "x", "--output", "y"])
    assert exit_info.value.code == 2 and match in capsys.readouterr().err


def test_from_a_transformers_written_directory(setup, tmp_path):
    """Any Hugging Face BERT directory: one written by transformers itself (BertForPreTraining.save_pretrained)."""
    import transformers
    from safetensors.torch import load_file

    vocab = (setup["ckpt"] / "vocab.txt").read_text()
    hf_config = transformers.BertConfig(
        vocab_size=len(vocab.splitlines()),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    torch.manual_seed(1)
    transformers.BertForPreTraining(hf_config).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "vocab.txt").write_text(vocab)
    write_glue(setup["glue"], "wnli", 40, 10, 3)
    cfg = config(setup, "wnli", tmp_path / "out", epochs=1, lr=1e-9)
    cfg.init_from = str(tmp_path / "hf")
    main(cfg)
    tuned = load_file(tmp_path / "out" / "model.safetensors")
    source = transformers.BertForPreTraining.from_pretrained(tmp_path / "hf").state_dict()
    for name in ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.1.output.dense.weight"):
        torch.testing.assert_close(tuned[name], source[name], atol=1e-6, rtol=0)
