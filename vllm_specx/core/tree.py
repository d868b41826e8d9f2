"""Token trees for speculative decoding: verification buffers and PCT expansion.

A batch of B trees is padded to N nodes per request:
  parents    [B, N] int64  parent node index; -1 for the root (node 0) and for padding
  node_valid [B, N] bool
  token_ids  [B, N] int64  node 0 = the token the target already sampled (always accepted)
Nodes are in topological (BFS) order: parents[b, i] < i for every valid i > 0.

`build_tree_buffers` turns such a batch into everything verification needs (Medusa's
"one function, all buffers"). `expand_level` / `build_pct_tree` grow a Pruned Candidate
Tree level by level: a drafted node is kept only if its expected time gain is positive,
path_prob * t_target_step > marginal node cost, i.e. path_prob > node_threshold
(see cost_model.CostModel.node_threshold). The fixed EAGLE-2 style tree is the same code
path with threshold 0 and a global node budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


# ----------------------------------------------------------------------------- buffers
@dataclass
class TreeBuffers:
    depth: Tensor           # [B, N] int64, root 0 (padding 0)
    positions: Tensor       # [B, N] int64, context_lens[:, None] + depth (RoPE positions)
    ancestor_mask: Tensor   # [B, N, N] bool, [b, i, j]: j is i or an ancestor of i
    is_leaf: Tensor         # [B, N] bool
    retrieve_paths: Tensor  # [B, L, D+1] int64 root-to-leaf node indices, -1 padded
    num_nodes: Tensor       # [B] int64


def _num_doublings(n: int) -> int:
    """Pointer-doubling rounds so that 2**rounds >= n - 1 (the largest possible depth)."""
    return max(n - 1, 1).bit_length()


def _jump_pointers(parents: Tensor) -> Tensor:
    """[B, N] parent index, with the root and padding pointing at themselves."""
    self_idx = torch.arange(parents.shape[1], device=parents.device).expand_as(parents)
    return torch.where(parents >= 0, parents, self_idx)


def node_depth(parents: Tensor) -> Tensor:
    """[B, N] depth by pointer jumping: O(B N log N), no per-node loop."""
    jump = _jump_pointers(parents)
    depth = (parents >= 0).long()  # distance from i to jump[i]
    for _ in range(_num_doublings(parents.shape[1])):
        depth = depth + depth.gather(1, jump)
        jump = jump.gather(1, jump)
    return depth


def ancestor_mask(parents: Tensor, node_valid: Tensor) -> Tensor:
    """[B, N, N] bool, [b, i, j] = j is i or an ancestor of i (padding: diagonal only)."""
    B, N = parents.shape
    jump = _jump_pointers(parents)
    eye = torch.eye(N, dtype=torch.bool, device=parents.device).expand(B, N, N)
    mask = eye | torch.nn.functional.one_hot(jump, N).bool()  # ancestors at distance 0..1
    for _ in range(_num_doublings(N)):
        # mask[i] covers distances 0..2^k and jump[i] is at distance 2^k: merge rows.
        mask = mask | mask.gather(1, jump[:, :, None].expand(B, N, N))
        jump = jump.gather(1, jump)
    valid2 = node_valid[:, :, None] & node_valid[:, None, :]
    return (mask & valid2) | eye


def num_children(parents: Tensor, node_valid: Tensor) -> Tensor:
    """[B, N] int64 number of valid children of each node."""
    is_child = (node_valid & (parents >= 0)).long()
    return torch.zeros_like(parents).scatter_add_(1, parents.clamp(min=0), is_child)


def _retrieve_paths(anc: Tensor, depth: Tensor, is_leaf: Tensor) -> Tensor:
    """[B, L, D+1] node index at each depth of every root-to-leaf path (leaves in node order)."""
    B, N = depth.shape
    L = max(int(is_leaf.sum(1).max()), 1)
    D = int(depth.max()) if depth.numel() else 0
    leaves = torch.sort(is_leaf.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :L]
    leaf_ok = is_leaf.gather(1, leaves)                                           # [B, L]
    on_path = anc.gather(1, leaves[:, :, None].expand(B, L, N)) & leaf_ok[:, :, None]  # [B, L, N]
    col = torch.where(on_path, depth[:, None, :].expand(B, L, N), D + 1)          # D+1 = dump column
    paths = torch.full((B, L, D + 2), -1, dtype=torch.long, device=depth.device)
    node = torch.arange(N, device=depth.device).expand(B, L, N)
    return paths.scatter_(2, col, node)[:, :, : D + 1]


def build_tree_buffers(parents: Tensor, node_valid: Tensor, context_lens: Tensor) -> TreeBuffers:
    """All per-step tree buffers from (parents [B, N], node_valid [B, N], context_lens [B])."""
    parents = torch.where(node_valid, parents, -1)
    depth = node_depth(parents) * node_valid
    anc = ancestor_mask(parents, node_valid)
    is_leaf = node_valid & (num_children(parents, node_valid) == 0)
    return TreeBuffers(
        depth=depth,
        positions=context_lens.long()[:, None] + depth,
        ancestor_mask=anc,
        is_leaf=is_leaf,
        retrieve_paths=_retrieve_paths(anc, depth, is_leaf),
        num_nodes=node_valid.sum(1),
    )


def check_tree(parents: Tensor, node_valid: Tensor) -> None:
    """Raise ValueError unless the batch follows the tree conventions (debug/test helper; syncs)."""
    N = parents.shape[1]
    idx = torch.arange(N, device=parents.device)
    if not bool(node_valid[:, 0].all()) or bool((parents[:, 0] != -1).any()):
        raise ValueError("node 0 must be a valid root with parent -1")
    inner = node_valid[:, 1:]
    par = parents[:, 1:]
    if bool((inner & ((par < 0) | (par >= idx[1:]))).any()):
        raise ValueError("every valid node i > 0 needs a parent in [0, i)")
    if bool((inner & ~node_valid.gather(1, par.clamp(min=0))).any()):
        raise ValueError("a valid node has a padding parent")


# ----------------------------------------------------------------------------- PCT
@dataclass
class LevelExpansion:
    keep: Tensor         # [B, M] bool, kept children sorted by path prob (descending)
    token_ids: Tensor    # [B, M] int64
    path_prob: Tensor    # [B, M] float, parent path prob * child draft prob
    parent_slot: Tensor  # [B, M] int64, index into the frontier (0..F-1)


def expand_level(
    frontier_path_prob: Tensor,  # [B, F]
    frontier_valid: Tensor,      # [B, F] bool
    child_probs: Tensor,         # [B, F, k] draft prob of each proposed child
    child_ids: Tensor,           # [B, F, k] token id of each proposed child
    node_threshold: Tensor | float,  # [B]: marginal node cost / target step time
    max_new_nodes: int,
) -> LevelExpansion:
    """Keep children with path_prob > node_threshold, at most max_new_nodes per request, best first."""
    B, F, K = child_probs.shape
    cand = (frontier_path_prob[:, :, None] * child_probs).reshape(B, F * K)  # [B, F*k]
    threshold = torch.as_tensor(node_threshold, dtype=cand.dtype, device=cand.device).reshape(-1, 1)
    ok = frontier_valid[:, :, None].expand(B, F, K).reshape(B, F * K) & (cand > threshold)
    M = min(max_new_nodes, F * K)
    order = torch.sort(cand.masked_fill(~ok, -1.0), dim=1, descending=True, stable=True).indices[:, :M]
    return LevelExpansion(
        keep=ok.gather(1, order),
        token_ids=child_ids.reshape(B, F * K).gather(1, order),
        path_prob=cand.gather(1, order),
        parent_slot=order // K,
    )


@dataclass
class DraftTree:
    """A growing batch of draft trees in the padded convention (capacity C nodes per request)."""

    parents: Tensor     # [B, C] int64
    token_ids: Tensor   # [B, C] int64
    node_valid: Tensor  # [B, C] bool
    path_prob: Tensor   # [B, C] float32, root 1.0, padding 0.0
    num_nodes: Tensor   # [B] int64

    @classmethod
    def new(cls, root_ids: Tensor, capacity: int) -> "DraftTree":
        B, dev = root_ids.shape[0], root_ids.device
        tree = cls(
            parents=torch.full((B, capacity), -1, dtype=torch.long, device=dev),
            token_ids=torch.zeros((B, capacity), dtype=torch.long, device=dev),
            node_valid=torch.zeros((B, capacity), dtype=torch.bool, device=dev),
            path_prob=torch.zeros((B, capacity), dtype=torch.float32, device=dev),
            num_nodes=torch.ones(B, dtype=torch.long, device=dev),
        )
        tree.token_ids[:, 0] = root_ids
        tree.node_valid[:, 0] = True
        tree.path_prob[:, 0] = 1.0
        return tree

    def trim(self) -> "DraftTree":
        """Drop trailing capacity that no request uses (syncs)."""
        n = max(int(self.num_nodes.max()), 1)
        return DraftTree(self.parents[:, :n], self.token_ids[:, :n], self.node_valid[:, :n],
                         self.path_prob[:, :n], self.num_nodes)


def _scatter_kept(dst: Tensor, slot: Tensor, keep: Tensor, src: Tensor) -> None:
    """dst[b, slot[b, m]] = src[b, m] where keep[b, m] (others go to a discarded column)."""
    C = dst.shape[1]
    tmp = torch.cat([dst, dst[:, :1]], dim=1)
    tmp.scatter_(1, torch.where(keep, slot, C), src.to(dst.dtype))
    dst.copy_(tmp[:, :C])


def append_level(tree: DraftTree, exp: LevelExpansion, frontier_nodes: Tensor) -> Tensor:
    """Write kept children after each request's last node (in place). Returns node index [B, M] or -1."""
    slot = tree.num_nodes[:, None] + exp.keep.long().cumsum(1) - 1  # [B, M]
    keep = exp.keep & (slot < tree.parents.shape[1])
    parent = frontier_nodes.gather(1, exp.parent_slot)
    _scatter_kept(tree.parents, slot, keep, parent)
    _scatter_kept(tree.token_ids, slot, keep, exp.token_ids)
    _scatter_kept(tree.node_valid, slot, keep, keep)
    _scatter_kept(tree.path_prob, slot, keep, exp.path_prob)
    tree.num_nodes += keep.sum(1)
    return torch.where(keep, slot, -1)


