"""EDD drafter as a vLLM model, run by vLLM's EAGLE-3 proposer (`method="eagle3"`).

Same math as `vllm_specx.core.edd` (see its docstring for the KV layout); this file only maps it
onto vLLM layers. Contract with the proposer (vllm/v1/spec_decode/llm_base_proposer.py, declared in
`compat.py`):
  - `combine_hidden_states(aux [T, Ht])` -> soft-prompt context vectors z [T, H];
  - `forward(input_ids [T], positions [T], hidden_states z [T, H])` -> (normed hidden [T, H] for
    `compute_logits`, next-step context [T, H]); the next-step context is the embedding of the input
    token, which will occupy the next KV slot while it is a draft token;
  - the embedding and LM head are shared from the target (`has_own_* = False`).
The proposer asserts `isinstance(model, Eagle3LlamaForCausalLM)`, hence the base class; none of
its __init__ or forward is used.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.llama_eagle3 import Eagle3LlamaForCausalLM
from vllm.model_executor.models.utils import maybe_prefix

from vllm_specx.vllm_adapter import checks, draft_profile
from vllm_specx.vllm_adapter.drafter_parts import SpecxDrafterModel, feed_draft_step

ARCHITECTURE = "SpecxEddForCausalLM"


class EddAttention(nn.Module):
    """Queries from the token stream, keys/values from the context stream, one KV slot per position."""

    def __init__(self, config, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.head_dim = config.head_dim
        self.total_num_heads = config.num_attention_heads
        self.total_num_kv_heads = config.num_key_value_heads
        self.num_heads = self.total_num_heads // tp
        self.num_kv_heads = max(1, self.total_num_kv_heads // tp)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, self.head_dim, self.total_num_heads, self.total_num_kv_heads,
            bias=False, prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            self.total_num_heads * self.head_dim, config.hidden_size, bias=False, prefix=f"{prefix}.o_proj"
        )
        # +2: the query sits one position ahead of its slot.
        self.rotary_emb = get_rope(
            self.head_dim,
            max_position=config.max_position_embeddings + 2,
            rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
            is_neox_style=True,
        )
        self.attn = Attention(
            self.num_heads, self.head_dim, self.head_dim**-0.5, num_kv_heads=self.num_kv_heads,
            cache_config=vllm_config.cache_config, prefix=f"{prefix}.attn",
        )

    def _rotated_qkv(self, slots: torch.Tensor, query_in: torch.Tensor, context_in: torch.Tensor):
        """-> q [T, q_size] at RoPE position slot + 1, k, v [T, kv_size] at the slot.
        One projection, two input streams: q from the token, k/v from the slot's context. Both streams
        go through the fused layer (vLLM may repack or quantise its weight, so it is not sliced by hand);
        the unused halves cost one extra small GEMM."""
        num_tokens = query_in.shape[0]
        qkv, _ = self.qkv_proj(torch.cat([query_in, context_in], dim=0))  # [2T, q + 2kv]
        q = qkv[:num_tokens, : self.q_size]
        k, v = qkv[num_tokens:, self.q_size :].split([self.kv_size, self.kv_size], dim=-1)
        q, _ = self.rotary_emb(slots + 1, q.contiguous(), None)
        k, _ = self.rotary_emb(slots, k.contiguous(), None)
        return q, k, v

    def forward(self, positions: torch.Tensor, query_in: torch.Tensor, context_in: torch.Tensor,
                rows: torch.Tensor | None = None) -> torch.Tensor:  # -> [T, H], or [R, H] for rows [R]
        out = self.attn(*self._rotated_qkv(positions, query_in, context_in))  # writes every row's KV slot
        out, _ = self.o_proj(out if rows is None else out[rows])
        return out

    def forward_branches(self, slots: torch.Tensor, query_in: torch.Tensor, context_in: torch.Tensor,
                         attend) -> torch.Tensor:  # -> [R, H]
        """One draft step along R branches whose own slots are not in the cache (see `forward`):
        attend(q [R, Hq, D], k [R, Hkv, D], v [R, Hkv, D]) -> [R, Hq, D] adds the cached context."""
        num_rows = query_in.shape[0]
        q, k, v = self._rotated_qkv(slots, query_in, context_in)
        out = attend(q.view(num_rows, self.num_heads, self.head_dim),
                     k.view(num_rows, self.num_kv_heads, self.head_dim), v.reshape(num_rows, self.num_kv_heads, self.head_dim))
        out, _ = self.o_proj(out.reshape(num_rows, self.q_size))
        return out


class EddDecoder(nn.Module):
    def __init__(self, config, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        h = config.hidden_size
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, h, prefix=maybe_prefix(prefix, "embed_tokens"))
        self.hidden_norm = RMSNorm(config.target_hidden_size, eps=config.rms_norm_eps)
        self.hidden_proj = ReplicatedLinear(
            config.target_hidden_size, h, bias=False, return_bias=False, prefix=maybe_prefix(prefix, "hidden_proj")
        )
        self.input_layernorm = RMSNorm(h, eps=config.rms_norm_eps)
        self.context_layernorm = RMSNorm(h, eps=config.rms_norm_eps)
        layer_prefix = maybe_prefix(prefix, f"layers.{vllm_config.model_config.get_total_num_hidden_layers()}")
        self.self_attn = EddAttention(config, vllm_config, prefix=f"{layer_prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(h, eps=config.rms_norm_eps)
        self.gate_up_proj = MergedColumnParallelLinear(
            h, [config.intermediate_size] * 2, bias=False, prefix=f"{layer_prefix}.mlp.gate_up_proj"
        )
        self.down_proj = RowParallelLinear(
            config.intermediate_size, h, bias=False, prefix=f"{layer_prefix}.mlp.down_proj"
        )
        self.act = SiluAndMul()
        self.norm = RMSNorm(h, eps=config.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        context: torch.Tensor,  # [T, H]
        inputs_embeds: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,  # [R]: finish only these rows (the rest of the output is 0)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        embeds = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        attn = self.self_attn(positions, self.input_layernorm(embeds), self.context_layernorm(context), rows)
        out = self._finish((embeds if rows is None else embeds[rows]) + attn)
        if rows is not None:
            out = embeds.new_zeros(embeds.shape).index_copy_(0, rows, out)
        return out, embeds

    def forward_branches(self, tokens: torch.Tensor, parent_tokens: torch.Tensor, slots: torch.Tensor,
                         attend) -> torch.Tensor:
        """tokens [R]: branch nodes (drafted, not in the cache), parent_tokens [R]: their parents, whose
        context vectors (draft-token embeddings) belong in slots [R]; the query in slot s reads the branch
        token at position s + 1 and predicts its child (the layout of `forward`). -> normed hidden [R, H]."""
        embeds = self.embed_tokens(tokens)
        context = self.context_layernorm(self.embed_tokens(parent_tokens))
        return self._finish(embeds + self.self_attn.forward_branches(slots, self.input_layernorm(embeds), context, attend))

    def _finish(self, x: torch.Tensor) -> torch.Tensor:  # after attention: MLP, final norm
        gate_up, _ = self.gate_up_proj(self.post_attention_layernorm(x))
        mlp, _ = self.down_proj(self.act(gate_up))
        return self.norm(x + mlp)


class SpecxEddForCausalLM(SpecxDrafterModel, Eagle3LlamaForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        nn.Module.__init__(self)
        from vllm_specx.vllm_adapter.drafter_parts import build_drafter_parts
        from vllm_specx.vllm_adapter.vocab_head import build_vocab_head

        speculative_config = vllm_config.speculative_config
        assert speculative_config is not None
        # checks, sample-then-match, the draft-length controller (early stop, trees, lookup chains)
        parts = build_drafter_parts(vllm_config, can_expand=True)
        self.config = speculative_config.draft_model_config.hf_config
        checks.check_edd_against_target(self.config, vllm_config.model_config)
        self.model = EddDecoder(self.config, vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(self.config.vocab_size, self.config.hidden_size,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        self.logits_processor = LogitsProcessor(self.config.vocab_size)
        self.draft_id_to_target_id = None
        self.use_parallel_drafting = False
        # The embedding and LM head always come from the target (the proposer shares them).
        self.has_own_embed_tokens = False
        self.has_own_lm_head = False
        # SpecVocab / fixed reduced vocabulary: None for the full head (see vocab_head.py)
        self.vocab_head = build_vocab_head(
            speculative_config.draft_model_config.model, parts.specx, parts.vocab_mode, self.config.vocab_size,
            self.config.hidden_size, vllm_config.device_config.device, vllm_config.parallel_config.tensor_parallel_size)
        self.draft_length = parts.draft_length  # fed by compute_logits (drafter_parts.feed_draft_step)
        self._metrics = parts.metrics
        self._rows_per_request = speculative_config.num_speculative_tokens + 1  # see _rows_read
        self._all_rows = os.environ.get("SPECX_DRAFTER_ALL_ROWS", "0") == "1"

    def embed_input_ids(self, input_ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(input_ids, positions, hidden_states, inputs_embeds, rows=self._rows_read(input_ids.shape[0]))

    def _rows_read(self, num_tokens: int) -> torch.Tensor | None:
        """Rows of this forward whose output the proposer can read, or None for all of them.

        Every row's KV slot must be written, but the proposer samples one row per request: its query's
        last row, or an earlier one when the target rejected drafts (at most K back). In a prefill
        chunk the other rows' attention output, o_proj and MLP (about 3/4 of the drafter's GEMM work per
        row) would only be thrown away, so they are skipped: the last K + 1 rows of each request's query
        are finished, the rest of the output is 0. SPECX_DRAFTER_ALL_ROWS=1 finishes every row."""
        if self._all_rows:
            return None
        metadata = get_forward_context().attn_metadata
        if isinstance(metadata, dict):
            metadata = metadata.get(self.model.self_attn.attn.layer_name)
        starts = getattr(metadata, "query_start_loc", None)  # [B + 1]
        if starts is None or num_tokens <= (starts.shape[0] - 1) * self._rows_per_request:
            return None
        ends = starts[1:]
        take = torch.clamp(ends - starts[:-1], max=self._rows_per_request)  # [B]
        offsets = torch.arange(int(take.sum()), device=ends.device)  # rows of the kept blocks, in order
        first = torch.repeat_interleave(ends - take, take)
        block_start = torch.repeat_interleave(torch.cumsum(take, 0) - take, take)
        rows = first + offsets - block_start  # [R]
        if self._metrics is not None:
            self._metrics.drafter_rows_skipped.inc(num_tokens - rows.shape[0])
        return rows

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        # Subset modes return log-probs [B, V] (-inf outside the subset): argmax and softmax-sampling
        # of the row are exactly the drafter's proposal distribution.
        return feed_draft_step(self.draft_length, hidden_states, self._head)

    def _head(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor | None, bool, torch.Tensor | None]:
        """-> (logits [B, V], or log-probs of a vocabulary subset (-inf elsewhere) when subset is True;
        subset; the subset row's finite entries [B, k] when the head has them at hand, else None)."""
        subset = self.vocab_head is not None and self.vocab_head.pays(hidden_states.shape[0])
        if self.vocab_head is not None and self._metrics is not None:
            (self._metrics.vocab_subset_rows if subset else self._metrics.vocab_full_rows).inc(hidden_states.shape[0])
        with draft_profile.timed("head", hidden_states.device):
            if subset:
                logits, topk_logprobs = self.vocab_head(hidden_states, self.lm_head.weight, with_topk=True)
                return logits, True, topk_logprobs
            return self.logits_processor(self.lm_head, hidden_states), False, None

    def branch_logprobs(self, tokens: torch.Tensor, parent_tokens: torch.Tensor, slots: torch.Tensor,
                        block_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normed hidden [R, H], next-token log-probs [R, V]) of the drafter after R tree branches that
        are not in its KV cache (PCT expansion below runner-up tokens): row r continues the chain of its
        request whose drafter cache holds positions < slots[r] (block_table [R, max_blocks], that request's
        row), with parent_tokens[r] at position slots[r] and tokens[r] after it. Reads the cache, writes
        nothing (the cache read through tree_backends.kv_views: a backend trees support)."""
        from vllm_specx.core.tree_attention import branch_attention_paged
        from vllm_specx.vllm_adapter.tree_backends import kv_views

        attn = self.model.self_attn.attn
        key_cache, value_cache = kv_views(attn)

        def attend(q, k, v):
            return branch_attention_paged(q, k, v, key_cache, value_cache, block_table, slots,
                                          self.model.self_attn.head_dim**-0.5)

        hidden = self.model.forward_branches(tokens, parent_tokens, slots, attend)
        logits, subset, _ = self._head(hidden)
        return hidden, logits.float() if subset else torch.log_softmax(logits.float(), dim=-1)

    def combine_hidden_states(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # [T, Ht] target hidden state at the EDD layer -> soft-prompt context vector [T, H]
        return self.model.hidden_proj(self.model.hidden_norm(hidden_states))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for ckpt_name, tensor in weights:
            name, shard = checkpoint_to_vllm_name(ckpt_name)
            if name not in params:
                raise ValueError(
                    f"EDD checkpoint has an unexpected tensor {ckpt_name!r}: it is not an EDD drafter "
                    "checkpoint (for EAGLE-3 drafters use vLLM's own eagle3 architecture)."
                )
            param = params[name]
            loader = getattr(param, "weight_loader", None)
            if shard is not None:
                loader(param, tensor, shard)
            elif loader is not None:
                loader(param, tensor)
            else:
                param.data.copy_(tensor)
            loaded.add(name)
        expected = {n for n in params if not n.startswith(("lm_head", "model.embed_tokens"))}
        missing = expected - loaded
        if missing:
            raise ValueError(
                f"EDD checkpoint is missing tensors {sorted(missing)}: it is truncated or not an EDD "
                "drafter. Re-export it with `vllm-specx train`."
            )


_STACKED = {"q_proj": ("self_attn.qkv_proj", "q"), "k_proj": ("self_attn.qkv_proj", "k"),
            "v_proj": ("self_attn.qkv_proj", "v"), "o_proj": ("self_attn.o_proj", None),
            "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


def checkpoint_to_vllm_name(name: str) -> tuple[str, str | int | None]:
    """`layer.q_proj.weight` -> (`model.self_attn.qkv_proj.weight`, "q"); `norm.weight` -> `model.norm.weight`."""
    module, _, leaf = name.rpartition(".")
    parts = module.split(".")
    if parts[0] == "layer":
        parts = parts[1:]
    shard = None
    if parts and parts[-1] in _STACKED:
        dst, shard = _STACKED[parts[-1]]
        parts = parts[:-1] + dst.split(".")
    return "model." + ".".join(parts + [leaf]), shard
