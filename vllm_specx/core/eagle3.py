"""EAGLE-3 drafter in plain PyTorch: the baseline that EDD is measured against (no vLLM).

It computes what vLLM's own `Eagle3LlamaForCausalLM` computes (one layer, `norm_before_residual`,
target embedding and LM head shared), so a checkpoint trained here runs under vLLM's `eagle3` method.

Why a trainer of our own: the `speculators` trainer needs CUDA. Training uses EAGLE-3's
"training-time test": inside a drafting block the drafter's input at depth d > 0 is its own output
from depth d-1, not the target's feature, so training must unroll the block. With the same random
block boundaries as EDD (`core.edd.random_block_starts`), slot s (block start b, depth d = s - b):
  input  g_s = fc(aux_s)              if d == 0  (target features: low, middle, high layer)
         g_s = prenorm_out_{s-1}      if d > 0   (the drafter's own previous output)
  keys   slots 0..b from the target features, slots b+1..s from the drafter's own inputs
which is `block_attention_mask` over [target-feature KV ; drafter KV]. Depth d needs depth d-1's
output, so `forward_blocks` runs `max_depth` passes of the (cheap) layer and one LM-head pass; EDD
needs a single pass because its draft-slot keys are token embeddings (the paper's training-cost point).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vllm_specx.core.edd import RMSNorm, block_attention_mask, rope


@dataclass
class Eagle3ArchConfig:
    vocab_size: int
    hidden_size: int
    target_hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    aux_layer_ids: tuple[int, ...] = ()
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    draft_vocab_size: int | None = None  # a reduced draft vocabulary (own head + d2t map); None: the target's

    def to_dict(self) -> dict:
        d = asdict(self)
        d["aux_layer_ids"] = list(self.aux_layer_ids)
        return d


class Eagle3Drafter(nn.Module):
    """Parameter names follow the EAGLE-3 checkpoint layout (`fc`, `midlayer.*`, `norm`)."""

    def __init__(self, cfg: Eagle3ArchConfig, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor):
        super().__init__()
        h, nq, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.cfg = cfg
        self.fc = nn.Linear(cfg.target_hidden_size * len(cfg.aux_layer_ids), h, bias=False)
        self.midlayer = nn.ModuleDict({
            "input_layernorm": RMSNorm(h, cfg.rms_norm_eps),
            "hidden_norm": RMSNorm(h, cfg.rms_norm_eps),
            "post_attention_layernorm": RMSNorm(h, cfg.rms_norm_eps),
        })
        attn = nn.ModuleDict({
            "q_proj": nn.Linear(2 * h, nq * hd, bias=False),
            "k_proj": nn.Linear(2 * h, nkv * hd, bias=False),
            "v_proj": nn.Linear(2 * h, nkv * hd, bias=False),
            "o_proj": nn.Linear(nq * hd, h, bias=False),
        })
        mlp = nn.ModuleDict({
            "gate_proj": nn.Linear(h, cfg.intermediate_size, bias=False),
            "up_proj": nn.Linear(h, cfg.intermediate_size, bias=False),
            "down_proj": nn.Linear(cfg.intermediate_size, h, bias=False),
        })
        self.midlayer["self_attn"] = attn
        self.midlayer["mlp"] = mlp
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.register_buffer("embed_weight", embed_weight.detach(), persistent=False)
        self.register_buffer("lm_head_weight", lm_head_weight.detach(), persistent=False)
        if self.reduced_vocab:  # the checkpoint's own head over draft ids; d2t: draft id -> target id offset
            self.lm_head = nn.Linear(h, cfg.draft_vocab_size, bias=False)
            self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))

    @property
    def reduced_vocab(self) -> bool:
        return self.cfg.draft_vocab_size is not None and self.cfg.draft_vocab_size != self.cfg.vocab_size

    def combine(self, aux_hidden: torch.Tensor) -> torch.Tensor:  # [..., n_aux * Ht] -> [..., H]
        return self.fc(aux_hidden)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self.embed_weight).to(self.fc.weight.dtype)

    def logits(self, prenorm: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., V] (target ids)
        if not self.reduced_vocab:
            return F.linear(self.norm(prenorm), self.lm_head_weight.to(prenorm.dtype))
        draft = self.lm_head(self.norm(prenorm))  # [..., Vd]; as vLLM: -inf outside the draft vocabulary
        full = draft.new_full((*draft.shape[:-1], self.cfg.vocab_size), float("-inf"))
        full[..., torch.arange(draft.shape[-1], device=draft.device) + self.d2t] = draft
        return full

    def _qkv(self, embeds: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor):
        """embeds, hidden: [B, S, H] -> q [B, nq, S, hd], k/v [B, nkv, S, hd], residual [B, S, H]."""
        cfg, m = self.cfg, self.midlayer
        b, s, _ = embeds.shape
        residual = m["hidden_norm"](hidden)  # norm_before_residual: the normed feature is the residual
        x = torch.cat([m["input_layernorm"](embeds), residual], dim=-1)
        q = m["self_attn"]["q_proj"](x).view(b, s, cfg.num_attention_heads, cfg.head_dim)
        k = m["self_attn"]["k_proj"](x).view(b, s, cfg.num_key_value_heads, cfg.head_dim)
        v = m["self_attn"]["v_proj"](x).view(b, s, cfg.num_key_value_heads, cfg.head_dim)
        q = rope(q, positions, cfg.rope_theta).transpose(1, 2)
        k = rope(k, positions, cfg.rope_theta).transpose(1, 2)
        return q, k, v.transpose(1, 2), residual

    def _finish(self, q, k, v, residual, mask) -> torch.Tensor:
        """Attention over given keys + MLP; returns the pre-norm output (fed to the next depth)."""
        cfg, m = self.cfg, self.midlayer
        rep = cfg.num_attention_heads // cfg.num_key_value_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        b, _, s, _ = q.shape
        h = residual + m["self_attn"]["o_proj"](attn.transpose(1, 2).reshape(b, s, -1))
        mlp_in = m["post_attention_layernorm"](h)
        return h + m["mlp"]["down_proj"](F.silu(m["mlp"]["gate_proj"](mlp_in)) * m["mlp"]["up_proj"](mlp_in))

    def forward_blocks(
        self,
        token_ids: torch.Tensor,  # [B, S]
        aux_hidden: torch.Tensor,  # [B, S, n_aux * Ht] target features (low, middle, high layer)
        block_starts: torch.Tensor,  # [B, S] slot where each slot's drafting block began
        max_depth: int | None = None,  # unroll passes; default: the deepest slot in block_starts
    ) -> torch.Tensor:  # [B, S-1, H] pre-norm output of slots 0..S-2 (slot s predicts x_{s+2})
        b, s = token_ids.shape
        pos = torch.arange(s - 1, device=token_ids.device).expand(b, s - 1)
        embeds = self.embed(token_ids[:, 1:])  # slot s reads x_{s+1}
        feats = self.combine(aux_hidden[:, : s - 1])
        starts = block_starts[:, : s - 1]
        depth = pos - starts  # [B, S-1]
        mask = block_attention_mask(starts, s - 1)  # [B, S-1, 2(S-1)]
        max_depth = int(depth.max()) + 1 if max_depth is None else max_depth
        q0, k0, v0, res0 = self._qkv(embeds, feats, pos)
        out = self._finish(q0, torch.cat([k0, k0], 2), torch.cat([v0, v0], 2), res0, mask)
        final, k_acc, v_acc = out, k0, v0
        for d in range(1, max_depth):
            if not bool((depth >= d).any()):
                break
            prev = torch.cat([torch.zeros_like(final[:, :1]), final[:, :-1]], dim=1)  # output of slot s-1
            hidden = torch.where((depth > 0)[..., None], prev, feats)
            q, k, v, res = self._qkv(embeds, hidden, pos)
            at_d = (depth == d)[:, None, :, None]
            k_acc, v_acc = torch.where(at_d, k, k_acc), torch.where(at_d, v, v_acc)
            out = self._finish(q, torch.cat([k0, k_acc], 2), torch.cat([v0, v_acc], 2), res, mask)
            final = torch.where((depth == d)[..., None], out, final)
        return final


def eagle3_arch_for_target(target_config, aux_layer_ids: list[int]) -> Eagle3ArchConfig:
    from vllm_specx.core.edd import default_arch_for_target

    e = default_arch_for_target(target_config)
    return Eagle3ArchConfig(
        vocab_size=e.vocab_size, hidden_size=e.hidden_size, target_hidden_size=e.target_hidden_size,
        num_attention_heads=e.num_attention_heads, num_key_value_heads=e.num_key_value_heads, head_dim=e.head_dim,
        intermediate_size=e.intermediate_size, aux_layer_ids=tuple(aux_layer_ids), rms_norm_eps=e.rms_norm_eps,
        rope_theta=e.rope_theta, max_position_embeddings=e.max_position_embeddings,
    )
