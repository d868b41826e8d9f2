"""Tree attention over a paged KV cache: CPU implementation and reference for a GPU kernel.

The tree nodes of all requests are packed along T (query_start_loc [B+1], node order within
a request). Request b has context_lens[b] tokens already in its cache; its tree node k has
its K/V written at position context_lens[b] + k (one KV slot per node, in node order; the
RoPE position is context_len + depth, that is the caller's business). A node attends to
every context token plus the tree nodes allowed by tree_mask (ancestors-or-self).
"""

from __future__ import annotations

import torch
from torch import Tensor


def packed_index(query_start_loc: Tensor, num_tokens: int | None = None) -> tuple[Tensor, Tensor]:
    """For each packed token: (request index [T], node index within the request [T]). num_tokens = T
    when the caller knows it (spares a device sync on GPU)."""
    counts = query_start_loc[1:] - query_start_loc[:-1]
    req = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts, output_size=num_tokens)
    node = torch.arange(req.numel(), device=counts.device) - query_start_loc[req]
    return req, node


def tree_kv_slot_mapping(block_table: Tensor, context_lens: Tensor, query_start_loc: Tensor,
                         block_size: int) -> Tensor:
    """[T] flat cache slot (block * block_size + offset) for every packed tree node."""
    req, node = packed_index(query_start_loc)
    pos = context_lens.long()[req] + node
    return block_table[req, pos // block_size].long() * block_size + pos % block_size


def _gather_kv(cache: Tensor, block_table: Tensor, kv_lens: Tensor, L: int) -> Tensor:
    """[B, L, Hkv, D] cache rows for positions 0..L-1 of each request (zeros past kv_lens)."""
    block_size = cache.shape[1]
    pos = torch.arange(L, device=cache.device)
    in_range = pos[None, :] < kv_lens[:, None]                                # [B, L]
    col = (pos // block_size).clamp(max=block_table.shape[1] - 1).expand(block_table.shape[0], L)
    blk = torch.where(in_range, block_table.gather(1, col).long(), 0)         # [B, L]
    rows = cache[blk, (pos % block_size)[None, :]]
    return torch.where(in_range[:, :, None, None], rows, torch.zeros((), dtype=rows.dtype))


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """q [B, N, Hq, D], k/v [B, L, Hkv, D], mask [B, N, L] -> [B, N, Hq, D] (GQA by grouping)."""
    B, N, Hq, D = q.shape
    Hkv = k.shape[2]
    qg = q.view(B, N, Hkv, Hq // Hkv, D)
    scores = torch.einsum("bnhgd,blhd->bhgnl", qg, k) * scale               # [B, Hkv, G, N, L]
    mask = mask | ~mask.any(-1, keepdim=True)  # padded query rows: attend anywhere, discarded
    scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bhgnl,blhd->bnhgd", probs, v).reshape(B, N, Hq, D)


def _tree_attention_chunk(query, query_start_loc, key_cache, value_cache, block_table,
                          context_lens, tree_mask, scale):
    B, N = tree_mask.shape[:2]
    Hq, D = query.shape[1:]
    acc = torch.promote_types(query.dtype, torch.float32)
    n_q = query_start_loc[1:] - query_start_loc[:-1]                          # [B]
    req, node = packed_index(query_start_loc)
    q = query.new_zeros((B, N, Hq, D), dtype=acc)
    q[req, node] = query.to(acc)
    ctx = context_lens.long()
    kv_lens = ctx + n_q
    L = max(int(kv_lens.max()), 1)
    k = _gather_kv(key_cache, block_table, kv_lens, L).to(acc)
    v = _gather_kv(value_cache, block_table, kv_lens, L).to(acc)
    pos = torch.arange(L, device=query.device)[None, :]                       # [1, L]
    tree_idx = pos - ctx[:, None]                                             # [B, L] node of slot
    in_tree = (tree_idx >= 0) & (tree_idx < n_q[:, None])
    anc = tree_mask.gather(2, tree_idx.clamp(0, N - 1)[:, None, :].expand(B, N, L))  # [B, N, L]
    mask = (pos < ctx[:, None])[:, None, :] | (in_tree[:, None, :] & anc)
    out = _attend(q, k, v, mask, scale)
    return out[req, node].to(query.dtype)


def tree_attention_paged(
    query: Tensor,            # [T, Hq, D] tree nodes of all requests, packed
    query_start_loc: Tensor,  # [B+1] int
    key_cache: Tensor,        # [num_blocks, block_size, Hkv, D]
    value_cache: Tensor,      # [num_blocks, block_size, Hkv, D]
    block_table: Tensor,      # [B, max_blocks] int
    context_lens: Tensor,     # [B] tokens in the cache before the tree
    tree_mask: Tensor,        # [B, N, N] bool ancestor-or-self mask (N >= nodes of any request)
    scale: float,
    requests_per_chunk: int = 16,
) -> Tensor:                  # [T, Hq, D]
    """Each node attends to its request's context plus its tree ancestors-or-self.

    Requests are processed in chunks (vectorised inside a chunk) to bound the padded
    [chunk, L, Hkv, D] gathers on long contexts.
    """
    assert query.shape[1] % key_cache.shape[2] == 0, "Hq must be a multiple of Hkv"
    B = block_table.shape[0]
    out = torch.empty_like(query)
    qsl = query_start_loc.long()
    for s in range(0, B, requests_per_chunk):
        e = min(s + requests_per_chunk, B)
        t0, t1 = int(qsl[s]), int(qsl[e])
        out[t0:t1] = _tree_attention_chunk(
            query[t0:t1], qsl[s:e + 1] - t0, key_cache, value_cache, block_table[s:e],
            context_lens[s:e], tree_mask[s:e], scale)
    return out


def branch_attention_paged(
    query: Tensor,            # [R, Hq, D] one query per branch row
    key: Tensor,              # [R, Hkv, D] the row's own key (its slot is not in the cache)
    value: Tensor,            # [R, Hkv, D]
    key_cache: Tensor,        # [num_blocks, block_size, Hkv, D]
    value_cache: Tensor,      # [num_blocks, block_size, Hkv, D]
    block_table: Tensor,      # [R, max_blocks] int: the block table row of each branch's request
    context_lens: Tensor,     # [R] cache positions 0..context_lens[r]-1 that row r attends to
    scale: float,
    rows_per_chunk: int = 16,
) -> Tensor:                  # [R, Hq, D]
    """Each row attends to the first context_lens[r] positions of its request's paged cache plus its own
    key/value: one step of a chain drafted along a branch, without writing the branch into the cache."""
    assert query.shape[1] % key_cache.shape[2] == 0, "Hq must be a multiple of Hkv"
    R = query.shape[0]
    acc = torch.promote_types(query.dtype, torch.float32)
    out = torch.empty_like(query)
    for s in range(0, R, rows_per_chunk):
        e = min(s + rows_per_chunk, R)
        ctx = context_lens[s:e].long()
        L = int(ctx.max()) if e > s else 0
        k = torch.cat([_gather_kv(key_cache, block_table[s:e], ctx, L), key[s:e, None]], dim=1).to(acc)
        v = torch.cat([_gather_kv(value_cache, block_table[s:e], ctx, L), value[s:e, None]], dim=1).to(acc)
        pos = torch.arange(L + 1, device=query.device)[None, :]
        mask = ((pos < ctx[:, None]) | (pos == L))[:, None, :]               # [r, 1, L+1]
        out[s:e] = _attend(query[s:e, None].to(acc), k, v, mask, scale)[:, 0].to(query.dtype)
    return out
