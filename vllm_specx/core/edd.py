"""EDD: the Effective Draft Decoder, in plain PyTorch (training and reference; no vLLM).

The target LLM is the encoder: its hidden state at one intermediate layer becomes a soft prompt for
a one-layer draft decoder whose embedding and LM head are the target's own.

KV-cache layout (why it differs slightly from the paper's training code): vLLM gives a drafter one
KV slot per token position. EDD's drafter keeps, in slot `s`, a *context vector* z_s:
  - z_s = hidden_proj(hidden_norm(h_s))   once the target has verified position s (soft prompt);
  - z_s = embed(x_s)                      while x_s is still a draft token of the current block.
The query that predicts x_{s+2} sits in slot s, reads embed(x_{s+1}) at RoPE position s+1 and
attends to z_0..z_s. So within a drafting block that started at slot b, the query in slot s sees
soft prompts h_0..h_b and draft-token embeddings x_{b+1}..x_s: the paper's "dual-block" mask, except
that a query does not attend to its own token's key (that token still reaches it via the residual).
Training builds exactly this with random block boundaries (`block_attention_mask`).

Lossless regardless: draft tokens are only proposals that the target verifies.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class EddArchConfig:
    vocab_size: int
    hidden_size: int  # drafter width (= target embedding width: the embedding is shared)
    target_hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    target_layer_id: int = -1  # vLLM aux-hidden-state id: the input of target layer `id`

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Neox-style rotary embedding. x: [..., S, heads, head_dim], positions: [..., S]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = positions.float()[..., None] * inv_freq  # [..., S, d/2]
    cos, sin = ang.cos()[..., None, :], ang.sin()[..., None, :]
    x1, x2 = x.float()[..., : d // 2], x.float()[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class EddDraftLayer(nn.Module):
    """One Llama-style decoder layer whose queries and keys come from different streams."""

    def __init__(self, cfg: EddArchConfig):
        super().__init__()
        h, nq, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.cfg = cfg
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps)  # query stream
        self.context_layernorm = RMSNorm(h, cfg.rms_norm_eps)  # key/value stream
        self.q_proj = nn.Linear(h, nq * hd, bias=False)
        self.k_proj = nn.Linear(h, nkv * hd, bias=False)
        self.v_proj = nn.Linear(h, nkv * hd, bias=False)
        self.o_proj = nn.Linear(nq * hd, h, bias=False)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.gate_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, h, bias=False)

    def forward(
        self,
        query_embeds: torch.Tensor,  # [B, Sq, H]
        query_positions: torch.Tensor,  # [B, Sq]
        context: torch.Tensor,  # [B, Sk, H]
        context_positions: torch.Tensor,  # [B, Sk]
        attn_mask: torch.Tensor,  # [B or 1, Sq, Sk] bool, True = may attend
    ) -> torch.Tensor:  # [B, Sq, H]
        cfg = self.cfg
        b, sq, _ = query_embeds.shape
        sk = context.shape[1]
        q_in = self.input_layernorm(query_embeds)
        kv_in = self.context_layernorm(context)
        q = self.q_proj(q_in).view(b, sq, cfg.num_attention_heads, cfg.head_dim)
        k = self.k_proj(kv_in).view(b, sk, cfg.num_key_value_heads, cfg.head_dim)
        v = self.v_proj(kv_in).view(b, sk, cfg.num_key_value_heads, cfg.head_dim)
        q = rope(q, query_positions, cfg.rope_theta).transpose(1, 2)  # [B, nq, Sq, hd]
        k = rope(k, context_positions, cfg.rope_theta).transpose(1, 2)
        v = v.transpose(1, 2)
        rep = cfg.num_attention_heads // cfg.num_key_value_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask[:, None])
        attn = attn.transpose(1, 2).reshape(b, sq, -1)
        x = query_embeds + self.o_proj(attn)
        mlp_in = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(mlp_in)) * self.up_proj(mlp_in))


class EddDrafter(nn.Module):
    """Trainable EDD drafter. `embed` and `lm_head` are the target's (frozen, not saved)."""

    def __init__(self, cfg: EddArchConfig, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor):
        super().__init__()
        self.cfg = cfg
        self.hidden_norm = RMSNorm(cfg.target_hidden_size, cfg.rms_norm_eps)
        self.hidden_proj = nn.Linear(cfg.target_hidden_size, cfg.hidden_size, bias=False)
        self.layer = EddDraftLayer(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer("embed_weight", embed_weight.detach(), persistent=False)
        self.register_buffer("lm_head_weight", lm_head_weight.detach(), persistent=False)

    def context_from_target(self, target_hidden: torch.Tensor) -> torch.Tensor:
        return self.hidden_proj(self.hidden_norm(target_hidden))

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self.embed_weight).to(self.hidden_proj.weight.dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(hidden), self.lm_head_weight.to(hidden.dtype))

    def forward_blocks(
        self,
        token_ids: torch.Tensor,  # [B, S]
        target_hidden: torch.Tensor,  # [B, S, Ht]
        block_starts: torch.Tensor,  # [B, S] slot where each query's drafting block began
    ) -> torch.Tensor:  # [B, S-1, H] hidden for queries in slots 0..S-2 (predicting x_{s+2})
        b, s = token_ids.shape
        pos = torch.arange(s, device=token_ids.device).expand(b, s)
        embeds = self.embed(token_ids)
        context = torch.cat([self.context_from_target(target_hidden), embeds], dim=1)  # [B, 2S, H]
        context_pos = torch.cat([pos, pos], dim=1)
        query = embeds[:, 1:]  # embed(x_{s+1}) for slot s
        mask = block_attention_mask(block_starts[:, : s - 1], s)
        return self.layer(query, pos[:, 1:], context, context_pos, mask)


