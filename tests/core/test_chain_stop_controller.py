"""The per-request draft-length controller used inside vLLM, driven by synthetic draft steps."""

import math

import pytest
import torch

from vllm_specx.core.early_stop import FEATURE_NAMES, DraftLengthPolicy, train_early_stop
from vllm_specx.vllm_adapter.draft_length import ChainStopController, _AllStopped


@pytest.fixture(scope="module")
def confidence_model():
    """Acceptance probability ~ top-1 probability (learned from synthetic Bernoulli labels)."""
    g = torch.Generator().manual_seed(0)
    feats = torch.rand(4000, len(FEATURE_NAMES), generator=g) * torch.tensor([1, 1, 1, 10, 5, -20.0])
    labels = torch.bernoulli(feats[:, 0], generator=g)
    model, report = train_early_stop(feats, labels, kind="mlp", epochs=30, seed=0)
    assert report["auc"] > 0.7
    return model


def _logits(top1_probs):  # [B] -> [B, V] logits whose softmax has that top-1 probability
    v = 50
    p = torch.tensor(top1_probs)[:, None]
    probs = torch.cat([p, (1 - p).expand(-1, v - 1) / (v - 1)], dim=1)
    return probs.log()


def test_requests_stop_at_their_own_depth_and_the_loop_ends_when_all_stop(confidence_model):
    ctl = ChainStopController(DraftLengthPolicy(4, confidence_model), None, lambda b: 0.3)
    ctl.begin(armed=True)
    hidden = torch.randn(3, 8)
    ctl.observe(hidden, _logits([0.95, 0.95, 0.1]))  # request 2 stops at depth 0
    ctl.observe(hidden, _logits([0.95, 0.1, 0.1]))  # request 1 stops at depth 1
    with pytest.raises(_AllStopped) as stop:
        ctl.observe(hidden, _logits([0.1, 0.1, 0.1]))  # request 0 stops at depth 2: all stopped
    assert stop.value.tokens.shape == (3, 2)  # tokens of depths 0..1, the longest kept
    assert ctl.finish() == [2, 1, 0]
    assert ctl.finish() is None  # consumed: a step without drafting never reuses old lengths


@pytest.mark.parametrize("sibling_threshold, expect_tree", [(0.05, True), (0.5, False)])
def test_siblings_are_collected_only_when_a_threshold_lets_one_pay(confidence_model, sibling_threshold,
                                                                  expect_tree):
    """Runner-up gain = path_prob * q <= 1/2: at a node threshold >= 1/2 trees cannot grow, so the controller
    skips their bookkeeping; below it, the same step yields a tree with a sibling at depth 0."""
    ctl = ChainStopController(DraftLengthPolicy(2, confidence_model), None, lambda b: 0.3, max_siblings=2,
                              sibling_threshold_for_batch=lambda b: sibling_threshold)
    ctl.begin(armed=True)
    probs = torch.full((1, 50), 0.1 / 48)
    probs[0, 7], probs[0, 3] = 0.45, 0.45  # a near tie: the runner-up (id 3) is as likely as the top token
    ctl.observe(torch.randn(1, 8), probs.log())
    try:
        ctl.observe(torch.randn(1, 8), probs.log())
    except _AllStopped:
        pass
    ctl.finish()
    trees = ctl._trees
    if expect_tree:
        assert trees is not None and 3 in trees[0][0]  # the runner-up is a node of the tree
    else:
        assert trees is None and ctl._sibs == []


def test_unarmed_controller_changes_nothing(confidence_model):
    ctl = ChainStopController(DraftLengthPolicy(4, confidence_model), None, lambda b: 0.3)
    ctl.begin(armed=False)  # e.g. probabilistic drafts: fixed K
    ctl.observe(torch.randn(2, 8), _logits([0.1, 0.1]))
    assert ctl.finish() is None


def test_threshold_follows_batch_size(confidence_model):
    """A higher node threshold (bigger batch) keeps fewer tokens for the same drafts."""
    kept = {}
    for batch_threshold in (0.2, 0.9):
        ctl = ChainStopController(DraftLengthPolicy(3, confidence_model), None, lambda b, t=batch_threshold: t)
        ctl.begin(armed=True)
        try:
            for _ in range(3):
                ctl.observe(torch.randn(1, 8), _logits([0.8]))
        except _AllStopped:
            pass
        kept[batch_threshold] = ctl.finish()[0]
    assert kept[0.2] > kept[0.9]


