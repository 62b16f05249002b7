"""pretrain.models.bert against the real reference, transformers.BertForPreTraining (fp32, CPU, random weights)."""

import json

import pytest
import torch
import transformers
from tokenizers import BertWordPieceTokenizer
from torch.utils.flop_counter import FlopCounterMode

from common.errors import UserError
from pretrain.models import flops_per_sequence, kernel_options, load_config
from pretrain.models.bert import BertConfig, BertForPreTraining, BertModel
from pretrain.models.kernels import KernelOptions

CONFIGS = {
    "two_layers": BertConfig(vocab_size=211, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128),
    "odd_shape": BertConfig(
        vocab_size=97, hidden_size=48, num_layers=1, num_heads=3, intermediate_size=100, type_vocab_size=3
    ),
}


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values in every parameter (biases and LayerNorms too), so no zero-init hides a mismatch."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def padded_batch(config: BertConfig, B: int = 3, S: int = 12, seed: int = 1) -> dict:
    """Right-padded batch in the docs/DESIGN.md layout plus its HF-style (B, S) labels."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([S, S - 4, 5][:B])
    mask = (torch.arange(S) < lengths[:, None]).long()
    ids = torch.randint(1, config.vocab_size, (B, S), generator=gen) * mask
    types = torch.randint(0, config.type_vocab_size, (B, S), generator=gen) * mask
    masked = torch.tensor([1, 3, S + 2, S + 7, 2 * S + 1, 2 * S + 4])
    labels = torch.randint(1, config.vocab_size, (len(masked),), generator=gen)
    hf_labels = torch.full((B, S), -100)
    hf_labels.view(-1)[masked] = labels
    nsp = torch.tensor([0, 1, 1])
    batch = dict(input_ids=ids, token_type_ids=types, attention_mask=mask, masked_positions=masked)
    return {**batch, "mlm_labels": labels, "nsp_labels": nsp, "hf_labels": hf_labels}


def hf_model(config: BertConfig, state: dict) -> transformers.BertForPreTraining:
    hf = transformers.BertForPreTraining(config.to_hf())
    hf.load_state_dict(state, strict=True)
    return hf.eval()


def run_ours(model: BertForPreTraining, b: dict):
    """Training path: unpadded, MLM head on masked positions only."""
    keys = ("input_ids", "token_type_ids", "attention_mask", "masked_positions", "mlm_labels", "nsp_labels")
    out = model(**{k: b[k] for k in keys})
    out.loss.backward()
    return out


def run_hf(hf: transformers.BertForPreTraining, b: dict):
    out = hf(
        input_ids=b["input_ids"],
        token_type_ids=b["token_type_ids"],
        attention_mask=b["attention_mask"],
        labels=b["hf_labels"],
        next_sentence_label=b["nsp_labels"],
    )
    out.loss.backward()
    return out


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5, floor: float = 0.0) -> None:
    """Within `rel` of the reference's scale (at least `floor`), elementwise."""
    scale = max(expected.abs().max().item(), floor)
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


def assert_matches_hf(ours: BertForPreTraining, hf: transformers.BertForPreTraining, b: dict) -> None:
    o, h = run_ours(ours, b), run_hf(hf, b)
    rows = b["masked_positions"]
    assert_rel_close(o.mlm_logits, h.prediction_logits.flatten(0, 1)[rows])
    assert_rel_close(o.nsp_logits, h.seq_relationship_logits)
    assert_rel_close(o.loss, h.loss)
    hf_params = dict(hf.named_parameters())
    largest = max(p.grad.abs().max().item() for p in hf_params.values())  # some grads are 0 up to rounding
    for name, p in ours.named_parameters():
        assert_rel_close(p.grad, hf_params[name].grad, rel=1e-4, floor=1e-3 * largest)
    with torch.no_grad():  # every real position, through the (B, S, V) path
        full = ours(b["input_ids"], b["token_type_ids"], b["attention_mask"]).mlm_logits
    real = b["attention_mask"].bool()
    assert_rel_close(full[real], h.prediction_logits[real])


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_and_grads_match_hf(name):
    config = CONFIGS[name]
    ours = BertForPreTraining(config).eval()
    randomize(ours)
    assert_matches_hf(ours, hf_model(config, ours.state_dict()), padded_batch(config))


def test_plain_paths_match_hf_on_every_position():
    config = CONFIGS["two_layers"]
    ours = BertForPreTraining(config, KernelOptions(unpad=False, sparse_mlm_head=False)).eval()
    randomize(ours, seed=3)
    b = padded_batch(config)
    hf = hf_model(config, ours.state_dict())
    with torch.no_grad():
        assert_rel_close(
            ours(b["input_ids"], b["token_type_ids"], b["attention_mask"]).mlm_logits,
            hf(
                input_ids=b["input_ids"], token_type_ids=b["token_type_ids"], attention_mask=b["attention_mask"]
            ).prediction_logits,
        )


