"""Top-k over a candidate subset of the LM head (SpecVocab step 2).

SpecVocab ("Speculative Decoding with a Speculative Vocabulary", arXiv 2602.13836) drafts
over a per-row candidate subset of the vocabulary: a cheap low-rank scorer picks C token ids
(see `vocab_select.py`) and only those C rows of the LM head are multiplied with the draft
hidden state. This module computes, for every batch row b:

    logits[b, j]  = <hidden[b], lm_head_weight[cand_ids[b, j]]>     (fp32 accumulation)
    logsumexp[b]  = log sum_j exp(logits[b, j])                      (over the subset only)
    topk          = the k largest logits[b, :], as vocabulary ids and as
                    log-probabilities logits - logsumexp[b]

so the draft distribution q(. | b) = softmax over the subset is exact, and q is zero for
every token outside the subset. Rejection sampling against the target stays lossless as
long as the sampler uses this same q (a token outside the subset simply has q = 0).

Conventions shared by the Triton kernel and the torch reference:
  * cand_ids must be duplicate-free per row (a duplicate would be counted twice in the
    normaliser). `select_candidates_reference` guarantees this.
  * Negative ids are padding: ignored for the normaliser and never returned.
    Ids >= V are a caller bug; the kernel masks them (to stay memory safe) while the
    reference raises an IndexError.
  * If a row has fewer than k valid candidates, the missing slots hold id -1 and
    log-probability -inf.
  * Tie rule: order by (logit descending, candidate position ascending). Equal logits are
    thus returned in the order they appear in cand_ids; as `select_candidates_reference`
    emits candidates by descending approximate score, the better approximate score wins.
    (Ties need bit-identical fp32 logits, e.g. duplicated weight rows; with random weights
    the kernel and the reference may round differently, so tests compare values with a
    tolerance and ids only where values are well separated.)

Memory: neither path ever allocates a [B, V] tensor. The reference gathers candidate rows
in bounded blocks; the Triton kernel keeps a [BLOCK_C] logit tile in registers and
writes only [B, num_tiles, k] partial results. (This is a property of the code, not
something a test can observe, hence stated here.)

`full_vocab_topk_reference` is the baseline being replaced: the whole [V, H] head,
a [B, V] logit matrix and torch.topk.
"""

from __future__ import annotations

import contextlib
import os

import torch

try:  # Triton is optional: without it every call goes to the torch reference.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None
    tl = None
    HAS_TRITON = False

# Triton decides at decoration time (i.e. when this module is imported) whether a kernel is
# compiled for a GPU or run by its numpy interpreter, so the dispatcher must remember which.
TRITON_INTERPRETED = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"

# Elements of candidate rows the reference gathers at once: (CPU, CUDA).
_REFERENCE_GATHER_ELEMENTS = (1 << 20, 1 << 26)


# ---------------------------------------------------------------------------------------
# Plain-torch references
# ---------------------------------------------------------------------------------------


