#!/usr/bin/env bash
# The main job, end to end, with no download from any model or dataset hub:
#   1 set up  2 built-in corpus (or yours: DEMO_CORPUS)  3 vocabulary + dataset  4 pretrain (deepspeed,
#   interrupted and resumed)  5 held-out MLM/NSP accuracy vs the untrained model  6 Hugging Face export +
#   fill-mask  7 curves PNG  8 fine-tune, pretrained vs random initialization, 3 seeds, on two tasks: word order
#   in the documents pretraining held out, and which package a documentation paragraph is from
# Everything goes under one directory: runs/demo, or the first argument / $DEMO_DIR.
# 10-16 minutes on 2 CPU cores, by their speed (training has a wall-clock budget of 6; the twelve fine-tuning
# runs of step 8 take 3.5-6.5, docs/PERFORMANCE.md); on a GPU box it uses every GPU.
# Knobs (environment): DEMO_MODEL (model preset: modernbert-mini, the default, 4 layers x 128, pretrained MLM-only
# on packed samples at 30% masking with StableAdamW and a warmup-stable-decay schedule at a batch of 32,
# ds_configs/modernbert_demo.json;
# or a BERT preset such as tiny, BERT-tiny, pretrained the same way without dropout, ds_configs/demo.json; both
# evaluated at 15% masking and fine-tuned alike; docs/PERFORMANCE.md has the ablation behind the choice), DEMO_MINUTES (training
# budget, default 6), DEMO_STEPS (cap on steps), DEMO_CORPUS_MB (cap on the corpus), DEMO_VOCAB (vocabulary
# size), DEMO_SAVE_EVERY / DEMO_EVAL_EVERY (steps),
# DEMO_MASTER_PORT (rendezvous port of the launcher; fine-tuning also uses the next one), DEMO_FT_SEEDS
# (fine-tuning seeds, default "1 2 3"), DEMO_FT_LR_PRETRAINED / DEMO_FT_LR_RANDOM (fine-tuning learning rate of
# each initialization), DEMO_CORPUS (your own text instead of the built-in corpus: a file, directory or glob of
# anything bert-prep reads, at least DEMO_MIN_MB, default 1, MB of text; docs/demo.md), DEMO_FT_EVAL (eval
# examples per fine-tuning task, default 1000; fewer only to test this script quickly).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${1:-${DEMO_DIR:-runs/demo}}
model=${DEMO_MODEL:-modernbert-mini}
case "$model" in  # checkpoints often enough that the interruption below comes well within the budget
  modernbert-tiny | modernbert-base | modernbert-large) family=modernbert every=25 ;;  # tiny: ~80-140 CPU steps
  modernbert-*) family=modernbert every=100 ;;  # modernbert-mini, batch 32: ~550-1,700 steps in 6 CPU minutes
  *) family=bert every=200 ;;  # BERT-tiny at the demo's batch of 32: ~1,700 steps
esac
minutes=${DEMO_MINUTES:-6}
steps=${DEMO_STEPS:-20000}
corpus_mb=${DEMO_CORPUS_MB:-8}
corpus=${DEMO_CORPUS:-}
held_out=0.1  # share of documents pretraining holds out: its MLM eval and the word-order task's sentences
vocab_size=${DEMO_VOCAB:-8192}
save_every=${DEMO_SAVE_EVERY:-$every}
eval_every=${DEMO_EVAL_EVERY:-$((2 * every))}
port=${DEMO_MASTER_PORT:-29500}
start=$SECONDS

say() { printf '\n\033[1m== %s\033[0m  (%d:%02d)\n' "$*" $(((SECONDS - start) / 60)) $(((SECONDS - start) % 60)); }

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

if [ -n "$corpus" ]; then
  say "[2/8] your corpus: $corpus"
  python -m data_prep.corpus_size "$corpus" --min-mb "${DEMO_MIN_MB:-1}"  # too little text: one line, no training
  text=$corpus
