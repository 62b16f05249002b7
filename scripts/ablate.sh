#!/usr/bin/env bash
# One row of the pretraining ablation (docs/PERFORMANCE.md, "Pretraining that pays"): pretrain a model on a
# prepared dataset for a fixed wall-clock budget on this machine (2 processes on CPU, as the demo), then print
# steps, tokens/s and the last held-out eval (MLM accuracy at 15% masking whatever the training rate).
#   scripts/ablate.sh WORK NAME MINUTES DS_JSON MODEL [bert-pretrain flags...]
# WORK holds data/corpus (bert-prep build) and tokenizer/; the run goes to WORK/runs/NAME (replaced), its result
# line is appended to WORK/results.jsonl. MODEL is a preset or a model JSON (vocab and pad id come from the data);
# MODEL_SET="field=value ..." changes the preset's fields (e.g. MODEL_SET="num_layers=4").
set -euo pipefail
work=$1 name=$2 minutes=$3 ds=$4 model=$5
shift 5
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
run=$work/runs/$name
rm -rf "$run" && mkdir -p "$run"
# the preset (or JSON) with the data's vocabulary; bert-pretrain fills in the data's special-token ids itself
vocab=$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['tokenizer']['vocab_size'])" \
  "$work/data/corpus.json")
sets=(--model-set "vocab_size=$vocab")
for field in ${MODEL_SET:-}; do sets+=(--model-set "$field"); done
deepspeed --num_gpus "${NPROC:-2}" --master_port "${PORT:-29600}" --log_level warning --module pretrain.train \
  --deepspeed_config "$ds" --model "$model" "${sets[@]}" --data "$work/data/corpus" --seq-len 128 \
  --train-steps 100000 \
  --time-budget "$(python -c "print($minutes / 60)")" --save "$run/save" --eval-every 100000 --eval-samples 1024 \
  --eval-fraction 0.1 --num-workers 0 --log-every 50 "$@" >"$run/train.log" 2>&1 || { tail -20 "$run/train.log"; exit 1; }
python - "$run/save/metrics.jsonl" "$name" "$minutes" "$*" "$ds" "$model${MODEL_SET:+ $MODEL_SET}" "$(uptime)" >>"$work/results.jsonl" <<'PY'
import json, sys
path, name, minutes, flags, ds, model, load = sys.argv[1:]
recs = [json.loads(l) for l in open(path) if l.strip()]
train = [r for r in recs if r.get("split") != "eval" and "loss" in r]
evals = [r for r in recs if r.get("split") == "eval"]
last = evals[-1]
tps = sorted(r["tokens_per_s"] for r in train[len(train) // 10:])
print(json.dumps({"name": name, "minutes": float(minutes), "model": model, "ds": ds, "flags": flags,
                  "steps": train[-1]["step"], "tokens_per_s": round(tps[len(tps) // 2]),
                  "samples": train[-1]["samples"], "mlm_acc": round(last["mlm_acc"], 4),
                  "mlm_loss": round(last["mlm_loss"], 4), "first_mlm_acc": round(evals[0]["mlm_acc"], 4),
                  "load": load.split("load average:")[-1].strip()}))
PY
tail -1 "$work/results.jsonl"
