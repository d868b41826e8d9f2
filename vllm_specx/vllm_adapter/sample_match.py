"""Sample-then-match verification inside vLLM's V1 model runner, for specx drafters only.

vLLM verifies drafts by rejection sampling with its own random stream, so a seeded request sampled under
speculation does not repeat plain decoding's tokens, and vLLM refuses min_p, logit_bias and custom logits
processors under speculation. specx's drafts are deterministic given the context, so specx verifies them
with `core.sample_match.sample_then_match`: at each verified node (chains and PCT trees alike) vLLM's own
`Sampler` draws the target's token from that node's logits row exactly as plain decoding would draw it:

- the same processed logits: allowed tokens, bad words, logits processors (min_tokens, logit_bias, min_p,
  custom ones), penalties, temperature, top-k / top-p. Each request's output-so-far lists (which the
  penalties, bad words and processors read) hold the path accepted so far during the walk, and the
  processors' `update_state(None)` runs before every draw after the first, as before every plain step;
- the same random draws: the request's own generator is handed to the sampler only for requests whose walk
  is still alive, so it is consumed once per emitted token, in order; unseeded requests draw from the
  shared stream (the same distribution).

`_sample` (wrapped) does this for every step with drafts when the runner's drafter is specx's EDD model;
other drafters keep vLLM's rejection sampler. A batch of greedy requests whose logits nothing modifies
keeps vLLM's own verification (argmax matching: the same tokens). Tree steps (tree_step.py) are verified
here too and handed back to tree_step for their accepted path's KV move.

SPECX_SAMPLE_MATCH=0 (for measurements: sample-then-match against vLLM's rejection sampler on the same
drafter) hands chain steps back to vLLM's rejection sampler and keeps vLLM's refusals; PCT tree steps, which
vLLM cannot verify, stay here.

`install_request_guards` (from the plugin, every process) lifts vLLM's refusals for specx drafters only:
`SamplingParams` accepts min_p and logit_bias, and the runner builds the full set of logits processors
(built-in and custom) instead of min_tokens alone. Synchronous scheduling only (vLLM-CPU always is;
specx's early stop needs it too).
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import replace

import torch

from vllm_specx.core.sample_match import chain_parents, pack_drafts, sample_then_match
from vllm_specx.core.tree_verify import VerifyResult
from vllm_specx.vllm_adapter.drafter_parts import is_specx_model

_TEMPERATURE_EPS = 1e-5  # vLLM's: below it a request is greedy
STATS = {"steps": 0, "draws": 0}


# ------------------------------------------------------------------------------ request guards
def sample_match_on() -> bool:
    return os.environ.get("SPECX_SAMPLE_MATCH", "1") != "0"


def _is_specx(speculative_config) -> bool:
    from vllm_specx.plugin import SPECX_ARCHS

    draft = getattr(speculative_config, "draft_model_config", None)
    return bool(set(getattr(draft, "architectures", None) or ()) & set(SPECX_ARCHS))


def _wrap_validate_spec_decode(orig):
    @functools.wraps(orig)
    def _validate_spec_decode(self, speculative_config, *args, **kwargs):
        if _is_specx(speculative_config) and sample_match_on():
            return None  # specx verifies with the request's full sampling parameters
        return orig(self, speculative_config, *args, **kwargs)

    _validate_spec_decode.__specx_wrapped__ = True
    return _validate_spec_decode


def _wrap_build_logitsprocs(orig):
    @functools.wraps(orig)
    def build_logitsprocs(vllm_config, device, is_pin_memory, is_pooling_model, custom_logitsprocs=(),
                          *args, **kwargs):
        if is_pooling_model or not _is_specx(getattr(vllm_config, "speculative_config", None)) \
                or not sample_match_on():
            return orig(vllm_config, device, is_pin_memory, is_pooling_model, custom_logitsprocs, *args, **kwargs)
        import itertools

        from vllm.v1.sample import logits_processor as lp

        # what vLLM builds without speculation: the built-ins, then installed and requested custom ones
        classes = itertools.chain(lp.BUILTIN_LOGITS_PROCESSORS, lp._load_custom_logitsprocs(custom_logitsprocs))
        return lp.LogitsProcessors(ctor(vllm_config, device, is_pin_memory) for ctor in classes)

    build_logitsprocs.__specx_wrapped__ = True
    return build_logitsprocs


def install_request_guards() -> None:
    """Idempotent; runs from the plugin's register() in every vLLM process (the API server validates
    sampling parameters, the worker builds logits processors). Inert unless the drafter is specx's."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.sample import logits_processor as lp

    if not getattr(SamplingParams._validate_spec_decode, "__specx_wrapped__", False):
        SamplingParams._validate_spec_decode = _wrap_validate_spec_decode(SamplingParams._validate_spec_decode)
    if not getattr(lp.build_logitsprocs, "__specx_wrapped__", False):
        lp.build_logitsprocs = _wrap_build_logitsprocs(lp.build_logitsprocs)
    runner_module = sys.modules.get("vllm.v1.worker.gpu_model_runner")  # bound its own name at import
    if runner_module is not None:
        runner_module.build_logitsprocs = lp.build_logitsprocs


