"""pretrain.models.modernbert against the real reference, transformers.ModernBertForMaskedLM (eager and sdpa attention).

Random weights in every parameter, configs with both local and global layers, a local window shorter than the
sequence and padding in the batch. float64, so that a 1e-5 relative bound on logits and every gradient is far
above rounding (both implementations apply RoPE in float32, which leaves differences near 1e-7).
transformers' eager attention turns a padded query that has no real key inside its window into NaN, which the
next layer spreads to every row (0 x NaN), so the eager batches keep padding within the window radius.
"""

import dataclasses
import json

import pytest
import torch
import transformers
from tokenizers import BertWordPieceTokenizer

from common.errors import UserError
from pretrain import models
from pretrain.models.kernels import KernelOptions
from pretrain.models.modernbert import ModernBertConfig, ModernBertForMaskedLM

CONFIGS = {
    "four_layers": ModernBertConfig(
        vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=4, num_attention_heads=2,
        local_attention=10, global_rope_theta=1000.0, local_rope_theta=50.0, pad_token_id=0,
    ),
    "biases_every_2nd": ModernBertConfig(
        vocab_size=61, hidden_size=48, intermediate_size=56, num_hidden_layers=5, num_attention_heads=3,
        global_attn_every_n_layers=2, local_attention=7, norm_bias=True, attention_bias=True, mlp_bias=True,
        classifier_bias=True, decoder_bias=False, norm_eps=1e-6, pad_token_id=3,
    ),
}  # fmt: skip
S = 16


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values in every parameter (biases and norms too), so no default init hides a mismatch."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)


def padded_batch(config: ModernBertConfig, lengths: list[int], seed: int = 1) -> dict:
    """Right-padded batch in the docs/DESIGN.md layout plus HF's (B, S) labels; 30% of real tokens masked."""
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.arange(S) < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(0, config.vocab_size, (len(lengths), S), generator=gen)
    ids = torch.where(mask.bool(), ids, config.pad_token_id)
    picks = [
        torch.randperm(n, generator=gen)[: max(1, n * 3 // 10)].sort().values + b * S for b, n in enumerate(lengths)
    ]
    masked = torch.cat(picks)
    labels = torch.randint(0, config.vocab_size, (len(masked),), generator=gen)
    hf_labels = torch.full((len(lengths), S), -100)
    hf_labels.view(-1)[masked] = labels
    types = torch.randint(0, 2, ids.shape, generator=gen)  # ignored by ModernBERT, as is nsp_labels
    batch = dict(input_ids=ids, token_type_ids=types, attention_mask=mask, masked_positions=masked)
    return {**batch, "mlm_labels": labels, "nsp_labels": torch.ones(len(lengths), dtype=torch.long), "hf": hf_labels}


def hf_twin(ours: ModernBertForMaskedLM, impl: str) -> transformers.ModernBertForMaskedLM:
    hf = transformers.ModernBertForMaskedLM._from_config(ours.config.to_hf(), attn_implementation=impl)
    hf = hf.to(next(ours.parameters()).dtype)
    hf.load_state_dict(ours.state_dict(), strict=True)
    return hf.eval()


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5, floor: float = 0.0) -> None:
    """Within `rel` of the reference's scale (at least `floor`), elementwise."""
    scale = max(expected.abs().max().item(), floor)
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


def assert_matches_hf(ours: ModernBertForMaskedLM, hf: transformers.ModernBertForMaskedLM, b: dict) -> None:
    keys = ("input_ids", "token_type_ids", "attention_mask", "masked_positions", "mlm_labels", "nsp_labels")
    o = ours(**{k: b[k] for k in keys})
    h = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["hf"])
    o.loss.backward()
    h.loss.backward()
    assert o.nsp_logits is None and o.nsp_loss is None and torch.equal(o.loss, o.mlm_loss)
    assert_rel_close(o.mlm_logits, h.logits.flatten(0, 1)[b["masked_positions"]])
    assert_rel_close(o.loss, h.loss)
    hf_params = dict(hf.named_parameters())
    largest = max(p.grad.abs().max().item() for p in hf_params.values())
    assert {n for n, _ in ours.named_parameters()} == set(hf_params)
    for name, p in ours.named_parameters():
        assert_rel_close(p.grad, hf_params[name].grad, floor=1e-3 * largest)
    with torch.no_grad():  # every real position, through the (B, S, V) path
        full = ours(b["input_ids"], attention_mask=b["attention_mask"]).mlm_logits
    real = b["attention_mask"].bool()
    assert_rel_close(full[real], h.logits[real])


