"""Per-request draft length in vLLM's chain drafting (MCSD early stop); V1 and V2 runners, sync scheduling.

How it plugs in (each vLLM internal is declared in `compat.INTERNALS`):
  1. vLLM's EAGLE proposer calls the drafter's `compute_logits` exactly once per draft step with the
     step's hidden states [B, H] in batch order; `SpecxEddForCausalLM.compute_logits` hands them to
     `ChainStopController.observe`, which runs the decision model (`core.early_stop`) per request.
  2. `SpecDecodeBaseProposer.propose` is wrapped: `begin` before it; a step that does not pay runs as
     vLLM's own K = 0 step (`skip_step`: the drafter's forward keeps its KV cache, no head). Once every
     request has stopped, `observe` raises `_AllStopped` carrying the tokens drafted so far and the wrapper
     returns them ([B, d] instead of [B, K]): the drafting loop ends early, which is where batch-1 time is
     saved. vLLM's loop (`for token_index in range(K - 1)`) has no exit of its own, so this one exception
     is the only way out short of a copy of vLLM's loop; it never leaves the wrapper.
  3. `GPUModelRunner.take_draft_token_ids` is wrapped: each request's list is cut to its own length,
     so the scheduler verifies only the tokens that request kept (vLLM supports ragged draft lists:
     ngram returns empty ones).
  4. `GPUModelRunner.propose_draft_token_ids` is wrapped: before drafting, the tokens the target just
     accepted per request feed `OnlineAcceptCalibration`, so a request whose drafts were rejected
     drafts less on its next step (and backs off until the drafter does better).
  5. With a `lookup` table (`LookupCandidates`), the same runner wrapper finds each request's prompt-
     lookup chain before drafting, and `take_draft_token_ids` verifies it instead of the drafter's
     chain (or tree) where it expects more accepted tokens (`core.lookup`).
  6. PCT trees (`max_siblings` > 0): each depth's runner-up tokens are offered as alternative children of
     the chain's previous node; after the chain loop, one more drafter pass (`ChainStopController.expand`,
     `SpecxEddForCausalLM.branch_logprobs`) drafts children under the runner-ups worth it, reading the
     drafter's paged KV cache (context + the chain nodes above the runner-up) without writing to it; the
     tree keeps the best nodes by expected gain (`core.tree.chain_with_siblings`), `tree_step` verifies it.
     The decision model also reads each expanded runner-up's draft step (`branch_decision`): its
     estimate that the best child is accepted replaces that child's draft confidence
     (`core.early_stop.branch_child_probs`), so it stops a branch where the estimate does not pay.
  7. Under vLLM's V2 runner (GPU default) the speculator's `propose` is wrapped instead of V1's proposer
     (`_wrap_v2_propose`: feedback, lookup search over V2's token history, early exit, step skipping;
     the step is settled there because V2 stores its [B, K] draft block right after), and V2's
     `take_draft_token_ids` cuts each request's placeholder list to the settled length. Chains only.
The runner wrappers of points 2-5 and 7 are in `runner_hooks.py`, the lookup chains of point 5 in
`lookup_choice.py`. Lossless: stopping only removes proposals; the target verifies whatever remains. Greedy draft
sampling only: when vLLM samples drafts probabilistically (draft probabilities kept for rejection
sampling) the step runs at fixed K so that probabilities and tokens stay aligned.
"""

from __future__ import annotations

import functools
import os
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vllm_specx.core.early_stop import (
    DraftingPayoff,
    DraftLengthPolicy,
    OnlineAcceptCalibration,
    branch_child_probs,
    draft_step_features,
    load_early_stop,
    top_probs_and_entropy,
)
from vllm_specx.core.spec_vocab import summarise_logprobs
from vllm_specx.vllm_adapter.lookup_choice import LookupCandidates, load_lookup_candidates

if TYPE_CHECKING:
    from vllm_specx.vllm_adapter.runner_hooks import V2TokenHistory

DEFAULT_THRESHOLD = 0.25  # used when the drafter folder has no calibrated cost model


class _AllStopped(Exception):
    def __init__(self, tokens: torch.Tensor):  # [B, d]
        super().__init__()
        self.tokens = tokens


