"""Triton kernels of vllm-specx. Importable without vLLM; Triton itself is optional
(each kernel has a plain-torch reference that is used when Triton is unavailable)."""

# The submodule `topk_lm_head` and its dispatcher function share a name, so the dispatcher
# is deliberately not re-exported here (it would shadow the module attribute and break
# `import vllm_specx.kernels.topk_lm_head as m`). Use:
#     from vllm_specx.kernels.topk_lm_head import topk_lm_head
from vllm_specx.kernels.topk_lm_head import (
    HAS_TRITON,
    full_vocab_topk_reference,
    topk_lm_head_reference,
    topk_lm_head_triton,
    triton_path_available,
)
from vllm_specx.kernels.vocab_select import lowrank_scores_reference, select_candidates_reference, top_candidates

__all__ = [
    "HAS_TRITON",
    "full_vocab_topk_reference",
    "lowrank_scores_reference",
    "select_candidates_reference",
    "top_candidates",
    "topk_lm_head_reference",
    "topk_lm_head_triton",
    "triton_path_available",
]
