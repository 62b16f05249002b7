"""The data-prep benchmark runs end to end on a tiny input and reports every row of its table."""

from __future__ import annotations

import re

from fixtures_prep import documents, txt

from data_prep import bench


def test_bench_prints_the_throughput_table(tmp_path, capsys):
    src = tmp_path / "a.txt"
    src.write_text(txt(documents(150, seed=30)), encoding="utf-8")
    args = ["--input", str(src), "--workdir", str(tmp_path / "w"), "--vocab-size", 300, "--workers", 1]
    assert bench.main([str(a) for a in args] + ["--read-sentences", "2000"]) == 0
    out = capsys.readouterr().out
    assert "encode_batch_fast" in out and "`bert-prep build --workers 1`" in out and "--no-split-sentences" in out
    assert "ASCII fast path" in out and "--no-ascii-fast-path" in out
    rates = re.findall(r"\| ([\d,]+) \| ([\d.]+) \|", out)
    assert "the same documents as Parquet" in out
    assert len(rates) == 7 and all(float(t.replace(",", "")) > 0 for t, _ in rates)
    assert re.search(r"opening 2,000 sentences took [\d.]+ ms", out)
    assert re.search(r"SIGKILLed after 6 of 8 chunks, the re-run took [\d.]+ s", out)
    assert re.search(r"feeding rate .*: [\d.]+ MB of text per CPU-s", out)


def test_bench_compares_txt_and_parquet_builds_of_the_same_text(tmp_path, capsys):
    src = tmp_path / "a.txt"
    src.write_text(txt(documents(60, seed=31)), encoding="utf-8")
    args = ["--input", str(src), "--workdir", str(tmp_path / "w"), "--vocab-size", "300", "--formats-only"]
    assert bench.main(args + ["--repeats", "2"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"\| (\d) \| ([\d,]+) \| ([\d,]+) \| ([\d.]+) \|", out)
    assert [r[0] for r in rows] == ["1", "2"]
    for _, a, b, ratio in rows:
        assert abs(float(ratio) - int(b.replace(",", "")) / int(a.replace(",", ""))) < 0.002
    assert re.search(r"throughput over 2 pairs: median [\d.]+, range [\d.]+-[\d.]+", out)
    assert re.search(r"tokens per CPU-s over 2 pairs: median [\d.]+, range [\d.]+-[\d.]+", out)
    assert re.search(r"feeding rate, Parquet .*: [\d.]+ MB of text per CPU-s", out)
    assert "encode_batch" not in out  # only the pair of builds
