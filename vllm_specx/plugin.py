"""`vllm.general_plugins` entry point: runs in every vLLM process (API server, engine core, workers).

`register()` adds names to vLLM's registries (lazily, by module path) and wraps the methods whose answer
changes only for a specx drafter (`SpeculativeConfig.use_eagle_block_drop`, see
vllm_adapter/prefix_cache.py; the min_p / logit_bias refusal and the logits processors built under
speculation, see vllm_adapter/sample_match.py): it imports no model code and changes no behaviour unless
a specx drafter is requested. It is idempotent.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("vllm_specx")

_REGISTERED = False
EDD_ARCH = "SpecxEddForCausalLM"
EAGLE3_ARCH = "SpecxEagle3ForCausalLM"  # an attached EAGLE-3 drafter (`vllm-specx attach`)
SPECX_ARCHS = (EDD_ARCH, EAGLE3_ARCH)
GEMMA3_EAGLE3_ARCH = "SpecxGemma3ForCausalLM"


def register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    _trace_process()

    from vllm_specx.vllm_adapter.compat import version_problem

    problem = version_problem()
    if problem:
        # Not fatal here: vLLM runs every plugin even when specx is not used. A specx drafter
        # refuses to load on an unsupported vLLM (see vllm_adapter/edd_model.py).
        logger.warning("vllm-specx: %s; specx drafters will refuse to load.", problem)
        return

    from vllm import ModelRegistry

    supported = ModelRegistry.get_supported_archs()
    if EDD_ARCH not in supported:
        ModelRegistry.register_model(EDD_ARCH, "vllm_specx.vllm_adapter.edd_model:SpecxEddForCausalLM")
    if EAGLE3_ARCH not in supported:
        ModelRegistry.register_model(EAGLE3_ARCH, "vllm_specx.vllm_adapter.eagle3_model:SpecxEagle3ForCausalLM")
    # A new name (vLLM's own Gemma3ForCausalLM is untouched): a Gemma-3 target with EAGLE-3 auxiliary
    # hidden states, chosen per engine with hf_overrides={"architectures": [GEMMA3_EAGLE3_ARCH]}.
    if GEMMA3_EAGLE3_ARCH not in supported:
        ModelRegistry.register_model(GEMMA3_EAGLE3_ARCH,
                                     "vllm_specx.vllm_adapter.gemma3_eagle3:SpecxGemma3ForCausalLM")

    from vllm.transformers_utils.configs.speculators.algos import SUPPORTED_SPECULATORS_TYPES

    from vllm_specx.checkpoint import (
        EAGLE3_SPECULATORS_TYPE, EDD_SPECULATORS_TYPE, update_edd_pretrained_config,
        update_specx_eagle3_pretrained_config)

    SUPPORTED_SPECULATORS_TYPES.setdefault(EDD_SPECULATORS_TYPE, update_edd_pretrained_config)
    SUPPORTED_SPECULATORS_TYPES.setdefault(EAGLE3_SPECULATORS_TYPE, update_specx_eagle3_pretrained_config)

    from vllm_specx.vllm_adapter.prefix_cache import install_prefix_cache_hook

    install_prefix_cache_hook()

    from vllm_specx.vllm_adapter.sample_match import install_request_guards

    install_request_guards()


def _trace_process() -> None:
    """Test hook: append this process's pid to $VLLM_SPECX_PLUGIN_TRACE (proves per-process loading)."""
    path = os.environ.get("VLLM_SPECX_PLUGIN_TRACE")
    if path:
        import multiprocessing

        with open(path, "a") as fh:
            fh.write(f"{os.getpid()} {multiprocessing.current_process().name}\n")