def _one_step(ctl, req_ids, top1, num_sampled, k):
    """One engine step as vLLM drives it: feedback for the step just verified, then k draft steps."""
    ctl.feedback(req_ids, num_sampled)
    ctl.begin(armed=True)
    try:
        for _ in range(k):
            ctl.observe(torch.randn(len(req_ids), 8), _logits(top1))
    except _AllStopped:
        pass
    return ctl.finish()


def test_request_whose_drafts_were_all_rejected_drafts_less_next_step(confidence_model):
    """Same confident drafts every step; request "a" had all its drafts rejected, "b" all accepted."""
    from vllm_specx.core.early_stop import OnlineAcceptCalibration

    k = 5
    ctl = ChainStopController(DraftLengthPolicy(k, confidence_model), None, lambda b: 0.3, OnlineAcceptCalibration())
    first = _one_step(ctl, ["a", "b"], [0.97, 0.97], [1, 1], k)  # prefill: nothing verified yet
    assert first[0] == first[1] and first[0] >= 3
    second = _one_step(ctl, ["a", "b"], [0.97, 0.97], [1, first[1] + 1], k)  # a: 0 accepted; b: all
    assert second[0] < first[0], (first, second)
    assert second[1] == first[1]
    # a keeps being rejected: it stays short (evidence decays, so it never locks at zero for good)
    lengths = [_one_step(ctl, ["a"], [0.97], [1], k)[0] for _ in range(12)]
    assert max(lengths) < first[0] and lengths[-1] <= lengths[0], lengths
    # ... and once its drafts are accepted again it drafts long again
    again = [lengths[-1]]
    for _ in range(8):  # every kept draft accepted: num_sampled = kept + 1
        again.append(_one_step(ctl, ["a"], [0.97], [again[-1] + 1], k)[0])
    assert again[-1] == first[0], again
    # without calibration the same history changes nothing
    plain = ChainStopController(DraftLengthPolicy(k, confidence_model), None, lambda b: 0.3)
    assert _one_step(plain, ["a"], [0.97], [1], k) == _one_step(plain, ["a"], [0.97], [1], k) == [first[0]]


def test_online_calibration_forgets_finished_requests():
    from vllm_specx.core.early_stop import OnlineAcceptCalibration

    cal = OnlineAcceptCalibration(decay=0.5, prior=1.0)
    cal.update(["a", "b"], [0, 3], [3.0, 3.0])
    s = cal.scales(["a", "b"])
    assert s[0] == pytest.approx(1 / 4) and s[1] == pytest.approx(1.0)
    cal.update(["b"], [0], [0.0])  # "a" finished
    assert cal.scales(["a"]).item() == 1.0 and set(cal._sums) == {"b"}
    with pytest.raises(ValueError):
        OnlineAcceptCalibration(decay=1.0)


def test_shared_calibration_starts_new_requests_from_the_engine_wide_ratio():
    from vllm_specx.core.early_stop import OnlineAcceptCalibration

    own = OnlineAcceptCalibration(decay=0.5, prior=1.0)
    shared = OnlineAcceptCalibration(decay=0.5, prior=1.0, shared_decay=0.5)
    for cal in (own, shared):  # two requests' drafts earned a third of what was expected
        cal.update(["a", "b"], [1, 1], [3.0, 3.0])
    assert own.scales(["new"]).item() == 1.0 and own.centre() == 1.0
    centre = (2 + 1) / (6 + 1)
    assert shared.centre() == pytest.approx(centre) and shared.scales(["new"]).item() == pytest.approx(centre)
    # a request's own evidence moves it away from the centre: "a" then accepted all it was expected to
    shared.update(["a", "b"], [3, 0], [3.0, 0.0])
    a_sums = (1 * 0.5 + 3, 3.0 * 0.5 + 3)
    centre = (2 * 0.5 + 3 + 1) / (6 * 0.5 + 3 + 1)
    assert shared.scales(["a"]).item() == pytest.approx((a_sums[0] + centre) / (a_sums[1] + 1))
    # steps that verified nothing leave the engine-wide ratio where it is (requests' own sums decay)
    before = shared.centre()
    for _ in range(5):
        shared.update(["a", "b"], [0, 0], [0.0, 0.0])
    assert shared.centre() == before and shared.scales(["a"]).item() == pytest.approx(before, rel=0.05)
    with pytest.raises(ValueError):
        OnlineAcceptCalibration(shared_decay=1.0)


