"""PCT expansion below runner-ups: one extra drafter pass after the chain loop drafts the children of
runner-up tokens, reading the drafter's paged KV cache without writing the branch into it.

The check that it drafts the right thing: run along the chain's own node at depth d (its parent at slot
root + d), the expansion must give the distribution the chain loop itself drafted at depth d + 1 (same
cache, same positions, same weights); a runner-up differs from that node only in its token.
"""

import shutil

import pytest
import torch

from tests.conftest import many_prompts
from tests.vllm.trees import K
from vllm_specx.testing import assert_same_tokens, run_generate, specx_counter


@pytest.fixture(scope="module")
def edd_tree_drafter_mixing(edd_tree_drafter, tmp_path_factory):
    """The tree drafter with its attention and MLP outputs scaled up: the random drafter otherwise just
    repeats its input token (tied embeddings dominate the residual), so every branch would have the same
    parent token as the chain node it is compared with, and a wrong parent would go unnoticed."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("edd_tree_mixing") / "drafter"
    shutil.copytree(edd_tree_drafter, folder)
    weights = load_file(str(folder / "model.safetensors"))
    for name in ("layer.o_proj.weight", "layer.down_proj.weight"):
        weights[name] = weights[name] * 30
    save_file(weights, str(folder / "model.safetensors"))
    return str(folder)


def _record_chain_and_check_expansion(monkeypatch):
    """Wraps the controller: records each step's chain distributions; after each real expansion, runs it
    again with the first runner-up of every depth replaced by the chain's own token (probability 1, so
    that it ranks high enough to be expanded) and compares the children with the chain's next depth."""
    from vllm_specx.vllm_adapter.draft_length import ChainStopController

    seen = {"step_logp": [], "checked": [], "max_err": 0.0, "id_diff": 0, "expanded": 0, "new_parent": 0}
    orig_observe, orig_expand = ChainStopController.observe, ChainStopController.expand

    def observe(self, normed_hidden, logits, logprobs=False, topk_logprobs=None):
        if self._armed:
            if self._depth == 0:
                seen["step_logp"] = []
            seen["step_logp"].append(logits.float() if logprobs else torch.log_softmax(logits.float(), dim=-1))
        return orig_observe(self, normed_hidden, logits, logprobs, topk_logprobs)

    def expand(self, model, bonus, root_pos, block_table):
        before = self.stats.get("runner_ups_expanded", 0)
        orig_expand(self, model, bonus, root_pos, block_table)
        seen["expanded"] += self.stats.get("runner_ups_expanded", 0) - before
        real_sibs, real_children, logps = self._sibs, self._children, seen["step_logp"]
        real_accept = self._branch_accept
        if real_children is None and not real_sibs:
            return
        fake = []
        for d, (ids, probs, path) in enumerate(real_sibs):
            ids, probs = ids.clone(), probs.clone()
            ids[:, 0], probs[:, 0] = self._tokens[d].cpu(), 1.0
            fake.append((ids, probs, path))
        self._sibs = fake
        orig_expand(self, model, bonus, root_pos, block_table)
        child_ids, child_probs = self._children
        c = child_ids.shape[-1]
        for b, d in (child_probs[:, :, 0].sum(-1) > 0).nonzero().tolist():
            if d + 1 >= len(logps):
                continue  # the chain loop stopped at depth d: nothing to compare with
            ref_lp, ref_ids = logps[d + 1][b].cpu().topk(c)
            seen["id_diff"] += int((child_ids[b, d, 0] != ref_ids).sum())
            seen["max_err"] = max(seen["max_err"], float((child_probs[b, d, 0].log() - ref_lp).abs().max()))
            seen["checked"].append(d)
            parent = bonus[b] if d == 0 else self._tokens[d - 1][b]
            seen["new_parent"] += int(parent.item() != self._tokens[d][b].item())  # a branch, not a repeat
        self._sibs, self._children, self._branch_accept = real_sibs, real_children, real_accept

    monkeypatch.setattr(ChainStopController, "observe", observe)
    monkeypatch.setattr(ChainStopController, "expand", expand)
    return seen


