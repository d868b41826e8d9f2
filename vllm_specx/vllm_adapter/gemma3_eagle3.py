"""Gemma-3 text target with EAGLE-3 auxiliary hidden states (vLLM's `SupportsEagle3`).

vLLM 0.32's native `Gemma3ForCausalLM` does not collect auxiliary hidden states, which vLLM's EAGLE-3
path (and so specx's EDD drafter) reads from the target. `SpecxGemma3ForCausalLM` is vLLM's class with
the collection added in the decoder loop exactly as vLLM's Llama does it (`EagleModelMixin`: layer id i is
the input of layer i, i.e. the residual stream `hidden_states + residual` after layer i - 1; id 0 is the
scaled embedding). Without aux layers set, its forward returns what vLLM's returns.

Select it for a Gemma-3 target with `hf_overrides={"architectures": ["SpecxGemma3ForCausalLM"]}`
(`--hf-overrides '{"architectures": ["SpecxGemma3ForCausalLM"]}'` on the command line); the plugin
registers the name. Pipeline parallelism is not supported with auxiliary hidden states here.
"""

from __future__ import annotations

from itertools import islice

import torch
from torch import nn

from vllm_specx.vllm_adapter.compat import INTERNALS, check_vllm_internals

check_vllm_internals(tuple(e for e in INTERNALS if e.runner == "gemma3"))

from vllm.config import VllmConfig  # noqa: E402
from vllm.distributed import get_pp_group  # noqa: E402
from vllm.model_executor.layers.logits_processor import LogitsProcessor  # noqa: E402
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead  # noqa: E402
from vllm.model_executor.models.gemma3 import Gemma3ForCausalLM, Gemma3Model  # noqa: E402
from vllm.model_executor.models.interfaces import EagleModelMixin, SupportsEagle3  # noqa: E402
from vllm.model_executor.models.utils import maybe_prefix  # noqa: E402
from vllm.sequence import IntermediateTensors  # noqa: E402

ARCH = "SpecxGemma3ForCausalLM"


class SpecxGemma3Model(Gemma3Model, EagleModelMixin):
    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor | IntermediateTensors | tuple[torch.Tensor, list[torch.Tensor]]:
        if get_pp_group().is_first_rank:
            hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
            residual = None
        else:
            assert intermediate_tensors is not None
            hidden_states = intermediate_tensors["hidden_states"]
            residual = intermediate_tensors["residual"]
        aux_hidden_states: list[torch.Tensor] = []
        if get_pp_group().is_first_rank:
            self._maybe_add_hidden_state(aux_hidden_states, self.start_layer, hidden_states, residual)
        for idx, layer in enumerate(islice(self.layers, self.start_layer, self.end_layer), start=self.start_layer):
            hidden_states, residual = layer(positions, hidden_states, residual, **kwargs)
            self._maybe_add_hidden_state(aux_hidden_states, idx + 1, hidden_states, residual)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states, "residual": residual})
        hidden_states, _ = self.norm(hidden_states, residual)
        if aux_hidden_states:
            return hidden_states, aux_hidden_states
        return hidden_states


class SpecxGemma3ForCausalLM(Gemma3ForCausalLM, SupportsEagle3):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        # vLLM's Gemma3ForCausalLM.__init__ with SpecxGemma3Model in place of Gemma3Model (building both
        # would register every attention layer twice).
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_config
        self.config = config
        self.quant_config = vllm_config.quant_config
        self.model = SpecxGemma3Model(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=self.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size, soft_cap=config.final_logit_softcapping)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors
