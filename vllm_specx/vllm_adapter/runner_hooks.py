"""vLLM runner glue of the draft-length controller (`draft_length.ChainStopController`), V1 and V2.

V1: `SpecDecodeBaseProposer.propose` (arm the controller, skip steps, end the drafting loop once every
request stopped), `GPUModelRunner.take_draft_token_ids` (cut each request's list to its own length, or
swap in its lookup chain or tree) and `GPUModelRunner.propose_draft_token_ids` (feedback of the tokens
just accepted, lookup search before drafting). V2: the speculator's `propose` (the same, settled in place
because V2 stores its [B, K] draft block right after), `take_draft_token_ids` and `sample_tokens`. Every
method wrapped here is declared in `compat.INTERNALS`; a proposer whose model carries no controller runs
unchanged.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from vllm_specx.vllm_adapter.draft_length import ChainStopController, _AllStopped


def _controller_of(proposer) -> ChainStopController | None:
    return getattr(getattr(proposer, "model", None), "draft_length", None)


def _wrap_propose(orig):
    @functools.wraps(orig)
    def propose(self, num_speculative_tokens, *args, **kwargs):
        ctl = _controller_of(self)
        if ctl is None:
            return orig(self, num_speculative_tokens, *args, **kwargs)
        sampling = kwargs.get("sampling_metadata", args[6] if len(args) > 6 else None)
        # instance attributes of the proposer (read strictly: a rename must fail, not arm wrongly)
        greedy_drafts = not self._enable_probabilistic_draft_probs or bool(sampling.all_greedy)
        ctl.begin(armed=greedy_drafts and num_speculative_tokens > 1)
        next_token_ids = kwargs.get("next_token_ids", args[3] if len(args) > 3 else None)  # [B]
        branch_ctx = _branch_context(args, kwargs, next_token_ids) if greedy_drafts and ctl.expand_children else None
        if greedy_drafts and ctl.skip_step(next_token_ids.shape[0]):
            # A skipped step runs vLLM's own K = 0 step: the drafter's forward over the new tokens (its KV
            # cache stays complete, so later drafting is as good as if nothing was skipped) and no head.
            # With skip_forward it may return before the forward too (`forward_skipped`).
            if ctl.forward_skipped():
                return torch.empty((next_token_ids.shape[0], 0), dtype=torch.long, device=next_token_ids.device)
            num_speculative_tokens = 0
        try:
            tokens = orig(self, num_speculative_tokens, *args, **kwargs)
        except _AllStopped as stop:
            tokens = stop.tokens
        finally:
            ctl.forward_ran()
        if branch_ctx is not None:
            ctl.expand(self.model, *branch_ctx)
        return tokens

    propose.__specx_wrapped__ = True
    return propose


def _branch_context(args, kwargs, next_token_ids) -> tuple | None:
    """(root token [B], root position [B], block table [B, max_blocks]) from the proposer's arguments,
    read before it runs (it rewrites the attention metadata as it drafts): the sampled row of each request
    holds the last accepted token, one position before the root (`set_inputs_first_pass`)."""
    positions = kwargs.get("target_positions", args[1] if len(args) > 1 else None)
    sample_rows = kwargs.get("token_indices_to_sample", args[4] if len(args) > 4 else None)
    metadata = kwargs.get("common_attn_metadata", args[5] if len(args) > 5 else None)
    if positions is None or metadata is None or next_token_ids is None or positions.dim() != 1:
        return None  # M-RoPE targets: no expansion
    if sample_rows is None:
        sample_rows = metadata.query_start_loc[1:] - 1
    return next_token_ids.clone(), positions[sample_rows].long() + 1, metadata.block_table_tensor


def _wrap_v2_propose(orig):
    """V2 runner (`TargetDependentARSpeculator.propose`): the same protocol as `_wrap_propose`, where V2
    keeps its drafts: a [B, K] block (`self.draft_tokens`) that the runner copies into its request states
    and reads the first n of when the scheduler schedules n drafts for a request. Feedback comes here
    too (V2 hands the speculator num_sampled [B], rows in input_batch.req_ids order), and so does the
    prompt-lookup search (V2's token history: `V2TokenHistory`). The step is settled here, not in
    `take_draft_token_ids` as under V1, because V2 stores the block right after this returns: each
    request's length is decided, its lookup chain (if chosen) written into its row, and the columns
    nobody will verify set to -1, as V2 itself does for a smaller K."""

    @functools.wraps(orig)
    def propose(self, input_batch, *args, **kwargs):
        ctl = _controller_of(self)
        if ctl is None or kwargs.get("dummy_run", False):
            return orig(self, input_batch, *args, **kwargs)
        b = input_batch.num_reqs
        req_ids = list(input_batch.req_ids[:b])
        ctl.settled = None  # set again below if this step is armed
        num_sampled = kwargs.get("num_sampled", args[4] if len(args) > 4 else None)  # [B] on the device
        ctl.feedback(req_ids, num_sampled[:b].tolist())
        k = kwargs.get("num_speculative_tokens") or self.num_speculative_steps
        # Greedy drafts through compute_logits only (not gumbel-sampled ones, nor the TP-local argmax
        # that bypasses compute_logits): the controller's tokens are then exactly V2's.
        greedy_drafts = self.draft_logits is None and not self.use_local_argmax_reduction
        if greedy_drafts and ctl.lookup is not None and ctl.token_history is not None:
            tokens, num_tokens = ctl.token_history.rows(input_batch.idx_mapping[:b])
            ctl.lookup.find(req_ids, tokens, num_tokens, None, min(ctl.policy.max_k, k),
                            ctl.token_history.max_model_len, threshold=ctl.lookup_threshold(b))
        ctl.begin(armed=greedy_drafts and k > 1)
        drafts = self.draft_tokens[:b]  # [B, K]
        if greedy_drafts and ctl.skip_step(b):  # as under V1: vLLM's K = 0 step, or no forward at all
            if ctl.forward_skipped():
                return _settle_v2(ctl, input_batch, req_ids, drafts.fill_(-1))
            kwargs["num_speculative_tokens"] = 0  # V2 fills the block with -1 after the drafter's forward
        try:
            drafts = orig(self, input_batch, *args, **kwargs)
        except _AllStopped as stop:
            d = stop.tokens.shape[1]
            drafts[:, :d] = stop.tokens.to(drafts)
            drafts[:, d:] = -1
        finally:
            ctl.forward_ran()
        return _settle_v2(ctl, input_batch, req_ids, drafts)

    propose.__specx_wrapped__ = True
    return propose


def _settle_v2(ctl: ChainStopController, input_batch, req_ids: list[str], drafts: torch.Tensor) -> torch.Tensor:
    """V2: this step's per-request lengths (`finish`), lookup chains where they win (`lookup_chains`) or
    PCT trees (`take_trees`: nodes in BFS order, registered for verification) written into their rows of
    drafts [B, K], -1 past each request's length. The lengths wait in `ctl.settled` for
    `take_draft_token_ids`. Not armed (sampled drafts): the block stays at fixed K."""
    lengths = ctl.finish()
    if lengths is None:
        return drafts
    b, k = drafts.shape
    rows = _v2_rows(ctl, input_batch, req_ids, k)
    if rows:
        chosen, row_tokens = torch.zeros(b, dtype=torch.bool), torch.full((b, k), -1, dtype=drafts.dtype)
        for i, tokens in rows:  # at most K long (`find` was given K; trees are cut to it)
            chosen[i], row_tokens[i, : len(tokens)], lengths[i] = True, torch.tensor(tokens), len(tokens)
        drafts.copy_(torch.where(chosen[:, None].to(drafts.device), row_tokens.to(drafts.device), drafts))
    length = torch.tensor(lengths, device=drafts.device)
    drafts.masked_fill_(torch.arange(k, device=drafts.device)[None, :] >= length[:, None], -1)
    ctl.settled = lengths
    return drafts


def _v2_rows(ctl: ChainStopController, input_batch, req_ids: list[str], k: int) -> list[tuple[int, list[int]]]:
    """(row, tokens) of the requests whose drafts are not the drafter's chain: a lookup chain, or a tree
    (registered with tree_step for the step that verifies it) where the request may have one."""
    chains = ctl.lookup_chains(req_ids)
    trees = ctl.take_trees(input_batch, req_ids)
    rows = [(i, c) for i, c in enumerate(chains) if c is not None]
    if trees is not None:
        from vllm_specx.vllm_adapter.tree_step import is_chain, register_tree, v2_tree_ok

        for i, (rid, (tokens, parents)) in enumerate(zip(req_ids, trees)):
            if chains[i] is None and tokens and len(tokens) <= k and not is_chain(parents) and v2_tree_ok(rid):
                register_tree(rid, tokens, parents)
                rows.append((i, list(tokens)))
    return rows


class V2TokenHistory:
    """Each V2 request's tokens (prompt + output so far, with this step's sampled tokens: V2's
    post_update writes them before the speculator runs), read for the prompt-lookup search. V2 keeps
    them in `RequestState.all_token_ids` [max_reqs, max_model_len] (UVA or device memory, int32) with
    `total_len` [max_reqs]; a row is copied to the host only when the search reads it."""

    def __init__(self, req_states):
        self.all_token_ids = req_states.all_token_ids.gpu
        self.total_len = req_states.total_len.gpu
        self.max_model_len = int(req_states.max_model_len)

    def rows(self, idx_mapping: torch.Tensor) -> tuple[_HistoryRows, np.ndarray]:
        """(rows indexable as tokens[i, :n] -> numpy, num_tokens [B]) for the batch's rows."""
        return _HistoryRows(self.all_token_ids, idx_mapping), self.total_len[idx_mapping].cpu().numpy()


