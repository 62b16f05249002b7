#!/usr/bin/env bash
# Retrieval from our own checkpoint, end to end, with no download:
#   1 a retrieval task from local documentation (a docstring's summary line -> the rest of its documentation,
#     train/test split by module)  2 a pretrained model: the main demo's (runs/demo/hf) when it pretrained at least
#     RETRIEVAL_PRETRAIN_MINUTES, else ModernBERT-mini pretrained here that long with the main demo's recipe (on its
#     dataset when it exists)  3 contrastive training from it and from random weights  4 retrieval on the held-out
#     modules, next to BM25.
# Everything goes under one directory: runs/demo_retrieval, or the first argument.
# Knobs (environment): DEMO_DIR (the main demo's directory, default runs/demo), RETRIEVAL_PRETRAIN_MINUTES
# (the pretraining the model needs, default 20: 6 minutes lose to random weights on this task, 20 win),
# RETRIEVAL_EPOCHS (contrastive epochs, default 3), RETRIEVAL_STEPS (a cap on the contrastive steps),
# RETRIEVAL_BATCH (pairs per batch, default 32), RETRIEVAL_LR (default 1e-3; a sweep of 3e-4 to 3e-3 found it the
# best for both starts, docs/PERFORMANCE.md).
# The two contrastive runs go side by side, one process (and on a CPU one thread) each.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${1:-runs/demo_retrieval}
demo=${DEMO_DIR:-runs/demo}
minutes=${RETRIEVAL_PRETRAIN_MINUTES:-20}
epochs=${RETRIEVAL_EPOCHS:-3}
batch=${RETRIEVAL_BATCH:-32}
steps=${RETRIEVAL_STEPS:+--max-steps $RETRIEVAL_STEPS}
start=$SECONDS

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

bash scripts/setup.sh --embed  # sentence-transformers, bm25s, ir-measures too
venv=${VENV:-${VIRTUAL_ENV:-$root/.venv}}  # where setup.sh installed
export PATH="$venv/bin:$PATH" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
python -c "import torch, sys; sys.exit(torch.cuda.device_count() == 0)" || export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
mkdir -p "$out"
out=$(cd "$out" && pwd)

say "[1/4] retrieval task from the installed documentation"
[ -s "$out/task/test/qrels/test.tsv" ] || python -m embed.cli task --output "$out/task"

say "[2/4] pretrained model"
# The main demo's model when it pretrained at least $minutes minutes; else ModernBERT-mini with the main demo's recipe
# for $minutes minutes, on the main demo's dataset when there is one. Six CPU minutes of pretraining (the main demo's
# default) lose to random weights on this task; twenty win (docs/PERFORMANCE.md, "The retrieval demo").
trained_s=0
if [ -s "$demo/run/latest" ] && [ -f "$demo/hf/config.json" ]; then
  trained_s=$(python -c "import json, sys; print(int(json.load(open(sys.argv[1]))['elapsed_s']))" \
    "$demo/run/$(cat "$demo/run/latest")/train_state.json" 2>/dev/null || echo 0)
fi
if [ "$trained_s" -ge $((minutes * 57)) ]; then # 95% of the budget: a time-budgeted run stops just short of it
  init=$(cd "$demo/hf" && pwd)
  echo "the main demo's model ($((trained_s / 60)) minutes of pretraining): $init"
