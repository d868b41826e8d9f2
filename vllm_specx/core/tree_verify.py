"""Lossless verification of a batch of draft trees (greedy and recursive rejection sampling).

Inputs follow core/tree.py: token_ids / parents / node_valid [B, N], node 0 = root (the
token already sampled by the target, always accepted). Target outputs are given *at* each
node: target_argmax[b, i] / target_probs[b, i] is the target's next-token choice /
distribution after the path ending in node i. Vectorised over the batch; the only loops are
over depth and over sibling rank.

Sampling supports two lossless drafting forms:
  (a) deterministic candidates (draft_probs=None): the children of a node are any fixed
      token list x_1..x_m (e.g. top-k). Accept x_i with prob p_i(x_i); on rejection
      p_{i+1} = normalize(p_i with x_i zeroed).
  (b) candidates sampled i.i.d. from q = draft_probs[b, node] (SpecInfer): accept x_i
      with prob min(1, p_i(x_i) / q(x_i)); on rejection p_{i+1} = normalize(max(p_i - q, 0)).
If no child is accepted the bonus token is sampled from the final residual p; after an
accepted child the walk descends with p = target_probs at that child.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vllm_specx.core.metrics import expected_calibration_error
from vllm_specx.core.tree import node_depth, num_children


@dataclass
class VerifyResult:
    accepted_path: Tensor  # [B, D+1] int64 accepted node indices, root first, -1 padded
    num_accepted: Tensor   # [B] int64 accepted nodes including the root (>= 1)
    bonus_token: Tensor    # [B] int64 token emitted after the last accepted node

    def emitted_tokens(self, token_ids: Tensor) -> Tensor:
        """[B, D+1] tokens appended this step (accepted non-root nodes, then bonus), -1 padded."""
        B = self.accepted_path.shape[0]
        drafted = token_ids.gather(1, self.accepted_path[:, 1:].clamp(min=0))
        out = torch.cat([torch.where(self.accepted_path[:, 1:] >= 0, drafted, -1),
                         torch.full((B, 1), -1, dtype=torch.long, device=drafted.device)], dim=1)
        return out.scatter(1, (self.num_accepted - 1)[:, None], self.bonus_token[:, None])


def children_table(parents: Tensor, node_valid: Tensor) -> Tensor:
    """[B, N, C] children of each node in node order (sibling rank order), -1 padded."""
    B, N = parents.shape
    is_child = node_valid & (parents >= 0)
    par = parents.clamp(min=0)
    same = (par[:, :, None] == par[:, None, :]) & is_child[:, :, None] & is_child[:, None, :]
    rank = same.tril(-1).sum(2)  # [B, N] earlier siblings of each node
    C = max(int(num_children(parents, node_valid).max()), 1)
    flat = torch.where(is_child, par * C + rank, N * C)  # N*C = dump slot
    table = torch.full((B, N * C + 1), -1, dtype=torch.long, device=parents.device)
    table.scatter_(1, flat, torch.arange(N, device=parents.device).expand(B, N))
    return table[:, : N * C].view(B, N, C)


def _max_depth(parents: Tensor, node_valid: Tensor, max_depth: int | None) -> int:
    if max_depth is not None:
        return max_depth
    return int((node_depth(torch.where(node_valid, parents, -1)) * node_valid).max())


def greedy_accept(token_ids: Tensor, parents: Tensor, node_valid: Tensor, target_argmax: Tensor,
                  max_depth: int | None = None) -> VerifyResult:
    """Walk from the root while some child carries the target's argmax at the current node."""
    B = token_ids.shape[0]
    D = _max_depth(parents, node_valid, max_depth)
    children = children_table(parents, node_valid)  # [B, N, C]
    rows = torch.arange(B, device=token_ids.device)
    cur = torch.zeros(B, dtype=torch.long, device=token_ids.device)
    alive = torch.ones(B, dtype=torch.bool, device=token_ids.device)
    path = torch.full((B, D + 1), -1, dtype=torch.long, device=token_ids.device)
    path[:, 0] = 0
    for d in range(1, D + 1):
        kids = children[rows, cur]                                  # [B, C]
        want = target_argmax[rows, cur]                             # [B]
        match = (kids >= 0) & (token_ids.gather(1, kids.clamp(min=0)) == want[:, None])
        match &= alive[:, None]
        alive = match.any(1)
        first = kids.gather(1, match.to(torch.uint8).argmax(1, keepdim=True))[:, 0]
        cur = torch.where(alive, first, cur)
        path[:, d] = torch.where(alive, first, -1)
    return VerifyResult(path, (path >= 0).sum(1), target_argmax[rows, cur])


