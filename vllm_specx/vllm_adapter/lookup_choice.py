"""Prompt-lookup chains that compete with the drafter's, per request and step (`core.lookup`).

Before drafting, each request's continuation of its longest recent n-gram match is looked up in its own
tokens (`find`); after drafting, the chain whose expected accepted tokens are higher is verified
(`choose`): the lookup chain, cut where a token stops paying its verification, or the drafter's. A step
where every request has a lookup chain the drafter would not beat skips the drafter's head (`preempts`).
Engine-free apart from the metrics object it is handed; the draft-length controller owns one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from vllm_specx.core.early_stop import OnlineAcceptCalibration
from vllm_specx.core.lookup import LookupTable, lookup_continuation, lookup_tokens_to_verify


@dataclass
class LookupCandidates:
    """Per step: each request's prompt-lookup chain (computed from the runner's token ids before
    drafting) and, after drafting, which chain is verified (`core.lookup`). Greedy drafts only (the
    controller is armed only then): sampled drafts carry probabilities tied to the drafter's tokens."""

    table: LookupTable
    min_n: int = 1
    # Expected accepted lookup tokens above which every request's drafter head is skipped. 1.0 vs 2.0
    # (batch 1, 12 Spec-Bench prompts): the same target passes and lookup chains chosen, 74 instead of 27
    # steps without drafter levels, ~1 ms a pass less; 0.6 gave the same passes again.
    preempt_expected: float = 1.0
    calibration: OnlineAcceptCalibration = field(default_factory=OnlineAcceptCalibration)
    metrics: object | None = None  # prom_metrics.SpecxMetrics
    stats: dict = field(default_factory=lambda: {"chosen": 0, "tokens": 0, "accepted": 0, "expected": 0.0})
    _chains: dict = field(default_factory=dict)   # req_id -> (chain np.ndarray, matched n), this step
    _verifying: dict = field(default_factory=dict)  # req_id -> (tokens proposed, expected accepted)

    def feedback(self, req_ids: list[str], num_sampled: list[int]) -> None:
        acc = [min(max(n - 1, 0), self._verifying[r][0]) if r in self._verifying else 0
               for r, n in zip(req_ids, num_sampled)]
        self.calibration.update(req_ids, acc, [self._verifying.get(r, (0, 0.0))[1] for r in req_ids])
        self.stats["accepted"] += sum(acc)
        self._verifying = {}

    def find(self, req_ids: list[str], token_ids, num_tokens, pending: list[list[int]] | None, k: int,
             max_model_len: int, threshold: float | None = None) -> None:
        """token_ids [B_max, max_len] numpy, num_tokens [B_max]: the runner's input batch (row i is
        req_ids[i]'s prompt + output so far); pending[i]: tokens sampled this step that the runner has
        not written there yet (vLLM drafts EAGLE-style before its bookkeeping), or None. Chains never
        run past max_model_len. threshold: this step's node threshold; a request whose chain could not
        clear it (its scale times the table's best first-token rate is below it) is not searched, which
        changes no decision of `preempts` or `choose` (at 64 in flight the search was ~1% of a step)."""
        max_n = len(self.table.first)
        self._chains = {}
        rows = list(enumerate(req_ids))  # (row in the runner's batch, request)
        if threshold is not None and self.preempt_expected > 0:
            scales = self.calibration.scales(req_ids).tolist()
            rows = [(i, r) for (i, r), s in zip(rows, scales) if self.table.may_clear(s, threshold)]
            self.stats["not_searched"] = self.stats.get("not_searched", 0) + len(req_ids) - len(rows)
            if self.metrics is not None:
                self.metrics.lookup_not_searched.inc(len(req_ids) - len(rows))
        for i, r in rows:
            n = int(num_tokens[i])
            context = token_ids[i, :n]
            if pending is not None and pending[i]:
                context = np.concatenate([context, np.asarray(pending[i], dtype=context.dtype)])
            self._chains[r] = lookup_continuation(context, self.min_n, max_n,
                                                  max(0, min(k, max_model_len - context.size - 1)))

    def _path_probs(self, req_ids: list[str]) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """Per request: (this step's lookup chain, its path probabilities under the request's online
        scale), or None when its context has no repeated suffix n-gram."""
        scales = self.calibration.scales(req_ids).tolist()
        out = []
        for r, scale in zip(req_ids, scales):
            chain, n = self._chains.get(r, (None, 0))
            out.append((chain, self.table.path_probs(n, chain.size, scale)) if n else None)
        return out

    def preempts(self, req_ids: list[str], threshold: float) -> bool:
        """True when every request's lookup chain is expected to yield >= preempt_expected accepted
        tokens: the drafter (whose chains rarely expect more than one) then skips its LM head."""
        return bool(req_ids) and all(
            c is not None and float(c[1][c[1] >= threshold].sum()) >= self.preempt_expected
            for c in self._path_probs(req_ids))

    def choose(self, req_ids: list[str], threshold: float, drafter_expected: list[float]) -> list[list[int] | None]:
        """Per request: the lookup chain to verify instead of the drafter's, or None."""
        out = []
        for r, candidate, expected in zip(req_ids, self._path_probs(req_ids), drafter_expected):
            keep = lookup_tokens_to_verify(candidate[1], threshold, expected) if candidate is not None else 0
            if keep:
                chain, probs = candidate
                self._verifying[r] = (keep, float(probs[:keep].sum()))
                self.stats["expected"] += self._verifying[r][1]
                self.stats["chosen"] += 1
                self.stats["tokens"] += keep
            out.append(candidate[0][:keep].tolist() if keep else None)
        return out


# The lookup table is fitted on the target's answers to training prompts; on other traffic it can be
# over-confident (Spec-Bench, one run: 1102 lookup tokens verified at 64 in flight, 550 accepted, though
# every one was kept at path probability >= 0.71). Requests start from the engine-wide ratio.
SHARED_LOOKUP_DECAY = 0.9


def load_lookup_candidates(lookup: dict) -> LookupCandidates:
    """specx_config.json's `lookup` section (validated by checkpoint.SpecxConfig); env overrides:
    SPECX_LOOKUP_PREEMPT (preempt_expected), SPECX_LOOKUP_SHARED (shared_calibration; 'none': off)."""
    shared = os.environ.get("SPECX_LOOKUP_SHARED", lookup.get("shared_calibration", SHARED_LOOKUP_DECAY))
    shared = None if shared in (None, "none") else float(shared)
    from vllm_specx.vllm_adapter.prom_metrics import specx_metrics

    return LookupCandidates(
        LookupTable(tuple(lookup["first_accept"]), tuple(lookup["deeper_accept"])), int(lookup.get("min_n", 1)),
        preempt_expected=float(os.environ.get("SPECX_LOOKUP_PREEMPT", lookup.get("preempt_expected", 1.0))),
        calibration=OnlineAcceptCalibration(shared_decay=shared), metrics=specx_metrics())