# ------------------------------------------------------------------------------ V1 verification
class _TargetDraws:
    """`draw` for core.sample_then_match inside V1's runner: each request's token after its current node,
    drawn by vLLM's Sampler on that node's logits row with the batch's sampling metadata."""

    def __init__(self, runner, logits: torch.Tensor, root_rows: torch.Tensor):
        batch = runner.input_batch
        self.sampler = runner.sampler
        self.metadata = batch.sampling_metadata
        self.logits = logits            # [num rows, V]: root and node rows of every request
        self.root_rows = root_rows      # [B] int64: each request's root row in logits
        B = root_rows.shape[0]
        self.history = list(batch.req_output_token_ids[:B])  # output-so-far lists, shared with vLLM
        self.lengths = [len(h) if h is not None else 0 for h in self.history]
        self.last: torch.Tensor | None = None  # [B] the previous draw
        self.logprobs: list = []  # per draw: LogprobsTensors over the B rows, or None

    def __call__(self, node: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        if self.last is not None:
            self._accept_last(alive)
        alive_idx = set(alive.nonzero()[:, 0].tolist())
        generators = {i: g for i, g in self.metadata.generators.items() if i in alive_idx}
        rows = (self.root_rows + node).to(self.logits.device)
        out = self.sampler(logits=self.logits[rows],
                           sampling_metadata=replace(self.metadata, generators=generators, spec_token_ids=None))
        STATS["draws"] += 1
        self.logprobs.append(out.logprobs_tensors)
        self.last = out.sampled_token_ids[:, 0].long().cpu()
        return self.last

    def _accept_last(self, alive: torch.Tensor) -> None:
        """Where the walk is alive the previous draw was accepted: it joins the output so far, as it would
        before plain decoding's next step (penalties, bad words, min_tokens and processors read it)."""
        for i in alive.nonzero()[:, 0].tolist():
            if self.history[i] is not None:
                self.history[i].append(int(self.last[i]))
        for processor in self.metadata.logitsprocs.all:
            processor.update_state(None)

    def restore(self) -> None:
        """The output-so-far lists as vLLM left them (its bookkeeping appends the emitted tokens)."""
        for h, n in zip(self.history, self.lengths):
            if h is not None:
                del h[n:]


def _logits_untouched(metadata) -> bool:
    """Whether no logits processing applies to greedy requests: then argmax over raw logits (vLLM's greedy
    verification) is what plain decoding takes."""
    from vllm.v1.sample.logits_processor.builtin import LogitBiasLogitsProcessor, MinTokensLogitsProcessor

    def inactive(p) -> bool:
        if isinstance(p, MinTokensLogitsProcessor):
            return not p.min_toks
        if isinstance(p, LogitBiasLogitsProcessor):
            return not p.biases
        return False  # a custom processor may change any row

    return (metadata.no_penalties and not metadata.bad_words_token_ids and metadata.allowed_token_ids_mask is None
            and all(inactive(p) for p in metadata.logitsprocs.non_argmax_invariant))


def _draft_forest(spec_decode_metadata, tree_rows: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every request's drafts as a tree under its root: its registered PCT tree (tree_rows: batch index ->
    tree_step._TreeRow) or the chain it is. -> token_ids, parents, node_valid [B, N]."""
    num_drafts = spec_decode_metadata.num_draft_tokens
    flat = spec_decode_metadata.draft_token_ids.tolist()
    tokens, parents, start = [], [], 0
    for i, n in enumerate(num_drafts):
        drafts = flat[start: start + n]
        start += n
        tokens.append(torch.tensor([0] + drafts, dtype=torch.long))
        parents.append(tree_rows[i].parents if i in tree_rows else chain_parents(n))
    return pack_drafts(tokens, parents)


def _stack_logprobs(per_draw: list, num_reqs: int, width: int):
    """Per-draw LogprobsTensors (B rows each) -> one LogprobsTensors of B * width rows, row b * width + j
    = request b's j-th emitted token (rows past a request's last emitted token are filtered out by vLLM)."""
    if not per_draw or per_draw[0] is None:
        return None
    from vllm.v1.outputs import LogprobsTensors

    fields = []
    for k in range(3):  # logprob_token_ids [B, L], logprobs [B, L], selected_token_ranks [B]
        stacked = torch.stack([lt[k] for lt in per_draw], dim=1)  # [B, J, ...]
        pad = torch.zeros((num_reqs, width - stacked.shape[1], *stacked.shape[2:]), dtype=stacked.dtype,
                          device=stacked.device)
        fields.append(torch.cat([stacked, pad], dim=1).flatten(0, 1))
    return LogprobsTensors(*fields)


def verify_step(runner, logits: torch.Tensor, spec_decode_metadata, tree_rows: dict):
    """Sample-then-match over a whole V1 step. -> (SamplerOutput [B, max drafts + 1] -1 padded, the walk:
    VerifyResult over the batch)."""
    from vllm.v1.outputs import SamplerOutput

    num_reqs = len(spec_decode_metadata.num_draft_tokens)
    token_ids, parents, valid = _draft_forest(spec_decode_metadata, tree_rows)
    cu_sampled = spec_decode_metadata.cu_num_sampled_tokens.cpu().long()  # [B]
    root_rows = cu_sampled - torch.tensor(spec_decode_metadata.num_draft_tokens, dtype=torch.long) - 1
    draws = _TargetDraws(runner, logits, root_rows)
    try:
        res = sample_then_match(token_ids, parents, valid, draws)
    finally:
        draws.restore()
    STATS["steps"] += 1
    width = spec_decode_metadata.max_spec_len + 1
    sampled = torch.full((num_reqs, width), -1, dtype=torch.int32)
    emitted = res.emitted_tokens(token_ids)  # [B, D + 1], D <= max drafts
    sampled[:, : emitted.shape[1]] = emitted.to(torch.int32)
    logprobs = _stack_logprobs(draws.logprobs, num_reqs, width)
    return SamplerOutput(sampled_token_ids=sampled.to(logits.device), logprobs_tensors=logprobs), res


def _finish_tree_step(step, res: VerifyResult, sampled_token_ids: torch.Tensor, samples) -> None:
    """Hand a tree step's walks back to tree_step (each tree request's accepted path, its row of
    sampled_token_ids [B, K + 1], statistics; samples(i): batch index i samples) and move the accepted
    paths' KV into place."""
    from vllm_specx.vllm_adapter import tree_step

    if step is None:
        return
    for i, row in step.rows.items():
        one = VerifyResult(res.accepted_path[i: i + 1], res.num_accepted[i: i + 1], res.bonus_token[i: i + 1])
        tree_step.record_tree_walk(row, one, sampled_token_ids[i], samples(i))
    tree_step.move_accepted_kv(step)