@dataclass
class ChainStopController:
    """Decides, per engine step, how many draft tokens each request keeps."""

    policy: DraftLengthPolicy
    hidden_proj: torch.Tensor | None
    threshold_for_batch: callable  # batch_size -> node threshold
    calibration: OnlineAcceptCalibration | None = None
    _: KW_ONLY  # the rest by name only (a field added here must not shift positional callers)
    drafting_pays: callable = lambda batch_size: True  # False: skip the drafter for this step entirely
    metrics: object | None = None  # prom_metrics.SpecxMetrics
    payoff: DraftingPayoff | None = None  # skips whole steps whose drafting recently did not pay
    max_siblings: int = 0  # PCT: runner-up tokens per depth offered as alternative children (0: chains)
    expand_children: int = 0  # PCT: children drafted under each runner-up worth expanding (0: runner-ups are leaves)
    branch_decision: bool = True  # PCT: the decision model estimates the expanded children (False: draft confidence)
    sibling_threshold_for_batch: callable | None = None  # default: threshold_for_batch
    lookup: LookupCandidates | None = None  # prompt-lookup chains competing with the drafter's
    # A lookup token costs only its verification (no draft level): its node threshold is the marginal
    # verify cost alone (default: threshold_for_batch)
    lookup_threshold_for_batch: callable | None = None
    token_history: V2TokenHistory | None = None  # V2 runner: where the lookup search reads each request's tokens
    settled: list[int] | None = None  # V2 runner: the lengths of the step just drafted, for take_draft_token_ids
    # Steps that do not pay (cost model / payoff, not lookup preemption) also skip the drafter's forward
    # when every request is decoding: faster at large batches, but the drafter's KV cache then has holes
    # at those positions, which can only make its later drafts worse (never the output: lossless).
    skip_forward: bool = False
    # With skip_forward: such a step skips the forward even when it holds prefills. Requests whose prompt
    # (or a chunk of it) the drafter skipped are drafter-blind for the rest of their life: the drafter never
    # drafts for them (its KV cache lacks their prompt), prompt-lookup chains still may. At batch sizes
    # where drafting keeps not paying this saves the drafter's pass over every new prompt.
    skip_prefill: bool = False
    _drafter_seen: set = field(default_factory=set)  # requests whose prompt the drafter has processed
    _blind: set = field(default_factory=set)  # requests whose prompt the drafter skipped (skip_prefill)
    _num_sampled: list[int] | None = None  # this step's feedback, aligned with _req_ids
    _forward_skippable: bool = False
    _sibs: list = field(default_factory=list)  # per depth: (ids [B, m], probs [B, m], chain path prob [B])
    _sib_path_conf: list = field(default_factory=list)  # per depth: [B] product of the chain's confidences above it
    _children: tuple | None = None  # (ids [B, D, m, c], probs [B, D, m, c]) drafted under runner-ups, or None
    _branch_accept: torch.Tensor | None = None  # [B, D, m] decision model's P(best child accepted); None: not run
    _trees: list | None = None  # per request: (node tokens, parents) of the step that just ran
    stats: dict = field(default_factory=lambda: {"steps": 0, "early_exits": 0, "kept": 0, "max_tokens": 0})
    _armed: bool = False
    _depth: int = 0
    _path_conf: torch.Tensor | None = None
    _tokens: list = field(default_factory=list)
    _lengths: list[int] | None = None
    _req_ids: list[str] | None = None  # this step's batch, in row order (from the runner)
    _scale: torch.Tensor | None = None  # [B] online calibration of the accept probability
    _blind_rows: torch.Tensor | None = None  # [B] bool: drafter-blind rows of this step (None: none)
    _raw_path: torch.Tensor | None = None  # [B] product of the model's raw accept probs kept so far
    _expected: torch.Tensor | None = None  # [B] sum of raw path probs over kept tokens
    _last: dict = field(default_factory=dict)  # req_id -> expected accepted of the step being verified
    _last_step: tuple[int, int] | None = None  # (batch size, requests that kept drafts) of that step; None: skipped
    _skipping: bool = False

    def feedback(self, req_ids: list[str], num_sampled: list[int]) -> None:
        """Before a step drafts: num_sampled[i] tokens were just emitted for req_ids[i] (accepted
        drafts + 1; 0 for a partial prefill). Feeds the calibration with the step now verified."""
        self._req_ids, self._num_sampled = list(req_ids), list(num_sampled)
        self._drafter_seen &= set(req_ids)  # finished or preempted requests leave the batch
        self._blind &= self._drafter_seen  # (a preempted request prefills afresh when it comes back)
        if self.lookup is not None:
            self.lookup.feedback(req_ids, num_sampled)
        accepted = [max(n - 1, 0) if r in self._last else 0 for r, n in zip(req_ids, num_sampled)]
        if self.payoff is not None and self._last_step is not None:
            self.payoff.update(self._last_step[0], sum(accepted), self._last_step[1])
        self._last_step = None
        if self.calibration is None:
            return
        expected = [self._last.get(r, 0.0) for r in req_ids]
        self.calibration.update(req_ids, accepted, expected)
        if self.metrics is not None:
            for r, a in zip(req_ids, accepted):
                if r in self._last:
                    self.metrics.accepted.observe(a)

    def begin(self, armed: bool) -> None:
        self._armed, self._depth, self._tokens, self._lengths, self._path_conf = armed, 0, [], None, None
        self._sibs, self._trees, self._sibling_threshold, self._children = [], None, None, None
        self._sib_path_conf, self._branch_accept = [], None

    def skip_step(self, batch_size: int) -> bool:
        """True when drafting does not pay at this batch size (cost model, and what drafting steps at
        this batch size recently earned: `DraftingPayoff`), or when every request has a lookup chain
        the drafter would not beat (`LookupCandidates.preempts`): the drafter drafts nothing."""
        self._skipping = self._forward_skippable = False
        preempted = self.lookup is not None and self._req_ids is not None and len(self._req_ids) == batch_size \
            and self.lookup.preempts(self._req_ids, self.lookup_threshold(batch_size))
        if not preempted and self.drafting_pays(batch_size) and (self.payoff is None or self.payoff.pays(batch_size)):
            return False
        self._skipping = True
        # a decode-only step of requests whose prompts the drafter has seen may skip the forward too; with
        # skip_prefill any step may (the requests it leaves unseen turn drafter-blind: `forward_skipped`)
        self._forward_skippable = self.skip_forward and not preempted and self._num_sampled is not None \
            and len(self._num_sampled) == batch_size and (self.skip_prefill or (
                min(self._num_sampled, default=0) >= 1 and all(r in self._drafter_seen for r in self._req_ids)))
        if preempted:  # every request has a lookup chain the drafter would not beat: skip its head
            self.stats["lookup_preempted"] = self.stats.get("lookup_preempted", 0) + 1
        self._lengths, self._armed, self._expected = [0] * batch_size, True, torch.zeros(batch_size)
        self.stats["skipped_steps"] = self.stats.get("skipped_steps", 0) + 1
        if self.metrics is not None:
            self.metrics.skipped_steps.inc()
        return True

    def forward_skipped(self) -> bool:
        """After `skip_step`: True when this step skips the drafter's forward as well (counted)."""
        if not self._forward_skippable:
            return False
        self._forward_skippable = False
        self.stats["forward_skipped"] = self.stats.get("forward_skipped", 0) + 1
        blind = [r for r in self._req_ids if r not in self._drafter_seen]  # only under skip_prefill
        self._blind.update(blind)
        self._drafter_seen.update(blind)  # nothing left to keep complete: later steps may skip the forward
        self.stats["blind_requests"] = self.stats.get("blind_requests", 0) + len(blind)
        if self.metrics is not None:
            self.metrics.forwards_skipped.inc()
            if blind:
                self.metrics.blind_requests.inc(len(blind))
        return True

    def forward_ran(self) -> None:
        """The drafter's forward ran this step: requests past their prefill are now known to it."""
        if self._req_ids is not None and self._num_sampled is not None:
            self._drafter_seen |= {r for r, n in zip(self._req_ids, self._num_sampled) if n >= 1}

    def observe(self, normed_hidden: torch.Tensor, logits: torch.Tensor, logprobs: bool = False,
                topk_logprobs: torch.Tensor | None = None) -> None:
        """One draft step: normed_hidden [B, H], logits [B, V] (the token drafted is the argmax);
        logprobs=True: the row holds log-probs of a subset head that may sum to < 1 (not renormalised);
        topk_logprobs [B, k]: that row's finite entries (the rest are -inf), summarised instead of the
        row (same top probabilities and entropy, without a pass over the vocabulary)."""
        if not self._armed or self._skipping:  # V2's K = 0 step still samples the prefill's head: not a draft
            return
        b = logits.shape[0]
        if self._depth == 0:
            self.policy.begin(b, self.threshold_for_batch(b), device="cpu")
            self._path_conf = torch.ones(b)
            rows_known = self._req_ids is not None and len(self._req_ids) == b
            ids_ok = self.calibration is not None and rows_known
            self._scale = self.calibration.scales(self._req_ids) if ids_ok else torch.ones(b)
            self._blind_rows = torch.tensor([r in self._blind for r in self._req_ids]) \
                if rows_known and self._blind else None
            if self._blind_rows is not None:  # drafter-blind requests keep no drafter token
                self.policy.active &= ~self._blind_rows
            self._raw_path, self._expected = torch.ones(b), torch.zeros(b)
            # The step's sibling threshold (also used by _build_trees), or None when no sibling can be
            # kept: a runner-up's gain is path_prob * q with q <= 1/2 (it is not the top token), so at a
            # node threshold >= 1/2 their top-k and the tree are skipped (exact).
            thr = float((self.sibling_threshold_for_batch or self.threshold_for_batch)(b))
            self._sibling_threshold = thr if self.max_siblings > 0 and thr < 0.5 else None
        # log-probs of the proposal once per depth: a subset head already returns them (not renormalised)
        logp = logits.float() if logprobs else torch.log_softmax(logits.float(), dim=-1)
        if logprobs:
            top, entropy = summarise_logprobs(logp if topk_logprobs is None else topk_logprobs, k=2)
        else:
            top, entropy = top_probs_and_entropy(logp, k=2)
        top, entropy = top.cpu(), entropy.cpu()
        depth = torch.full((b,), self._depth)
        feats = draft_step_features(normed_hidden.float().cpu(), top, entropy, depth, self._path_conf,
                                    self.hidden_proj)
        raw = self.policy.model.predict_accept_prob(feats).float()  # [B]
        keep = self.policy.step(accept_prob=(raw * self._scale).clamp(max=1.0))
        self._raw_path = torch.where(keep, self._raw_path * raw, self._raw_path)
        self._expected += torch.where(keep, self._raw_path, torch.zeros(b))
        self._tokens.append(logits.argmax(-1))
        if self._sibling_threshold is not None:
            top_lp, top_i = logp.topk(self.max_siblings + 1, dim=-1)
            top_p = top_lp.exp()
            if self._blind_rows is not None:  # nor a runner-up (their path prob stays 1: nothing kept)
                top_p = top_p.masked_fill(self._blind_rows[:, None].to(top_p.device), 0.0)
            path = self.policy.path_prob.clone()  # P(chain through this depth accepted), where kept
            self._sibs.append((top_i[:, 1:].cpu(), top_p[:, 1:].cpu(), path.cpu()))
            self._sib_path_conf.append(self._path_conf)
        self._path_conf = self._path_conf * top[:, 0]
        self._depth += 1
        self._lengths = self.policy.num_tokens.tolist()
        if self.policy.done and self._depth < self.policy.max_k:
            kept = max(self._lengths)
            self.stats["early_exits"] += 1
            if self.metrics is not None:
                self.metrics.early_exits.inc()
            raise _AllStopped(torch.stack(self._tokens[: max(kept, 1)], dim=1))

    def finish(self) -> list[int] | None:
        """Per-request lengths of the step that just ran (None: not armed, keep vLLM's lists)."""
        lengths, self._lengths, self._armed = self._lengths, None, False  # one use: never stale
        if lengths is not None and self._sibs and len(self._sibs) == len(self._tokens):
            self._trees = self._build_trees(lengths)
        ids = self._req_ids or []
        self._last = ({r: float(e) for r, e, n in zip(ids, self._expected.tolist(), lengths) if n > 0}
                      if lengths is not None and len(ids) == len(lengths) else {})
        self._req_ids = None
        self._last_step = None if lengths is None or self._skipping else (len(lengths), sum(n > 0 for n in lengths))
        self._skipping = False
        if lengths is not None:
            self.stats["steps"] += 1
            self.stats["kept"] += sum(lengths)
            self.stats["max_tokens"] += self.policy.max_k * len(lengths)
            if self.metrics is not None:
                self.metrics.draft_steps.inc()
                self.metrics.tokens_kept.inc(sum(lengths))
                self.metrics.tokens_max.inc(self.policy.max_k * len(lengths))
        return lengths

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(chain ids [B, D], chain path prob [B, D], runner-up ids [B, D, m], their probs [B, D, m])."""
        return (torch.stack([t.cpu() for t in self._tokens], dim=1), torch.stack([s[2] for s in self._sibs], dim=1),
                torch.stack([s[0] for s in self._sibs], dim=1), torch.stack([s[1] for s in self._sibs], dim=1))

    def expand(self, model, bonus: torch.Tensor, root_pos: torch.Tensor, block_table: torch.Tensor) -> None:
        """After the chain loop: one more drafter pass drafts the children of the runner-ups worth it
        (`core.tree.siblings_to_expand`), for `_build_trees`. bonus [B]: the token the target sampled last
        (the root, at position root_pos [B]); block_table [B, max_blocks]: the batch's KV block table. A
        runner-up at depth d hangs under chain node d-1 (the root for d = 0), at position root + d + 1."""
        from vllm_specx.core.tree import siblings_to_expand

        self._children, self._branch_accept = None, None
        lengths = self._lengths
        if self.expand_children <= 0 or self._sibling_threshold is None or lengths is None or not self._sibs \
                or len(self._sibs) != len(self._tokens) or len(lengths) != bonus.shape[0]:
            return
        chain_ids, chain_path, sib_ids, sib_probs = self._stacked()
        worth = siblings_to_expand(torch.tensor(lengths), chain_path, sib_probs, self._sibling_threshold,
                                   node_budget=self.policy.max_k)
        req, depth, sib = worth.nonzero().unbind(1)  # [R] each
        if req.numel() == 0:
            return
        parent = torch.where(depth == 0, bonus.cpu()[req], chain_ids[req, (depth - 1).clamp(min=0)])
        dev = bonus.device
        hidden, logp = model.branch_logprobs(sib_ids[req, depth, sib].to(dev), parent.to(dev),
                                             (root_pos.cpu()[req] + depth).to(dev),
                                             block_table[req.to(block_table.device)])
        top_lp, top_i = logp.topk(self.expand_children, dim=-1)  # [R, c]
        shape = (*sib_ids.shape, self.expand_children)
        child_ids, child_probs = torch.zeros(shape, dtype=torch.long), torch.zeros(shape)
        child_ids[req, depth, sib], child_probs[req, depth, sib] = top_i.cpu(), top_lp.exp().float().cpu()
        self._children = (child_ids, child_probs)
        if self.branch_decision and self.policy.model is not None:
            path_conf = torch.stack(self._sib_path_conf, dim=1)[req, depth] * sib_probs[req, depth, sib]
            self._branch_accept = torch.zeros(sib_ids.shape)
            self._branch_accept[req, depth, sib] = self._branch_accept_prob(hidden, logp, req, depth + 1, path_conf)
        self.stats["expansions"] = self.stats.get("expansions", 0) + 1
        self.stats["runner_ups_expanded"] = self.stats.get("runner_ups_expanded", 0) + int(req.numel())
        if self.metrics is not None:
            self.metrics.tree_expansions.inc()
            self.metrics.tree_runner_ups_expanded.inc(int(req.numel()))

    def _branch_accept_prob(self, normed_hidden: torch.Tensor, logp: torch.Tensor, req: torch.Tensor,
                            depth: torch.Tensor, path_conf: torch.Tensor) -> torch.Tensor:
        """The decision model on R branch draft steps, with the features of a chain step (normed_hidden
        [R, H], log-probs logp [R, V] of the children; req, depth, path_conf [R]: request row, the children's
        depth, product of the draft confidences above them) and the request's online calibration. -> [R]"""
        top, entropy = summarise_logprobs(logp, k=2)
        feats = draft_step_features(normed_hidden.float().cpu(), top.cpu(), entropy.cpu(), depth, path_conf,
                                    self.hidden_proj)
        raw = self.policy.model.predict_accept_prob(feats).float()
        return (raw * self._scale[req]).clamp(max=1.0)

    def _build_trees(self, lengths: list[int]) -> list[tuple[list[int], list[int]]]:
        from vllm_specx.core.tree import chain_with_siblings

        b = len(lengths)
        chain_ids, chain_path, sib_ids, sib_probs = self._stacked()
        child_ids, child_probs = self._children or (None, None)
        if child_probs is not None and self._branch_accept is not None:
            child_probs = branch_child_probs(child_probs, self._branch_accept)
        tree = chain_with_siblings(chain_ids, torch.tensor(lengths), chain_path, sib_ids, sib_probs,
                                   self._sibling_threshold, node_budget=self.policy.max_k,
                                   child_ids=child_ids, child_probs=child_probs)
        out = []
        for r in range(b):
            n = int(tree.num_nodes[r])
            out.append((tree.token_ids[r, 1:n].tolist(), tree.parents[r, 1:n].tolist()))
        return out

    def lookup_chains(self, req_ids: list[str]) -> list[list[int] | None]:
        """Per request: the prompt-lookup chain to verify instead of the drafter's, or None. Call after
        `finish` (it compares with the drafter's expected accepted tokens of this step)."""
        if self.lookup is None:
            return [None] * len(req_ids)
        chains = self.lookup.choose(req_ids, self.lookup_threshold(len(req_ids)),
                                    [self._last.get(r, 0.0) for r in req_ids])
        for r, chain in zip(req_ids, chains):
            if chain is not None:  # the drafter's calibration learns from its own drafts only
                self._last.pop(r, None)
        if self.metrics is not None:
            self.metrics.lookup_chains.inc(sum(c is not None for c in chains))
            self.metrics.drafter_chains.inc(sum(c is None and self._last.get(r, 0.0) > 0.0
                                                for r, c in zip(req_ids, chains)))
        return chains

    def lookup_threshold(self, batch_size: int) -> float:
        """Node threshold of a lookup token at this batch size (see lookup_threshold_for_batch)."""
        return float((self.lookup_threshold_for_batch or self.threshold_for_batch)(batch_size))

    def take_trees(self, runner, req_ids: list[str]) -> list | None:
        """Per request (aligned with req_ids): (node tokens, parents) of the tree drafted this step.
        runner: the V1 model runner, or the V2 step's input_batch (unused here; context for overrides)."""
        trees, self._trees = self._trees, None
        return trees


