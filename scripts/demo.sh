#!/usr/bin/env bash
# The main job, end to end, with no download from any model or dataset hub:
#   1 set up  2 built-in corpus  3 vocabulary + dataset  4 pretrain (deepspeed, interrupted and resumed)
#   5 held-out MLM/NSP accuracy vs the untrained model  6 Hugging Face export + fill-mask  7 curves PNG
#   8 fine-tune on a task from the same docs, pretrained vs random initialization
# Everything goes under one directory: runs/demo, or the first argument / $DEMO_DIR.
# About 10 minutes on 2 CPU cores (training has a wall-clock budget); on a GPU box it uses every GPU.
# Knobs (environment): DEMO_MODEL (model preset: tiny, BERT-tiny, the default; or a ModernBERT preset such as
# modernbert-tiny, pretrained MLM-only on packed samples with 30% masking, StableAdamW and a warmup-stable-decay
# schedule, ds_configs/modernbert_demo.json, then evaluated and fine-tuned as BERT is), DEMO_MINUTES (training
# budget, default 6), DEMO_STEPS (cap on steps), DEMO_CORPUS_MB (cap on the corpus), DEMO_VOCAB (vocabulary
# size), DEMO_SAVE_EVERY / DEMO_EVAL_EVERY (steps),
# DEMO_MASTER_PORT (rendezvous port of the launcher; fine-tuning also uses the next one), DEMO_FT_SEEDS
# (fine-tuning seeds, default "1 2 3").
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${1:-${DEMO_DIR:-runs/demo}}
model=${DEMO_MODEL:-tiny}
case "$model" in  # checkpoints often enough that the interruption below comes well within the budget
  modernbert-*) family=modernbert every=25 ;;  # ModernBERT-tiny: ~7x BERT-tiny's work a step, 80-140 CPU steps
  *) family=bert every=100 ;;
esac
minutes=${DEMO_MINUTES:-6}
steps=${DEMO_STEPS:-20000}
corpus_mb=${DEMO_CORPUS_MB:-8}
vocab_size=${DEMO_VOCAB:-8192}
save_every=${DEMO_SAVE_EVERY:-$every}
eval_every=${DEMO_EVAL_EVERY:-$((2 * every))}
port=${DEMO_MASTER_PORT:-29500}
start=$SECONDS

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "[1/8] setup"
bash scripts/setup.sh
venv=${VENV:-${VIRTUAL_ENV:-$root/.venv}}  # where setup.sh installed
export PATH="$venv/bin:$PATH" TOKENIZERS_PARALLELISM=false WANDB_MODE=${WANDB_MODE:-offline} HF_HUB_OFFLINE=1
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -gt 0 ]; then
  procs=$gpus workers=2
else
  procs=2 workers=0  # on 2 cores, loader worker processes only compete with the two ranks
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1  # one core per process
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
echo "output directory: $out ($procs training processes, $gpus GPUs)"

say "[2/8] built-in corpus: documentation of the installed Python standard library and packages"
bert-prep corpus --output "$out/corpus.txt" --max-mb "$corpus_mb"

say "[3/8] WordPiece vocabulary and the indexed dataset"
bert-prep vocab --input "$out/corpus.txt" --vocab-size "$vocab_size" --output "$out/tokenizer"
bert-prep build --input "$out/corpus.txt" --tokenizer "$out/tokenizer" --output "$out/data/corpus" --workers 2 \
  --overwrite
bert-prep inspect "$out/data/corpus"

say "[4/8] pretrain $model for $minutes minutes with the deepspeed launcher ($procs processes)"
# the preset's shape (BERT-tiny: 2 layers, 128 wide) with the vocabulary just trained and its special-token ids
python - "$model" "$out/data/corpus.json" "$out/model.json" <<'EOF'
import json, sys
from pretrain.models import load_config
preset, manifest, path = sys.argv[1:]
tokenizer = json.load(open(manifest))["tokenizer"]
ids = tokenizer["special_tokens"]
fields = [f"vocab_size={tokenizer['vocab_size']}", f"pad_token_id={ids['pad']}"]
if preset.startswith("modernbert"):  # its config.json names the tokenizer's ids (the preset's are ModernBERT's own)
    fields += [f"{name}_token_id={ids[role]}" for name, role in (("cls", "cls"), ("sep", "sep"), ("bos", "cls"), ("eos", "sep"))]