def runner_drafts_with_specx(runner) -> bool:
    return is_specx_model(getattr(getattr(runner, "drafter", None), "model", None))


def _wrap_sample(orig):
    @functools.wraps(orig)
    def _sample(self, logits, spec_decode_metadata, *args, **kwargs):
        from vllm_specx.vllm_adapter import tree_step

        if not runner_drafts_with_specx(self):
            return orig(self, logits, spec_decode_metadata, *args, **kwargs)
        step = tree_step.tree_step_to_verify(spec_decode_metadata is not None and logits is not None)
        metadata = self.input_batch.sampling_metadata
        if spec_decode_metadata is None or (step is None and (
                not sample_match_on() or metadata.all_greedy and _logits_untouched(metadata))):
            return orig(self, logits, spec_decode_metadata, *args, **kwargs)
        self.input_batch.update_async_output_token_ids()  # as vLLM's _sample (a no-op when synchronous)
        rows = step.rows if step is not None else {}
        out, res = verify_step(self, logits, spec_decode_metadata, rows)
        temperature = self.input_batch.temperature_cpu
        _finish_tree_step(step, res, out.sampled_token_ids, lambda i: float(temperature[i]) >= _TEMPERATURE_EPS)
        return out

    _sample.__specx_wrapped__ = True
    return _sample