class _HistoryRows:
    def __init__(self, all_token_ids: torch.Tensor, idx_mapping: torch.Tensor):
        self.all_token_ids, self.idx = all_token_ids, idx_mapping.tolist()

    def __getitem__(self, key: tuple[int, slice]) -> np.ndarray:
        row, cols = key
        return self.all_token_ids[self.idx[row], cols].cpu().numpy()


def _wrap_v2_sample_tokens(orig):
    """V2 runner: hands the speculator's controller the runner's token history (for the lookup search)
    before the step's sampling and drafting; V2's speculator itself has no reference to it."""

    @functools.wraps(orig)
    def sample_tokens(self, *args, **kwargs):
        ctl = _controller_of(self.speculator)
        if ctl is not None and ctl.lookup is not None and ctl.token_history is None:
            ctl.token_history = V2TokenHistory(self.req_states)
        return orig(self, *args, **kwargs)

    sample_tokens.__specx_wrapped__ = True
    return sample_tokens


def _wrap_take(orig):
    @functools.wraps(orig)
    def take_draft_token_ids(self):
        out = orig(self)
        if not hasattr(self, "drafter"):  # V2 runner: its speculator's wrapper settled the step
            ctl = _controller_of(getattr(self, "speculator", None))
            if ctl is None:
                return out
            lengths, ctl.settled = ctl.settled, None  # one use: never stale
            if out is not None and lengths is not None and len(lengths) == len(out.draft_token_ids):
                out.draft_token_ids = [list(ids[:n]) for ids, n in zip(out.draft_token_ids, lengths)]
            return out
        ctl = _controller_of(self.drafter)
        lengths = ctl.finish() if ctl is not None else None
        if out is None or lengths is None or len(lengths) != len(out.draft_token_ids):
            return out
        trees = ctl.take_trees(self, out.req_ids)
        lookups = ctl.lookup_chains(out.req_ids)
        from vllm_specx.vllm_adapter.tree_step import register_tree, tree_eligible, trees_supported

        use_trees = trees is not None and trees_supported(self)
        lists = []
        for i, (rid, ids, n) in enumerate(zip(out.req_ids, out.draft_token_ids, lengths)):
            tokens, parents = trees[i] if use_trees else ((), ())
            req = self.requests.get(rid) if use_trees else None
            if lookups[i] is not None:
                lists.append(lookups[i])
            elif tokens and req is not None and tree_eligible(req.sampling_params):
                register_tree(rid, tokens, parents)
                lists.append(tokens)
            else:
                lists.append(list(ids[:n]))
        out.draft_token_ids = lists
        return out

    take_draft_token_ids.__specx_wrapped__ = True
    return take_draft_token_ids