@pytest.mark.parametrize(
    "name, impl, lengths",
    [
        ("four_layers", "eager", [S, S - 2, S - 5]),
        ("biases_every_2nd", "eager", [S, S - 3, S - 1]),
        ("four_layers", "sdpa", [S, 9, 4]),
        ("biases_every_2nd", "sdpa", [5, S, 12]),
    ],
)
def test_logits_and_grads_match_hf(name, impl, lengths):
    ours = ModernBertForMaskedLM(CONFIGS[name]).double().eval()
    randomize(ours)
    assert_matches_hf(ours, hf_twin(ours, impl), padded_batch(CONFIGS[name], lengths))


def test_hf_directory_round_trip_both_ways(tmp_path):
    config = CONFIGS["four_layers"]
    hf = transformers.ModernBertForMaskedLM(config.to_hf()).eval()
    randomize(hf, seed=5)
    hf.save_pretrained(tmp_path / "from_hf")
    ours = models.from_hf_pretrained(str(tmp_path / "from_hf")).eval()  # the family comes from config.json
    assert isinstance(ours, ModernBertForMaskedLM) and ours.config == config
    assert ours.decoder.weight is ours.model.embeddings.tok_embeddings.weight
    b = padded_batch(config, [S, 12, 14], seed=3)
    assert_matches_hf(ours, hf, b)

    ours.save_hf_pretrained(str(tmp_path / "from_ours"))
    back = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "from_ours").eval()
    assert type(back) is transformers.ModernBertForMaskedLM
    assert back.decoder.weight.data_ptr() == back.model.embeddings.tok_embeddings.weight.data_ptr()
    assert back.config.layer_types == hf.config.layer_types
    ours.zero_grad()
    assert_matches_hf(ours, back, padded_batch(config, [S, S, 11], seed=4))
    again = ModernBertForMaskedLM.from_hf_pretrained(str(tmp_path / "from_ours"), KernelOptions(unpad=False))
    assert again.config == config and again.paths.options == KernelOptions(unpad=False)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in ours.state_dict().items())