# ------------------------------------------------------------------------------ V2 verification
# V2's sampler draws each row's token with Gumbel noise keyed by (the request's seed, the row's position),
# not from a consumed stream, and applies every sampling parameter per row with the rows before it (the
# drafts) as context. Its token for every row of a step is the token plain decoding draws at that row's
# position once the path before it is accepted, so V2's whole step is drawn at once and walked after.
_V2_SPECX_STEP = [False]  # set while a V2 runner whose drafter is specx's samples


def _v2_runner_drafts_with_specx(runner) -> bool:
    return is_specx_model(getattr(getattr(runner, "speculator", None), "model", None))


def _wrap_v2_runner_sample(orig):
    @functools.wraps(orig)
    def sample(self, *args, **kwargs):
        _V2_SPECX_STEP[0] = _v2_runner_drafts_with_specx(self)
        try:
            return orig(self, *args, **kwargs)
        finally:
            _V2_SPECX_STEP[0] = False

    sample.__specx_wrapped__ = True
    return sample


def _v2_draft_forest(cu_num_logits, row_inputs: list[int], tree_rows: dict):
    """Each V2 request's drafts as a tree under its root: its PCT tree (tree_rows: batch index ->
    tree_step._TreeRow; its own tokens: V2's placeholder test reads a side node's depth position as a
    prefill row), or the chain in its logits rows cu_num_logits[i]..[i + 1] (the root, then the drafts:
    those rows' inputs, -1 for placeholders). -> token_ids, parents, node_valid [B, N]."""
    tokens, parents = [], []
    for i in range(len(cu_num_logits) - 1):
        if i in tree_rows:
            tokens.append(tree_rows[i].tokens)
            parents.append(tree_rows[i].parents)
            continue
        lo, hi = int(cu_num_logits[i]), int(cu_num_logits[i + 1])
        tokens.append(torch.tensor([0] + row_inputs[lo + 1: hi], dtype=torch.long))
        parents.append(chain_parents(max(hi - lo - 1, 0)))
    return pack_drafts(tokens, parents)