def test_lookup_chains_of_an_over_confident_table_stop_once_the_engine_has_seen_them_rejected(confidence_model):
    """At a high node threshold (large batch) a chain the table rates 0.9 per token is kept until the
    engine-wide ratio shows that lookup tokens are accepted far less often than rated; a brand-new
    request then gets no chain either (per-request calibration alone starts every request at 1)."""
    from vllm_specx.core.early_stop import OnlineAcceptCalibration

    tokens, lengths = _lookup_batch()

    def run(shared_decay, prune=False):
        ctl = _lookup_controller(confidence_model, threshold=0.7)
        ctl.lookup.calibration = OnlineAcceptCalibration(shared_decay=shared_decay)
        ctl.drafting_pays = lambda b: False  # the drafter drafts nothing: only lookup chains compete

        def step(req_id):  # one engine step of a request that just had 1 token emitted (chain rejected)
            ctl.feedback([req_id], [1])
            ctl.lookup.find([req_id], tokens[:1], lengths[:1], None, k=4, max_model_len=100,
                            threshold=0.7 if prune else None)
            ctl.begin(armed=True)
            assert ctl.skip_step(1) and ctl.finish() == [0]
            return ctl.lookup_chains([req_id])[0]

        firsts = []
        for i in range(6):  # short requests: two steps each, the first one's chain rejected at its first token
            firsts.append(step(f"r{i}"))
            step(f"r{i}")
        return firsts, ctl.lookup.calibration.centre(), ctl.lookup.stats

    firsts, centre, _ = run(shared_decay=None)
    assert all(f == [7, 8, 9] for f in firsts) and centre == 1.0  # 0.9, 0.81, 0.73 >= 0.7, every time
    firsts, centre, _ = run(shared_decay=0.9)
    assert firsts[0] == [7, 8, 9] and firsts[-1] is None and centre < 0.7 / 0.9
    # requests whose chain could not clear the threshold are not searched: the same chains, fewer searches
    pruned, pruned_centre, stats = run(shared_decay=0.9, prune=True)
    assert (pruned, pruned_centre) == (firsts, centre) and stats["not_searched"] >= 6


def test_lookup_search_skips_rows_that_cannot_clear_the_threshold_and_keeps_rows_aligned(confidence_model):
    ctl = _lookup_controller(confidence_model, threshold=0.7)
    tokens, lengths = _lookup_batch()
    tokens, lengths = tokens[[1, 0]], lengths[[1, 0]]  # row 0: "b" (no repeat), row 1: "a" (a 4-gram match)
    for _ in range(3):  # "b" had drafts rejected: scale 0.25, 0.9 * 0.25 < 0.7
        ctl.lookup.calibration.update(["b"], [0], [1.0])
    ctl.lookup.find(["b", "a"], tokens, lengths, None, k=4, max_model_len=100, threshold=0.7)
    assert "b" not in ctl.lookup._chains and ctl.lookup.stats["not_searched"] == 1
    assert ctl.lookup._chains["a"][0].tolist() == [7, 8, 9, 5]  # "a"'s own row, not row 0


# ------------------------------------------------------------------ whole-step payoff
def test_drafting_payoff_skips_buckets_that_do_not_earn_their_cost_and_explores():
    from vllm_specx.core.early_stop import DraftingPayoff

    # drafting costs 0.1 of a plain step at batch 1, 0.5 at batch 64 (+ verify 0.1 per kept fraction)
    payoff = DraftingPayoff(lambda b, kept: (0.1 if b < 8 else 0.5) + 0.1 * kept, decay=0.5, explore_every=4)
    assert payoff.pays(64) and payoff.pays(1)  # no evidence yet: draft and measure
    for _ in range(5):
        payoff.update(64, accepted=6, kept=8)  # 0.09 accepted per request: below 0.5 + 0.0125
        payoff.update(1, accepted=1, kept=1)  # 1 accepted per request: pays
    assert payoff.pays(1)
    decisions = [payoff.pays(64) for _ in range(12)]
    # one exploring step after four; it found nothing new, so the next one waits eight
    assert decisions == [False, False, False, True] + [False] * 7 + [True]
    assert payoff.pays(48)  # bucket 32..63 has no evidence: it starts from batch 1's, which pays
    for _ in range(10):
        payoff.update(64, accepted=50, kept=60)  # the drafter earns again at this batch size
    assert payoff.pays(64)
    a, f = payoff.estimate(64)
    assert abs(a - 50 / 64) < 0.01 and abs(f - 60 / 64) < 0.01


