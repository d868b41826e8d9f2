"""Greedy output with speculation equals plain decoding, token for token (real vLLM on CPU)."""

import pytest

from tests.conftest import PROMPTS, many_prompts
from vllm_specx.testing import assert_same_tokens, run_generate


def test_ngram_equals_plain_and_accepts(tiny_target, tiny_plain_outputs):
    spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    res = run_generate(tiny_target, PROMPTS, spec, max_tokens=48)
    assert_same_tokens(tiny_plain_outputs["base"].token_ids, res.token_ids)
    m = res.metrics
    assert m.num_drafts > 0 and m.num_accepted_tokens > 0
    assert len(m.accepted_per_pos) == 4 and sum(m.accepted_per_pos) == m.num_accepted_tokens
    assert m.num_accepted_tokens <= m.num_draft_tokens <= 4 * m.num_drafts


def test_eagle3_random_drafter_equals_plain(tiny_target, tiny_eagle3_drafter, tiny_plain_outputs):
    spec = {"method": "eagle3", "model": tiny_eagle3_drafter, "num_speculative_tokens": 3}
    res = run_generate(tiny_target, PROMPTS, spec, max_tokens=48)
    assert_same_tokens(tiny_plain_outputs["base"].token_ids, res.token_ids)
    m = res.metrics
    # EAGLE-3 always drafts k tokens per step; every decode step of every request drafted.
    assert m.num_drafts > 0 and m.num_draft_tokens == 3 * m.num_drafts
    assert len(m.accepted_per_pos) == 3


def test_edd_random_drafter_equals_plain_on_64_prompts(tiny_target, tiny_edd_drafter, tiny_plain_outputs):
    spec = {"method": "eagle3", "model": tiny_edd_drafter, "num_speculative_tokens": 3}
    res = run_generate(tiny_target, many_prompts(64), spec, max_tokens=32)
    assert_same_tokens(tiny_plain_outputs["many"].token_ids, res.token_ids)
    assert res.metrics.num_drafts > 0 and res.metrics.num_draft_tokens == 3 * res.metrics.num_drafts


def test_harness_detects_a_difference(tiny_plain_outputs):
    """The comparison can fail: a one-token change is reported with its position."""
    ref = tiny_plain_outputs["base"].token_ids
    bad = [list(t) for t in ref]
    bad[2][5] = (bad[2][5] + 1) % 49152
    with pytest.raises(AssertionError, match="request 2: first difference at output token 5"):
        assert_same_tokens(ref, bad)
