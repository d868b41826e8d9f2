"""Per-request draft length in vLLM's chain drafting (MCSD early stop); V1 runner, sync scheduling.

How it plugs in (each vLLM internal is declared in `compat.INTERNALS`):
  1. vLLM's EAGLE proposer calls the drafter's `compute_logits` exactly once per draft step with the
     step's hidden states [B, H] in batch order; `SpecxEddForCausalLM.compute_logits` hands them to
     `ChainStopController.observe`, which runs the decision model (`core.early_stop`) per request.
  2. `SpecDecodeBaseProposer.propose` is wrapped: `begin` before it; once every request has stopped,
     `observe` raises `_AllStopped` carrying the tokens drafted so far and the wrapper returns them
     ([B, d] instead of [B, K]): the drafting loop ends early, which is where batch-1 time is saved.
  3. `GPUModelRunner.take_draft_token_ids` is wrapped: each request's list is cut to its own length,
     so the scheduler verifies only the tokens that request kept (vLLM supports ragged draft lists:
     ngram returns empty ones).
Lossless: stopping only removes proposals; the target verifies whatever remains. Greedy draft
sampling only: when vLLM samples drafts probabilistically (draft probabilities kept for rejection
sampling) the step runs at fixed K so that probabilities and tokens stay aligned.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vllm_specx.core.early_stop import DraftLengthPolicy, draft_step_features, load_early_stop, topk_and_entropy

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
    stats: dict = field(default_factory=lambda: {"steps": 0, "early_exits": 0, "kept": 0, "max_tokens": 0})
    _armed: bool = False
    _depth: int = 0
    _path_conf: torch.Tensor | None = None
    _tokens: list = field(default_factory=list)
    _lengths: list[int] | None = None

    def begin(self, armed: bool) -> None:
        self._armed, self._depth, self._tokens, self._lengths, self._path_conf = armed, 0, [], None, None

    def observe(self, normed_hidden: torch.Tensor, logits: torch.Tensor) -> None:
        """One draft step: normed_hidden [B, H], logits [B, V] (the token drafted is the argmax)."""
        if not self._armed:
            return
        b = logits.shape[0]
        if self._depth == 0:
            self.policy.begin(b, self.threshold_for_batch(b), device="cpu")
            self._path_conf = torch.ones(b)
        top, entropy = topk_and_entropy(logits.float(), k=2)
        top, entropy = top.cpu(), entropy.cpu()
        depth = torch.full((b,), self._depth)
        feats = draft_step_features(normed_hidden.float().cpu(), top, entropy, depth, self._path_conf,
                                    self.hidden_proj)
        self.policy.step(feats)
        self._tokens.append(logits.argmax(-1))
        self._path_conf = self._path_conf * top[:, 0]
        self._depth += 1
        self._lengths = self.policy.num_tokens.tolist()
        if self.policy.done and self._depth < self.policy.max_k:
            kept = max(self._lengths)
            self.stats["early_exits"] += 1
            raise _AllStopped(torch.stack(self._tokens[: max(kept, 1)], dim=1))

    def finish(self) -> list[int] | None:
        """Per-request lengths of the step that just ran (None: not armed, keep vLLM's lists)."""
        lengths, self._lengths, self._armed = self._lengths, None, False  # one use: never stale
        if lengths is not None:
            self.stats["steps"] += 1
            self.stats["kept"] += sum(lengths)
            self.stats["max_tokens"] += self.policy.max_k * len(lengths)
        return lengths


def load_controller(drafter_dir: str | Path, early_stop: dict, max_k: int) -> ChainStopController | None:
    """The controller described by specx_config.json's `early_stop` section (None when absent/off)."""
    if not early_stop or not early_stop.get("enabled", True) or "path" not in early_stop:
        return None
    folder = Path(drafter_dir) / early_stop["path"]
    model = load_early_stop(folder)
    proj = getattr(model, "hidden_proj", None)
    cost_file = Path(drafter_dir) / early_stop.get("cost_model", "cost_model.json")
    if cost_file.exists():
        from vllm_specx.core.cost_model import CostModel

        cost = CostModel.load(cost_file)

        def threshold(batch_size: int) -> float:
            return float(cost.node_threshold(batch_size))
    else:
        fixed = float(early_stop.get("threshold", DEFAULT_THRESHOLD))

        def threshold(batch_size: int) -> float:
            return fixed
    return ChainStopController(DraftLengthPolicy(max_k, model), proj, threshold)


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
        ctl.begin(armed=greedy_drafts and self.num_speculative_tokens > 1)
        try:
            return orig(self, num_speculative_tokens, *args, **kwargs)
        except _AllStopped as stop:
            return stop.tokens

    propose.__specx_wrapped__ = True
    return propose


def _wrap_take(orig):
    @functools.wraps(orig)
    def take_draft_token_ids(self):
        out = orig(self)
        ctl = _controller_of(getattr(self, "drafter", None))
        lengths = ctl.finish() if ctl is not None else None
        if out is None or lengths is None or len(lengths) != len(out.draft_token_ids):
            return out
        out.draft_token_ids = [list(ids[:n]) for ids, n in zip(out.draft_token_ids, lengths)]
        return out

    take_draft_token_ids.__specx_wrapped__ = True
    return take_draft_token_ids


def install_runner_hooks() -> None:
    """Idempotent; a no-op for every proposer whose model carries no controller."""
    from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if not getattr(SpecDecodeBaseProposer.propose, "__specx_wrapped__", False):
        SpecDecodeBaseProposer.propose = _wrap_propose(SpecDecodeBaseProposer.propose)
    if not getattr(GPUModelRunner.take_draft_token_ids, "__specx_wrapped__", False):
        GPUModelRunner.take_draft_token_ids = _wrap_take(GPUModelRunner.take_draft_token_ids)
