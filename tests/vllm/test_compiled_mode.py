"""specx under vLLM's default compilation (no `enforce_eager`): what `vllm serve` runs unless told otherwise.

Every other vLLM test runs eager (start-up in seconds). Here the target is compiled by vLLM (torch.compile,
inductor on CPU) while the EDD drafter runs eager; specx's hooks (hidden-state capture by the EAGLE-3 path,
early stop, tree attention inside the compiled target's attention op, the accepted-path KV move) must give
exactly the plain output of the same compiled target. Oracle trees prove that tree verification really
ran: their chain tokens are always wrong, so only side branches can be accepted.
"""

import pytest

from tests.conftest import many_prompts
from tests.vllm.trees import K, install_oracle
from vllm_specx.testing import assert_same_tokens, run_generate

COMPILED = {"enforce_eager": False}


@pytest.fixture(scope="module")
def compiled_plain(tiny_target):
    return run_generate(tiny_target, many_prompts(16), None, max_tokens=24, llm_kwargs=COMPILED)


def test_compiled_target_chain_drafting_is_lossless(tiny_target, tiny_edd_drafter, compiled_plain):
    spec = {"method": "eagle3", "model": tiny_edd_drafter, "num_speculative_tokens": 3}
    res = run_generate(tiny_target, many_prompts(16), spec, max_tokens=24, llm_kwargs=COMPILED)
    assert_same_tokens(compiled_plain.token_ids, res.token_ids)
    assert res.metrics.num_drafts > 0


def test_compiled_target_oracle_trees_accept_side_branches(tiny_target, edd_tree_drafter, compiled_plain,
                                                           monkeypatch):
    from vllm_specx.vllm_adapter import tree_step

    prompts = many_prompts(16)
    install_oracle(monkeypatch, tiny_target, prompts, compiled_plain.token_ids)
    before = dict(tree_step.STATS)
    spec = {"method": "eagle3", "model": edd_tree_drafter, "num_speculative_tokens": K}
    res = run_generate(tiny_target, prompts, spec, max_tokens=24, llm_kwargs=COMPILED)
    assert_same_tokens(compiled_plain.token_ids, res.token_ids)
    assert tree_step.STATS["tree_requests"] > before["tree_requests"]
    assert res.metrics.num_accepted_tokens >= 2.5 * res.metrics.num_drafts, res.metrics