load_config(preset, fields).to_json(path)
EOF
if [ "$family" = modernbert ]; then  # ModernBERT's recipe: MLM only, packed documents, 30% masking, StableAdamW + WSD
  recipe=(--deepspeed_config ds_configs/modernbert_demo.json --pair-task none --packing --mask-prob 0.3)
else
  recipe=(--deepspeed_config ds_configs/demo.json)
fi
rm -rf "$out/run"  # a fresh run each time, so the interruption below happens
train=(deepspeed --num_gpus "$procs" --master_port "$port" --log_level warning --module pretrain.train
  "${recipe[@]}" --model "$out/model.json" --data "$out/data/corpus" --seq-len 128
  --train-steps "$steps" --time-budget "$(python -c "print($minutes / 60)")" --save "$out/run"
  --save-every "$save_every" --keep-last 3 --eval-every "$eval_every"
  --eval-samples 1024 --eval-fraction 0.05 --num-workers "$workers")
echo "+ ${train[*]}"
set -m  # the background launch gets its own process group, so one signal reaches every rank
"${train[@]}" &
pgid=$!
set +m
trap 'kill -TERM -- -"$pgid" 2>/dev/null; exit 130' INT TERM  # Ctrl-C here must reach the background group too
while [ ! -s "$out/run/latest" ] && kill -0 "$pgid" 2>/dev/null; do sleep 0.2; done
kill -0 "$pgid" 2>/dev/null || { echo "training exited before its first checkpoint"; exit 1; }
say "checkpoint $(cat "$out/run/latest") is written: interrupting training with SIGTERM (as a scheduler would)"
kill -TERM -- -"$pgid"
while kill -0 -- -"$pgid" 2>/dev/null; do sleep 0.5; done  # every rank saves at a step boundary and exits
trap - INT TERM
say "relaunching the same command: it resumes from $(cat "$out/run/latest")"
"${train[@]}"

say "[5/8] held-out accuracy: trained vs untrained (step 0) on the same held-out documents"
python - "$out/run/metrics.jsonl" <<'EOF'
import json, sys
evals = {}
for line in open(sys.argv[1]):
    if line.strip() and (rec := json.loads(line)).get("split") == "eval":
        evals[rec["step"]] = rec
first, last = evals[min(evals)], evals[max(evals)]
print(f"{'':>22} {'MLM accuracy':>13} {'NSP accuracy':>13}")
for name, rec in ((f"untrained (step {first['step']})", first), (f"trained (step {last['step']})", last)):
    nsp = f"{rec['nsp_acc']:>13.4f}" if rec["nsp_acc"] is not None else f"{'- (no NSP)':>13}"
    print(f"{name:>22} {rec['mlm_acc']:>13.4f} {nsp}")
EOF

say "[6/8] export to a Hugging Face directory and run transformers' fill-mask pipeline"
bert-export "$out/run" "$out/hf"
python - "$out/hf" <<'EOF'
import sys
from transformers import logging, pipeline
logging.set_verbosity_error()  # the pipeline's masked-LM load reports the NSP head it leaves out
fill = pipeline("fill-mask", model=sys.argv[1], device="cpu")
mask = fill.tokenizer.mask_token  # [MASK] for the demo's WordPiece vocabulary; another tokenizer names its own
for text in [
    "Return the [MASK] of the list.",
    "This function is used to [MASK] the file.",
    "If the [MASK] is not found, an exception is raised.",
    "The default value is [MASK].",
]:
    text = text.replace("[MASK]", mask)
    guesses = ", ".join(f"{p['token_str']} ({p['score']:.2f})" for p in fill(text, top_k=3))
    print(f"{text:<55} -> {guesses}")
