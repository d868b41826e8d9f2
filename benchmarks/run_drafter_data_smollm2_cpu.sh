#!/usr/bin/env bash
# The run behind benchmarks/results/acceptance_drafter_data_smollm2_cpu.{json,png} (issue: EDD drafter):
# the session-6 bundled drafter (Alpaca + coding prompts only) against the session-7 one (fine-tuned on
# the same records + document-task prompts: summaries, answers from passages, translations, word
# problems), on Spec-Bench per category, batch 1, one run:
#   *_k5   fixed chain of 5 (early stop and trees off): acceptance per position, comparable per category
#   *      the drafter as shipped (early-stop chain up to 8)
# The session-6 drafter is taken from git (commit f1496c0), so nothing extra is committed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
NEW=vllm_specx/assets/edd-smollm2-135m
OLD=${OLD_DRAFTER:-$(mktemp -d)/edd-s6}
if [ ! -f "$OLD/config.json" ]; then
  mkdir -p "$OLD" && git archive f1496c0 vllm_specx/assets/edd-smollm2-135m | tar -x -C "$OLD" --strip-components=3
fi
k5='"num_speculative_tokens": 5, "env": {"SPECX_EARLY_STOP": "0", "SPECX_TREE": "0"}'
METHODS=(
  none
  "edd_s6_k5={\"method\": \"eagle3\", \"model\": \"$OLD\", $k5}"
  "edd_s7_k5={\"method\": \"eagle3\", \"model\": \"$NEW\", $k5}"
  "edd_s6={\"method\": \"eagle3\", \"model\": \"$OLD\", \"num_speculative_tokens\": 8}"
  "edd_s7={\"method\": \"eagle3\", \"model\": \"$NEW\", \"num_speculative_tokens\": 8}"
)
$PY benchmarks/bench_acceptance.py --prompts spec_bench --per-category 6 --methods "${METHODS[@]}" \
  --batch-sizes 1 --max-tokens 64 --k 5 --tag drafter_data_smollm2_cpu "$@"