def test_drafting_payoff_backs_off_its_exploring_steps_and_starts_large_batches_from_smaller_ones():
    from vllm_specx.core.early_stop import DraftingPayoff

    payoff = DraftingPayoff(lambda b, kept: 0.2 * b.bit_length(), decay=0.5, explore_every=2, max_explore_every=8)
    explored = []
    for step in range(60):
        if payoff.pays(16):
            explored.append(step)
            payoff.update(16, accepted=1, kept=2)  # 1/16 per request: never pays 0.2 * 5
    assert explored == [0, 2, 6, 14, 22, 30, 38, 46, 54]  # first step, then one in 2, 4, 8, 8, ...
    assert not payoff.pays(32)  # no evidence at 32..63: batch 16's estimate, which did not pay there
    assert payoff.pays(2)  # nothing smaller than batch 2 was seen: draft and measure
    payoff.update(16, accepted=64, kept=16)  # the drafter earns again: exploring waits reset
    payoff.update(16, accepted=64, kept=16)
    assert payoff.pays(16) and payoff._interval[payoff.bucket(16)] == 2
    with pytest.raises(ValueError, match="max_explore_every"):
        DraftingPayoff(lambda b, kept: 0.5, explore_every=16, max_explore_every=8)


def test_controller_skips_steps_after_drafting_steps_that_did_not_pay(confidence_model):
    """The controller feeds the payoff with what each drafting step earned (from the next step's
    sampled counts); skipped steps teach it nothing; an exploring step drafts again."""
    from vllm_specx.core.early_stop import DraftingPayoff

    ctl = ChainStopController(DraftLengthPolicy(2, confidence_model), None, lambda b: 0.3,
                              payoff=DraftingPayoff(lambda b, kept: 0.5, decay=0.0, explore_every=3))
    ids = ["a", "b"]

    def drafting_step(top1):  # the order of vllm_adapter's propose wrapper and the drafter's compute_logits
        ctl.feedback(ids, [1, 1])  # nothing accepted in the step verified now
        ctl.begin(armed=True)
        if not ctl.skip_step(2):  # a skipped step is vLLM's K = 0 step: no head, nothing observed
            try:
                for _ in range(2):
                    ctl.observe(torch.randn(2, 8), _logits(top1))
            except _AllStopped as stop:
                assert stop.tokens.shape[1] > 0
        return ctl.finish()

    assert drafting_step([0.95, 0.95]) == [2, 2]  # no evidence: drafts
    assert drafting_step([0.95, 0.95]) == [0, 0]  # 0 accepted < 0.5: skipped
    assert drafting_step([0.95, 0.95]) == [0, 0]
    assert drafting_step([0.95, 0.95]) == [2, 2]  # third skip in a row explores
    assert ctl.stats["skipped_steps"] == 2


def _lookup_batch():
    """Two requests: row 0 repeats a phrase (a 4-gram match predicts [7, 8, 9]), row 1 never repeats."""
    import numpy as np

    tokens = np.zeros((4, 32), dtype=np.int32)
    row0 = [1, 2, 3, 4, 7, 8, 9, 5, 1, 2, 3, 4]
    tokens[0, : len(row0)] = row0
    tokens[1, :6] = [10, 11, 12, 13, 14, 15]
    return tokens, np.array([len(row0), 6, 0, 0])


def _weak_draft_step(ctl, tokens, lengths):
    """One engine step for requests "a", "b" (each just had 1 token emitted, no draft accepted): lookup
    chains found, the drafter unsure for both (both stop at depth 0); returns the lookup chains chosen."""
    ctl.feedback(["a", "b"], [1, 1])
    ctl.lookup.find(["a", "b"], tokens, lengths, None, k=4, max_model_len=100)
    ctl.begin(armed=True)
    try:
        ctl.observe(torch.randn(2, 8), _logits([0.2, 0.2]))
    except _AllStopped:
        pass
    ctl.finish()
    return ctl.lookup_chains(["a", "b"])


