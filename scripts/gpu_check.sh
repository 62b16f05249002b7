#!/usr/bin/env bash
# The GPU half of the checks, for any CUDA machine (yours or a cluster node):
#   correctness: every test marked `gpu` (tests/test_gpu.py and the GPU tests beside the CPU ones): each fused
#                path against the plain one in bf16 and fp16, DeepSpeed's fused LAMB against ours, fp16 with
#                dynamic loss scaling (an injected overflow; 300 steps of tiny and base on real text), ZeRO-1/2
#                checkpoint + resume on one GPU;
#   bench:       bert-bench at the settings docs/PERFORMANCE.md tracks, each beside Hugging Face's
#                BertForPreTraining (SDPA) on the same GPU, batch and precision; then real data three ways:
#                the bare step, the DeepSpeed engine step, and bert-pretrain end to end (loader included).
# Usage: scripts/gpu_check.sh [correctness|bench|all] [--out DIR] [--data PREFIX] [--quick] [--smoke]
#   --out DIR      logs, JUnit XML and bench JSON go here (default gpu_check_out/)
#   --data PREFIX  a bert-prep dataset of real text; without it one is built from `bert-prep corpus` in DIR
#   --quick        fewer timed steps
#   --smoke        the same runs with a tiny model on any device, CPU included (tests the script itself)
# Python: $PYTHON, else .venv/bin/python when scripts/setup.sh made one, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."

part=all out=gpu_check_out data="${BERT_GPU_DATA:-}" steps=30 smoke=0
while [ $# -gt 0 ]; do
  case "$1" in
    correctness|bench|all) part=$1 ;;
    --out) out=$2; shift ;;
    --data) data=$2; shift ;;
    --quick) steps=8 ;;
    --smoke) smoke=1 ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
    *) echo "error: unknown argument '$1'; see scripts/gpu_check.sh --help" >&2; exit 2 ;;
  esac
  shift
done
py=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
if [ $smoke = 0 ] && ! $py -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "error: $py sees no CUDA GPU (torch.cuda.is_available() is False); run this on a GPU machine" >&2
  exit 2
fi
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
unset DS_ACCELERATOR
# model, sequence lengths, micro-batches, corpus MB, vocabulary, engine config: real sizes, or tiny for --smoke
large=large base=base s128=128 s512=512 mb128=128 mb256=256 mb512=32 mbdata=32 corpus_mb=20 vocab_size=8192
engine_cfg=ds_configs/bert_large_phase1_zero2_bf16.json
if [ $smoke = 1 ]; then
  large=tiny base=tiny s128=32 s512=64 mb128=4 mb256=4 mb512=2 mbdata=16 corpus_mb=1 vocab_size=2000 steps=2
  engine_cfg=ds_configs/cpu_small_bf16_zero2.json
fi

$py - <<'EOF' | tee "$out/environment.txt"
import importlib.util, torch
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
found = {m: importlib.util.find_spec(m) is not None for m in ("deepspeed", "flash_attn", "apex", "transformers")}
print(f"device {name}; torch {torch.__version__} (CUDA {torch.version.cuda}); " +
      ", ".join(f"{m} {'yes' if ok else 'no'}" for m, ok in found.items()))
EOF

if [ -z "$data" ]; then
  data="$out/data/corpus"
  if [ ! -f "$data.json" ]; then
    echo "== building a real-text dataset in $out/data (bert-prep corpus, vocab, build)"
    mkdir -p "$out/data"
    $py -m data_prep.cli corpus --output "$out/data/corpus.txt" --max-mb $corpus_mb
    $py -m data_prep.cli vocab --input "$out/data/corpus.txt" --vocab-size $vocab_size --output "$out/data/tokenizer"
    $py -m data_prep.cli build --input "$out/data/corpus.txt" --tokenizer "$out/data/tokenizer" \
      --output "$data" --workers "$(nproc)" --overwrite
  fi
fi

status=0
if [ "$part" != bench ]; then
  # only the files that hold gpu tests: collecting the rest would import CPU-only test dependencies
  mapfile -t files < <(grep -l "mark.gpu" tests/test_*.py)
  echo "== correctness: pytest -m gpu ${files[*]}"
  BERT_GPU_DATA="$data" $py -m pytest -m gpu -v -rA -p no:cacheprovider "${files[@]}" --junitxml "$out/gpu_tests.xml" \
    2>&1 | tee "$out/gpu_tests.log" || status=1
fi

