"""EDD drafters keep the whole prefix-cache hit: vLLM's EAGLE block drop is turned off for them.

vLLM drops the last block of every prefix-cache hit when an EAGLE-style drafter runs
(`SpeculativeConfig.use_eagle_block_drop()`, read by the scheduler when it builds its KV cache manager):
an EAGLE drafter's cache entry at position s is computed from the target's hidden state at s *and the
token at s + 1*, which lies outside the cached block (the block's hash does not cover it), so the cached
entry may belong to another continuation and the block is recomputed, target and drafter alike.

EDD's drafter computes the key and value of slot s from the target's hidden state at s alone; the token
at s + 1 enters only the query (`edd_model.EddAttention._rotated_qkv`). The prefix determines that hidden
state, so the cached entry is the one a fresh prefill would write, and the drop only makes the target
recompute up to a block per hit: in a 64-in-flight stream of Spec-Bench chats with resent prompts, 12.6 %
more target tokens than the same server without speculation
(benchmarks/results/serve_c64_stream_smollm2_cpu_intel.json).
Greedy output does not depend on it either way (the target verifies every draft).

The wrapper answers False only for a specx EDD drafter; every other method gets vLLM's own answer.
SPECX_EAGLE_BLOCK_DROP=1 (environment of the engine-core process) gives EDD vLLM's answer too: for
measuring what the drop costs.
"""

from __future__ import annotations

import functools
import logging
import os

from vllm_specx.plugin import EDD_ARCH

logger = logging.getLogger("vllm_specx")
_logged = False


def is_edd_drafter(speculative_config) -> bool:
    draft = getattr(speculative_config, "draft_model_config", None)
    return EDD_ARCH in (getattr(draft, "architectures", None) or ())


def _wrap_use_eagle_block_drop(orig):
    @functools.wraps(orig)
    def use_eagle_block_drop(self) -> bool:
        global _logged
        if not is_edd_drafter(self) or os.environ.get("SPECX_EAGLE_BLOCK_DROP") == "1":
            return orig(self)
        if not _logged:
            _logged = True
            logger.info("vllm-specx: the EDD drafter keeps the last block of prefix-cache hits (its cache "
                        "entries depend on the prefix alone); vLLM's warning that EAGLE block dropping is "
                        "disabled refers to this and is expected.")
        return False

    use_eagle_block_drop.__specx_wrapped__ = True
    return use_eagle_block_drop


def install_prefix_cache_hook() -> None:
    """Idempotent. Runs from the plugin's register() in every vLLM process: the scheduler that asks lives
    in the engine-core process, which loads plugins before it builds the scheduler."""
    from vllm.config.speculative import SpeculativeConfig

    if not getattr(SpeculativeConfig.use_eagle_block_drop, "__specx_wrapped__", False):
        SpeculativeConfig.use_eagle_block_drop = _wrap_use_eagle_block_drop(SpeculativeConfig.use_eagle_block_drop)