def _lookup_controller(confidence_model, threshold=0.3):
    from vllm_specx.core.lookup import LookupTable
    from vllm_specx.vllm_adapter.lookup_choice import LookupCandidates

    lookup = LookupCandidates(LookupTable(first=(0.2, 0.5, 0.6, 0.9), deeper=(0.5, 0.6, 0.7, 0.9)))
    return ChainStopController(DraftLengthPolicy(4, confidence_model), None, lambda b: threshold, lookup=lookup)


def test_lookup_chain_replaces_a_weak_drafter_chain_and_learns_from_rejections(confidence_model):
    ctl = _lookup_controller(confidence_model)
    tokens, lengths = _lookup_batch()
    chains = _weak_draft_step(ctl, tokens, lengths)
    assert chains[0] == [7, 8, 9, 5][: len(chains[0])] and len(chains[0]) >= 2  # 0.9, 0.81, 0.73, ... >= 0.3
    assert chains[1] is None  # no match: the drafter's chain (here: nothing) stays
    first_len = len(chains[0])
    # the target rejects the lookup's first token, several steps in a row: the request's scale drops
    for _ in range(6):
        chains = _weak_draft_step(ctl, tokens, lengths)
    assert chains[0] is None or len(chains[0]) < first_len
    assert ctl.lookup.stats["accepted"] == 0 and ctl.lookup.stats["chosen"] >= 2


def test_lookup_tokens_are_cut_at_their_own_verify_only_threshold(confidence_model):
    """A lookup token costs its verification only (no draft level): with a lookup threshold below the
    drafter's node threshold, the same match keeps more tokens; the drafter's threshold is unchanged."""
    tokens, lengths = _lookup_batch()
    chains = {}
    for lookup_threshold in (None, 0.05):
        ctl = _lookup_controller(confidence_model, threshold=0.75)
        ctl.lookup_threshold_for_batch = None if lookup_threshold is None else (lambda b: lookup_threshold)
        chains[lookup_threshold] = _weak_draft_step(ctl, tokens, lengths)[0]
        assert ctl.threshold_for_batch(1) == 0.75
    assert chains[None] == [7, 8]  # 4-gram match: path probs 0.9, 0.81, 0.729, ...: two clear 0.75
    assert chains[0.05] == [7, 8, 9, 5]  # every token clears 0.05 (k = 4)


def test_lookup_scales_are_computed_once_per_step_and_afresh_after_feedback(confidence_model):
    """find (with its pruning bound), preempts and choose share one computation of the requests' online
    scales per step; after feedback (the calibration changed) they are computed again."""
    ctl = _lookup_controller(confidence_model)
    tokens, lengths = _lookup_batch()
    calls = []
    original = ctl.lookup.calibration._compute_scales
    ctl.lookup.calibration._compute_scales = lambda ids: calls.append(list(ids)) or original(ids)
    ctl.feedback(["a", "b"], [1, 1])
    ctl.lookup.find(["a", "b"], tokens, lengths, None, k=4, max_model_len=100, threshold=0.3)
    ctl.lookup.preempts(["a", "b"], 0.3)
    first = ctl.lookup.choose(["a", "b"], 0.3, [0.0, 0.0])
    assert calls == [["a", "b"]] and first[0] == [7, 8, 9, 5][: len(first[0])]
    for _ in range(3):  # "a"'s chains are rejected at their first token: its scale must fall
        ctl.lookup.feedback(["a", "b"], [1, 1])
        ctl.lookup.find(["a", "b"], tokens, lengths, None, k=4, max_model_len=100)
        chains = ctl.lookup.choose(["a", "b"], 0.3, [0.0, 0.0])
    assert len(calls) == 4 and (chains[0] is None or len(chains[0]) < len(first[0]))


def test_lookup_sees_the_tokens_sampled_this_step_and_never_passes_max_model_len(confidence_model):
    from vllm_specx.vllm_adapter.runner_hooks import _pending_tokens

    ctl = _lookup_controller(confidence_model)
    tokens, lengths = _lookup_batch()
    lengths[0] -= 1  # the runner has not written the step's last sampled token (4) yet
    pending = _pending_tokens(torch.tensor([[4, -1], [16, -1]]))
    assert pending == [[4], [16]] and _pending_tokens([[4], [16]]) is None  # lists come after bookkeeping
    ctl.lookup.find(["a", "b"], tokens, lengths, pending, k=4, max_model_len=100)
    assert ctl.lookup._chains["a"][0].tolist() == [7, 8, 9, 5]
    ctl.lookup.find(["a", "b"], tokens, lengths, pending, k=4, max_model_len=14)
    assert ctl.lookup._chains["a"][0].tolist() == [7]  # 12 tokens + 1 draft + the bonus token fit in 14


