"""select_candidates_reference: top-C by low-rank score, forced ids, uniqueness, and the
end-to-end SpecVocab draft step (selection -> exact subset top-k)."""

from __future__ import annotations

import pytest
import torch

from vllm_specx.kernels import vocab_select as vs
from vllm_specx.kernels.topk_lm_head import full_vocab_topk_reference, topk_lm_head


def make_projections(batch, hidden, rank, vocab, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, hidden, generator=g).to(dtype)  # [B, H]
    proj_a = (torch.randn(hidden, rank, generator=g) / hidden**0.5).to(dtype)  # [H, r]
    proj_b = (torch.randn(vocab, rank, generator=g) / rank**0.5).to(dtype)  # [V, r]
    return h, proj_a, proj_b


def brute_force_scores(h, proj_a, proj_b):
    return (h.double() @ proj_a.double()) @ proj_b.double().T  # [B, V]


@pytest.mark.parametrize(
    "batch,hidden,rank,vocab,num_cand",
    [(1, 576, 64, 32003, 2048), (7, 1000, 96, 49152, 513), (64, 256, 128, 131072, 1024)],
)
def test_selects_the_top_c_low_rank_scores(batch, hidden, rank, vocab, num_cand):
    h, proj_a, proj_b = make_projections(batch, hidden, rank, vocab, seed=batch)
    cand = vs.select_candidates_reference(h, proj_a, proj_b, num_cand)
    assert cand.shape == (batch, num_cand) and cand.dtype == torch.int64
    assert (cand >= 0).all() and (cand < vocab).all()

    scores = brute_force_scores(h, proj_a, proj_b)  # [B, V] fp64
    expected_sorted = scores.topk(num_cand, dim=-1).values  # [B, C]
    got_scores = scores.gather(1, cand)  # [B, C]
    # Same multiset of scores as the exact top-C (fp32 vs fp64 rounding tolerated) ...
    torch.testing.assert_close(got_scores, expected_sorted, atol=1e-4, rtol=1e-5)
    # ... emitted best first.
    assert (got_scores[:, :-1] >= got_scores[:, 1:] - 1e-4).all()


@pytest.mark.parametrize("batch,vocab,num_cand", [(1, 49152, 2048), (5, 32003, 777), (3, 100, 100), (2, 50, 1)])
def test_unordered_selection_is_the_same_set(batch, vocab, num_cand):
    """ordered=False (the serving path: numpy introselect on CPU) returns the top-C set in any order."""
    scores = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(vocab))
    ordered = vs.top_candidates(scores.clone(), num_cand)
    unordered = vs.top_candidates(scores.clone(), num_cand, ordered=False)
    assert unordered.shape == ordered.shape and unordered.dtype == torch.int64
    assert torch.equal(unordered.sort(dim=-1).values, ordered.sort(dim=-1).values)


@pytest.mark.parametrize("batch,vocab,num_cand", [(1, 1000, 1000), (5, 32003, 777), (64, 5000, 4999)])
def test_candidates_are_unique_per_row(batch, vocab, num_cand):
    h, proj_a, proj_b = make_projections(batch, 64, 16, vocab, seed=vocab)
    cand = vs.select_candidates_reference(h, proj_a, proj_b, num_cand)
    for row in cand:
        assert row.unique().numel() == num_cand


def test_always_include_forces_ids_in_first_with_padding_and_duplicates():
    batch, vocab, num_cand = 3, 20000, 64
    h, proj_a, proj_b = make_projections(batch, 128, 32, vocab, seed=4)
    scores = brute_force_scores(h, proj_a, proj_b)
    worst = scores.argsort(dim=-1)[:, :3]  # [B, 3] the lowest-scoring ids of each row
    forced = torch.cat([worst, torch.full((batch, 2), -1), worst[:, :1]], dim=1)  # padding + duplicate
    forced[1, 0] = -1  # row 1 forces one id fewer
    cand = vs.select_candidates_reference(h, proj_a, proj_b, num_cand, always_include=forced)
    for b in range(batch):
        wanted = {int(v) for v in forced[b] if v >= 0}
        assert set(cand[b, : len(wanted)].tolist()) == wanted  # forced ids lead the row
        assert cand[b].unique().numel() == num_cand
        # The rest is the top of the remaining scores.
        rest = scores[b].clone()
        rest[list(wanted)] = float("-inf")
        expected = set(rest.topk(num_cand - len(wanted)).indices.tolist())
        assert set(cand[b, len(wanted) :].tolist()) == expected


def test_always_include_validation():
    h, proj_a, proj_b = make_projections(2, 32, 8, 100)
    with pytest.raises(ValueError):
        vs.select_candidates_reference(h, proj_a, proj_b, 4, always_include=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError):
        vs.select_candidates_reference(h, proj_a, proj_b, 4, always_include=torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError):
        vs.select_candidates_reference(h, proj_a, proj_b, 101)
    with pytest.raises(ValueError):
        vs.select_candidates_reference(h, proj_a[:16], proj_b, 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_projections_are_scored_in_fp32_chunk_by_chunk(monkeypatch, dtype):
    """The chunked fp32 upcast of a 16-bit proj_b (bounded memory) equals scoring the
    upcast tensors in one go; a tiny chunk forces a ragged multi-chunk loop."""
    h, proj_a, proj_b = make_projections(4, 200, 24, 3001, dtype=dtype, seed=9)
    monkeypatch.setattr(vs, "_UPCAST_CHUNK_ELEMENTS", 24 * 500)
    chunked = vs.lowrank_scores_reference(h, proj_a, proj_b)
    whole = vs.lowrank_scores_reference(h.float(), proj_a.float(), proj_b.float())
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


def test_end_to_end_draft_step_recovers_full_vocab_topk_with_an_exact_factorisation():
    """With proj = an exact factorisation of the head (r = H), the top-C candidates contain
    the true top-k, so subset top-k ids equal the full-vocabulary ones and the log-probs
    differ by exactly the normaliser gap lse_full - lse_subset >= 0."""
    batch, hidden, vocab, num_cand, k = 5, 48, 6007, 300, 8
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(vocab, hidden, generator=g) / hidden**0.5  # [V, H]
    h = 3.0 * torch.randn(batch, hidden, generator=g)  # [B, H]
    proj_a, proj_b = torch.eye(hidden), weight  # W = proj_b @ proj_a^T exactly

    cand = vs.select_candidates_reference(h, proj_a, proj_b, num_cand)
    ids, logprobs, lse = topk_lm_head(h, weight, cand, k)
    full_ids, full_logprobs, full_lse = full_vocab_topk_reference(h, weight, k)

    assert torch.equal(ids, full_ids)
    assert (full_lse >= lse - 1e-5).all()
    torch.testing.assert_close(logprobs - full_logprobs, (full_lse - lse)[:, None].expand(-1, k), atol=1e-4, rtol=0)
