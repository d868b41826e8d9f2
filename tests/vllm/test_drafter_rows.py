"""EDD finishes only the rows vLLM's proposer can sample: same drafts, fewer rows through o_proj + MLP."""

from tests.conftest import many_prompts
from vllm_specx.testing import assert_same_tokens, recording_drafts, run_generate, specx_counter


def _drafts_and_rows_skipped(tiny_target, drafter) -> tuple[list[list[int]], float, list]:
    before = specx_counter("drafter_rows_skipped")
    spec = {"method": "eagle3", "model": drafter, "num_speculative_tokens": 3}
    with recording_drafts() as drafted:  # the tokens the drafter proposed, every compute_logits call
        res = run_generate(tiny_target, many_prompts(16), spec, max_tokens=16)
    skipped = specx_counter("drafter_rows_skipped") - before
    return drafted, skipped, res.token_ids


def test_prefill_rows_the_proposer_never_reads_are_not_finished(tiny_target, tiny_edd_drafter, tiny_plain_outputs,
                                                                monkeypatch):
    drafted, skipped, tokens = _drafts_and_rows_skipped(tiny_target, tiny_edd_drafter)
    assert skipped > 0  # the prompts are longer than K + 1 = 4 tokens
    assert_same_tokens([t[:16] for t in tiny_plain_outputs["many"].token_ids[:16]], tokens)
    monkeypatch.setenv("SPECX_DRAFTER_ALL_ROWS", "1")
    drafted_all, skipped_all, tokens_all = _drafts_and_rows_skipped(tiny_target, tiny_edd_drafter)
    assert skipped_all == 0
    assert tokens_all == tokens
    # the rows that are sampled hold the same values either way: every drafted token is the same
    assert len(drafted) == len(drafted_all) > 0 and drafted == drafted_all