EOF

say "[7/8] loss and accuracy curves"
bert-report "$out/run"

say "[8/8] fine-tune on a task from the same documentation: which standard-library package a paragraph is from"
python -m finetune.tasks packages --output "$out/task" --per-class 150
# One process per fine-tuning run (the task is small: more ranks only add synchronization), the pretrained and
# the randomly initialized run side by side, once per seed: the seed alone moves one run by 10-20 points,
# more than pretraining changes it, so the comparison is the mean over seeds.
read -r -a seeds <<<"${DEMO_FT_SEEDS:-1 2 3}"
finetune=(--module finetune.run --task classify --train "$out/task/train.csv" --eval "$out/task/eval.csv"
  --seq-len 128 --epochs 3 --lr 1e-3 --batch 16)
echo "+ deepspeed --num_gpus 1 ${finetune[*]} --init-from $out/hf [--random-init] --seed S" \
  "--output $out/finetune/{pretrained,random}/seedS"
echo "  for S in ${seeds[*]}; logs in $out/finetune/*.log"
mkdir -p "$out/finetune"
finetune_run() { # init seed port [flags]: one run, its output in a log that is shown if it fails
  local log="$out/finetune/$1-seed$2.log"
  if ! deepspeed --num_gpus 1 --master_port "$3" --log_level warning "${finetune[@]}" --seed "$2" \
    --init-from "$out/hf" "${@:4}" --output "$out/finetune/$1/seed$2" >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "error: fine-tuning ($1, seed $2) failed; its log: $log" >&2
    return 1
  fi
}
for seed in "${seeds[@]}"; do
  finetune_run pretrained "$seed" "$port" &
  pretrained_pid=$!
  finetune_run random "$seed" "$((port + 1))" --random-init &
  random_pid=$!
  failed=0
  wait "$pretrained_pid" || failed=1
  wait "$random_pid" || failed=1
  [ "$failed" = 0 ] || exit 1
  grep -h "^best eval accuracy" "$out/finetune/pretrained-seed$seed.log" "$out/finetune/random-seed$seed.log"
done
python - "$out/finetune" "${seeds[@]}" <<'EOF'
import json, statistics, sys
root, seeds = sys.argv[1], sys.argv[2:]
acc = {
    init: [json.load(open(f"{root}/{init}/seed{s}/eval_report.json"))["report"]["accuracy"] for s in seeds]
    for init in ("pretrained", "random")
}
gains = [100 * (p - r) for p, r in zip(acc["pretrained"], acc["random"])]
print(f"{'seed':>6} {'pretrained':>11} {'random init':>12} {'gain (points)':>14}")
for s, p, r, g in zip(seeds, acc["pretrained"], acc["random"], gains):
    print(f"{s:>6} {p:>11.4f} {r:>12.4f} {g:>+14.1f}")
mean = {init: statistics.mean(a) for init, a in acc.items()}
print(f"{'mean':>6} {mean['pretrained']:>11.4f} {mean['random']:>12.4f} {statistics.mean(gains):>+14.1f}")
print(f"pretraining adds {statistics.mean(gains):+.1f} accuracy points on this task (mean of {len(seeds)} seeds; "
      f"per seed {min(gains):+.1f} to {max(gains):+.1f})")
if statistics.mean(gains) < 0:
    print("a few CPU minutes of pretraining can leave features that fine-tune worse than random weights "
          "(docs/PERFORMANCE.md, fine-tuning results); a longer DEMO_MINUTES gives pretraining room to pay")
EOF

say "done in $(((SECONDS - start) / 60)) min $(((SECONDS - start) % 60)) s; everything is under $out"
cat <<EOF
  corpus          $out/corpus.txt
  tokenizer       $out/tokenizer
  dataset         $out/data/corpus.{bin,idx,json}
  checkpoints     $out/run   (and metrics.jsonl)
  Hugging Face    $out/hf
  curves          $out/run/curves.png
  fine-tuning     $out/finetune/{pretrained,random}/seed*   (eval_report.json, HF directories)
EOF