def _normalize(p: Tensor, fallback: Tensor) -> Tensor:
    """Rows of p scaled to sum 1; rows with no mass keep `fallback` (rejection was impossible)."""
    s = p.sum(-1, keepdim=True)
    return torch.where(s > 0, p / s.clamp(min=1e-300), fallback)


def _accept_point_mass(p: Tensor, tok: Tensor) -> tuple[Tensor, Tensor]:
    """Form (a): accept prob p(x); residual = p with x zeroed, renormalized."""
    accept_prob = p.gather(1, tok[:, None])[:, 0]
    return accept_prob, _normalize(p.scatter(1, tok[:, None], 0.0), p)


def _accept_sampled(p: Tensor, q: Tensor, tok: Tensor) -> tuple[Tensor, Tensor]:
    """Form (b): accept prob min(1, p(x)/q(x)); residual = normalize(max(p - q, 0))."""
    px, qx = p.gather(1, tok[:, None])[:, 0], q.gather(1, tok[:, None])[:, 0]
    accept_prob = torch.where(qx > 0, (px / qx.clamp(min=1e-300)).clamp(max=1.0), 1.0)
    return accept_prob, _normalize((p - q).clamp(min=0.0), p)


def sample_accept(token_ids: Tensor, parents: Tensor, node_valid: Tensor, target_probs: Tensor,
                  generator: torch.Generator | None = None, draft_probs: Tensor | None = None,
                  max_depth: int | None = None) -> VerifyResult:
    """Multi-candidate recursive rejection sampling; emitted tokens follow target_probs exactly.

    target_probs [B, N, V]: target distribution at each node (after temperature etc.).
    draft_probs [B, N, V] or None: q at each node for form (b); None selects form (a).
    """
    B = token_ids.shape[0]
    dev = token_ids.device
    D = _max_depth(parents, node_valid, max_depth)
    children = children_table(parents, node_valid)  # [B, N, C]
    rows = torch.arange(B, device=dev)
    cur = torch.zeros(B, dtype=torch.long, device=dev)
    alive = torch.ones(B, dtype=torch.bool, device=dev)
    path = torch.full((B, D + 1), -1, dtype=torch.long, device=dev)
    path[:, 0] = 0
    residual = target_probs[:, 0].double()  # [B, V]
    for d in range(1, D + 1):
        residual = torch.where(alive[:, None], target_probs[rows, cur].double(), residual)
        q = draft_probs[rows, cur].double() if draft_probs is not None else None
        kids = children[rows, cur]  # [B, C]
        chosen = torch.full((B,), -1, dtype=torch.long, device=dev)
        for r in range(kids.shape[1]):
            x = kids[:, r]
            active = alive & (chosen < 0) & (x >= 0)
            tok = token_ids[rows, x.clamp(min=0)]
            if q is None:
                accept_prob, rejected_p = _accept_point_mass(residual, tok)
            else:
                accept_prob, rejected_p = _accept_sampled(residual, q, tok)
            u = torch.rand(B, generator=generator, device=dev, dtype=torch.float64)
            accept = active & (u < accept_prob)
            residual = torch.where((active & ~accept)[:, None], rejected_p, residual)
            chosen = torch.where(accept, x, chosen)
        alive = chosen >= 0
        cur = torch.where(alive, chosen, cur)
        path[:, d] = chosen
    residual = torch.where(alive[:, None], target_probs[rows, cur].double(), residual)
    bonus = torch.multinomial(residual, 1, generator=generator)[:, 0]
    return VerifyResult(path, (path >= 0).sum(1), bonus)


def accepted_node_mask(accepted_path: Tensor, num_nodes_padded: int) -> Tensor:
    """[B, N] bool: node was accepted (root included)."""
    B = accepted_path.shape[0]
    mask = torch.zeros((B, num_nodes_padded + 1), dtype=torch.bool, device=accepted_path.device)
    idx = torch.where(accepted_path >= 0, accepted_path, num_nodes_padded)
    return mask.scatter_(1, idx, True)[:, :num_nodes_padded]


def draft_confidence_ece(confidence: Tensor, accepted: Tensor, mask: Tensor | None = None,
                         n_bins: int = 15) -> float:
    """ECE of drafted-node confidences (e.g. PCT path probs [B, N]) against acceptance [B, N]."""
    if mask is not None:
        confidence, accepted = confidence[mask], accepted[mask]
    return expected_calibration_error(confidence.float(), accepted.float(), n_bins=n_bins)