def select_top_nodes(tree: DraftTree, node_budget: int) -> DraftTree:
    """Keep the root and the node_budget best nodes by path prob, re-indexed in BFS order.

    Path probs never increase from parent to child, and a stable sort puts a parent (lower
    index) before an equal-probability child, so the kept set is closed under ancestors.
    """
    B, C = tree.parents.shape
    keep_n = min(node_budget + 1, C)
    score = tree.path_prob.masked_fill(~tree.node_valid, -1.0)
    score[:, 0] = 2.0  # root first
    best = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :keep_n]   # [B, K]
    best = torch.where(tree.node_valid.gather(1, best), best, C)
    old = torch.sort(best, dim=1).values  # node order keeps BFS order; padding (C) last
    valid = old < C
    new_of_old = torch.full((B, C + 1), -1, dtype=torch.long, device=old.device)
    new_of_old.scatter_(1, old, torch.arange(keep_n, device=old.device).expand(B, keep_n))
    new_of_old[:, C] = -1
    old = old.clamp(max=C - 1)
    old_par = tree.parents.gather(1, old)
    parents = torch.where(valid & (old_par >= 0), new_of_old.gather(1, old_par.clamp(min=0)), -1)
    return DraftTree(
        parents=parents,
        token_ids=tree.token_ids.gather(1, old) * valid,
        node_valid=valid,
        path_prob=tree.path_prob.gather(1, old) * valid,
        num_nodes=valid.sum(1),
    )