def topk_lm_head_reference(
    hidden: torch.Tensor,  # [B, H] draft hidden states (any float dtype)
    lm_head_weight: torch.Tensor,  # [V, H] LM head, same dtype family as hidden
    cand_ids: torch.Tensor,  # [B, C] int32/int64 vocabulary ids, -1 = padding
    k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of the candidate-subset logits, normalised over the subset.

    Returns (topk_ids [B, k] int64, topk_logprobs [B, k] float32, logsumexp [B] float32).
    """
    _check_shapes(hidden, lm_head_weight, cand_ids, k)
    batch, hidden_size = hidden.shape
    num_cand = cand_ids.shape[1]
    device = hidden.device

    valid = cand_ids >= 0  # [B, C]
    safe_ids = cand_ids.long().clamp_min(0)  # [B, C]; padding reads row 0, masked below
    hidden_f32 = hidden.float()  # [B, H]
    logits = torch.empty(batch, num_cand, dtype=torch.float32, device=device)  # [B, C]

    # Gather the candidate rows in blocks of at most `budget` elements through one reused
    # buffer: on CPU a cache-sized block is consumed by the GEMV while still in cache
    # (several times faster than gathering [B, C, H] at once), on GPU it bounds memory.
    budget = _REFERENCE_GATHER_ELEMENTS[device.type == "cuda"]
    cand_per_block = max(1, min(num_cand, budget // hidden_size))
    rows_per_block = max(1, min(batch, budget // (cand_per_block * hidden_size)))
    gather_buf = torch.empty(rows_per_block * cand_per_block, hidden_size, dtype=lm_head_weight.dtype, device=device)
    for r0 in range(0, batch, rows_per_block):
        r1 = min(batch, r0 + rows_per_block)
        for c0 in range(0, num_cand, cand_per_block):
            c1 = min(num_cand, c0 + cand_per_block)
            block_ids = safe_ids[r0:r1, c0:c1].reshape(-1)  # [b * c]
            cand_rows = gather_buf[: block_ids.numel()]  # [b * c, H]
            torch.index_select(lm_head_weight, 0, block_ids, out=cand_rows)
            cand_rows = cand_rows.view(r1 - r0, c1 - c0, hidden_size).float()  # [b, c, H]
            logits[r0:r1, c0:c1] = torch.bmm(cand_rows, hidden_f32[r0:r1, :, None]).squeeze(-1)
    logits.masked_fill_(~valid, float("-inf"))

    lse = torch.logsumexp(logits, dim=-1)  # [B]; -inf for a row without valid candidates

    # A stable descending sort implements the tie rule: equal logits keep cand_ids order.
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)  # [B, C]
    kk = min(k, num_cand)
    top_logits, top_pos = sorted_logits[:, :kk], order[:, :kk]  # [B, kk]
    found = valid.gather(1, top_pos)  # [B, kk]
    topk_ids = torch.where(found, cand_ids.gather(1, top_pos).long(), -1)
    topk_logprobs = torch.where(found, top_logits - lse[:, None], float("-inf"))
    if kk < k:  # fewer candidates than k: pad the missing slots
        pad = k - kk
        topk_ids = torch.cat([topk_ids, topk_ids.new_full((batch, pad), -1)], dim=1)
        topk_logprobs = torch.cat(
            [topk_logprobs, topk_logprobs.new_full((batch, pad), float("-inf"))], dim=1
        )
    return topk_ids, topk_logprobs, lse


def full_vocab_topk_reference(
    hidden: torch.Tensor,  # [B, H]
    lm_head_weight: torch.Tensor,  # [V, H]
    k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Baseline: full LM head, [B, V] logits, log-softmax over the whole vocabulary, topk.

    The GEMM runs in the weights' dtype (as a serving engine would) and the [B, V] logits
    are then upcast to fp32. Ties follow torch.topk (unspecified).
    Returns (topk_ids [B, k] int64, topk_logprobs [B, k] float32, logsumexp [B] float32).
    """
    logits = torch.nn.functional.linear(hidden, lm_head_weight).float()  # [B, V]
    lse = torch.logsumexp(logits, dim=-1)  # [B]
    top_logits, top_ids = torch.topk(logits, k, dim=-1)  # [B, k]
    return top_ids, top_logits - lse[:, None], lse


def _check_shapes(hidden, lm_head_weight, cand_ids, k) -> None:
    if hidden.dim() != 2 or lm_head_weight.dim() != 2 or cand_ids.dim() != 2:
        raise ValueError("expected hidden [B, H], lm_head_weight [V, H], cand_ids [B, C]")
    if hidden.shape[1] != lm_head_weight.shape[1]:
        raise ValueError(f"hidden size mismatch: {hidden.shape[1]} vs {lm_head_weight.shape[1]}")
    if cand_ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"batch mismatch: cand_ids {cand_ids.shape[0]} vs hidden {hidden.shape[0]}")
    if cand_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cand_ids must be int32 or int64, got {cand_ids.dtype}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


# ---------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------
#
# Pass 1, grid (B, num_tiles): each program owns BLOCK_C candidates of one row. It gathers
# their weight rows H-chunk by H-chunk, accumulates fp32 logits [BLOCK_C], and writes
#   * the tile's softmax partials (max, sum exp(logit - max)), and
#   * the tile's top-k_tile (logit, candidate position) by repeated argmax.
# Pass 2, grid (B,): merges the num_tiles partials of a row into the logsumexp (online
# softmax) and the row's top-k (k rounds of "best entry after the previous pick").
#
# Candidate positions (0..C-1), not vocabulary ids, travel between the passes: they make
# the (logit desc, position asc) order total, which is what implements the tie rule and
# lets pass 2 select without any scratch "already taken" mask.
#
# Why per-row GEMV and not tl.dot: every row has its own candidate set, so gathered weight
# rows are not shared across the batch; the kernel is bound by reading B * C * H weights,
# and an fp32 multiply + row reduction is enough to stay at that bound.

