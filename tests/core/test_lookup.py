"""Prompt-lookup candidates (core.lookup): the n-gram match, the accept table, the choice against the drafter."""

import numpy as np
import pytest

from vllm_specx.core.lookup import LookupTable, fit_lookup_table, lookup_continuation, lookup_tokens_to_verify


def naive_lookup(ctx: list[int], min_n: int, max_n: int, k: int) -> tuple[list[int], int]:
    """The rule spelled out with Python loops: longest suffix n-gram that occurs earlier; of its
    occurrences the latest followed by k tokens, else the earliest."""
    length = len(ctx)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        starts = [s for s in range(0, length - n) if ctx[s: s + n] == ctx[length - n:]]
        if starts:
            full = [s for s in starts if s + n + k <= length]
            s = full[-1] if full else starts[0]
            return ctx[s + n: s + n + k], n
    return [], 0


@pytest.mark.parametrize("vocab", [3, 8, 50])
def test_matches_the_naive_rule_on_random_contexts(vocab):
    rng = np.random.default_rng(vocab)
    for _ in range(300):
        ctx = rng.integers(0, vocab, size=int(rng.integers(1, 60)))
        min_n, max_n, k = int(rng.integers(1, 3)), int(rng.integers(2, 6)), int(rng.integers(0, 9))
        max_n = max(min_n, max_n)
        chain, n = lookup_continuation(ctx, min_n, max_n, k)
        want, want_n = naive_lookup(ctx.tolist(), min_n, max_n, k)
        assert (chain.tolist(), n) == (want, want_n)


def test_longest_suffix_wins_and_recent_text_is_preferred():
    ctx = np.array([5, 1, 2, 3, 9, 9, 1, 2, 3, 7, 1, 2])
    chain, n = lookup_continuation(ctx, 1, 4, 3)
    assert n == 2 and chain.tolist() == [3, 7, 1]  # [1, 2] occurs at 1 and 6: the later one
    chain, n = lookup_continuation(np.array([4, 4, 4, 4, 4]), 1, 3, 4)
    assert n == 3 and chain.tolist() == [4, 4]  # a loop: the earliest occurrence has the longest continuation
    assert lookup_continuation(np.array([1, 2, 3, 4]), 1, 4, 5)[1] == 0  # nothing repeats
    assert lookup_continuation(np.array([1, 2, 1]), 2, 4, 5)[1] == 0  # only a 1-gram repeats, min_n is 2


def test_path_probs_and_the_choice_against_the_drafter():
    table = LookupTable(first=(0.2, 0.5, 0.9), deeper=(0.5, 0.6, 0.95))
    p4 = table.path_probs(4, 6)  # longer than the table: the last row
    assert np.allclose(p4, 0.9 * 0.95 ** np.arange(6))
    assert table.path_probs(1, 3, scale=10.0)[0] == 1.0  # the online scale is clipped to a probability
    probs = table.path_probs(2, 5)  # 0.5, 0.3, 0.18, ...
    assert lookup_tokens_to_verify(probs, threshold=0.25, drafter_expected=0.0) == 2  # cut below the threshold
    assert lookup_tokens_to_verify(probs, threshold=0.25, drafter_expected=0.8) == 0  # 0.8 expected by the lookup: not more
    assert lookup_tokens_to_verify(probs, threshold=0.6, drafter_expected=0.0) == 0  # even its first token does not pay


def test_fit_separates_reliable_long_matches_from_short_ones():
    rng = np.random.default_rng(0)
    seqs, plens = [], []
    for _ in range(40):
        block = rng.integers(0, 1000, size=12)
        prompt = rng.integers(0, 1000, size=20)
        seqs.append(np.concatenate([prompt, block, block, block]))  # the response repeats itself
        plens.append(20)
    table, report = fit_lookup_table(seqs, plens, max_n=4, k=8)
    assert report["positions"] == 40 * 36
    assert report["matches_per_n"][3] > 0.5 * report["positions"]  # from the second copy on: 4-gram matches
    assert table.first[3] > 0.95 and table.deeper[3] > 0.95  # and they are right
    assert all(0.0 < p < 1.0 for p in table.first + table.deeper)  # the prior keeps every cell finite