# draft_level(level, frontier_nodes [B, F], frontier_valid [B, F], tree)
#   -> (child_probs [B, F, k], child_ids [B, F, k]); level counts from 0 (children of the root).
DraftLevelFn = Callable[[int, Tensor, Tensor, DraftTree], "tuple[Tensor, Tensor]"]


def build_pct_tree(
    root_ids: Tensor,                # [B] bonus token of the previous step
    draft_level: DraftLevelFn,
    node_threshold: Tensor | float,  # [B] (0 = no cost pruning)
    max_depth: int,
    max_new_nodes: int,              # nodes added per level per request
    max_frontier: int | None = None,  # nodes expanded at the next level (default max_new_nodes)
    node_budget: int | None = None,  # keep the best node_budget non-root nodes overall
) -> DraftTree:
    """Grow a (pruned) candidate tree level by level; stops early when every frontier is empty."""
    max_frontier = max_new_nodes if max_frontier is None else max_frontier
    tree = DraftTree.new(root_ids, capacity=1 + max_depth * max_new_nodes)
    B, dev = root_ids.shape[0], root_ids.device
    frontier = torch.zeros((B, 1), dtype=torch.long, device=dev)
    frontier_valid = torch.ones((B, 1), dtype=torch.bool, device=dev)
    for level in range(max_depth):
        if not bool(frontier_valid.any()):
            break
        child_probs, child_ids = draft_level(level, frontier, frontier_valid, tree)
        frontier_prob = tree.path_prob.gather(1, frontier.clamp(min=0))
        exp = expand_level(frontier_prob, frontier_valid, child_probs, child_ids,
                           node_threshold, max_new_nodes)
        new_nodes = append_level(tree, exp, frontier.clamp(min=0))[:, :max_frontier]
        frontier, frontier_valid = new_nodes, new_nodes >= 0
    if node_budget is not None:
        tree = select_top_nodes(tree, node_budget)
    return tree.trim()


