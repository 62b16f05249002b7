"""pretrain.train.main in-process (one process, fp32 CPU): learning, metrics, checkpoints, weights in and out,
and every bad input rejected with one line before any compute."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from fixtures_train import ds_config_json, make_setup, tiny_model_json

from common.errors import UserError
from pretrain.data_config import DataConfig
from pretrain.models.bert import BertForPreTraining
from pretrain.models.kernels import OPTION_NAMES
from pretrain.runtime import checkpoint
from pretrain.runtime.weights import load_weights
from pretrain.train import cli, evaluate, main
from pretrain.train_config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("train"), stage=0, dropout=0.0, lr=0.1)


def config(setup: dict, save: Path, steps: int = 8, **kw) -> TrainConfig:
    data = DataConfig([setup["prefix"]], seq_len=48, eval_fraction=0.1, num_workers=0)
    base = dict(deepspeed_config=setup["ds"], model=setup["model"], data=data, save=str(save), train_steps=steps)
    return TrainConfig(**{**base, "log_every": 0, **kw})


@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):
    """60 steps with evaluation at 0, every 30 and at the end; checkpoints every 20, keep the last 2."""
    save = tmp_path_factory.mktemp("run") / "save"
    cfg = config(setup, save, steps=60, eval_every=30, save_every=20, keep_last=2, eval_samples=64, tensorboard=True)
    result = main(cfg)
    return save, result


def records(save: Path) -> list[dict]:
    return [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]


def test_loss_decreases_and_eval_beats_the_untrained_baseline(trained):
    save, result = trained
    train = [r for r in records(save) if "split" not in r]
    first, last = sum(r["loss"] for r in train[:10]) / 10, sum(r["loss"] for r in train[-10:]) / 10
    assert last < first - 0.5, (first, last)
    evals = {r["step"]: r for r in records(save) if r.get("split") == "eval"}
    assert sorted(evals) == [0, 30, 60]
    assert evals[60]["mlm_loss"] < evals[0]["mlm_loss"] - 0.5
    assert evals[60]["mlm_acc"] > evals[0]["mlm_acc"]
    assert result["step"] == 60 and result["eval"]["step"] == 60


def test_metrics_jsonl_has_one_record_per_step_with_the_issue_fields(trained):
    save, _ = trained
    train = [r for r in records(save) if "split" not in r]
    assert [r["step"] for r in train] == list(range(1, 61))
    for key in ("loss", "mlm_loss", "nsp_loss", "lr", "samples", "seq_per_s", "tokens_per_s", "tflops", "grad_norm"):
        assert all(isinstance(r[key], float | int) for r in train), key
    assert all(r["grad_norm"] > 0 and r["peak_mem_gb"] > 0.1 for r in train)
    # tokens per sequence: real ones, at most --seq-len 48; FLOPs: the BERT formula on them (over 1e5 a sequence)
    assert all(10 < r["tokens_per_s"] / r["seq_per_s"] < 48 + 1e-6 for r in train)
    assert all(r["fill"] == pytest.approx(r["tokens_per_s"] / r["seq_per_s"] / 48) for r in train)
    assert all(r["tflops"] * 1e12 / r["seq_per_s"] > 1e5 for r in train)
    assert train[-1]["samples"] == 60 * 4
    assert all(abs(r["loss"] - r["mlm_loss"] - r["nsp_loss"]) < 1e-4 for r in train)
    assert list((save / "tensorboard").glob("events.out.tfevents.*"))
    lrs = [r["lr"] for r in train]
    peak = max(lrs)
    assert lrs.index(peak) == 6 and lrs[0] == 0.0 and lrs[-1] < peak / 50  # warmup 10% of 60, then decay


def test_checkpoints_are_pruned_complete_and_carry_the_resolved_config(trained):
    save, _ = trained
    assert checkpoint.tags(save) == ["step_00000060", "step_00000040"]
    assert (save / "latest").read_text() == "step_00000060"
    state = checkpoint.read_state(save / "step_00000060")
    assert state.step == 60 and state.consumed_samples == 240
    assert state.config["model"]["hidden_size"] == 64 and state.config["deepspeed"]["train_batch_size"] == 4


def test_evaluate_matches_an_independent_count_with_hugging_face(trained, setup):
    """Our eval metrics vs transformers.BertForPreTraining on the exported weights, batch by batch."""
    from transformers import BertForPreTraining as HFBert

    from pretrain.data import PretrainingData, eval_batches
    from pretrain.models.bert import BertForPreTraining

    save, _ = trained
    cfg, weights = load_weights(save)
    ours = BertForPreTraining(cfg)
    ours.load_state_dict(weights)
    hf = HFBert(cfg.to_hf()).eval()
    hf.load_state_dict(weights, strict=False)
    data = PretrainingData(DataConfig([setup["prefix"]], seq_len=48, eval_fraction=0.1, num_workers=0))
    batches = eval_batches(data, 4, 0, 1, 32)
    got = evaluate(ours, batches)
    correct = total = nsp_ok = nsp_n = 0
    loss = 0.0
    with torch.no_grad():
        for b in batches:
            out = hf(b["input_ids"], b["attention_mask"], b["token_type_ids"])
            logits = out.prediction_logits.reshape(-1, cfg.vocab_size)[b["masked_positions"]]
            correct += (logits.argmax(-1) == b["mlm_labels"]).sum().item()
            total += len(b["mlm_labels"])
            loss += torch.nn.functional.cross_entropy(logits, b["mlm_labels"], reduction="sum").item()
            nsp_ok += (out.seq_relationship_logits.argmax(-1) == b["nsp_labels"]).sum().item()
            nsp_n += len(b["nsp_labels"])
    assert got["mlm_acc"] == pytest.approx(correct / total)
    assert got["mlm_loss"] == pytest.approx(loss / total, rel=1e-4)
    assert got["nsp_acc"] == pytest.approx(nsp_ok / nsp_n)


def test_load_weights_from_save_dir_tag_and_hf_dir_agree(trained, tmp_path):
    from pretrain.models.bert import BertForPreTraining

    save, _ = trained
    cfg, from_dir = load_weights(save)
    _, from_tag = load_weights(save / "step_00000060")
    module = torch.load(save / "step_00000060" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert from_dir.keys() == from_tag.keys() >= module.keys()
    assert all(torch.equal(from_dir[k], module[k]) for k in module)
    model = BertForPreTraining(cfg)
    model.load_state_dict(from_dir)
    model.save_hf_pretrained(str(tmp_path / "hf"))
    _, from_hf = load_weights(tmp_path / "hf")
    assert all(torch.equal(from_hf[k], from_dir[k]) for k in from_dir)


def test_init_from_loads_weights_only_with_a_fresh_schedule(trained, setup, tmp_path):
    save, _ = trained
    _, weights = load_weights(save)
    run = tmp_path / "phase2"
    main(config(setup, run, steps=1, init_from=str(save), eval_every=1, eval_samples=64))
    evals = [r for r in records(run) if r.get("split") == "eval"]
    trained_eval = [r for r in records(save) if r.get("split") == "eval"][-1]
    assert evals[0]["step"] == 0 and evals[0]["mlm_loss"] == pytest.approx(trained_eval["mlm_loss"], rel=1e-5)
    assert [r["lr"] for r in records(run) if "split" not in r] == [0.0]  # step 1 of a fresh warmup
    assert checkpoint.read_state(run / "step_00000001").consumed_samples == 4


def test_init_optimizer_takes_the_lamb_moments_with_a_fresh_schedule(trained, setup, tmp_path, monkeypatch):
    """NVIDIA's phase 2: the phase-1 LAMB moments (and their step count, for bias correction) carry over; the
    schedule and the step count start afresh; the hyperparameters are the new run's."""
    from pretrain.train import _Run

    save, _ = trained
    seen = []

    def at_start(self, stop):  # what the engine holds before the first step
        opt = self.engine.basic_optimizer
        params = [p for g in opt.param_groups for p in g["params"]]
        seen.append(([dict(opt.state[p]) for p in params], [g["lr"] for g in opt.param_groups], self.state.step))
        return self.result

    monkeypatch.setattr(_Run, "train", at_start)
    main(config(setup, tmp_path / "with", steps=3, init_from=str(save), init_optimizer=True))
    main(config(setup, tmp_path / "without", steps=3, init_from=str(save)))
    phase1 = torch.load(save / "step_00000060" / "mp_rank_00_model_states.pt", weights_only=False)["optimizer"]
    (taken, lrs, step), (fresh, _, _) = seen
    assert step == 0 and lrs == [0.0, 0.0]  # step 0 of a new warmup
    assert len(taken) == len(phase1["state"]) and all(not state for state in fresh)
    for i, state in enumerate(taken):
        assert state["step"] == 60
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], phase1["state"][i][key]) and state[key].abs().sum() > 0
    BertForPreTraining.from_state(*load_weights(save)).save_hf_pretrained(str(tmp_path / "hf"))
    with pytest.raises(UserError, match="not one of our checkpoints"):
        main(config(setup, tmp_path / "from_hf", steps=3, init_from=str(tmp_path / "hf"), init_optimizer=True))
    with pytest.raises(UserError, match="--init-optimizer takes the optimizer state of --init-from"):
        main(config(setup, tmp_path / "none", steps=3, init_optimizer=True))