def test_a_strong_lookup_match_for_every_request_skips_the_drafters_head(confidence_model):
    ctl = _lookup_controller(confidence_model)
    tokens, lengths = _lookup_batch()
    ctl.feedback(["a"], [1])
    ctl.lookup.find(["a"], tokens, lengths, None, k=4, max_model_len=100)
    ctl.begin(armed=True)
    assert ctl.skip_step(1)  # 0.9 + 0.81 + 0.73 + 0.66 >= preempt_expected (1.0) expected tokens
    assert ctl.finish() == [0] and ctl.lookup_chains(["a"])[0] == [7, 8, 9, 5]
    ctl.feedback(["a", "b"], [1, 1])  # one request without a match: the drafter runs for the batch
    ctl.lookup.find(["a", "b"], tokens, lengths, None, k=4, max_model_len=100)
    ctl.begin(armed=True)
    assert not ctl.skip_step(2)


def test_forward_is_skipped_only_on_decode_steps_of_requests_the_drafter_has_seen(confidence_model):
    """skip_forward: a step that does not pay returns before the drafter's forward only when every request
    is decoding and its prompt went through the drafter (else its KV cache would miss a prompt)."""
    ctl = ChainStopController(DraftLengthPolicy(4, confidence_model), None, lambda b: 0.3,
                              drafting_pays=lambda b: b < 2, skip_forward=True)

    def step(req_ids, num_sampled):  # what the runner wrappers do in one engine step
        ctl.feedback(req_ids, num_sampled)
        ctl.begin(armed=True)
        skipped = ctl.skip_step(len(req_ids)) and ctl.forward_skipped()
        if not skipped:
            ctl.forward_ran()
        ctl.finish()
        return skipped

    assert not step(["a", "b"], [0, 0])  # partial prefills: the drafter must see the prompts
    assert not step(["a", "b"], [1, 1])  # last prefill chunk: its tokens go through the drafter
    assert step(["a", "b"], [1, 1]) and step(["a", "b"], [2, 1])  # decoding at a size that does not pay
    assert not step(["a", "b", "c"], [1, 1, 0])  # c is prefilling
    assert not step(["a", "b", "c"], [1, 1, 1])  # c's prompt is not in the drafter's KV yet
    assert step(["a", "b", "c"], [1, 1, 1])
    assert not step(["b"], [1])  # batch 1 pays: the drafter drafts (a and c finished)
    assert not step(["a2", "b"], [1, 1])  # a new request (or one resumed after preemption)
    assert ctl.stats["forward_skipped"] == 3
    off = ChainStopController(DraftLengthPolicy(4, confidence_model), None, lambda b: 0.3,
                              drafting_pays=lambda b: False)
    off.feedback(["a", "b"], [1, 1]), off.begin(armed=True), off.forward_ran(), off.finish()
    off.feedback(["a", "b"], [1, 1]), off.begin(armed=True)
    assert off.skip_step(2) and not off.forward_skipped()  # skip_forward off: the head only


