"""Prompt-lookup candidates beside the drafter's (multi-candidate drafting, engine-free).

Why: on Spec-Bench about half of the answer tokens continue a bigram already in the context
(summaries, translations, RAG answers quote their input), prompt lookup predicts ~65 % of those,
and the one-layer drafter ~16 % (benchmarks/results/drafter_copy_smollm2_cpu.json). So each step has
two candidate chains per request: the drafter's (with its own accept probabilities from the early-stop
model) and the continuation of the latest earlier occurrence of the context's suffix n-gram. The one
with more expected accepted tokens is verified. Lossless either way: the target verifies whatever is
proposed; greedy output is unchanged (the same argument as vLLM's ngram method).

A lookup token's accept probability depends on how long the matched n-gram is (a 1-gram match is
right ~25 % of the time, a 4-gram match ~90 % on the target's own training responses): `LookupTable`
holds P(first token accepted | n) and P(next accepted | previous accepted, n), fitted on training
records by `fit_lookup_table` (`vllm-specx train --stages lookup`) and scaled per request online
(`early_stop.OnlineAcceptCalibration`). A lookup chain is cut where its path probability falls below
the step's node threshold, the same rule (and cost model) the drafter's chain is cut by.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def lookup_continuation(context: np.ndarray, min_n: int, max_n: int, k: int) -> tuple[np.ndarray, int]:
    """context [L] int -> (up to k tokens [<=k] that followed an earlier occurrence of the longest
    suffix n-gram with min_n <= n <= max_n, that n); (empty, 0) when no suffix n-gram occurs earlier.

    Of several occurrences: the latest with k tokens after it (recent text predicts best), else the
    earliest (the longest continuation; in a repeating loop the latest is followed by only a few).
    One pass over the context finds the earlier positions of the last token; each further suffix token
    is compared at those positions only (this runs per request and step: ~10x fewer operations than a
    window comparison per n)."""
    length = context.shape[0]
    ends = np.flatnonzero(context[:-1] == context[-1])  # [M] ends of earlier occurrences of the 1-gram
    if ends.size == 0 or min_n > min(max_n, length - 1):
        return context[:0], 0
    matched = np.ones(ends.size, dtype=np.int64)  # [M] suffix length matched at each end, up to max_n
    for j in range(1, min(max_n, length - 1)):
        alive = np.flatnonzero((matched == j) & (ends >= j))
        if alive.size == 0:
            break
        alive = alive[context[ends[alive] - j] == context[length - 1 - j]]
        matched[alive] = j + 1
    n = int(matched.max())
    if n < min_n:
        return context[:0], 0
    begins = ends[matched == n] + 1  # where each occurrence's continuation starts
    full = begins[begins + k <= length]
    begin = int(full[-1] if full.size else begins[0])
    return context[begin: begin + k], n


@dataclass(frozen=True)
class LookupTable:
    """Accept probabilities of lookup tokens by matched n-gram length n = 1..len(first) (longer
    matches use the last entry): first[n-1] = P(first token accepted), deeper[n-1] = P(token d+1
    accepted | token d accepted)."""

    first: tuple[float, ...]
    deeper: tuple[float, ...]

    def path_probs(self, n: int, length: int, scale: float = 1.0) -> np.ndarray:
        """[length] probability that the chain is accepted through each depth (scale: the request's
        online correction of the first token's probability, clipped to a probability)."""
        i = min(n, len(self.first)) - 1
        first = min(1.0, self.first[i] * scale)
        return first * self.deeper[i] ** np.arange(length)

    def may_clear(self, scale: float, threshold: float) -> bool:
        """Whether any chain of a request with this scale can have a token at path probability >=
        threshold: path_probs never exceeds its first entry, which is at most the best n's, clipped."""
        return min(1.0, max(self.first) * scale) >= threshold


def lookup_tokens_to_verify(path_probs: np.ndarray, threshold: float, drafter_expected: float) -> int:
    """How many lookup tokens to verify instead of the drafter's chain (0: keep the drafter's).

    path_probs [L] is non-increasing: the chain is cut where it falls below the node threshold (a
    node pays when its path probability clears the cost model's threshold), and it wins when its
    expected accepted tokens (sum of kept path probabilities) exceed the drafter's."""
    n = int((path_probs >= threshold).sum())
    return n if n and float(path_probs[:n].sum()) > drafter_expected else 0


def fit_lookup_table(sequences: list[np.ndarray], prompt_lens: list[int], max_n: int = 4, k: int = 8,
                     prior: tuple[float, float] = (1.0, 1.0)) -> tuple[LookupTable, dict]:
    """Fit a LookupTable on target-generated sequences (prompt + greedy response): at every response
    position, the lookup chain from the context so far is compared with the response that followed.
    Returns the table and a report (positions, matches and rates per n). prior: Beta pseudo-counts
    (accepted, rejected) per cell, so that a rare n stays finite."""
    first = np.zeros((max_n, 2))  # per n: (tried, accepted)
    deeper = np.zeros((max_n, 2))
    positions = 0
    for seq, plen in zip(sequences, prompt_lens):
        seq = np.asarray(seq)
        for t in range(max(plen, 2), len(seq)):
            positions += 1
            chain, n = lookup_continuation(seq[:t], 1, max_n, k)
            if n == 0:
                continue
            truth = seq[t: t + chain.size]
            ok = int(np.cumprod(chain[: truth.size] == truth).sum())
            first[n - 1] += (1, ok >= 1)
            tried_deeper = min(ok, truth.size - 1)  # depths d >= 1 whose parent was accepted
            deeper[n - 1] += (tried_deeper, max(ok - 1, 0))
    a, b = prior
    table = LookupTable(tuple(((first[:, 1] + a) / (first[:, 0] + a + b)).round(4).tolist()),
                        tuple(((deeper[:, 1] + a) / (deeper[:, 0] + a + b)).round(4).tolist()))
    report = {"positions": positions, "matches_per_n": first[:, 0].astype(int).tolist(),
              "first_accept": list(table.first), "deeper_accept": list(table.deeper), "max_n": max_n, "k": k}
    return table, report