def test_hf_directory_round_trip_both_ways(tmp_path):
    config = CONFIGS["two_layers"]
    hf = transformers.BertForPreTraining(config.to_hf()).eval()
    randomize(hf, seed=5)
    hf.save_pretrained(tmp_path / "from_hf")
    ours = BertForPreTraining.from_hf_pretrained(str(tmp_path / "from_hf")).eval()
    assert ours.config == config
    assert_matches_hf(ours, hf, padded_batch(config))

    ours.save_hf_pretrained(str(tmp_path / "from_ours"))
    back = transformers.BertForPreTraining.from_pretrained(tmp_path / "from_ours").eval()
    assert back.cls.predictions.decoder.weight.data_ptr() == back.bert.embeddings.word_embeddings.weight.data_ptr()
    ours.zero_grad()
    assert_matches_hf(ours, back, padded_batch(config, seed=2))
    again = BertForPreTraining.from_hf_pretrained(str(tmp_path / "from_ours"))
    for (k, v), (k2, v2) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_hf_state_dict_loads_strict_and_decoder_is_tied():
    config = CONFIGS["odd_shape"]
    hf = transformers.BertForPreTraining(config.to_hf())
    ours = BertForPreTraining(config)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()}
    ours.load_state_dict(hf.state_dict(), strict=True)
    assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight
    assert ours.cls.predictions.decoder.bias is ours.cls.predictions.bias


def test_initialization_statistics():
    config = BertConfig.preset("mini", vocab_size=5000)
    torch.manual_seed(0)
    model = BertForPreTraining(config)
    std = config.initializer_range
    truncated_std = std * 0.8796  # std of N(0, std^2) truncated at +-2 std
    for name, p in model.named_parameters():
        if "LayerNorm.weight" in name:
            assert torch.all(p == 1), name
        elif name.endswith("bias") or "LayerNorm" in name:
            assert torch.all(p == 0), name
        else:
            w = p[1:] if "word_embeddings" in name else p  # row pad_token_id = 0 starts at zero
            assert p.abs().max() <= 2 * std, name
            n = w.numel()  # 4 standard errors of the sample mean and std
            assert abs(w.mean().item()) < 4 * truncated_std / n**0.5, name
            assert abs(w.std().item() - truncated_std) < 4 * truncated_std / (2 * n) ** 0.5, name
    assert torch.all(model.bert.embeddings.word_embeddings.weight[config.pad_token_id] == 0)


def test_bert_model_alone_matches_hf_encoder():
    config = CONFIGS["two_layers"]
    ours = BertModel(config).eval()
    randomize(ours, seed=7)
    hf = transformers.BertModel(config.to_hf()).eval()
    hf.load_state_dict(ours.state_dict(), strict=True)
    b = padded_batch(config)
    with torch.no_grad():
        seq, pooled = ours(b["input_ids"], b["token_type_ids"], b["attention_mask"])
        ref = hf(input_ids=b["input_ids"], token_type_ids=b["token_type_ids"], attention_mask=b["attention_mask"])
    real = b["attention_mask"].bool()
    assert seq.shape == ref.last_hidden_state.shape
    assert_rel_close(seq[real], ref.last_hidden_state[real])
    assert_rel_close(pooled, ref.pooler_output)


def test_config_presets_json_and_hf(tmp_path):
    shapes = {
        n: (c.num_layers, c.hidden_size, c.num_heads, c.intermediate_size)
        for n in ("tiny", "base", "large")
        for c in [BertConfig.preset(n)]
    }
    assert shapes == {"tiny": (2, 128, 2, 512), "base": (12, 768, 12, 3072), "large": (24, 1024, 16, 4096)}
    config = BertConfig.preset("mini", vocab_size=1234, hidden_dropout=0.0)
    config.to_json(tmp_path / "m.json")
    assert load_config(str(tmp_path / "m.json")) == config
    assert load_config("mini") == BertConfig.preset("mini")
    assert BertConfig.from_hf(config.to_hf()) == config
    config.to_hf().save_pretrained(tmp_path / "hf")  # an HF config.json is accepted as --model too
    assert load_config(str(tmp_path / "hf" / "config.json")).num_layers == 4
    (tmp_path / "bad.json").write_text(json.dumps({"hidden_size": 64, "colour": "red"}))
    for spec in ("huge", str(tmp_path / "missing.json"), str(tmp_path / "bad.json")):
        with pytest.raises(UserError):
            load_config(spec)
    with pytest.raises(UserError):
        BertConfig(hidden_size=100, num_heads=3)