bench() {  # name, then bert-bench flags
  local name=$1; shift
  echo "== bench $name"
  $py -m pretrain.bench --steps "$steps" --warmup $([ $smoke = 1 ] && echo 1 || echo 5) --json "$out/bench_$name.json" "$@" 2>&1 \
    | grep -v "timed steps" | tee "$out/bench_$name.log" || status=1
}
if [ "$part" != correctness ]; then
  bench large_s128_bf16 --model $large --seq-len $s128 --micro-batch $mb128 --precision bf16 --padding none --compare-hf
  bench base_s128_bf16 --model $base --seq-len $s128 --micro-batch $mb256 --precision bf16 --padding none --compare-hf
  bench large_s512_realistic_bf16 --model $large --seq-len $s512 --micro-batch $mb512 --precision bf16 --compare-hf
  bench large_s512_padded_bf16 --model $large --seq-len $s512 --micro-batch $mb512 --precision bf16 --padding none \
    --model-set unpad=false --compare-hf
  if [ $smoke = 0 ]; then  # fp16 needs CUDA; compiling on CPU is slow and says nothing about the GPU
    bench large_s128_fp16 --model $large --seq-len $s128 --micro-batch $mb128 --precision fp16 --padding none \
      --compare-hf
    bench large_s128_bf16_compile --model $large --seq-len $s128 --micro-batch $mb128 --precision bf16 \
      --padding none --model-set fused_ops=compile
    bench large_s128_bf16_compiled_model --model $large --seq-len $s128 --micro-batch $mb128 --precision bf16 \
      --padding none --compile
  fi
  # end to end: real batches through the DeepSpeed engine (its JSON: LAMB, ZeRO-2, bf16), beside the bare step
  # on the same batches and micro-batch (--data without the engine)
  vocab=$($py -c "import json,sys; print(json.load(open(sys.argv[1]))['tokenizer']['vocab_size'])" "$data.json")
  bench large_s128_data_bare --model $large --model-set "vocab_size=$vocab" --seq-len $s128 --micro-batch $mbdata \
    --precision bf16 --data "$data"
  bench large_s128_data_engine --model $large --model-set "vocab_size=$vocab" --seq-len $s128 --data "$data" \
    --deepspeed_config $engine_cfg
  # end to end through bert-pretrain itself (loader, engine, logging; 4 micro-batches per optimizer step):
  # seq/s is the median over the logged steps after the first 10
  echo "== bench large_s128_pretrain_e2e"
  rm -rf "$out/e2e_run"
  $py - "$engine_cfg" "$out/e2e_ds.json" "$mbdata" <<'EOF'
import json, sys
cfg = json.load(open(sys.argv[1]))
mb = int(sys.argv[3])
cfg.update(train_batch_size=4 * mb, train_micro_batch_size_per_gpu=mb, steps_per_print=10**9)
cfg.pop("gradient_accumulation_steps", None)
json.dump(cfg, open(sys.argv[2], "w"), indent=2)
EOF
  $py -m pretrain.train --deepspeed_config "$out/e2e_ds.json" --model $large --model-set "vocab_size=$vocab" \
    --data "$data" --seq-len $s128 --train-steps 40 --save "$out/e2e_run" --log-every 10 2>&1 \
    | grep -E "^step|error" | tee "$out/bench_large_s128_pretrain_e2e.log" || status=1
  $py - "$out" <<'EOF' || status=1
import json, os, statistics, sys
out = sys.argv[1]
steps = [json.loads(line) for line in open(os.path.join(out, "e2e_run", "metrics.jsonl")) if '"split"' not in line]
rate = statistics.median(r["seq_per_s"] for r in steps if r["step"] > 10)
result = {"ours": {"seq_per_s": rate, "mfu": None, "peak_mem_bytes": None}, "steps": len(steps)}
json.dump(result, open(os.path.join(out, "bench_large_s128_pretrain_e2e.json"), "w"), indent=2)
print(f"bert-pretrain end to end: {rate:.1f} seq/s (median of steps 11-{len(steps)})")
EOF
  $py - "$out" <<'EOF' | tee "$out/bench_summary.txt"
import glob, json, os, sys
print(f"{'run':34s} {'ours seq/s':>10s} {'MFU':>6s} {'HF seq/s':>9s} {'speedup':>7s} {'peak GiB':>8s}")
for path in sorted(glob.glob(os.path.join(sys.argv[1], "bench_*.json"))):
    r = json.load(open(path))
    o, h = r["ours"], r.get("hf")
    mfu = f"{100 * o['mfu']:.1f}%" if o.get("mfu") else "n/a"
    hf = f"{h['seq_per_s']:9.1f} {r['speedup_vs_hf']:6.2f}x" if h else f"{'-':>9s} {'-':>7s}"
    mem = f"{o['peak_mem_bytes'] / 2**30:8.1f}" if o.get("peak_mem_bytes") else f"{'n/a':>8s}"
    print(f"{os.path.basename(path)[6:-5]:34s} {o['seq_per_s']:10.1f} {mfu:>6s} {hf} {mem}")
EOF
fi
exit $status