else
  say "[2/8] built-in corpus: documentation of the installed Python standard library and packages"
  bert-prep corpus --output "$out/corpus.txt" --max-mb "$corpus_mb"
  text=$out/corpus.txt
fi

say "[3/8] WordPiece vocabulary and the indexed dataset"
bert-prep vocab --input "$text" --vocab-size "$vocab_size" --output "$out/tokenizer"
bert-prep build --input "$text" --tokenizer "$out/tokenizer" --output "$out/data/corpus" --workers 2 --overwrite
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
else:  # no dropout: a few minutes of data are seen a few times at most (docs/PERFORMANCE.md, the ablation)
    fields += ["hidden_dropout=0", "attention_dropout=0"]
load_config(preset, fields).to_json(path)
EOF
if [ "$family" = modernbert ]; then  # ModernBERT's recipe: MLM only, packed documents, 30% masking, StableAdamW + WSD
  recipe=(--deepspeed_config ds_configs/modernbert_demo.json --pair-task none --packing --mask-prob 0.3)
else  # MLM only on packed documents at 30%, no dropout, a batch of 32 at 2e-3 (docs/PERFORMANCE.md, the ablation)
  recipe=(--deepspeed_config ds_configs/demo.json --pair-task none --packing --mask-prob 0.3)
fi
rm -rf "$out/run"  # a fresh run each time, so the interruption below happens
train=(deepspeed --num_gpus "$procs" --master_port "$port" --log_level warning --module pretrain.train
  "${recipe[@]}" --model "$out/model.json" --data "$out/data/corpus" --seq-len 128
  --train-steps "$steps" --time-budget "$(python -c "print($minutes / 60)")" --save "$out/run"
  --save-every "$save_every" --keep-last 3 --eval-every "$eval_every"
  --eval-samples 1024 --eval-fraction "$held_out" --num-workers "$workers")
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

say "[8/8] fine-tune, pretrained vs random initialization, on two tasks"
# Word order: is a sentence as written or with two words swapped, in documents pretraining held out (never trained
# on); packages: which package a documentation paragraph is from. Each task evaluates on over 1,000 examples.
ft_eval=${DEMO_FT_EVAL:-1000}  # eval examples per task (fewer only to test the script quickly)
python -m finetune.demo_tasks word-order --data "$out/data/corpus" --data-eval-fraction "$held_out" \
  --eval-examples "$ft_eval" --train-examples "$((2 * ft_eval))" --output "$out/tasks/word-order"
python -m finetune.demo_tasks packages --output "$out/tasks/packages" --classes 8 --per-class "$(((ft_eval + 3) / 4))" \
  --eval-fraction 0.51
# One process per fine-tuning run (the tasks are small: more ranks only add synchronization), the pretrained and
# the randomly initialized run side by side, once per seed: the seed alone moves one run by up to 10-20 points,
# so the comparison is paired per seed and judged against the spread of the per-seed gains. Each initialization
# and task has its own learning rate, from the sweeps on two machines (docs/PERFORMANCE.md, "Fine-tuning learning
# rates on the demo's model"): 3e-4 for the pretrained model on word order (its best on both; at 1e-3 it loses 1-2
# points), 1e-3 otherwise (within a few points of the best; random weights stay at chance on word order at every
# rate). DEMO_FT_LR_PRETRAINED / DEMO_FT_LR_RANDOM set one initialization's rate for both tasks.
read -r -a seeds <<<"${DEMO_FT_SEEDS:-1 2 3}"
declare -A lr=(
  [word-order/pretrained]=${DEMO_FT_LR_PRETRAINED:-3e-4} [word-order/random]=${DEMO_FT_LR_RANDOM:-1e-3}
  [packages/pretrained]=${DEMO_FT_LR_PRETRAINED:-1e-3} [packages/random]=${DEMO_FT_LR_RANDOM:-1e-3})