def block_attention_mask(block_starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Mask over [soft prompts (S) ; draft embeddings (S)] for queries in slots 0..Sq-1.

    block_starts: [B, Sq]; the query in slot s (block start b = block_starts[s] <= s) may attend to
    soft prompt slots 0..b and draft-embedding slots b+1..s. Returns [B, Sq, 2S] bool.
    """
    bsz, sq = block_starts.shape
    slot = torch.arange(sq, device=block_starts.device)[None, :, None]  # [1, Sq, 1]
    key = torch.arange(seq_len, device=block_starts.device)[None, None, :]  # [1, 1, S]
    start = block_starts[:, :, None]
    soft = key <= start
    draft = (key > start) & (key <= slot)
    return torch.cat([soft, draft], dim=-1)


def random_block_starts(batch: int, seq_len: int, min_len: int, max_len: int, generator: torch.Generator) -> torch.Tensor:
    """[B, S] block starts from random block lengths in [min_len, max_len] and a random offset,
    so that training sees every depth (0..max_len-1) at every position."""
    starts = torch.empty(batch, seq_len, dtype=torch.long)
    for row in range(batch):  # O(S / block) per row; data-preparation, not a hot path
        s = -int(torch.randint(0, max_len, (1,), generator=generator))
        while s < seq_len:
            n = int(torch.randint(min_len, max_len + 1, (1,), generator=generator))
            lo, hi = max(s, 0), min(s + n, seq_len)
            starts[row, lo:hi] = max(s, 0)
            s += n
    return starts


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def default_arch_for_target(target_config, target_layer_id: int | None = None) -> EddArchConfig:
    """An EDD drafter shaped like one layer of the target (HF LlamaConfig-like object)."""
    nq = target_config.num_attention_heads
    head_dim = getattr(target_config, "head_dim", None) or target_config.hidden_size // nq
    n_layers = target_config.num_hidden_layers
    if target_layer_id is None:
        # The paper reads the 4th hidden state from the end (HF hidden_states[-4]), i.e. the input
        # of layer n-3 in vLLM's aux-hidden-state numbering.
        target_layer_id = max(n_layers - 3, 0)
    return EddArchConfig(
        vocab_size=target_config.vocab_size,
        hidden_size=target_config.hidden_size,
        target_hidden_size=target_config.hidden_size,
        num_attention_heads=nq,
        num_key_value_heads=getattr(target_config, "num_key_value_heads", nq),
        head_dim=head_dim,
        intermediate_size=target_config.intermediate_size,
        rms_norm_eps=getattr(target_config, "rms_norm_eps", 1e-5),
        rope_theta=float(_rope_theta(target_config)),
        max_position_embeddings=target_config.max_position_embeddings,
        target_layer_id=target_layer_id,
    )


def _rope_theta(cfg) -> float:
    theta = getattr(cfg, "rope_theta", None)
    if theta is None:
        params = getattr(cfg, "rope_parameters", None) or {}
        theta = params.get("rope_theta", 10000.0)
    return theta


def init_weights_(drafter: EddDrafter, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in drafter.named_parameters():
        if p.dim() == 2:
            std = 1.0 / math.sqrt(p.shape[1])
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * std * 0.5)