def _num_sampled(sampled_token_ids) -> list[int]:
    """Tokens emitted per request this step: list[list[int]], or a [B, K+1] tensor padded with -1."""
    if isinstance(sampled_token_ids, torch.Tensor):
        return (sampled_token_ids != -1).sum(dim=1).tolist()
    return [len(t) for t in sampled_token_ids]


def _pending_tokens(sampled_token_ids) -> list[list[int]] | None:
    """This step's sampled tokens not yet in input_batch.token_ids_cpu: vLLM hands EAGLE-style drafters
    the sampler's [B, K+1] tensor (padded with -1) before its bookkeeping writes them; drafters that
    get list[list[int]] run after it (the tokens are already there)."""
    if not isinstance(sampled_token_ids, torch.Tensor):
        return None
    return [[t for t in row if t != -1] for row in sampled_token_ids.tolist()]


def _wrap_propose_draft_token_ids(orig):
    @functools.wraps(orig)
    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, *args, **kwargs):
        ctl = _controller_of(getattr(self, "drafter", None))
        if ctl is not None:
            req_ids = list(self.input_batch.req_ids)
            ctl.feedback(req_ids, _num_sampled(sampled_token_ids))
            if ctl.lookup is not None:  # context per row: prompt + output so far (+ this step's tokens)
                batch = self.input_batch
                ctl.lookup.find(req_ids, batch.token_ids_cpu, batch.num_tokens_no_spec,
                                _pending_tokens(sampled_token_ids), ctl.policy.max_k, self.max_model_len,
                                threshold=ctl.lookup_threshold(len(req_ids)))
        return orig(self, scheduler_output, sampled_token_ids, *args, **kwargs)

    propose_draft_token_ids.__specx_wrapped__ = True
    return propose_draft_token_ids


def install_runner_hooks(runner: str = "v1") -> None:
    """Idempotent; a no-op for every proposer whose model carries no controller. runner: "v1" or "v2"."""
    if runner == "v2":
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2Runner
        from vllm.v1.worker.gpu.spec_decode.target_dependent_ar.speculator import TargetDependentARSpeculator

        _wrap_once(TargetDependentARSpeculator, "propose", _wrap_v2_propose)
        _wrap_once(V2Runner, "take_draft_token_ids", _wrap_take)
        _wrap_once(V2Runner, "sample_tokens", _wrap_v2_sample_tokens)
        return
    from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    _wrap_once(SpecDecodeBaseProposer, "propose", _wrap_propose)
    _wrap_once(GPUModelRunner, "take_draft_token_ids", _wrap_take)
    _wrap_once(GPUModelRunner, "propose_draft_token_ids", _wrap_propose_draft_token_ids)


def _wrap_once(owner: type, name: str, wrap) -> None:
    """owner.name = wrap(owner.name), unless a specx wrapper is already there."""
    if not getattr(getattr(owner, name), "__specx_wrapped__", False):
        setattr(owner, name, wrap(getattr(owner, name)))
