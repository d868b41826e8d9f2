"""Draft LM head over a vocabulary subset: SpecVocab (per-step predicted subset) and the fixed
reduced vocabulary it is compared with (EAGLE-3 / FR-Spec style). Engine-free: tensors in, tensors out.

Three modes of the drafter's head, one switch (`vocab_mode` in specx_config.json):
  full         exact logits over all V tokens (the drafter as trained);
  fixed        exact logits over a fixed id set chosen once from token frequencies (size N);
  speculative  per draft step, a low-rank projection scores all V tokens approximately,
               the top C become the candidate set, exact logits are computed for those C only
               (`kernels.topk_lm_head`), and the top k are returned.

Every mode returns *log-probabilities of the distribution the drafter proposes from*, scattered into
a [B, V] tensor with -inf outside the subset (`scatter_logprobs`): the proposer's argmax is exact, and
a proposer that samples draft tokens from softmax(row) samples from exactly the q it then reports to
the rejection sampler. Drafts are only proposals, so every mode is lossless; a mode can only change
how often they are accepted.

Speculative mode keeps only the top k of the C exact log-probabilities (normalised over all C), so the
row sums to <= 1. `summarise_logprobs` reads the step's top probabilities and entropy from such a row
without renormalising (the missing mass is counted as one lumped outcome).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vllm_specx.core.early_stop import top_probs_and_entropy
from vllm_specx.kernels.topk_lm_head import topk_lm_head, topk_lm_head_reference
from vllm_specx.kernels.vocab_select import lowrank_scores_reference, top_candidates


def svd_projection(lm_head_weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r factorisation W ~= proj_b @ proj_a^T (Eckart-Young), the projection's initial value.

    lm_head_weight [V, H] -> proj_a [H, r] (right singular vectors scaled by sigma), proj_b [V, r].
    """
    if not 1 <= rank <= min(lm_head_weight.shape):
        raise ValueError(f"rank must be in [1, {min(lm_head_weight.shape)}], got {rank}")
    w = lm_head_weight.float()
    # Randomised SVD would do for large V; the full one on [V, H] is fine at the sizes trained here.
    u, s, vh = torch.linalg.svd(w, full_matrices=False)  # u [V, H], s [H], vh [H, H]
    proj_a = (vh[:rank].T * s[:rank]).contiguous()  # [H, r]
    proj_b = u[:, :rank].contiguous()  # [V, r]
    return proj_a, proj_b


def fixed_vocab_from_counts(counts: torch.Tensor, size: int, always_include: list[int] = ()) -> torch.Tensor:
    """The `size` most frequent token ids (FR-Spec's choice of a reduced draft vocabulary), with
    `always_include` (e.g. EOS) forced in. counts [V] -> ids [size] int64, sorted ascending."""
    vocab_size = counts.shape[0]
    if not 1 <= size <= vocab_size:
        raise ValueError(f"fixed vocabulary size must be in [1, {vocab_size}], got {size}")
    score = counts.double().clone()
    forced = torch.tensor(list(always_include), dtype=torch.long)
    if forced.numel():
        score[forced] = float("inf")
    ids = torch.topk(score, size, sorted=False).indices  # ties: unspecified but deterministic on CPU
    return ids.sort().values


