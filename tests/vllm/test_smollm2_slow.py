"""Slow: the real SmolLM2-135M target with the bundled EDD drafter (run with -m slow)."""

import json
from pathlib import Path

import pytest
import torch

from vllm_specx.testing import assert_same_tokens, generate, make_llm, shutdown

BUNDLED = Path(__file__).resolve().parents[2] / "vllm_specx" / "assets" / "edd-smollm2-135m"
SPEC_BENCH = Path(__file__).resolve().parents[3] / "shared" / "data" / "spec_bench_question.jsonl"


def _prompts(n):
    from transformers import AutoTokenizer

    from vllm_specx.models import smollm2_path

    tok = AutoTokenizer.from_pretrained(str(smollm2_path()))
    if SPEC_BENCH.exists():
        rows = [json.loads(x) for x in SPEC_BENCH.read_text().splitlines()]
        texts = [r["turns"][0] for r in rows][:: max(1, len(rows) // n)][:n]
    else:
        from tests.conftest import many_prompts
        texts = many_prompts(n)
    return [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
            for t in texts]


def _smollm2_plain_60():
    """(SmolLM2's folder, 60 Spec-Bench chat prompts, plain decoding's RunResult, 64 tokens, one batch)."""
    from vllm_specx.models import smollm2_path

    target = str(smollm2_path())
    prompts = _prompts(60)
    llm = make_llm(target, max_num_seqs=64, max_model_len=2048)
    try:
        return target, prompts, generate(llm, prompts, max_tokens=64)
    finally:
        shutdown(llm)


def _assert_equals_plain_and_accepted(target, spec, prompts, plain, label) -> None:
    """One speculative engine over the prompts (batch 64): output equals plain decoding's, and a trained
    drafter's (or lookup) drafts are actually accepted, not merely harmless."""
    llm = make_llm(target, spec, max_num_seqs=64, max_model_len=2048)
    try:
        res = generate(llm, prompts, max_tokens=64)
    finally:
        shutdown(llm)
    assert_same_tokens(plain.token_ids, res.token_ids)
    assert res.metrics.num_accepted_tokens > 0.05 * res.metrics.num_drafts, (label, res.metrics)


@pytest.mark.slow
def test_bundled_edd_equals_plain_on_smollm2_60_prompts(monkeypatch):
    """Chains at fixed K, early stop (decision model + this machine's cost model when it matches) and
    PCT trees, each against plain decoding on 60 Spec-Bench prompts in one mixed batch."""
    target, prompts, plain = _smollm2_plain_60()
    spec = {"method": "eagle3", "model": str(BUNDLED), "num_speculative_tokens": 5}
    for mode, env in (("chain", {"SPECX_EARLY_STOP": "0"}), ("early_stop", {"SPECX_TREE": "0"}),
                      ("pct", {"SPECX_TREE": "1"})):
        for k in ("SPECX_EARLY_STOP", "SPECX_TREE"):
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        _assert_equals_plain_and_accepted(target, spec, prompts, plain, mode)


# PCT trees where a verified node is cheap: the what-if node threshold of docs/benchmarks.md (the cost model keeps no
# runner-up on this CPU), runner-ups as leaves (V2 does not expand them)
V2_PCT_ENV = {"SPECX_TREE": "1", "SPECX_NODE_THRESHOLD": "0.05", "SPECX_EXPAND_CHILDREN": "0"}


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the V2 runner on CPU; on a GPU it is the default")
@pytest.mark.parametrize("mode", ["chains", "pct"])
def test_bundled_edd_under_the_v2_runner_drafts_like_v1_on_smollm2(mode, monkeypatch):
    """The GPU build's default V2 model runner (run on CPU, tests/vllm/v2_cpu.py) with the trained drafter:
    output equal to plain decoding on 24 Spec-Bench prompts (4 per category), and every draft step the same
    tokens as under the V1 runner with the same early stop (decision model, this machine's cost model,
    online feedback, the prompt-lookup chains the drafter ships), the same number of drafts, draft tokens
    and accepted tokens. mode "pct": the same with PCT trees on (V2_PCT_ENV), verified as trees by both
    runners. Fewer prompts than the V1 test:
    V2's rejection sampler runs vocabulary-wide Triton kernels, slow in the interpreter."""
    import multiprocessing

    for k, v in (V2_PCT_ENV if mode == "pct" else {}).items():
        monkeypatch.setenv(k, v)  # this process (V1) and the spawned V2 process
    from vllm_specx.vllm_adapter import tree_step

    from tests.vllm.test_v2_runner import assert_same_draft_steps
    from tests.vllm.v2_cpu import generate_under_v2
    from vllm_specx.models import smollm2_path
    from vllm_specx.testing import recording_drafts

    target = str(smollm2_path())
    prompts = _prompts(24)
    spec = {"method": "eagle3", "model": str(BUNDLED), "num_speculative_tokens": 5}
    # every prompt prefilled in one step: a request whose prefill is chunked gets throwaway drafts for its
    # partial prompt, which the runners compute differently (never verified)
    opts = {"max_num_seqs": 64, "max_model_len": 2048, "max_num_batched_tokens": 65536}
    llm = make_llm(target, **opts)
    try:
        plain = generate(llm, prompts, max_tokens=64)
    finally:
        shutdown(llm)
    llm = make_llm(target, spec, **opts)
    v1_trees = dict(tree_step.STATS)
    try:
        with recording_drafts() as v1_drafts:
            v1 = generate(llm, prompts, max_tokens=64)
    finally:
        shutdown(llm)
    v1_trees = {k: v - v1_trees[k] for k, v in tree_step.STATS.items()}
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        [(v2, v2_drafts, runner_mro, *_, stats)] = pool.apply(generate_under_v2,
                                                              ([(target, prompts, spec, 64, opts)],))
    assert "vllm.v1.worker.gpu.model_runner.GPUModelRunner" in runner_mro
    assert_same_tokens(plain.token_ids, v2.token_ids)
    assert stats is not None and stats["steps"] > 0  # V2 ran specx's early stop
    assert stats["lookup"]["chosen"] > 0  # and verified prompt-lookup chains
    assert_same_draft_steps(v2_drafts, v1_drafts, None)
    m1, m2 = v1.metrics, v2.metrics
    assert (m2.num_drafts, m2.num_draft_tokens, m2.num_accepted_tokens) == (
        m1.num_drafts, m1.num_draft_tokens, m1.num_accepted_tokens)
    assert m2.num_draft_tokens < 5 * m2.num_drafts and m2.num_accepted_tokens > 0.05 * m2.num_drafts, m2
    assert stats["trees"] == v1_trees  # the same tree requests, nodes verified and accepted
    if mode == "pct":
        assert stats["trees"]["tree_requests"] > 0 and stats["trees"]["nodes_accepted"] > 0, stats["trees"]
    else:
        assert stats["trees"]["tree_requests"] == 0


SPECX_EAGLE3 = Path(__file__).resolve().parents[2] / "benchmarks" / "drafters" / "specx-eagle3-smollm2-135m"


@pytest.mark.slow
def test_attached_eagle3_equals_plain_on_smollm2_60_prompts(monkeypatch):
    """The project's EAGLE-3 drafter with specx's parts (`vllm-specx attach`: its decision model, lookup table
    and cost model) against plain decoding on 60 Spec-Bench prompts in one mixed batch, chains then PCT trees
    (runner-ups as leaves), with prompt-lookup chains on."""
    target, prompts, plain = _smollm2_plain_60()
    spec = {"method": "eagle3", "model": str(SPECX_EAGLE3), "num_speculative_tokens": 8}
    for tree in ("0", "1"):
        monkeypatch.setenv("SPECX_TREE", tree)
        monkeypatch.setenv("SPECX_NODE_THRESHOLD", "0.05")  # draft at every batch size: the parts must act
        _assert_equals_plain_and_accepted(target, spec, prompts, plain, f"tree={tree}")