def test_skip_prefill_makes_the_requests_it_skips_drafter_blind(confidence_model):
    """skip_prefill: a step that does not pay skips the drafter's forward even with prefills in it; the
    requests whose prompt (or a chunk of it) it skipped never get a drafter token or runner-up again, the
    others draft as before once drafting pays; a blind request that leaves the batch (finished or
    preempted) comes back seeing."""
    pays = {"now": True}
    ctl = ChainStopController(DraftLengthPolicy(3, confidence_model), None, lambda b: 0.3,
                              drafting_pays=lambda b: pays["now"], skip_forward=True, skip_prefill=True,
                              max_siblings=2, sibling_threshold_for_batch=lambda b: 0.01)

    def step(req_ids, num_sampled, top1=0.95):  # one engine step as the runner wrappers drive it
        ctl.feedback(req_ids, num_sampled)
        ctl.begin(armed=True)
        if ctl.skip_step(len(req_ids)):
            skipped = ctl.forward_skipped()
            if not skipped:
                ctl.forward_ran()
            return ctl.finish(), skipped
        hidden = torch.randn(len(req_ids), 8)
        probs = torch.full((len(req_ids), 50), (0.96 - top1) / 48)
        probs[:, 0], probs[:, 1] = top1, 0.04  # a runner-up worth a node at the sibling threshold 0.01
        try:
            for _ in range(3):
                ctl.observe(hidden, probs.log())
        except _AllStopped:
            pass
        ctl.forward_ran()
        return ctl.finish(), False

    assert step(["a"], [1]) == ([3], False)  # drafting pays: a's prompt went through the drafter
    pays["now"] = False
    assert step(["a", "b", "c"], [1, 1, 0]) == ([0, 0, 0], True)  # b's prompt and c's first chunk skipped
    assert ctl.stats["blind_requests"] == 2 and ctl._blind == {"b", "c"}
    assert step(["a", "b", "c"], [2, 1, 1]) == ([0, 0, 0], True)  # decode-only now: skipped as before
    pays["now"] = True
    lengths, _ = step(["a", "b", "c"], [1, 1, 1])
    assert lengths == [3, 0, 0]  # a drafts; b and c are blind
    trees = ctl._trees
    assert trees[0][0] and trees[1] == ([], []) and trees[2] == ([], [])  # no runner-up for blind rows
    assert step(["b"], [1])[0] == [0]  # still blind when alone (a and c finished)
    lengths, _ = step(["c", "b"], [0, 1])  # c was preempted and is back, prefilling afresh; drafting pays
    assert lengths[1] == 0 and "c" not in ctl._blind  # (vLLM drops drafts of a partial prefill's row)
    assert step(["c", "b"], [1, 1])[0] == [3, 0]  # c sees again; b never does
    off = ChainStopController(DraftLengthPolicy(3, confidence_model), None, lambda b: 0.3,
                              drafting_pays=lambda b: False, skip_forward=True)
    off.feedback(["a", "b"], [1, 0]), off.begin(armed=True)
    assert off.skip_step(2) and not off.forward_skipped()  # skip_prefill off: prefills run the forward


class _DepthModel:
    """Decision-model stand-in: accept prob 0.9 for a draft step at depth 0, `deeper` below; records the
    feature rows it is asked about."""

    def __init__(self, deeper: float):
        self.deeper, self.rows = deeper, []

    def predict_accept_prob(self, feats):
        self.rows.append(feats.clone())
        return torch.where(feats[:, 4] == 0, 0.9, self.deeper)


class _BranchDrafter:
    """The drafter's branch pass: every expanded runner-up gets children 11 (p 0.6) and 12 (p 0.3)."""

    def __init__(self):
        self.calls = []

    def branch_logprobs(self, tokens, parent_tokens, slots, block_table):
        self.calls.append((tokens.clone(), parent_tokens.clone(), slots.clone()))
        probs = torch.full((tokens.shape[0], 50), 0.1 / 48)
        probs[:, 11], probs[:, 12] = 0.6, 0.3
        return torch.randn(tokens.shape[0], 8), probs.log()