def test_fill_mask_pipeline_on_saved_directory(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("the cat sat on the mat.\nthe dog sat on the log.\na cat and a dog met.\n" * 20)
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train([str(text)], vocab_size=120, min_frequency=1)
    out = tmp_path / "model"
    out.mkdir()
    wordpiece.save_model(str(out))
    tokenizer = transformers.BertTokenizer.from_pretrained(str(out))
    ids = {f"{k}_token_id": tokenizer.convert_tokens_to_ids(t) for k, t in [("pad", "[PAD]"), ("cls", "[CLS]")]}
    config = dataclasses.replace(CONFIGS["four_layers"], vocab_size=len(tokenizer), **ids)
    model = ModernBertForMaskedLM(config).eval()
    model.save_hf_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    fill = transformers.pipeline("fill-mask", model=str(out), device="cpu")
    predictions = fill("the cat [MASK] on the mat.", top_k=3)
    enc = tokenizer("the cat [MASK] on the mat.", return_tensors="pt")
    position = int((enc["input_ids"][0] == tokenizer.mask_token_id).nonzero())
    with torch.no_grad():
        logits = model(enc["input_ids"], attention_mask=enc["attention_mask"]).mlm_logits[0, position]
    top = logits.softmax(-1).topk(3)
    assert [p["token"] for p in predictions] == top.indices.tolist()
    assert [p["score"] for p in predictions] == pytest.approx(top.values.tolist(), rel=1e-4)


def test_presets_match_the_released_shapes_and_transformers_defaults():
    base = models.load_config("modernbert-base")
    hf = transformers.ModernBertConfig()  # transformers' defaults are ModernBERT-base
    shape = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    assert all(getattr(base, k) == getattr(hf, k) for k in (*shape, "local_attention", "norm_eps", "pad_token_id"))
    assert base.to_hf().layer_types == hf.layer_types and base.to_hf().rope_parameters == hf.rope_parameters
    large = models.load_config("modernbert-large")
    assert (large.num_hidden_layers, large.hidden_size, large.intermediate_size) == (28, 1024, 2624)
    tiny = models.load_config("modernbert-tiny", ["vocab_size=512", "pad_token_id=0", "global_rope_theta=1e6"])
    assert (tiny.vocab_size, tiny.global_rope_theta, tiny.classifier_pooling) == (512, 1e6, "mean")


def test_config_json_hf_and_saved_dicts(tmp_path):
    config = CONFIGS["biases_every_2nd"]
    config.to_json(tmp_path / "ours.json")
    assert models.load_config(str(tmp_path / "ours.json")) == config
    config.to_hf().save_pretrained(tmp_path / "hf")  # transformers' config.json: layer_types, rope_parameters
    assert models.load_config(str(tmp_path / "hf" / "config.json")) == config
    legacy = {"model_type": "modernbert", "architectures": ["ModernBertForMaskedLM"], "vocab_size": 61,
              "hidden_size": 48, "num_attention_heads": 3, "num_hidden_layers": 5, "global_rope_theta": 7.0,
              "global_attn_every_n_layers": 2, "pad_token_id": 3, "reference_compile": False}  # fmt: skip
    (tmp_path / "legacy.json").write_text(json.dumps(legacy))
    got = models.load_config(str(tmp_path / "legacy.json"))
    assert (got.global_rope_theta, got.global_attn_every_n_layers, got.local_rope_theta) == (7.0, 2, 10000.0)
    saved = json.loads(json.dumps(dataclasses.asdict(config)))
    assert models.config_from_dict(saved) == config
    assert models.config_from_dict({**saved, "fused_ops": "compile", "unpad": False}) == config  # saved before
    # KernelOptions: the switches are runtime options now, dropped from the config
    bert = models.load_config("tiny")
    assert models.config_from_dict({k: v for k, v in dataclasses.asdict(bert).items() if k != "model_type"}) == bert
    assert models.shape_mismatch(saved, dataclasses.replace(config, local_attention=9)) == ["local_attention"]
    assert models.shape_mismatch(saved, bert) == ["model_type"] and models.shape_mismatch(saved, config) == []


@pytest.mark.parametrize(
    "spec, overrides",
    [
        ("modernbert-huge", []),
        ("modernbert-tiny", ["vocab_size=512"]),  # the default pad id 50283 is outside the vocabulary
        ("modernbert-tiny", ["model_type=bert"]),
        ("modernbert-tiny", ["fused_qkv=false"]),  # a BERT switch
        ("modernbert-tiny", ["num_attention_heads=3"]),
        ("modernbert-tiny", ["fused_ops=apex"]),  # apex is not installed here
    ],
)
def test_impossible_configs_are_one_line_errors(spec, overrides):
    with pytest.raises(UserError, match="--model"):
        models.load_config(spec, overrides)


def test_hf_layer_patterns_we_cannot_express_are_refused():
    d = CONFIGS["four_layers"].to_hf().to_dict()
    d["layer_types"] = ["sliding_attention", "full_attention", "full_attention", "sliding_attention"]
    with pytest.raises(UserError, match="layer_types"):
        ModernBertConfig.from_hf(d)


def test_initialization_statistics():
    config = models.load_config("modernbert-tiny", ["vocab_size=5000", "pad_token_id=0"])
    torch.manual_seed(0)
    model = ModernBertForMaskedLM(config)
    std, cut = config.initializer_range, config.initializer_cutoff_factor
    out = std / (2 * config.num_hidden_layers) ** 0.5
    for name, p in model.named_parameters():
        if "norm" in name:
            assert torch.all(p == 1), name
        elif name == "decoder.bias":
            assert torch.all(p == 0)
        else:
            s = out if name.endswith(("Wo.weight", "head.dense.weight")) else std
            truncated = s * 0.8796  # std of N(0, s^2) truncated at +-2 s
            assert p.abs().max() <= cut * s, name
            assert abs(p.std().item() - truncated) < 4 * truncated / (2 * p.numel()) ** 0.5, name


def test_export_builds_and_verifies_a_modernbert_checkpoint(tmp_path):
    """bert-export's weights part: a checkpoint state without the tied decoder key, written as a transformers
    directory, then reloaded by transformers and compared with our logits (pretrain.export.verify)."""
    from pretrain import export

    config = CONFIGS["biases_every_2nd"]
    trained = ModernBertForMaskedLM(config)
    randomize(trained, seed=9)
    state = {k: v for k, v in trained.state_dict().items() if k != "decoder.weight"}  # as DeepSpeed saves it
    model = export.build_model(models.config_from_dict(dataclasses.asdict(config)), state)
    model.save_hf_pretrained(str(tmp_path))
    assert 0 <= export.verify(model, tmp_path) < 1e-5
    with pytest.raises(UserError, match="ModernBertForMaskedLM weights"):
        export.build_model(config, {k: v for k, v in state.items() if k != "head.dense.weight"})