def scatter_logprobs(ids: torch.Tensor, logprobs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """ids/logprobs [B, k] (id -1 = empty slot) -> [B, V] fp32, -inf outside the given ids."""
    out = torch.full((ids.shape[0], vocab_size), float("-inf"), dtype=torch.float32, device=ids.device)
    # Empty slots (always after the real ones) rewrite the row's first entry with its own value, so
    # no scatter order can clobber a real entry; a row with no entry at all writes -inf to column 0.
    valid = ids >= 0
    ids = torch.where(valid, ids, ids[:, :1]).clamp_min(0)
    logprobs = torch.where(valid, logprobs, logprobs[:, :1]).float()
    return out.scatter_(1, ids, logprobs)


def fixed_vocab_logprobs(
    hidden: torch.Tensor,  # [B, H] normed draft hidden states
    fixed_weight: torch.Tensor,  # [N, H] the LM-head rows of the fixed ids (gathered once)
    fixed_ids: torch.Tensor,  # [N] int64
    vocab_size: int,
    linear: Callable[[torch.Tensor], torch.Tensor] | None = None,  # x -> x @ fixed_weight.T (a faster GEMM)
) -> torch.Tensor:  # [B, V] log-probs over the fixed set, -inf elsewhere
    logits = (linear(hidden) if linear is not None else torch.nn.functional.linear(hidden, fixed_weight)).float()
    out = torch.full((hidden.shape[0], vocab_size), float("-inf"), dtype=torch.float32, device=hidden.device)
    out[:, fixed_ids] = torch.log_softmax(logits, dim=-1)
    return out


def speculative_vocab_logprobs(
    hidden: torch.Tensor,  # [B, H] normed draft hidden states
    lm_head_weight: torch.Tensor,  # [V, H]
    proj_a: torch.Tensor,  # [H, r]
    proj_b: torch.Tensor,  # [V, r]
    num_candidates: int,  # C
    k: int,  # log-probs kept per row
    score: Callable[[torch.Tensor], torch.Tensor] | None = None,  # z [B, r] -> z @ proj_b.T (a faster GEMM)
    compiled_kernel_only: bool = False,  # never the Triton *interpreter* (a test device, far too slow to serve)
    with_topk: bool = False,  # also return the k log-probs [B, k] (the row's finite entries, unscattered)
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # [B, V]: top-k log-probs (normalised over the C candidates), -inf elsewhere
    if score is None:
        scores = lowrank_scores_reference(hidden, proj_a, proj_b)  # [B, V]
    else:
        scores = score(hidden.float() @ proj_a.float()).float()  # z [B, r] through the caller's GEMM
    cand_ids = top_candidates(scores, num_candidates, ordered=False)  # [B, C], a set: order is irrelevant
    subset_topk = topk_lm_head_reference if compiled_kernel_only and hidden.device.type != "cuda" else topk_lm_head
    ids, logprobs, _ = subset_topk(hidden, lm_head_weight, cand_ids, k)  # [B, k] each
    row = scatter_logprobs(ids, logprobs, lm_head_weight.shape[0])
    return (row, logprobs) if with_topk else row


def summarise_logprobs(logprobs: torch.Tensor, k: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k probabilities [B, k] and entropy [B] of a row of log-probs that may sum to < 1.

    Unlike softmax-based summaries this does not renormalise: the missing mass 1 - sum(p) is one
    lumped outcome in the entropy (a lower bound of the true entropy) and is never a top-k entry.
    """
    lp = logprobs.float()
    top, ent = top_probs_and_entropy(lp, k)
    rest = (1.0 - lp.exp().sum(-1)).clamp_min(0.0)
    ent = ent - torch.where(rest > 0, rest * rest.clamp_min(1e-30).log(), torch.zeros_like(rest))
    return top, ent


def projection_loss(
    hidden: torch.Tensor,  # [N, H] normed draft hidden states
    proj_a: torch.Tensor,  # [H, r]
    proj_b: torch.Tensor,  # [V, r]
    teacher_ids: torch.Tensor,  # [N, t] tokens the candidate set must contain
    teacher_logprobs: torch.Tensor,  # [N, t] their (unnormalised) log-weights
) -> torch.Tensor:
    """Auxiliary loss of the vocabulary projection: cross-entropy of softmax(low-rank scores) to the
    teacher distribution renormalised over its t tokens. Training pushes the teacher's likely tokens
    to the top of the approximate scores, which is what top-C selection needs (a ranking loss would
    also do; this one is the KL the drafter itself is trained with, so it shares its scale)."""
    scores = (hidden.float() @ proj_a.float()) @ proj_b.float().T  # [N, V]
    logq = torch.log_softmax(scores, dim=-1).gather(-1, teacher_ids)  # [N, t]
    p = torch.softmax(teacher_logprobs.float(), dim=-1)
    return -(p * logq).sum(-1).mean()


@torch.no_grad()
def candidate_recall(cand_ids: torch.Tensor, wanted: torch.Tensor) -> float:
    """Fraction of rows whose `wanted` id [N] is among cand_ids [N, C]."""
    return float((cand_ids == wanted[:, None]).any(-1).float().mean()) if wanted.numel() else float("nan")
