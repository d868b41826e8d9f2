"""An EAGLE-3 drafter with specx's parts: vLLM's own EAGLE-3 layers and weights, unchanged, plus early stop,
PCT trees (runner-ups as leaves), prompt-lookup chains and sample-then-match verification.

`vllm-specx attach EAGLE3_DIR --out DIR` writes a folder whose config.json names the `specx_eagle3`
speculators algorithm (vLLM's `eagle3` config, architecture `SpecxEagle3ForCausalLM`) and whose weights are
links to EAGLE3_DIR's; the original folder stays a plain vLLM `eagle3` drafter. Everything below vLLM's
`Eagle3LlamaForCausalLM` (weight names, the reduced vocabulary `d2t`, its own LM head) is vLLM's; this
class only routes each draft step through `drafter_parts.feed_draft_step`.
"""

from __future__ import annotations

import torch

from vllm.config import VllmConfig
from vllm.model_executor.models.llama_eagle3 import Eagle3LlamaForCausalLM

from vllm_specx.checkpoint import SpecxConfigError
from vllm_specx.vllm_adapter.drafter_parts import SpecxDrafterModel, build_drafter_parts, feed_draft_step

ARCHITECTURE = "SpecxEagle3ForCausalLM"


class SpecxEagle3ForCausalLM(SpecxDrafterModel, Eagle3LlamaForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        # no draft below runner-ups: vLLM's EAGLE-3 layer has no branch pass over its paged cache
        parts = build_drafter_parts(vllm_config, can_expand=False)
        if parts.vocab_mode != "full":
            raise SpecxConfigError(
                f"specx_config.json: vocab_mode {parts.vocab_mode!r} is not available for an attached EAGLE-3 "
                "drafter (its head is the checkpoint's own, reduced by d2t where it has one); set vocab_mode "
                "to 'full'.")
        Eagle3LlamaForCausalLM.__init__(self, vllm_config=vllm_config, prefix=prefix)
        self.draft_length = parts.draft_length

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        # hidden_states [B, H] normed; with d2t, vLLM's head returns [B, V] with -inf outside the draft vocabulary
        return feed_draft_step(self.draft_length, hidden_states, self._head)

    def _head(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor | None, bool, torch.Tensor | None]:
        return Eagle3LlamaForCausalLM.compute_logits(self, hidden_states), False, None
