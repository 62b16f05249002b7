"""`python -m finetune.compare`: the paired per-seed gain, mean +- std, and the verdict against the seed spread."""

import json
import statistics

import pytest

from common.errors import UserError
from finetune import compare


@pytest.mark.parametrize(
    "pretrained, random, outcome",
    [
        ([0.60, 0.62, 0.64], [0.50, 0.50, 0.50], "helped"),  # gains 10, 12, 14: mean 12, spread 2
        ([0.55, 0.40, 0.52], [0.50, 0.50, 0.50], "within spread"),  # gains 5, -10, 2: mean -1, spread 7.9
        ([0.56, 0.50, 0.53], [0.50, 0.50, 0.50], "within spread"),  # gains 6, 0, 3: mean 3 = spread 3, not more
        ([0.40, 0.38, 0.36], [0.50, 0.50, 0.50], "hurt"),
        ([0.70], [0.50], "one seed"),
    ],
)
def test_verdict_compares_the_mean_gain_with_the_spread_of_the_per_seed_gains(pretrained, random, outcome):
    v = compare.judge(pretrained, random)
    gains = [100 * (p - r) for p, r in zip(pretrained, random)]
    assert v.gains == pytest.approx(gains) and v.mean == pytest.approx(sum(gains) / len(gains))
    assert v.spread == (pytest.approx(statistics.stdev(gains)) if len(gains) > 1 else None)
    assert v.outcome == outcome


def test_table_reads_the_reports_and_prints_per_seed_mean_std_and_one_verdict(tmp_path, capsys):
    acc = {"pretrained": [0.61, 0.63, 0.65], "random": [0.50, 0.52, 0.51]}
    for init, values in acc.items():
        for seed, a in zip((1, 2, 3), values):
            d = tmp_path / init / f"seed{seed}"
            d.mkdir(parents=True)
            lr = 1e-3 if init == "pretrained" else 3e-3
            (d / "eval_report.json").write_text(json.dumps({"lr": lr, "seed": seed, "report": {"accuracy": a}}))
    assert compare.main([str(tmp_path), "--seeds", "1", "2", "3", "--task", "word order"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "word order: learning rate pretrained 0.001, random init 0.003"
    assert out[2].split() == ["1", "0.6100", "0.5000", "+11.0"]
    assert out[4].split() == ["3", "0.6500", "0.5100", "+14.0"]
    assert out[5] == (
        "mean +- std over 3 seeds: pretrained 0.6300 +- 0.0200, random init 0.5100 +- 0.0100, gain +12.0 +- 1.7 points"
    )
    assert out[6] == (
        "verdict (word order): pretraining helped: +12.0 accuracy points, seed spread 1.7 "
        "(mean of 3 seeds, per seed +11.0, +11.0, +14.0)"
    )
    assert len([line for line in out if line.startswith("verdict")]) == 1
    with pytest.raises(UserError, match="seed4/eval_report.json does not exist"):
        compare.read_reports(tmp_path, ["4"])
