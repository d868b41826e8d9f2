"""core.spec_vocab: subset heads against the full head, scatter edge cases, projection init/training."""

import math

import pytest
import torch

from vllm_specx.core import spec_vocab as S
from vllm_specx.core.early_stop import topk_and_entropy
from vllm_specx.kernels.vocab_select import select_candidates_reference


def _head(v=1000, h=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(v, h, generator=g), torch.randn(5, h, generator=g)


def test_full_rank_svd_projection_scores_are_the_exact_logits():
    w, x = _head(300, 24)
    a, b = S.svd_projection(w, 24)
    torch.testing.assert_close((x @ a) @ b.T, x @ w.T, rtol=1e-4, atol=1e-3)
    # lower rank: strictly worse than full rank, and still the best rank-r fit (error = tail singulars)
    a8, b8 = S.svd_projection(w, 8)
    s = torch.linalg.svdvals(w)
    assert torch.linalg.norm(w - b8 @ a8.T) == pytest.approx(float(s[8:].pow(2).sum().sqrt()), rel=1e-3)
    with pytest.raises(ValueError, match="rank"):
        S.svd_projection(w, 0)


def test_speculative_head_with_every_token_a_candidate_equals_the_full_head():
    w, x = _head()
    a, b = S.svd_projection(w, 16)
    out = S.speculative_vocab_logprobs(x, w, a, b, num_candidates=w.shape[0], k=8)  # [B, V]
    full = torch.log_softmax(x @ w.T, dim=-1)
    top_lp, top_ids = full.topk(8, dim=-1)
    assert torch.equal(out.topk(8, dim=-1).indices, top_ids)
    torch.testing.assert_close(out.gather(1, top_ids), top_lp, rtol=1e-4, atol=1e-4)
    assert int(torch.isfinite(out).sum()) == 5 * 8  # only the k kept entries are finite


def test_early_stop_summary_of_the_kept_logprobs_equals_that_of_the_whole_row():
    """Early stop summarises the head's k finite log-probs instead of scanning the [B, V] row."""
    w, x = _head()
    a, b = S.svd_projection(w, 8)
    row, topk = S.speculative_vocab_logprobs(x, w, a, b, num_candidates=40, k=6, with_topk=True)
    assert torch.equal(row, S.speculative_vocab_logprobs(x, w, a, b, num_candidates=40, k=6))
    assert torch.equal(row.topk(6, dim=-1).values, topk)
    for got, want in zip(S.summarise_logprobs(topk), S.summarise_logprobs(row)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_speculative_head_normalises_over_the_candidates_not_the_vocabulary():
    w, x = _head()
    a, b = S.svd_projection(w, 4)  # a poor projection: candidates miss some full-head winners
    cand = select_candidates_reference(x, a, b, 50)
    out = S.speculative_vocab_logprobs(x, w, a, b, num_candidates=50, k=50)
    subset = torch.log_softmax((x @ w.T).gather(1, cand), dim=-1)
    torch.testing.assert_close(out.gather(1, cand), subset, rtol=1e-4, atol=1e-4)
    assert torch.allclose(out.exp().sum(-1), torch.ones(5), atol=1e-4)  # k = C: a full distribution


def test_fixed_head_is_the_softmax_over_the_fixed_ids():
    w, x = _head()
    ids = torch.arange(0, 1000, 3)
    out = S.fixed_vocab_logprobs(x, w[ids], ids, 1000)
    torch.testing.assert_close(out[:, ids], torch.log_softmax(x @ w[ids].T, -1))
    mask = torch.ones(1000, dtype=torch.bool)
    mask[ids] = False
    assert torch.isneginf(out[:, mask]).all()
    everything = S.fixed_vocab_logprobs(x, w, torch.arange(1000), 1000)
    torch.testing.assert_close(everything, torch.log_softmax(x @ w.T, -1))


def test_fixed_vocab_takes_the_most_frequent_ids_and_forced_ones():
    counts = torch.tensor([5, 0, 9, 1, 7, 0, 3])
    assert S.fixed_vocab_from_counts(counts, 3).tolist() == [0, 2, 4]
    assert S.fixed_vocab_from_counts(counts, 3, always_include=[5]).tolist() == [2, 4, 5]
    with pytest.raises(ValueError, match="size"):
        S.fixed_vocab_from_counts(counts, 8)


def test_scatter_keeps_real_entries_whatever_the_empty_slots():
    ids = torch.tensor([[0, 3, -1, -1], [-1, -1, -1, -1], [2, 0, 1, -1]])
    lp = torch.tensor([[-0.5, -1.0, -math.inf, -math.inf], [-math.inf] * 4, [-0.1, -2.0, -3.0, -math.inf]])
    out = S.scatter_logprobs(ids, lp, 5)
    assert out[0].tolist() == [-0.5, -math.inf, -math.inf, -1.0, -math.inf]
    assert torch.isneginf(out[1]).all()
    assert out[2].tolist() == pytest.approx([-2.0, -3.0, -0.1, -math.inf, -math.inf])


def test_summary_of_a_full_distribution_matches_the_softmax_summary():
    logits = torch.randn(4, 30)
    top, ent = S.summarise_logprobs(torch.log_softmax(logits, -1), k=2)
    top_ref, ent_ref = topk_and_entropy(logits, k=2)
    torch.testing.assert_close(top, top_ref)
    torch.testing.assert_close(ent, ent_ref)


def test_summary_of_a_truncated_row_keeps_true_probabilities_and_lumps_the_tail():
    p = torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.1]])
    kept = torch.full((1, 5), -math.inf)
    kept[0, :2] = p[0, :2].log()  # top-2 of the distribution kept, 0.3 missing
    top, ent = S.summarise_logprobs(kept, k=2)
    torch.testing.assert_close(top, torch.tensor([[0.5, 0.2]]))
    expected = -(0.5 * math.log(0.5) + 0.2 * math.log(0.2) + 0.3 * math.log(0.3))
    assert float(ent) == pytest.approx(expected, rel=1e-5)
    true_entropy = float(-(p * p.log()).sum())
    assert float(ent) < true_entropy  # a lower bound


