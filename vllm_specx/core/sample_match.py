"""Sample-then-match verification of deterministic drafts (chains and trees).

Every draft specx makes is a deterministic function of the context (greedy chains, greedy trees,
prompt-lookup chains). Verification can therefore draw the target's token at each verified node exactly
as plain decoding would draw it after that node's path (`draw`), accept the child carrying the drawn
token and descend, and at the first node without such a child stop and emit the drawn token there.

- Lossless: a draft token x at a node is accepted with probability p(x), the probability rejection
  sampling with a point-mass draft gives it, and every emitted token is a draw from the target's
  (processed) distribution after the path so far: outputs follow the target exactly.
- Seeded requests equal plain decoding token for token: one draw per emitted token, in emission order,
  each made as plain decoding makes it; nodes after the first mismatch consume no draw.

Inputs follow core/tree.py: token_ids / parents / node_valid [B, N], node 0 = the root (the token the
target sampled last step). A chain of n drafts is the tree with parents [-1, 0, 1, ..., n - 1].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from vllm_specx.core.tree_verify import VerifyResult, _max_depth, children_table

# draw(node [B] int64, alive [B] bool) -> drawn token [B] int64: the target's token after the path ending
# in each request's node, drawn only for requests still alive (rows of the others are ignored and must
# consume nothing that plain decoding would not)
Draw = Callable[[Tensor, Tensor], Tensor]


def sample_then_match(token_ids: Tensor, parents: Tensor, node_valid: Tensor, draw: Draw,
                      max_depth: int | None = None) -> VerifyResult:
    """Walk every request's draft tree from the root, one `draw` per depth for the batch: accept the first
    child (sibling order) whose token equals the drawn one; otherwise the drawn token is the bonus.
    -> accepted path [B, D + 1] (root first, -1 padded), accepted nodes incl. the root [B], bonus [B]."""
    B = token_ids.shape[0]
    dev = token_ids.device
    D = _max_depth(parents, node_valid, max_depth)
    children = children_table(parents, node_valid)  # [B, N, C]
    rows = torch.arange(B, device=dev)
    cur = torch.zeros(B, dtype=torch.long, device=dev)
    alive = torch.ones(B, dtype=torch.bool, device=dev)
    path = torch.full((B, D + 1), -1, dtype=torch.long, device=dev)
    path[:, 0] = 0
    bonus = torch.zeros(B, dtype=torch.long, device=dev)
    for d in range(D + 1):
        drawn = draw(cur, alive).to(device=dev, dtype=torch.long)  # [B]
        bonus = torch.where(alive, drawn, bonus)
        if d == D:
            break
        kids = children[rows, cur]  # [B, C]
        match = (kids >= 0) & (token_ids.gather(1, kids.clamp(min=0)) == drawn[:, None]) & alive[:, None]
        alive = match.any(1)
        first = kids.gather(1, match.to(torch.uint8).argmax(1, keepdim=True))[:, 0]
        cur = torch.where(alive, first, cur)
        path[:, d + 1] = torch.where(alive, first, -1)
        if not bool(alive.any()):
            break
    return VerifyResult(path, (path >= 0).sum(1), bonus)


def chain_parents(num_drafts: int) -> Tensor:
    """[n + 1] parents of a chain of n drafts under the root: -1, 0, 1, ..., n - 1."""
    return torch.arange(-1, num_drafts, dtype=torch.long)


def pack_drafts(tokens: list[Tensor], parents: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Per-request node tokens / parents ([n_b + 1] each, root first) -> token_ids, parents, node_valid
    [B, N] padded (padding: token 0, parent -1, invalid)."""
    B, N = len(tokens), max((t.numel() for t in tokens), default=1)
    token_ids = torch.zeros(B, N, dtype=torch.long)
    par = torch.full((B, N), -1, dtype=torch.long)
    valid = torch.zeros(B, N, dtype=torch.bool)
    for b, (t, p) in enumerate(zip(tokens, parents)):
        n = t.numel()
        token_ids[b, :n], par[b, :n], valid[b, :n] = t, p, True
    return token_ids, par, valid