def build_fixed_tree(root_ids: Tensor, draft_level: DraftLevelFn, topk: int, max_depth: int,
                     node_budget: int) -> DraftTree:
    """EAGLE-2 style baseline: expand the top-k nodes per level, rerank all, keep node_budget."""
    return build_pct_tree(root_ids, draft_level, 0.0, max_depth, max_new_nodes=topk * topk,
                          max_frontier=topk, node_budget=node_budget)


def _sibling_scores(chain_len: Tensor, chain_path_prob: Tensor, sib_probs: Tensor,
                    node_threshold: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
    """(sibling path prob [B, D, m], sibling kept [B, D, m], chain node kept [B, D]): a sibling at depth d
    is accepted iff the chain up to d-1 is and the target's token is that sibling, so its path prob is
    path_prob(d-1) * q; it is kept when its parent is and the path prob beats the node threshold."""
    B, D = chain_path_prob.shape
    depth = torch.arange(D, device=chain_path_prob.device)
    parent_prob = torch.cat([torch.ones(B, 1, device=chain_path_prob.device),
                             chain_path_prob[:, :-1].float()], dim=1)  # [B, D]
    parent_ok = depth[None, :] < chain_len[:, None] + 1                 # chain node d-1 kept (or the root)
    thr = torch.as_tensor(node_threshold, dtype=torch.float32, device=chain_path_prob.device).reshape(-1, 1, 1)
    sib_path = parent_prob[:, :, None] * sib_probs.float()              # [B, D, m]
    return sib_path, parent_ok[:, :, None] & (sib_path > thr), depth[None, :] < chain_len[:, None]


def siblings_to_expand(
    chain_len: Tensor,        # [B] chain tokens kept, in [0, D]
    chain_path_prob: Tensor,  # [B, D]
    sib_probs: Tensor,        # [B, D, m]
    node_threshold: Tensor | float,
    node_budget: int,
) -> Tensor:                  # [B, D, m] bool
    """Siblings worth a drafter pass for their own children: kept siblings that rank among the
    node_budget - 1 best nodes of the chain-with-siblings tree, so that the tree still has room for a
    child under them (a child's path prob is at most its parent's, so it can only displace worse nodes)."""
    B, D, m = sib_probs.shape
    sib_path, sib_ok, chain_ok = _sibling_scores(chain_len, chain_path_prob, sib_probs, node_threshold)
    score = torch.cat([torch.where(chain_ok, chain_path_prob.float(), -1.0)[:, :, None],
                       torch.where(sib_ok, sib_path, -1.0)], dim=2).reshape(B, -1)  # [B, D*(1+m)]
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1]).expand(B, -1))
    return sib_ok & (rank.view(B, D, 1 + m)[:, :, 1:] < node_budget - 1)