def test_model_set_overrides_fields_with_their_types():
    """Config fields go to the config, speed switches to the model's KernelOptions (runtime, never saved)."""
    sets = ["vocab_size=8192", "unpad=false", "fused_ops=compile", "hidden_dropout=0.0"]
    assert load_config("mini", sets) == BertConfig.preset("mini", vocab_size=8192, hidden_dropout=0.0)
    assert kernel_options("mini", sets) == KernelOptions(unpad=False, fused_ops="compile")
    assert kernel_options("mini", ["use_sdpa=false"]).use_sdpa is False
    for bad in ("colour=red", "unpad=no", "vocab_size=big", "vocab_size", "fused_ops=turbo", "num_heads=3"):
        with pytest.raises(UserError, match="--model"):
            load_config("mini", [bad])


def test_flops_formula_matches_counted_matmuls():
    """The documented formula against torch's FLOP counter on a forward+backward of one sequence (MLM loss only).

    Plain attention and torch's GEMM, because the counter sees neither CPU's fused SDPA kernel nor oneDNN's matmul."""
    s, P, L, h, V = 40, 6, 2, 64, 500
    ids = torch.randint(1, 500, (1, s))
    masked = torch.arange(1, 1 + P)
    every_row = 72 * L * s * h * h + 12 * L * s * s * h + 6 * P * h * (h + V)
    row_past_attention = 6 * h * h + 12 * h * 4 * h  # the last layer's output projection and feed-forward
    pooler_and_nsp = 2 * h * h + 2 * h * 2  # forward only without NSP labels; left out of the formula on purpose
    for sparse_last_layer in (False, True):
        config = BertConfig(vocab_size=V, hidden_size=h, num_layers=L, num_heads=4, intermediate_size=4 * h)
        options = KernelOptions(use_sdpa=False, onednn_gemm=False, sparse_last_layer=sparse_last_layer)
        model = BertForPreTraining(config, options).eval()
        with FlopCounterMode(display=False) as counter:
            model(ids, masked_positions=masked, mlm_labels=ids[0, 1 : 1 + P]).loss.backward()
        documented = every_row - (s - P) * row_past_attention if sparse_last_layer else every_row
        assert flops_per_sequence(config, s, P, options) == documented
        cls_row = row_past_attention if sparse_last_layer else 0  # the [CLS] row too; left out of the formula
        assert counter.get_total_flops() == documented + cls_row + pooler_and_nsp


def test_fill_mask_pipeline_on_saved_directory(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("the cat sat on the mat.\nthe dog sat on the log.\na cat and a dog met.\n" * 20)
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train([str(text)], vocab_size=120, min_frequency=1)
    out = tmp_path / "model"
    out.mkdir()
    wordpiece.save_model(str(out))
    tokenizer = transformers.BertTokenizer.from_pretrained(str(out))
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    model = BertForPreTraining(config).eval()
    model.save_hf_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    fill = transformers.pipeline("fill-mask", model=str(out), device="cpu")
    predictions = fill("the cat [MASK] on the mat.", top_k=3)
    enc = tokenizer("the cat [MASK] on the mat.", return_tensors="pt")
    position = int((enc["input_ids"][0] == tokenizer.mask_token_id).nonzero())
    with torch.no_grad():
        logits = model(enc["input_ids"], enc["token_type_ids"], enc["attention_mask"]).mlm_logits[0, position]
    top = logits.softmax(-1).topk(3)
    assert [p["token"] for p in predictions] == top.indices.tolist()
    assert [p["score"] for p in predictions] == pytest.approx(top.values.tolist(), rel=1e-4)


def test_ignored_labels_drop_out_of_the_loss():
    config = CONFIGS["two_layers"]
    model = BertForPreTraining(config).eval()
    b = padded_batch(config)
    inputs = {k: b[k] for k in ("input_ids", "token_type_ids", "attention_mask", "masked_positions", "mlm_labels")}
    with torch.no_grad():
        off = model(**inputs, nsp_labels=torch.full((3,), -100))  # pair task "none": NSP contributes nothing
        assert off.nsp_loss == 0 and off.loss == off.mlm_loss
        some = model(**inputs, nsp_labels=torch.tensor([-100, 1, 0]))
        ref = torch.nn.functional.cross_entropy(some.nsp_logits[1:], torch.tensor([1, 0]))
        torch.testing.assert_close(some.nsp_loss, ref)