def test_projection_training_lifts_recall_of_the_teacher_tokens():
    """A projection that starts blind (random) learns to put the teacher's token in the top C."""
    from vllm_specx.training.vocab_fit import fit_projection

    g = torch.Generator().manual_seed(1)
    v, h, r, n = 200, 32, 8, 1000
    # a head whose logits are nearly rank r (as real LM heads are, approximately): learnable
    w = torch.randn(v, r, generator=g) @ torch.randn(r, h, generator=g) + 0.1 * torch.randn(v, h, generator=g)
    x = torch.randn(n, h, generator=g)
    logits = x @ w.T
    t_lp, t_ids = torch.log_softmax(logits, -1).topk(4, dim=-1)
    states = {"hidden": x, "draft_ids": t_ids, "draft_lp": t_lp, "target_ids": t_ids, "target_lp": t_lp}
    a0, b0 = torch.randn(h, r, generator=g), torch.randn(v, r, generator=g)

    def recall(a, b):
        return S.candidate_recall(select_candidates_reference(x[:500], a, b, 20), t_ids[:500, 0])

    before = recall(a0, b0)
    a, b, curve = fit_projection(states, a0, b0, steps=80, lr=5e-2, batch=256, seed=0)
    assert curve[-1] < curve[0]
    assert before < 0.2 and recall(a, b) > 0.8, (before, recall(a, b))


def test_recall_report_weights_every_state_once():
    """Chunks of unequal size: the report is the recall over all states, not the mean of chunk means."""
    from vllm_specx.training.vocab_fit import recall_report

    v, h = 50, 8
    a, b = torch.eye(h), torch.zeros(v, h)
    b[:h] = torch.eye(h)  # ids 0..7 score by their own hidden coordinate; 8.. score 0
    hidden = torch.full((5, h), -1.0)
    hidden[:, 0] = 1.0  # top-1 candidate: id 0
    wanted = torch.tensor([0, 0, 0, 0, 9])  # first chunk (4 rows) all hits, last chunk (1 row) a miss
    states = {"hidden": hidden, "draft_ids": wanted[:, None], "target_ids": wanted[:, None]}
    rep = recall_report(states, a, b, num_candidates=1, chunk=4)
    assert rep["draft_top1_in_candidates"] == pytest.approx(0.8)  # chunk means would give 0.5
