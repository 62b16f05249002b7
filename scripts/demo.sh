#!/usr/bin/env bash
# The main job, end to end, with no download from any model or dataset hub:
#   1 set up  2 built-in corpus  3 vocabulary + dataset  4 pretrain (deepspeed, interrupted and resumed)
#   5 held-out MLM/NSP accuracy vs the untrained model  6 Hugging Face export + fill-mask  7 curves PNG
#   8 fine-tune on a task from the same docs, pretrained vs random initialization
# Everything goes under one directory: runs/demo, or the first argument / $DEMO_DIR.
# About 10 minutes on 2 CPU cores (training has a wall-clock budget); on a GPU box it uses every GPU.
# Knobs (environment): DEMO_MINUTES (training budget, default 6), DEMO_STEPS (cap on steps), DEMO_CORPUS_MB
# (cap on the corpus), DEMO_VOCAB (vocabulary size), DEMO_SAVE_EVERY / DEMO_EVAL_EVERY (steps),
# DEMO_MASTER_PORT (rendezvous port of the launcher).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${1:-${DEMO_DIR:-runs/demo}}
minutes=${DEMO_MINUTES:-6}
steps=${DEMO_STEPS:-20000}
corpus_mb=${DEMO_CORPUS_MB:-8}
vocab_size=${DEMO_VOCAB:-8192}
save_every=${DEMO_SAVE_EVERY:-100}
eval_every=${DEMO_EVAL_EVERY:-200}
port=${DEMO_MASTER_PORT:-29500}
start=$SECONDS

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "[1/8] setup"
bash scripts/setup.sh
venv=${VENV:-$root/.venv}
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

say "[4/8] pretrain a small BERT for $minutes minutes with the deepspeed launcher ($procs processes)"
# BERT-tiny's shape (2 layers, 128 wide) with the vocabulary just trained
python -c "from pretrain.model import BertConfig as C; C.preset('tiny', vocab_size=$vocab_size).to_json('$out/model.json')"
rm -rf "$out/run"  # a fresh run each time, so the interruption below happens
train=(deepspeed --num_gpus "$procs" --master_port "$port" --log_level warning --module pretrain.train
  --deepspeed_config ds_configs/demo.json --model "$out/model.json" --data "$out/data/corpus" --seq-len 128
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
    print(f"{name:>22} {rec['mlm_acc']:>13.4f} {rec['nsp_acc']:>13.4f}")
EOF

say "[6/8] export to a Hugging Face directory and run transformers' fill-mask pipeline"
bert-export "$out/run" "$out/hf"
python - "$out/hf" <<'EOF'
import sys
from transformers import logging, pipeline
logging.set_verbosity_error()  # the pipeline's masked-LM load reports the NSP head it leaves out
fill = pipeline("fill-mask", model=sys.argv[1], device="cpu")
for text in [
    "Return the [MASK] of the list.",
    "This function is used to [MASK] the file.",
    "If the [MASK] is not found, an exception is raised.",
    "The default value is [MASK].",
]:
    guesses = ", ".join(f"{p['token_str']} ({p['score']:.2f})" for p in fill(text, top_k=3))
    print(f"{text:<55} -> {guesses}")
EOF

say "[7/8] loss and accuracy curves"
bert-report "$out/run"

say "[8/8] fine-tune on a task from the same documentation: which standard-library package a paragraph is from"
python -m finetune.tasks packages --output "$out/task" --per-class 150
finetune=(deepspeed --num_gpus "$procs" --master_port "$port" --log_level warning --module finetune.run
  --task classify --train "$out/task/train.csv" --eval "$out/task/eval.csv" --seq-len 128 --epochs 3 --lr 1e-3)
echo "+ ${finetune[*]} --init-from $out/hf [--random-init]"
"${finetune[@]}" --init-from "$out/hf" --output "$out/finetune/pretrained" 2>&1 | tee "$out/finetune-pretrained.log"
"${finetune[@]}" --init-from "$out/hf" --random-init --output "$out/finetune/random" 2>&1 \
  | tee "$out/finetune-random.log"
python - "$out/finetune" <<'EOF'
import json, sys
runs = {name: json.load(open(f"{sys.argv[1]}/{name}/eval_report.json")) for name in ("random", "pretrained")}
print(f"{'initialization':>16} {'accuracy':>9} {'macro-F1':>9} {'best epoch':>11}")
for name, r in runs.items():
    print(f"{name:>16} {r['report']['accuracy']:>9.4f} {r['report']['macro_f1']:>9.4f} {r['best_epoch']:>11}")
gain = runs["pretrained"]["report"]["accuracy"] - runs["random"]["report"]["accuracy"]
print(f"pretraining adds {100 * gain:+.1f} accuracy points on this task")
EOF

say "done in $(((SECONDS - start) / 60)) min $(((SECONDS - start) % 60)) s; everything is under $out"
cat <<EOF
  corpus          $out/corpus.txt
  tokenizer       $out/tokenizer
  dataset         $out/data/corpus.{bin,idx,json}
  checkpoints     $out/run   (and metrics.jsonl)
  Hugging Face    $out/hf
  curves          $out/run/curves.png
  fine-tuning     $out/finetune/{pretrained,random}   (eval_report.json, HF directories)
EOF
