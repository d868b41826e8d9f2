#!/usr/bin/env bash
# The run behind benchmarks/results/acceptance_vocab_modes_smollm2_cpu_b1.{json,png} (SpecVocab, issue #5):
# the bundled EDD drafter with its three LM-head modes, switched by SPECX_VOCAB on one checkpoint:
#   full         all 49152 rows of the target's LM head;
#   fixed32k     a fixed reduced vocabulary, the 32768 most frequent tokens of the training data (FR-Spec style);
#   speculative  per draft step, a trained rank-64 projection picks 2048 candidates, exact logits for those only.
# At fixed K = 3 (decision model off: the cleanest comparison of acceptance) and with the decision model
# (early stop, max K 8). SPECX_PROFILE_DRAFT=1 records drafting time per target step and LM-head time
# per draft depth in the engine's process (vllm_adapter/draft_profile.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
D=${DRAFTER:-vllm_specx/assets/edd-smollm2-135m}
m() {  # label K vocab early_stop
  echo "$1={\"method\": \"eagle3\", \"model\": \"$D\", \"num_speculative_tokens\": $2, \"env\": {\"SPECX_VOCAB\": \"$3\", \"SPECX_EARLY_STOP\": \"$4\", \"SPECX_PROFILE_DRAFT\": \"1\"}}"
}
METHODS=(
  none
  "$(m full_K3 3 full 0)"
  "$(m fixed32k_K3 3 fixed 0)"
  "$(m spec_K3 3 speculative 0)"
  "$(m full_es 8 full 1)"
  "$(m fixed32k_es 8 fixed 1)"
  "$(m spec_es 8 speculative 1)"
)
$PY benchmarks/bench_acceptance.py --prompts spec_bench --per-category 4 --methods "${METHODS[@]}" \
  --batch-sizes 1 --max-tokens 64 --tag vocab_modes_smollm2_cpu_b1 "$@"