else
  pre="$out/pretrain"
  init="$pre/hf"
  if [ ! -f "$init/config.json" ]; then
    mkdir -p "$pre"
    if [ -f "$demo/data/corpus.json" ]; then
      data=$(cd "$demo/data" && pwd)/corpus
      echo "the main demo's model pretrained $((trained_s / 60)) of the $minutes minutes this task needs:" \
        "pretraining ModernBERT-mini for $minutes minutes on its dataset $data"
    else
      echo "no main demo in $demo: pretraining ModernBERT-mini for $minutes minutes on the built-in corpus"
      bert-prep corpus --output "$pre/corpus.txt" --max-mb 8
      bert-prep vocab --input "$pre/corpus.txt" --vocab-size 8192 --output "$pre/tokenizer"
      bert-prep build --input "$pre/corpus.txt" --tokenizer "$pre/tokenizer" --output "$pre/data/corpus" --workers 2 \
        --overwrite
      data=$pre/data/corpus
    fi
    vocab=$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['tokenizer']['vocab_size'])" \
      "$data.json")
    rm -rf "${pre:?}/run" # bert-pretrain gives the preset the data's special-token ids (pretrain/identity.py)
    gpus=$(python -c "import torch; print(torch.cuda.device_count())")
    deepspeed --num_gpus "$((gpus > 0 ? gpus : 2))" --master_port "${DEMO_MASTER_PORT:-29500}" --log_level warning \
      --module pretrain.train --deepspeed_config ds_configs/modernbert_demo.json --pair-task none --packing \
      --mask-prob 0.3 --model modernbert-mini --model-set "vocab_size=$vocab" --data "$data" --seq-len 128 \
      --train-steps 100000 --save-every 500 --keep-last 1 --eval-every 500 --eval-samples 1024 --eval-fraction 0.1 --num-workers 0 \
      --time-budget "$(python -c "print($minutes / 60)")" --save "$pre/run"
    bert-export "$pre/run" "$init"
  fi
fi

say "[3/4] contrastive training ($epochs epochs, batch $batch): from the pretrained model and from random weights"
train=(python -m embed.cli train --train "$out/task/train/pairs.jsonl" --init-from "$init" --epochs "$epochs"
  --batch "$batch" --lr "${RETRIEVAL_LR:-1e-3}" --query-len 48 --passage-len 128 --symmetric --log-every 50 $steps)
echo "+ ${train[*]} --output $out/{pretrained,random} [--random-init]   (logs: $out/{pretrained,random}.log)"
run() { # name [flags]: one training run, its log shown if it fails
  rm -rf "${out:?}/$1" # a rerun of the demo trains afresh (bert-embed train would resume, or refuse other settings)
  if ! "${train[@]}" --output "$out/$1" "${@:2}" >"$out/$1.log" 2>&1; then
    tail -n 30 "$out/$1.log" >&2
    echo "error: contrastive training ($1) failed; its log: $out/$1.log" >&2
    return 1
  fi
}
run pretrained &
pretrained_pid=$!
run random --random-init &
random_pid=$!
failed=0
wait "$pretrained_pid" || failed=1
wait "$random_pid" || failed=1
[ "$failed" = 0 ] || exit 1
grep -h "step .*: loss" "$out/pretrained.log" | tail -n 1 | sed 's/^/pretrained: /'
grep -h "step .*: loss" "$out/random.log" | tail -n 1 | sed 's/^/random:     /'

say "[4/4] retrieval on the held-out modules: nDCG@10, Recall@100, MRR@10 next to BM25"
for init_kind in pretrained random; do
  python -m embed.cli eval --model "$out/$init_kind" --data "$out/task/test" --output "$out/$init_kind/report.json"
done
python - "$out" <<'EOF'
import json, sys
reports = {k: json.load(open(f"{sys.argv[1]}/{k}/report.json")) for k in ("pretrained", "random")}
keys = ("ndcg_at_10", "recall_at_100", "mrr_at_10")
print(f"{'':<28} {'nDCG@10':>8} {'R@100':>8} {'MRR@10':>8}")
rows = [("BM25", reports["pretrained"], "bm25_"), ("contrastive from pretrained", reports["pretrained"], ""),
        ("contrastive from random", reports["random"], "")]
for name, r, prefix in rows:
    print(f"{name:<28} " + " ".join(f"{r[prefix + k]:>8.4f}" for k in keys))
r = reports["pretrained"]
print(f"{r['queries']} test queries, {r['corpus']} passages (modules unseen in training)")
EOF
say "done in $(((SECONDS - start) / 60)) min $(((SECONDS - start) % 60)) s; everything is under $out"