def v2_verify_step(rejection_sampler, logits: torch.Tensor, input_batch, invalid_drafts, step):
    """Sample-then-match over a V2 step: V2's own sampler draws every logits row, then each request walks
    its chain or tree (step.rows: batch index -> tree_step._TreeRow). -> V2's SamplerOutput ([B, K + 1]
    -1 padded, num_sampled / num_rejected per request as V2's post_update reads them)."""
    from vllm.v1.worker.gpu.input_batch import get_num_sampled_and_rejected
    from vllm.v1.worker.gpu.sample.output import SamplerOutput
    from vllm.v1.worker.gpu.spec_decode.rejection_sampler import gather_draft_sampled

    sampler = rejection_sampler.sampler
    prefill_len = sampler.req_states.prefill_len.gpu
    draft_sampled, _ = gather_draft_sampled(input_batch.input_ids, input_batch.positions, input_batch.logits_indices,
                                            input_batch.expanded_idx_mapping, input_batch.expanded_local_pos,
                                            prefill_len)  # [num_logits] each row's input token (-1: none)
    if invalid_drafts is not None:  # drafts the grammar refuses never match
        draft_sampled = draft_sampled.masked_fill(invalid_drafts, -1)
    drawn_out = sampler(logits, input_batch)  # [num_logits, 1]: plain decoding's token at every row
    drawn = drawn_out.sampled_token_ids[:, 0].long().cpu()
    STATS["draws"] += 1
    num_reqs, cu = input_batch.num_reqs, input_batch.cu_num_logits_np
    token_ids, par, valid = _v2_draft_forest(cu[: num_reqs + 1], draft_sampled.cpu().tolist(),
                                             step.rows if step is not None else {})
    root_rows = torch.as_tensor(cu[:num_reqs], dtype=torch.long).clamp(max=max(drawn.numel() - 1, 0))
    res = sample_then_match(token_ids, par, valid, lambda node, alive: drawn[root_rows + node])
    STATS["steps"] += 1
    sampled = torch.full((num_reqs, rejection_sampler.num_speculative_steps + 1), -1, dtype=torch.int64)
    emitted = res.emitted_tokens(token_ids)
    sampled[:, : emitted.shape[1]] = emitted
    temperature, idx_mapping = sampler.sampling_states.temperature.np, input_batch.idx_mapping_np
    _finish_tree_step(step, res, sampled, lambda i: float(temperature[int(idx_mapping[i])]) >= _TEMPERATURE_EPS)
    device = logits.device
    num_sampled, num_rejected = get_num_sampled_and_rejected(
        res.num_accepted.to(device=device, dtype=torch.int32), input_batch.seq_lens, input_batch.cu_num_logits,
        input_batch.idx_mapping, prefill_len)
    return SamplerOutput(sampled_token_ids=sampled.to(device), logprobs_tensors=drawn_out.logprobs_tensors,
                         num_nans=drawn_out.num_nans, num_sampled=num_sampled, num_rejected=num_rejected)


def _wrap_v2_rejection_sample(orig):
    """V2's RejectionSampler.__call__(logits [num_logits, V], input_batch, draft_logits, invalid_drafts):
    specx steps (greedy drafts: no draft logits) are verified by `v2_verify_step`."""

    @functools.wraps(orig)
    def __call__(self, logits, input_batch, draft_logits=None, invalid_drafts=None, *args, **kwargs):
        from vllm_specx.vllm_adapter import tree_step

        if not _V2_SPECX_STEP[0] or draft_logits is not None or args or kwargs \
                or getattr(self, "watermark_key", None) is not None or self.sampler.return_sampling_mask:
            return orig(self, logits, input_batch, draft_logits, invalid_drafts, *args, **kwargs)
        step = tree_step.tree_step_to_verify(True)
        if step is None and not sample_match_on():
            return orig(self, logits, input_batch, draft_logits, invalid_drafts, *args, **kwargs)
        return v2_verify_step(self, logits, input_batch, invalid_drafts, step)

    __call__.__specx_wrapped__ = True
    return __call__


def install_sample_match_hooks(runner: str = "v1") -> None:
    """Idempotent. specx drafters' steps are verified by sample-then-match: V1's `_sample`, or V2's runner
    `sample` (marks the step as specx's) and rejection sampler."""
    if runner == "v2":
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2Runner
        from vllm.v1.worker.gpu.spec_decode.rejection_sampler import RejectionSampler

        hooks = [(V2Runner, "sample", _wrap_v2_runner_sample),
                 (RejectionSampler, "__call__", _wrap_v2_rejection_sample)]
    else:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        hooks = [(GPUModelRunner, "_sample", _wrap_sample)]
    for owner, name, wrap in hooks:
        if not getattr(getattr(owner, name), "__specx_wrapped__", False):
            setattr(owner, name, wrap(getattr(owner, name)))
