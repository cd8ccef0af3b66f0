#!/usr/bin/env bash
# The Retro-Search demo behind RESULTS.md ("Retro-Search"): two wasteful demo policies, traces
# revised by the policy itself and by the smaller one, and students distilled from each.
#   bash scripts/retro_demo.sh [OUT]        (make retro; ~2 h on 2 CPU cores)
# Every step skips its output when it already exists, so an interrupted run resumes.
set -euo pipefail
OUT=${1:-artifacts/demo/retro}
SA=${SEARCHAGENT:-.venv/bin/searchagent}
DEMO=artifacts/demo
QUESTIONS=${QUESTIONS:-400}  # train-split questions the policy answers
EVAL=${EVAL:-300}  # test-split questions each model is scored on
mkdir -p "$OUT"
step() { [ -e "$1" ] && echo "have $1" || { echo "== $1"; shift; "$@"; }; }

# 1. the larger policy: the committed SFT, fine-tuned on oracle traces with planted waste
#    (a detour before and a recheck after each hop, each at 65%: greedy decoding shows both)
WASTE=(--detour 0.65 --recheck 0.65 --worlds 8 --per-world 200 --batch-size 8 --lr 5e-4)
step "$OUT/policy/config.json" $SA train sft --init $DEMO/sft --out "$OUT/policy" \
  --steps 100 "${WASTE[@]}"
# 2. the smaller one: the committed SFT's first 2 of 4 layers, fine-tuned on the same traces
step "$OUT/small/config.json" $SA train sft --init $DEMO/sft --keep-layers 0,1 \
  --out "$OUT/small" --first-world 1020 --steps 150 "${WASTE[@]}"
# 3. the policy's traces on train questions, revised by itself (self-improvement) ...
step "$OUT/self.jsonl" $SA retro --policy "$OUT/policy" --revisor "$OUT/policy" \
  --data $DEMO/world/train.jsonl --limit "$QUESTIONS" --out "$OUT/self.jsonl" \
  --originals "$OUT/original.jsonl"
# 4. ... and the same traces revised by the smaller model (weak-to-strong)
step "$OUT/w2s.jsonl" $SA retro --revisor "$OUT/small" --traces "$OUT/original.jsonl" \
  --out "$OUT/w2s.jsonl"
# 5. one student (the policy) fine-tuned on each set, with the same steps
for set in original self w2s; do
  step "$OUT/student-$set/config.json" $SA train sft --init "$OUT/policy" \
    --data "$OUT/$set.jsonl" --out "$OUT/student-$set" --steps 60 --batch-size 8 --lr 3e-4
done
# (RESULTS.md also reports the three students again with --seed 1, under $OUT/seed1/)
# 6. held-out test EM, searches and generated tokens per question
for model in policy small student-original student-self student-w2s; do
  step "$OUT/eval-$model.json" bash -c "set -o pipefail; $SA eval --model '$OUT/$model' \
    --index $DEMO/index --data $DEMO/world/test.jsonl --limit $EVAL --json | tail -1 \
    > '$OUT/eval-$model.tmp' && mv '$OUT/eval-$model.tmp' '$OUT/eval-$model.json'"
done