def chain_with_siblings(
    chain_ids: Tensor,        # [B, D] chain (top-1) draft token per depth
    chain_len: Tensor,        # [B] chain tokens kept (early stop), in [0, D]
    chain_path_prob: Tensor,  # [B, D] estimated P(chain up to depth d accepted)
    sib_ids: Tensor,          # [B, D, m] runner-up draft tokens per depth (ranks 2..m+1)
    sib_probs: Tensor,        # [B, D, m] their draft probabilities (confidence = acceptance probability)
    node_threshold: Tensor | float,  # [B] or scalar: marginal node cost / target step (cost model)
    node_budget: int,         # verified nodes per request (excluding the root)
    child_ids: Tensor | None = None,    # [B, D, m, c] drafted children of each sibling (expanded ones)
    child_probs: Tensor | None = None,  # [B, D, m, c] their acceptance estimates (draft confidence, or the
                                        # decision model's: early_stop.branch_child_probs); 0: not expanded
) -> DraftTree:
    """A PCT tree grown from a chain drafter: at each drafted depth, the chain node plus the runner-up
    tokens of the same draft distribution as alternative children of the chain's previous node, and,
    when given, the children drafted under those siblings (`siblings_to_expand`).

    Every node's expected gain is its path prob (product of acceptance estimates along its path: the
    decision model's along the chain, draft confidence for runner-ups, child_probs below them); a node is
    kept only when that beats the node threshold and its parent is kept, and the best `node_budget` nodes
    are kept overall
    (`select_top_nodes`). Node layout before selection: depth d holds the chain node at 1 + d*(1+m),
    its siblings right after it; children follow all of them, in (depth, sibling, rank) order.
    """
    B, D = chain_ids.shape
    m = sib_ids.shape[2]
    c = 0 if child_ids is None else child_ids.shape[3]
    dev = chain_ids.device
    tree = DraftTree.new(torch.zeros(B, dtype=torch.long, device=dev), capacity=1 + D * (1 + m) + D * m * c)
    depth = torch.arange(D, device=dev)
    chain_node = 1 + depth * (1 + m)                                   # [D]
    parent = torch.cat([torch.zeros(1, dtype=torch.long, device=dev), chain_node[:-1]])  # [D]
    sib_path, sib_ok, chain_ok = _sibling_scores(chain_len, chain_path_prob, sib_probs, node_threshold)
    sib_node = chain_node[:, None] + 1 + torch.arange(m, device=dev)[None, :]  # [D, m]
    idx = torch.cat([chain_node[:, None], sib_node], 1).reshape(-1)     # [D*(1+m)] in layout order
    tree.parents[:, idx] = parent.repeat_interleave(1 + m)[None, :].expand(B, -1)
    tree.token_ids[:, idx] = torch.cat([chain_ids[:, :, None], sib_ids], 2).reshape(B, -1)
    tree.node_valid[:, idx] = torch.cat([chain_ok[:, :, None], sib_ok], 2).reshape(B, -1)
    tree.path_prob[:, idx] = torch.cat([chain_path_prob[:, :, None].float(), sib_path], 2).reshape(B, -1)
    if c:
        thr = torch.as_tensor(node_threshold, dtype=torch.float32, device=dev).reshape(-1, 1, 1, 1)
        child_path = sib_path[..., None] * child_probs.float()         # [B, D, m, c]
        child_ok = sib_ok[..., None] & (child_probs > 0) & (child_path > thr)
        cidx = 1 + D * (1 + m) + torch.arange(D * m * c, device=dev)  # [D*m*c]
        tree.parents[:, cidx] = sib_node.repeat_interleave(c).reshape(1, -1).expand(B, -1)
        tree.token_ids[:, cidx] = child_ids.reshape(B, -1)
        tree.node_valid[:, cidx] = child_ok.reshape(B, -1)
        tree.path_prob[:, cidx] = child_path.reshape(B, -1)
    tree.parents.masked_fill_(~tree.node_valid, -1)
    tree.path_prob.masked_fill_(~tree.node_valid, 0.0)
    tree.path_prob[:, 0] = 1.0
    tree.num_nodes = tree.node_valid.sum(1)
    return select_top_nodes(tree, node_budget).trim()