@pytest.mark.parametrize("deeper, branch_decision, child_kept", [
    (0.1, True, False),   # the model: the runner-up's best child is rarely accepted -> 0.4 * 0.1 < 0.05: cut
    (0.9, True, True),    # 0.4 * 0.9 > 0.05: kept
    (0.1, False, True),   # switched off: draft confidence 0.4 * 0.6 > 0.05 keeps it whatever the model says
])
def test_decision_model_stops_branches_below_runner_ups(deeper, branch_decision, child_kept):
    """A chain of one token (the model says stop at depth 1), a runner-up (id 3, p 0.4) at depth 0 that is
    expanded; the decision model reads the runner-up's draft step (child depth 1, path confidence 0.4, its
    children's top-2) and its estimate decides whether the best child (11) joins the tree."""
    model = _DepthModel(deeper)
    # chain threshold between 0.9 * deeper and 0.9: depth 0 is kept, depth 1 is not
    ctl = ChainStopController(DraftLengthPolicy(3, model), None, lambda b: 0.3 if deeper < 0.5 else 0.85,
                              max_siblings=2, expand_children=1, sibling_threshold_for_batch=lambda b: 0.05,
                              branch_decision=branch_decision)
    ctl.begin(armed=True)
    probs = torch.full((2, 50), 0.1 / 48)
    probs[0, 7], probs[0, 3] = 0.5, 0.4  # depth 0: chain token 7, runner-up 3
    probs[1, 8] = 0.9  # depth 1 (not kept; its runner-ups too unlikely for the tree)
    with pytest.raises(_AllStopped):
        for d in range(3):
            ctl.observe(torch.randn(1, 8), probs[min(d, 1)][None].log())
    drafter = _BranchDrafter()
    ctl.expand(drafter, bonus=torch.tensor([5]), root_pos=torch.tensor([20]), block_table=torch.zeros(1, 4, dtype=torch.long))
    assert ctl.finish() == [1]
    tokens, parents = ctl._trees[0]
    assert drafter.calls and drafter.calls[0][0].tolist() == [3] and drafter.calls[0][1].tolist() == [5]
    sib = tokens.index(3) + 1  # node number of the runner-up (node 0 is the root)
    assert (11 in tokens and parents[tokens.index(11)] == sib) == child_kept, (tokens, parents)
    if branch_decision:  # the branch step's features: child depth 1, log path confidence log(0.4), top-2 0.6/0.3
        branch_row = model.rows[-1][0]
        assert branch_row[4] == 1 and branch_row[5] == pytest.approx(math.log(0.4), abs=1e-5)
        assert branch_row[:2].tolist() == pytest.approx([0.6, 0.3], abs=1e-5)
    else:
        assert len(model.rows) == 2  # the chain's two steps only: the branch step was not scored


def test_v2_step_is_settled_in_the_draft_block_from_v2s_own_token_rows(confidence_model):
    """V2 runner: the lookup search reads V2's request-state rows (`V2TokenHistory`, rows in V2's own
    order via idx_mapping); `_settle_v2` writes the chosen lookup chain into the [B, K] draft block, -1
    past each request's length, and leaves the lengths for `take_draft_token_ids`, which cuts V2's
    placeholder lists to them once."""
    from types import SimpleNamespace

    from vllm_specx.vllm_adapter.runner_hooks import V2TokenHistory, _settle_v2, _wrap_take

    tokens, lengths = _lookup_batch()
    states = torch.zeros(3, 32, dtype=torch.int32)  # batch row 0 ("a") is state row 2, row 1 ("b") state row 0
    states[2], states[0] = torch.from_numpy(tokens[0]), torch.from_numpy(tokens[1])
    req_states = SimpleNamespace(all_token_ids=SimpleNamespace(gpu=states), max_model_len=100,
                                 total_len=SimpleNamespace(gpu=torch.tensor([6, 0, 12], dtype=torch.int32)))
    history = V2TokenHistory(req_states)
    rows, num_tokens = history.rows(torch.tensor([2, 0]))
    assert num_tokens.tolist() == [12, 6] and rows[0, :12].tolist() == tokens[0, :12].tolist()

    ctl = _lookup_controller(confidence_model)
    ctl.feedback(["a", "b"], [1, 1])
    ctl.lookup.find(["a", "b"], rows, num_tokens, None, k=4, max_model_len=history.max_model_len)
    ctl.begin(armed=True)
    hidden = torch.randn(2, 8)
    ctl.observe(hidden, _logits([0.2, 0.95]))  # "a": the drafter is unsure; "b" keeps its depth-0 token
    with pytest.raises(_AllStopped) as stop:
        ctl.observe(hidden, _logits([0.2, 0.1]))
    drafts = torch.full((2, 4), 99, dtype=torch.long)
    drafts[:, :2] = stop.value.tokens
    drafts[:, 2:] = -1
    settled = _settle_v2(ctl, None, ["a", "b"], drafts)
    n = ctl.settled[0]
    assert n >= 2 and settled[0, :n].tolist() == [7, 8, 9, 5][:n] and (settled[0, n:] == -1).all()
    assert ctl.settled[1] == 1 and settled[1, 0] == stop.value.tokens[1, 0] and (settled[1, 1:] == -1).all()

    runner = SimpleNamespace(speculator=SimpleNamespace(model=SimpleNamespace(draft_length=ctl)))
    take = _wrap_take(lambda self: SimpleNamespace(req_ids=["a", "b"], draft_token_ids=[[-1] * 4, [-1] * 4]))
    assert [len(ids) for ids in take(runner).draft_token_ids] == [n, 1]
    assert [len(ids) for ids in take(runner).draft_token_ids] == [4, 4]  # used once: never stale