def load_controller(drafter_dir: str | Path, early_stop: dict, max_k: int,
                    tree: dict | None = None, vocab_mode: str | None = None,
                    lookup: dict | None = None) -> ChainStopController | None:
    """The controller described by specx_config.json's `early_stop` section (None when absent/off).
    tree = {"max_siblings": m, optional "threshold", "expand_children": c, "branch_decision": bool}: draft PCT
    trees (chain + pruned runner-up children, and c children drafted under the runner-ups worth it, estimated
    by the decision model when branch_decision, else by draft confidence; see core.tree); their node
    threshold is the cost model's, else tree.threshold, else the early-stop threshold. The cost model is
    the first one measured on this machine (`calibrate.find_cost_model`: the drafter folder, then its
    cost_models/<machine>/ folders); one
    measured in the LM-head mode in use, vocab_mode (`cost_model.<mode>.json`, written by `vllm-specx
    calibrate` under SPECX_VOCAB=<mode>), wins over the default file, since the head's mode changes the
    cost of a draft step.
    lookup = {"first_accept": [...], "deeper_accept": [...], optional "min_n", "preempt_expected" (env
    SPECX_LOOKUP_PREEMPT overrides it)}: prompt-lookup chains
    compete with the drafter's each step (`LookupCandidates`); None: the drafter's chains only."""
    if not early_stop or not early_stop.get("enabled", True) or "path" not in early_stop:
        return None
    folder = Path(drafter_dir) / early_stop["path"]
    model = load_early_stop(folder)
    proj = getattr(model, "hidden_proj", None)
    forced = os.environ.get("SPECX_NODE_THRESHOLD")  # experiments: one fixed threshold for every node
    if forced is not None:
        early_stop = dict(early_stop, threshold=float(forced))
        tree = dict(tree or {}, threshold=float(forced))
    cost = None
    if forced is None:
        from vllm_specx.cost_model_files import find_cost_model, machine_id

        names = [early_stop.get("cost_model", "cost_model.json")]
        if vocab_mode is not None:
            names.insert(0, f"cost_model.{vocab_mode}.json")
        cost, _, elsewhere = find_cost_model(drafter_dir, names)
        if cost is None and elsewhere:
            from vllm.logger import init_logger

            init_logger(__name__).warning(
                "vllm-specx: the cost models in %s were measured on %s, this machine is %r: ignoring them (node "
                "threshold %s). Run `vllm-specx calibrate --drafter %s` here to fit drafting to this machine.",
                drafter_dir, sorted(set(elsewhere)), machine_id(), early_stop.get("threshold", DEFAULT_THRESHOLD),
                drafter_dir)
    if cost is not None:
        # Functions of the batch size only, asked several times per engine step: memoised (the fitted
        # model's predict was 0.2 % of the engine's time at 64 in flight).
        @functools.lru_cache(maxsize=4096)
        def threshold(batch_size: int) -> float:
            return float(cost.node_threshold(batch_size))

        @functools.lru_cache(maxsize=4096)
        def drafting_pays(batch_size: int) -> bool:
            return bool(cost.first_token_threshold(batch_size) < 1.0)

        @functools.lru_cache(maxsize=4096)
        def step_costs(batch_size: int) -> tuple[float, float]:  # (draft level, verify of 1 token) / plain
            plain = float(cost.target_step_time(batch_size, 1))
            verify = float(cost.target_step_time(batch_size, 2)) - plain
            return float(cost.draft_step_time(batch_size, 1)) / plain, max(verify, 0.0) / plain

        @functools.lru_cache(maxsize=4096)
        def lookup_threshold(batch_size: int) -> float:  # verify one more token / plain step: no draft level
            return step_costs(batch_size)[1]

        def step_cost_ratio(batch_size: int, kept_fraction: float) -> float:
            draft, verify = step_costs(batch_size)
            return draft + kept_fraction * verify

        # With skip_forward, the bundled drafter and lookup chains, batch 1, Intel
        # (results/paired_b1_step_skipping_smollm2_cpu_intel_{on,off}.json): 1.18x and 1.14x of no
        # speculation in two runs vs 1.10x with both off; 64 in flight served: 0.95x (3 reps) vs 0.92x with
        # payoff only. A drop in load after skipped forwards left the tail's acceptance as it was.
        env = os.environ.get("SPECX_STEP_PAYOFF")
        on = early_stop.get("step_payoff", True) if env is None else env == "1"
        payoff = DraftingPayoff(step_cost_ratio) if on else None
        env = os.environ.get("SPECX_SKIP_FORWARD")
        skip_forward = early_stop.get("skip_forward", True) if env is None else env == "1"
        env = os.environ.get("SPECX_SKIP_PREFILL")
        skip_prefill = skip_forward and (early_stop.get("skip_prefill", False) if env is None else env == "1")
    else:
        fixed = float(early_stop.get("threshold", DEFAULT_THRESHOLD))

        def threshold(batch_size: int) -> float:
            return fixed

        def drafting_pays(batch_size: int) -> bool:
            return True

        payoff, skip_forward, skip_prefill, lookup_threshold = None, False, False, threshold
    calibration = OnlineAcceptCalibration() if early_stop.get("online_calibration", True) else None
    from vllm_specx.vllm_adapter.prom_metrics import specx_metrics

    tree = tree or {}
    sibling_threshold = threshold
    if cost is None and "threshold" in tree:
        fixed_sibling = float(tree["threshold"])
        sibling_threshold = lambda batch_size: fixed_sibling  # noqa: E731
    return ChainStopController(
        DraftLengthPolicy(max_k, model), proj, threshold, calibration=calibration, drafting_pays=drafting_pays,
        metrics=specx_metrics(), payoff=payoff, skip_forward=skip_forward, skip_prefill=skip_prefill,
        max_siblings=int(tree.get("max_siblings", 0)),
        expand_children=int(tree.get("expand_children", 0)), branch_decision=bool(tree.get("branch_decision", True)),
        sibling_threshold_for_batch=sibling_threshold, lookup_threshold_for_batch=lookup_threshold,
        lookup=None if lookup is None else load_lookup_candidates(lookup))