def test_expansion_along_the_chain_reproduces_the_chain_and_runner_ups_are_expanded(
        tiny_target, edd_tree_drafter_mixing, tiny_plain_outputs, monkeypatch):
    from vllm_specx.vllm_adapter import tree_step

    counted = specx_counter("tree_runner_ups_expanded")
    # node threshold 0: chains run to depth K, so most expansions have a chain depth to compare with
    monkeypatch.setenv("SPECX_NODE_THRESHOLD", "0")
    seen = _record_chain_and_check_expansion(monkeypatch)
    before = dict(tree_step.STATS)
    spec = {"method": "eagle3", "model": edd_tree_drafter_mixing, "num_speculative_tokens": K}
    res = run_generate(tiny_target, many_prompts(64), spec, max_tokens=32)
    assert_same_tokens(tiny_plain_outputs["many"].token_ids, res.token_ids)
    assert seen["new_parent"] > len(seen["checked"]) // 2  # branches really differ from the chain
    assert {0, 1} <= set(seen["checked"]) and len(seen["checked"]) > 100, sorted(set(seen["checked"]))
    # log-probs: the random tiny drafter is nearly uniform, so probabilities alone would hide small errors
    assert seen["id_diff"] == 0 and seen["max_err"] < 1e-4, (seen["id_diff"], seen["max_err"])
    print("expansion check:", len(seen["checked"]), "rows,", seen["new_parent"], "with parent != node, max |log-prob "
          "error|", seen["max_err"])
    assert seen["expanded"] > 0  # real runner-ups were expanded in the same run
    counted = specx_counter("tree_runner_ups_expanded") - counted
    assert counted >= seen["expanded"]  # the metric counts the real expansions (and the test's own re-runs)
    assert tree_step.STATS["tree_requests"] > before["tree_requests"]


def test_children_of_runner_ups_reach_verification_and_stay_lossless(tiny_target, edd_tree_drafter,
                                                                     tiny_plain_outputs, monkeypatch):
    """With the chain cut at one token (the fixture's decision model), the tree is the chain node, its
    runner-ups and their children: nodes at depth 2 under a runner-up are verified, output unchanged."""
    from vllm_specx.vllm_adapter import tree_step

    depth2_under_runner_up = []
    orig_register = tree_step.register_tree

    def register_tree(req_id, tokens, parents):
        # node k+1 has parent parents[k]; node 1 is the chain's first node (best path first in layout)
        for k, p in enumerate(parents):
            if p > 0 and parents[p - 1] == 0 and p != 1:
                depth2_under_runner_up.append(req_id)
        orig_register(req_id, tokens, parents)

    monkeypatch.setattr(tree_step, "register_tree", register_tree)
    before = dict(tree_step.STATS)
    spec = {"method": "eagle3", "model": edd_tree_drafter, "num_speculative_tokens": K}
    res = run_generate(tiny_target, many_prompts(64), spec, max_tokens=32)
    assert_same_tokens(tiny_plain_outputs["many"].token_ids, res.token_ids)
    assert tree_step.STATS["nodes_verified"] - before["nodes_verified"] == res.metrics.num_draft_tokens
    assert len(depth2_under_runner_up) > 0


@pytest.mark.parametrize("verdict", [0.0, 1.0])
def test_decision_model_estimates_decide_which_children_of_runner_ups_are_verified(
        verdict, tiny_target, edd_tree_drafter, tiny_plain_outputs, monkeypatch):
    """The decision model reads each expanded runner-up's draft step inside vLLM (real branch rows: its
    features are checked) and its estimate, here overridden to `verdict`, decides the best child: 0 stops
    every branch (no node under a runner-up is verified though runner-ups were expanded), 1 keeps them.
    One child per runner-up (SPECX_EXPAND_CHILDREN=1), so the best child is the only one."""
    from vllm_specx.vllm_adapter import tree_step
    from vllm_specx.vllm_adapter.draft_length import ChainStopController

    monkeypatch.setenv("SPECX_EXPAND_CHILDREN", "1")
    scored, under_runner_up = [], []
    orig_accept, orig_register = ChainStopController._branch_accept_prob, tree_step.register_tree

    def branch_accept_prob(self, normed_hidden, logp, req, depth, path_conf):
        real = orig_accept(self, normed_hidden, logp, req, depth, path_conf)
        assert normed_hidden.shape[0] == logp.shape[0] == real.shape[0] == depth.shape[0] > 0
        assert bool((depth >= 1).all()) and bool(((real >= 0) & (real <= 1)).all())
        scored.append(real)
        return torch.full_like(real, verdict)

    def register_tree(req_id, tokens, parents):
        under_runner_up.extend(k for k, p in enumerate(parents) if p > 1 and parents[p - 1] == 0)
        orig_register(req_id, tokens, parents)

    monkeypatch.setattr(ChainStopController, "_branch_accept_prob", branch_accept_prob)
    monkeypatch.setattr(tree_step, "register_tree", register_tree)
    before = dict(tree_step.STATS)
    spec = {"method": "eagle3", "model": edd_tree_drafter, "num_speculative_tokens": K}
    res = run_generate(tiny_target, many_prompts(64), spec, max_tokens=32)
    assert_same_tokens(tiny_plain_outputs["many"].token_ids, res.token_ids)
    assert tree_step.STATS["tree_requests"] > before["tree_requests"] and scored
    # the fixture's decision model learned "accepted only at depth 0": branch steps (depth >= 1) score low
    assert float(torch.cat(scored).mean()) < 0.5
    assert (len(under_runner_up) > 0) == (verdict == 1.0), len(under_runner_up)
