"""bert-bench: synthetic batches follow the documented distribution, FLOPs and the JSON report add up."""

import json

import pytest
import torch
from fixtures_data import make_corpus

from common.errors import run_cli
from pretrain import bench, bench_batches
from pretrain.models import flops_per_sequence
from pretrain.models.bert import BertConfig
from pretrain.runtime import throughput


def test_synthetic_batch_layout_and_masking():
    config = BertConfig.preset("tiny")
    S = 128
    gen = torch.Generator().manual_seed(0)
    batches = [bench_batches.synthetic_batch(config, 64, S, "realistic", gen) for _ in range(4)]
    lengths = torch.cat([b["attention_mask"].sum(1) for b in batches])
    assert lengths.max() == S and lengths.min() >= 8
    assert 0.02 < (lengths < S // 2).float().mean() < 0.08  # short_seq_prob 0.1, of which 46% fall below S/2
    assert 0.65 < lengths.float().mean() / S < 0.8
    for b in batches:
        rows, cols = b["masked_positions"] // S, b["masked_positions"] % S
        assert torch.all(b["attention_mask"][rows, cols] == 1) and torch.all(cols > 0)
        counts = torch.bincount(rows, minlength=64)
        expected = (b["attention_mask"].sum(1) * 0.15).round().clamp(min=1)
        assert torch.equal(counts, expected.long())
        assert torch.all(b["input_ids"].view(-1)[b["masked_positions"]] == 103)  # bert-base-uncased's [MASK]
        assert torch.all(b["input_ids"][b["attention_mask"] == 0] == config.pad_token_id)
        labels = bench_batches.hf_inputs(b)["labels"].view(-1)
        assert torch.equal(labels[b["masked_positions"]], b["mlm_labels"])
        assert (labels != -100).sum() == len(b["masked_positions"])
    full = bench_batches.synthetic_batch(config, 4, S, "none", gen)
    assert torch.all(full["attention_mask"] == 1) and torch.all(full["input_ids"][:, 0] == 101)  # [CLS]


def test_synthetic_batches_take_the_special_ids_of_the_models_config():
    from pretrain.models import load_config

    config = load_config("modernbert-tiny", ["vocab_size=256", "pad_token_id=0", "cls_token_id=2"])
    b = bench_batches.synthetic_batch(config, 4, 16, "realistic", torch.Generator().manual_seed(0))
    assert torch.all(b["input_ids"][:, 0] == 2)
    assert torch.all(b["input_ids"].view(-1)[b["masked_positions"]] == 50284 % 256)  # ModernBERT's [MASK], wrapped


def test_batch_flops_sums_the_formula_per_sequence():
    config = BertConfig.preset("mini")
    b = bench_batches.synthetic_batch(config, 3, 64, "realistic", torch.Generator().manual_seed(1))
    lengths = b["attention_mask"].sum(1).tolist()
    masked = [int(((b["masked_positions"] // 64) == i).sum()) for i in range(3)]
    L, h, V = 4, 256, 30522
    last = 6 * h * h + 12 * h * 4 * h  # a row of the last layer's output projection and feed-forward
    expected = sum(
        72 * L * s * h * h + 12 * L * s * s * h + 6 * p * h * (h + V) - (s - p) * last for s, p in zip(lengths, masked)
    )
    assert throughput.batch_flops(config, b) == expected == sum(map(flops_per_sequence, [config] * 3, lengths, masked))


def test_bench_end_to_end_with_hf_json(tmp_path, capsys):
    out, model = tmp_path / "bench.json", tmp_path / "model.json"
    BertConfig.preset("tiny", vocab_size=1000).to_json(model)
    args = ["--model", str(model), "--seq-len", "32", "--micro-batch", "4", "--steps", "2", "--warmup", "1"]
    assert bench.main([*args, "--compare-hf", "--peak-tflops", "1.5", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "speedup vs HF" in capsys.readouterr().out
    for name in ("ours", "hf"):
        r = result[name]
        assert r["seq_per_s"] == pytest.approx(4 / r["step_s"])
        assert r["mfu"] == pytest.approx(r["tflops"] / 1.5)
        assert 0 < r["tokens_per_s"] <= 32 * r["seq_per_s"]
        assert r["peak_mem_bytes"] is None  # CPU
    assert result["speedup_vs_hf"] == pytest.approx(result["ours"]["seq_per_s"] / result["hf"]["seq_per_s"])


@pytest.mark.parametrize(
    "argv", [["--model", "tiny", "--precision", "fp16"], ["--model", "enormous"], ["--model", "tiny", "--seq-len", "4"]]
)
def test_bench_user_errors_exit_2(argv, capsys):
    assert run_cli(bench.main, [*argv, "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_bench_on_real_data(tmp_path):
    corpus = make_corpus(tmp_path, num_docs=30, vocab_size=2000)
    model, out = tmp_path / "model.json", tmp_path / "bench.json"
    BertConfig.preset("tiny", vocab_size=2000).to_json(model)
    args = ["--model", str(model), "--data", corpus.prefix, "--seq-len", "32", "--micro-batch", "4", "--steps", "1"]
    assert bench.main([*args, "--warmup", "0", "--json", str(out)]) == 0
    batches = bench_batches.data_batches(corpus.prefix, BertConfig.preset("tiny", vocab_size=2000), 4, 32, 0)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches) / len(batches)
    ours = json.loads(out.read_text())["ours"]
    assert ours["tokens_per_s"] == pytest.approx(tokens / ours["step_s"])


def test_bench_modernbert_beside_transformers(tmp_path, capsys):
    """--model of the ModernBERT family times transformers.ModernBertForMaskedLM beside ours, same weights."""
    from pretrain.models.modernbert import ModernBertConfig

    out, model = tmp_path / "bench.json", tmp_path / "model.json"
    shape = dict(num_hidden_layers=3, hidden_size=64, num_attention_heads=2, intermediate_size=96, local_attention=8)
    ModernBertConfig(vocab_size=500, pad_token_id=0, **shape).to_json(model)
    args = ["--model", str(model), "--seq-len", "32", "--micro-batch", "4", "--steps", "2", "--warmup", "1"]
    assert bench.main([*args, "--compare-hf", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "our fast paths: unpad real tokens only, attention grouped + SDPA" in capsys.readouterr().out
    assert (
        result["fast_paths"]["mlm_head"] == "masked positions only" and result["config"]["model_type"] == "modernbert"
    )
    assert result["speedup_vs_hf"] == pytest.approx(result["ours"]["seq_per_s"] / result["hf"]["seq_per_s"])
    config = ModernBertConfig(vocab_size=500, pad_token_id=0)
    for seed in range(2):  # ModernBERT's recipe masks 30%
        b = bench_batches.synthetic_batch(config, 4, 32, "realistic", torch.Generator().manual_seed(seed), 0.3)
        assert len(b["masked_positions"]) == int((b["attention_mask"].sum(1) * 0.3).round().clamp(min=1).sum())
        assert set(bench_batches.hf_inputs(b, "modernbert")) == {"input_ids", "attention_mask", "labels"}