def test_tensorboard_and_wandb_continue_across_a_resume_without_replayed_steps(setup, tmp_path):
    """A run that died after logging steps 4-6 but before saving step 6 resumes at 3 and logs 4-6 again: TensorBoard
    purges the first 4-6 (purge_step) and wandb resumes the same run (its id kept in SAVE/wandb_run_id)."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    save = tmp_path / "run"
    kw = dict(steps=6, save_every=3, tensorboard=True, wandb_project="bert-tests")
    main(config(setup, save, **kw))
    first = [r["loss"] for r in records(save) if "split" not in r]
    shutil.rmtree(save / "step_00000006")
    main(config(setup, save, **kw))
    events = EventAccumulator(str(save / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [step for step, _ in logged] == [1, 2, 3, 4, 5, 6]
    assert [value for _, value in logged] == pytest.approx(first)
    run_id = (save / "wandb_run_id").read_text()
    assert len(list((save / "wandb").glob(f"offline-run-*-{run_id}"))) == 2  # one per launch, one wandb run


def test_incomplete_and_unreadable_checkpoints_are_skipped_with_a_warning(setup, tmp_path):
    save = tmp_path / "run"
    main(config(setup, save, steps=4, save_every=2))
    (save / "step_00000004" / checkpoint.COMPLETE).unlink()  # as if killed while saving step 4
    with pytest.warns(UserWarning, match="step_00000004"):
        state = checkpoint.newest(save)
    assert state[0] == "step_00000002"
    (save / "step_00000004" / checkpoint.COMPLETE).write_text("")
    (save / "step_00000004" / "mp_rank_00_model_states.pt").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="skipping checkpoint .*step_00000004"):
        result = main(config(setup, save, steps=6))
    assert result["step"] == 6
    steps = [r["step"] for r in records(save) if "split" not in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # resumed at 2; what the run logged after step 2 was replaced
    (save / "step_00000006" / "mp_rank_00_model_states.pt").write_bytes(b"garbage")
    (save / "step_00000002" / "mp_rank_00_model_states.pt").write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(UserError, match="no checkpoint .* could be loaded"):
        main(config(setup, save, steps=8))


@pytest.mark.slow
def test_compile_trains_like_eager_and_its_checkpoints_resume_eagerly(setup, tmp_path):
    """--compile (DeepSpeed's engine.compile, in place): the same losses as eager (dropout off here), and a
    checkpoint whose tensor names are the eager model's, so an eager relaunch resumes from it."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    main(config(setup, eager, steps=6))
    torch._dynamo.utils.counters.clear()
    main(config(setup, compiled, steps=6, compile=True))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did go through torch.compile
    want = [r["loss"] for r in records(eager)]
    torch.testing.assert_close([r["loss"] for r in records(compiled)], want, rtol=1e-4, atol=1e-5)
    assert set(load_weights(str(compiled))[1]) == set(load_weights(str(eager))[1])
    assert main(config(setup, compiled, steps=8))["step"] == 8  # an eager relaunch resumes at step 6
    assert [r["step"] for r in records(compiled)] == list(range(1, 9))


def test_a_model_vocabulary_larger_than_the_data_gets_a_note(setup, tmp_path, capsys):
    main(config(setup, tmp_path / "fits", steps=1))
    assert "note: the model's vocab_size" not in capsys.readouterr().out
    main(config(setup, tmp_path / "wide", steps=1, model_set=["vocab_size=1000"]))
    assert "--model-set vocab_size=" in capsys.readouterr().out


def test_speed_switches_reach_the_model_and_stay_out_of_the_saved_model_config(setup, tmp_path):
    """`--model-set unpad=false` is a runtime KernelOptions: the run follows it (the printed fast paths), records
    it among its flags, and the checkpoint's model config holds the weights' shape only."""
    save = tmp_path / "run"
    main(config(setup, save, steps=1, model_set=["unpad=false", "fused_ops=plain"]))
    saved = json.loads((save / checkpoint.tag_name(1) / "train_state.json").read_text())["config"]
    assert saved["fast_paths"]["unpad"] == "every position" and saved["fast_paths"]["ops"] == "plain"
    assert "unpad=false" in saved["train"]["model_set"]
    assert not set(OPTION_NAMES) & set(saved["model"]) and saved["model"]["hidden_size"] > 0


def test_a_checkpoint_that_would_not_fit_again_is_warned_about(setup, tmp_path, monkeypatch):
    save = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(config(setup, save, steps=2, save_every=1))
    assert not [w for w in caught if "a checkpoint takes" in str(w.message)]
    tag_dir = save / checkpoint.tag_name(2)
    size = sum(f.stat().st_size for f in tag_dir.rglob("*") if f.is_file())
    assert checkpoint.low_disk_warning(save, tag_dir) is None

    usage = checkpoint.shutil.disk_usage(save)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage._replace(free=size // 2))
    with pytest.warns(UserWarning, match=r"[0-9.]+ [kM]?B free under .* but a checkpoint takes [0-9.]+ MB") as caught:
        main(config(setup, tmp_path / "full", steps=1))
    assert sum("a checkpoint takes" in str(w.message) for w in caught) == 1
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage._replace(free=size))
    assert checkpoint.low_disk_warning(save, tag_dir) is None


def test_a_signal_mid_accumulation_saves_the_last_whole_step_and_resumes_exactly(tmp_path, monkeypatch):
    """Phase 2 accumulates hundreds of micro-batches: a stop must not wait for the step's end (the launcher's grace
    would run out), so the flag is read before every micro-batch; the partial step is dropped and the checkpoint
    of the last whole step resumes with the losses of a run never stopped (dropout on: the RNG state matters)."""
    import os
    import signal

    from pretrain.loader import Batches

    setup = make_setup(tmp_path, stage=0, dropout=0.1)
    setup["ds"] = ds_config_json(tmp_path / "ds_accum.json", micro_batch=2, grad_accum=4)
    main(config(setup, tmp_path / "straight", steps=5))
    fetched, real_next = {"n": 0}, Batches.__next__

    def next_batch(self):
        fetched["n"] += 1
        if fetched["n"] == 11:  # the 3rd of step 3's 4 micro-batches
            os.kill(os.getpid(), signal.SIGTERM)
        return real_next(self)

    monkeypatch.setattr(Batches, "__next__", next_batch)
    stopped = main(config(setup, tmp_path / "run", steps=5))
    assert stopped["stopped_by"] == "signal" and stopped["step"] == 2 and fetched["n"] == 11
    assert checkpoint.newest(tmp_path / "run")[1].step == 2 and checkpoint.tags(tmp_path / "run") == ["step_00000002"]
    monkeypatch.setattr(Batches, "__next__", real_next)
    assert main(config(setup, tmp_path / "run", steps=5))["step"] == 5
    straight, resumed = records(tmp_path / "straight"), records(tmp_path / "run")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    assert [r["samples"] for r in resumed] == [8, 16, 24, 32, 40]


def test_time_budget_stops_with_a_checkpoint(setup, tmp_path):
    save = tmp_path / "run"
    result = main(config(setup, save, steps=1000, time_budget=1e-7))
    assert result["stopped_by"] == "time budget" and result["step"] == 1
    assert checkpoint.newest(save)[1].step == 1


def test_nonfinite_losses_stop_and_leave_the_last_good_checkpoint(setup, tmp_path, monkeypatch):
    from pretrain.models.bert import BertForPreTraining

    forward = BertForPreTraining.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 3 and self.training:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(BertForPreTraining, "forward", poisoned)
    save = tmp_path / "run"
    with pytest.raises(UserError, match="non-finite for 3 consecutive steps"):
        main(config(setup, save, steps=20, save_every=2, max_nonfinite=3))
    assert checkpoint.tags(save) == ["step_00000002"]


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_data", "does not exist"),
        ("vocab_too_large", "larger than the model's vocab_size"),
        ("seq_len_too_long", "exceeds the model's max_position_embeddings"),
        ("bad_batch", "train_batch_size"),
        ("fp16_on_cpu", "fp16"),
        ("other_model_in_save", "different model shape"),
    ],
)
def test_bad_input_is_one_line_before_compute(setup, trained, tmp_path, capsys, case, message):
    save, _ = trained
    args = ["--deepspeed_config", setup["ds"], "--model", setup["model"], "--data", setup["prefix"]]
    args += ["--seq-len", "48", "--train-steps", "2", "--save", str(tmp_path / "new"), "--num-workers", "0"]

    def put(flag, value):
        args[args.index(flag) + 1] = value

    if case == "missing_data":
        put("--data", str(tmp_path / "nope"))
    elif case == "vocab_too_large":
        put("--model", tiny_model_json(tmp_path / "m.json", vocab_size=100))
    elif case == "seq_len_too_long":
        put("--seq-len", "128")
    elif case == "bad_batch":
        put("--deepspeed_config", ds_config_json(tmp_path / "ds.json", train_batch_size=6, micro_batch=4))
    elif case == "fp16_on_cpu":
        put("--deepspeed_config", ds_config_json(tmp_path / "ds.json", fp16={"enabled": True}))
    elif case == "other_model_in_save":
        put("--model", tiny_model_json(tmp_path / "m.json", vocab_size=200, hidden_size=32, intermediate_size=64))
        put("--save", str(save))
    assert cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "new").exists()


def test_help_lists_the_issue_flags(capsys):
    with pytest.raises(SystemExit):
        cli(["--help"])
    out = capsys.readouterr().out
    for flag in ("--deepspeed_config", "--save-every", "--keep-last", "--eval-every", "--init-from", "--time-budget"):
        assert flag in out