# Through the launcher, though a world of one would not need it: started directly (`python -m finetune.run`), a run
# saves 5-10 s but at times aborts at interpreter exit after its report is written (docs/PERFORMANCE.md, stop 29).
finetune=(--module finetune.run --task classify --seq-len 128 --epochs 3 --batch 16)
echo "+ deepspeed --num_gpus 1 ${finetune[*]} --train $out/tasks/TASK/train.csv --eval $out/tasks/TASK/eval.csv" \
  "--init-from $out/hf [--random-init] --lr LR --seed S" \
  "--output $out/finetune/TASK/{pretrained,random}/seedS"
echo "  for TASK in word-order packages, S in ${seeds[*]}; logs in $out/finetune/TASK/*.log; LR, pretrained / random:" \
  "word order ${lr[word-order/pretrained]} / ${lr[word-order/random]}," \
  "packages ${lr[packages/pretrained]} / ${lr[packages/random]}"
finetune_run() { # task init seed port [flags]: one run, its output in a log that is shown if it fails
  local log="$out/finetune/$1/$2-seed$3.log"
  if ! deepspeed --num_gpus 1 --master_port "$4" --log_level warning "${finetune[@]}" --seed "$3" \
    --train "$out/tasks/$1/train.csv" --eval "$out/tasks/$1/eval.csv" --lr "${lr[$1/$2]}" --init-from "$out/hf" \
    "${@:5}" --output "$out/finetune/$1/$2/seed$3" >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "error: fine-tuning ($1, $2, seed $3) failed; its log: $log" >&2
    return 1
  fi
}
in_domain="documentation packages"
[ -z "$corpus" ] || in_domain="documentation packages (out of domain: not your corpus)"
for task in word-order packages; do
  mkdir -p "$out/finetune/$task"
  for seed in "${seeds[@]}"; do
    finetune_run "$task" pretrained "$seed" "$port" &
    pretrained_pid=$!
    finetune_run "$task" random "$seed" "$((port + 1))" --random-init &
    random_pid=$!
    failed=0
    wait "$pretrained_pid" || failed=1
    wait "$random_pid" || failed=1
    [ "$failed" = 0 ] || exit 1
  done
done
echo
python -m finetune.compare "$out/finetune/word-order" --seeds "${seeds[@]}" --task "word order, held-out documents" \
  | tee "$out/finetune/comparison.txt"
echo
python -m finetune.compare "$out/finetune/packages" --seeds "${seeds[@]}" --task "$in_domain" \
  | tee -a "$out/finetune/comparison.txt"
if ! grep -q "^verdict (documentation packages.*pretraining helped" "$out/finetune/comparison.txt"; then
  echo "packages is a task of words: a bag-of-words classifier (TF-IDF, linear) scores 0.79-0.83 on it, as random" \
    "weights do once fine-tuned, so a few minutes of pretraining add little there (docs/PERFORMANCE.md, stop 30)"
fi
if ! grep -q "pretraining helped" "$out/finetune/comparison.txt"; then
  echo "a few CPU minutes of pretraining may not beat random weights beyond the seed spread (docs/PERFORMANCE.md, fine-tuning results);" \
    "a longer DEMO_MINUTES gives pretraining room to pay"
fi

say "done; everything is under $out"  # the heading shows the minutes the whole demo took
cat <<EOF
  corpus          ${corpus:-$out/corpus.txt}
  tokenizer       $out/tokenizer
  dataset         $out/data/corpus.{bin,idx,json}
  checkpoints     $out/run   (and metrics.jsonl)
  Hugging Face    $out/hf
  curves          $out/run/curves.png
  tasks           $out/tasks/{word-order,packages}   (train.csv, eval.csv)
  fine-tuning     $out/finetune/{word-order,packages}/{pretrained,random}/seed*   (eval_report.json, HF directories)
  comparison      $out/finetune/comparison.txt
EOF