if HAS_TRITON:

    @triton.jit
    def _candidate_tile_topk_kernel(
        hidden_ptr,  # [B, H] contiguous
        weight_ptr,  # [V, H] row stride = stride_wv, unit column stride
        cand_ptr,  # [B, C] int32/int64, row stride = stride_cb
        part_val_ptr,  # [B, num_tiles, k_tile] fp32 out: tile top-k logits
        part_pos_ptr,  # [B, num_tiles, k_tile] int32 out: their candidate positions (-1 = none)
        part_max_ptr,  # [B, num_tiles] fp32 out: max logit of the tile (-inf if empty)
        part_sumexp_ptr,  # [B, num_tiles] fp32 out: sum exp(logit - max(tile max, 0 if empty))
        H,
        V,
        C,
        stride_hb,
        stride_wv,
        stride_cb,
        num_tiles,
        k_tile,
        BLOCK_C: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        row = tl.program_id(0)
        tile = tl.program_id(1)
        row64 = row.to(tl.int64)  # B * stride products can exceed int32

        pos = tile * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C] candidate positions
        in_range = pos < C
        ids = tl.load(cand_ptr + row64 * stride_cb + pos, mask=in_range, other=-1).to(tl.int64)
        valid = in_range & (ids >= 0) & (ids < V)  # [BLOCK_C]
        weight_row_offsets = tl.where(valid, ids, 0) * stride_wv  # [BLOCK_C] int64

        h_offs = tl.arange(0, BLOCK_H)  # [BLOCK_H]
        x_ptrs = hidden_ptr + row64 * stride_hb + h_offs  # [BLOCK_H]
        w_ptrs = weight_ptr + weight_row_offsets[:, None] + h_offs[None, :]  # [BLOCK_C, BLOCK_H]
        logits = tl.zeros([BLOCK_C], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            h_mask = (h0 + h_offs) < H
            # Upcast on load: accumulation is fp32 whatever the storage dtype.
            x = tl.load(x_ptrs, mask=h_mask, other=0.0).to(tl.float32)  # [BLOCK_H]
            w = tl.load(w_ptrs, mask=valid[:, None] & h_mask[None, :], other=0.0)
            w = w.to(tl.float32)  # [BLOCK_C, BLOCK_H] gathered weight rows
            logits += tl.sum(w * x[None, :], axis=1)
            x_ptrs += BLOCK_H
            w_ptrs += BLOCK_H
        logits = tl.where(valid, logits, float("-inf"))  # [BLOCK_C]

        # Softmax partials. An all-padding tile has max -inf; shift by 0 instead so that
        # exp(-inf - shift) = 0 rather than NaN.
        tile_max = tl.max(logits, axis=0)
        shift = tl.where(tile_max == float("-inf"), 0.0, tile_max)
        tile_sumexp = tl.sum(tl.exp(logits - shift), axis=0)
        tile_index = row64 * num_tiles + tile
        tl.store(part_max_ptr + tile_index, tile_max)
        tl.store(part_sumexp_ptr + tile_index, tile_sumexp)

        # Tile top-k: repeated argmax, earliest position among equal logits.
        out_base = tile_index * k_tile
        for i in range(k_tile):
            best = tl.max(logits, axis=0)
            best_pos = tl.min(tl.where(logits == best, pos, C), axis=0)
            best_pos = tl.where(best == float("-inf"), -1, best_pos)  # nothing valid left
            tl.store(part_val_ptr + out_base + i, best)
            tl.store(part_pos_ptr + out_base + i, best_pos)
            logits = tl.where(pos == best_pos, float("-inf"), logits)

    @triton.jit
    def _merge_tiles_kernel(
        part_val_ptr,  # [B, n_partials] fp32 (n_partials = num_tiles * k_tile)
        part_pos_ptr,  # [B, n_partials] int32, -1 = empty slot
        part_max_ptr,  # [B, num_tiles] fp32
        part_sumexp_ptr,  # [B, num_tiles] fp32
        cand_ptr,  # [B, C] int32/int64
        out_ids_ptr,  # [B, k] int64 out
        out_logprobs_ptr,  # [B, k] fp32 out
        out_lse_ptr,  # [B] fp32 out
        C,
        stride_cb,
        num_tiles,
        n_partials,
        k,
        BLOCK_T: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        row = tl.program_id(0)
        row64 = row.to(tl.int64)

        # --- logsumexp over tiles: online rescaling to a running max --------------------
        run_max = tl.max(tl.full([BLOCK_T], float("-inf"), tl.float32), axis=0)  # scalar
        run_sum = tl.sum(tl.zeros([BLOCK_T], tl.float32), axis=0)  # scalar
        for t0 in range(0, num_tiles, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            t_mask = t < num_tiles
            tile_max = tl.load(part_max_ptr + row64 * num_tiles + t, mask=t_mask, other=float("-inf"))
            tile_sumexp = tl.load(part_sumexp_ptr + row64 * num_tiles + t, mask=t_mask, other=0.0)
            new_max = tl.maximum(run_max, tl.max(tile_max, axis=0))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            # Tiles stored sumexp relative to their own max. Empty tiles (and masked lanes)
            # contribute 0 explicitly: 0 * exp(0 - shift) would be NaN once exp overflows.
            tile_empty = tile_max == float("-inf")
            rescaled = tile_sumexp * tl.exp(tl.where(tile_empty, shift, tile_max) - shift)
            run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.where(tile_empty, 0.0, rescaled), axis=0)
            run_max = new_max
        # A row without valid candidates has run_sum = 0 and lse = -inf (clamped inside the
        # log only to keep the interpreter free of divide-by-zero warnings).
        shift = tl.where(run_max == float("-inf"), 0.0, run_max)
        lse = tl.where(run_sum > 0, shift + tl.log(tl.maximum(run_sum, 1e-30)), float("-inf"))
        tl.store(out_lse_ptr + row, lse)

        # --- top-k: k rounds, each taking the best entry strictly after the previous pick
        # in the total order (logit desc, position asc); no scratch mask needed.
        prev_val = tl.max(tl.full([BLOCK_P], float("inf"), tl.float32), axis=0)  # scalar +inf
        prev_pos = tl.min(tl.full([BLOCK_P], -1, tl.int32), axis=0)
        for i in range(k):
            best_val = tl.max(tl.full([BLOCK_P], float("-inf"), tl.float32), axis=0)
            best_pos = tl.max(tl.full([BLOCK_P], C, tl.int32), axis=0)  # C = "none found"
            for p0 in range(0, n_partials, BLOCK_P):
                p = p0 + tl.arange(0, BLOCK_P)
                p_mask = p < n_partials
                val = tl.load(part_val_ptr + row64 * n_partials + p, mask=p_mask, other=float("-inf"))
                cpos = tl.load(part_pos_ptr + row64 * n_partials + p, mask=p_mask, other=-1)
                after_prev = (val < prev_val) | ((val == prev_val) & (cpos > prev_pos))
                eligible = p_mask & (cpos >= 0) & after_prev
                val = tl.where(eligible, val, float("-inf"))
                chunk_best = tl.max(val, axis=0)
                chunk_pos = tl.min(tl.where(eligible & (val == chunk_best), cpos, C), axis=0)
                better = (chunk_best > best_val) | ((chunk_best == best_val) & (chunk_pos < best_pos))
                best_val = tl.where(better, chunk_best, best_val)
                best_pos = tl.where(better, chunk_pos, best_pos)
            found = best_pos < C
            vocab_id = tl.load(
                cand_ptr + row64 * stride_cb + tl.where(found, best_pos, 0), mask=found, other=-1
            ).to(tl.int64)
            tl.store(out_ids_ptr + row64 * k + i, tl.where(found, vocab_id, -1))
            logprob = tl.where(found, best_val, 0.0) - tl.where(found, lse, 0.0)  # no inf - inf
            tl.store(out_logprobs_ptr + row64 * k + i, tl.where(found, logprob, float("-inf")))
            prev_val = best_val
            prev_pos = best_pos


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _default_blocks(num_cand: int, hidden_size: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_H). Not tuned on a GPU yet; chosen from the sm_90 compile output."""
    if TRITON_INTERPRETED:
        # The interpreter pays per program and per op, not per element: few, wide programs.
        return min(256, max(16, _next_pow2(num_cand))), min(1024, max(16, _next_pow2(hidden_size)))
    # GPU: 16 candidates per program gives even B = 1 with C = 2048 128 programs, and the
    # pass is bandwidth bound, so parallelism matters more than per-program reuse. With
    # BLOCK_H = 512 and 4 warps each thread keeps eight 16-byte loads in flight (when H is
    # a multiple of 16, Triton then proves the gathered rows aligned and vectorises), at
    # ~96 registers and no spills for sm_90 (checked by tests/kernels, compile only).
    return 16, min(512, max(16, _next_pow2(hidden_size)))


def topk_lm_head_triton(
    hidden: torch.Tensor,  # [B, H]
    lm_head_weight: torch.Tensor,  # [V, H], unit stride along H (never copied)
    cand_ids: torch.Tensor,  # [B, C] int32/int64, -1 = padding
    k: int,
    *,
    block_c: int | None = None,  # candidates per program (power of two)
    block_h: int | None = None,  # hidden elements per inner step (power of two)
    merge_block: int | None = None,  # partials per step of the merge pass (power of two)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused candidate-subset LM head + top-k + logsumexp. Same contract as the reference."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use topk_lm_head() or the reference")
    _check_shapes(hidden, lm_head_weight, cand_ids, k)
    if not (hidden.device == lm_head_weight.device == cand_ids.device):
        raise ValueError("hidden, lm_head_weight and cand_ids must be on one device")
    if not triton_path_available(hidden.device):
        raise RuntimeError(
            f"no Triton path for {hidden.device} tensors: CPU needs TRITON_INTERPRET=1 set before "
            "vllm_specx.kernels.topk_lm_head is imported"
        )
    if lm_head_weight.stride(1) != 1:
        raise ValueError("lm_head_weight must have unit stride along H (it is never copied)")
    batch, hidden_size = hidden.shape
    vocab_size = lm_head_weight.shape[0]
    num_cand = cand_ids.shape[1]
    device = hidden.device

    topk_ids = torch.empty(batch, k, dtype=torch.int64, device=device)
    topk_logprobs = torch.empty(batch, k, dtype=torch.float32, device=device)
    lse = torch.empty(batch, dtype=torch.float32, device=device)
    if batch == 0:
        return topk_ids, topk_logprobs, lse
    if num_cand == 0:
        return topk_ids.fill_(-1), topk_logprobs.fill_(float("-inf")), lse.fill_(float("-inf"))

    hidden = hidden.contiguous()
    cand_ids = cand_ids.contiguous()
    default_c, default_h = _default_blocks(num_cand, hidden_size)
    block_c = block_c or default_c
    block_h = block_h or default_h
    num_tiles = triton.cdiv(num_cand, block_c)
    k_tile = min(k, block_c)  # a tile can never contribute more than its own size

    part_val = torch.empty(batch, num_tiles, k_tile, dtype=torch.float32, device=device)
    part_pos = torch.empty(batch, num_tiles, k_tile, dtype=torch.int32, device=device)
    part_max = torch.empty(batch, num_tiles, dtype=torch.float32, device=device)
    part_sumexp = torch.empty(batch, num_tiles, dtype=torch.float32, device=device)

    n_partials = num_tiles * k_tile
    # Launch on the tensors' GPU, not whichever is current (no-op for the interpreter).
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _candidate_tile_topk_kernel[(batch, num_tiles)](
            hidden, lm_head_weight, cand_ids,
            part_val, part_pos, part_max, part_sumexp,
            hidden_size, vocab_size, num_cand,
            hidden.stride(0), lm_head_weight.stride(0), cand_ids.stride(0),
            num_tiles, k_tile,
            BLOCK_C=block_c, BLOCK_H=block_h,
            num_warps=4,
        )  # fmt: skip
        # Pass 2 runs k dependent rounds over the B * n_partials partials; at B = 1 and
        # k ~ 8 that is likely comparable to pass 1 (unmeasured). If it shows up in
        # profiles, a packed (logit, position) int64 key and one tl.sort is the next step.
        _merge_tiles_kernel[(batch,)](
            part_val, part_pos, part_max, part_sumexp, cand_ids,
            topk_ids, topk_logprobs, lse,
            num_cand, cand_ids.stride(0), num_tiles, n_partials, k,
            BLOCK_T=merge_block or min(1024, _next_pow2(num_tiles)),
            BLOCK_P=merge_block or min(1024, _next_pow2(n_partials)),
            num_warps=4,
        )  # fmt: skip
    return topk_ids, topk_logprobs, lse


# ---------------------------------------------------------------------------------------
# Dispatcher
# ---------------------------------------------------------------------------------------


def triton_path_available(device: torch.device | str) -> bool:
    """True when topk_lm_head() would run the Triton kernel for tensors on `device`.

    CUDA tensors use the compiled kernel; CPU tensors use the interpreter only if
    TRITON_INTERPRET=1 was set before this module was imported (Triton reads it when the
    kernels are decorated).
    """
    device = torch.device(device)
    return HAS_TRITON and (device.type == "cuda" or TRITON_INTERPRETED)


def topk_lm_head(
    hidden: torch.Tensor,  # [B, H]
    lm_head_weight: torch.Tensor,  # [V, H]
    cand_ids: torch.Tensor,  # [B, C]
    k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(topk_ids [B, k] int64, topk_logprobs [B, k] fp32, logsumexp [B] fp32), via Triton
    when available for the tensors' device, else via the torch reference."""
    if triton_path_available(hidden.device):
        return topk_lm_head_triton(hidden, lm_head_weight, cand_ids, k)
    return topk_lm_head_reference(hidden, lm_head_weight, cand_ids, k)
