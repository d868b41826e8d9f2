"""EDD drafters keep the whole prefix-cache hit (vllm_adapter/prefix_cache.py).

Prompt pairs share a prefix of exactly two KV blocks and then differ: A = P + x, B = P + y. A runs
first, so B hits P in the prefix cache. vLLM drops the last block of a hit for EAGLE-style drafters
because an EAGLE drafter's cache entry at the last position of P was computed from A's next token x[0];
EDD's entry depends on the target's hidden state alone, so it keeps the block, and its drafts for B
are the drafts of a fresh prefill of B.
"""

import random

import pytest
import torch

from vllm_specx.testing import assert_same_tokens, make_llm, shutdown

BLOCK = 32  # the smallest block vLLM-CPU attention takes
PAIRS = 8


def _prompt_pairs() -> list[tuple[list[int], list[int]]]:
    rng = random.Random(0)
    pairs = []
    for _ in range(PAIRS):
        shared = [rng.randrange(100, 1000) for _ in range(2 * BLOCK)]
        pairs.append((shared + [rng.randrange(100, 1000) for _ in range(5)],
                      shared + [rng.randrange(100, 1000) for _ in range(5)]))
    return pairs


def _run(target: str, spec: dict | None, monkeypatch) -> dict:
    """A, then B (hits P), then B again after the prefix cache is reset, one request at a time:
    outputs, prefix-cache hits (tokens) of the B pass, and the draft lists each request got per step."""
    from vllm import SamplingParams
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    llm = make_llm(target, spec, block_size=BLOCK, enable_prefix_caching=True)
    drafts: list[list[list[int]]] = []
    take = GPUModelRunner.take_draft_token_ids  # specx's wrapper, installed with the drafter

    def recording_take(self):
        out = take(self)
        if out is not None:
            drafts[-1].append([list(d) for d in out.draft_token_ids])
        return out

    monkeypatch.setattr(GPUModelRunner, "take_draft_token_ids", recording_take)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)

    def one_by_one(prompts):
        outs, steps = [], []
        for p in prompts:
            drafts.append([])
            (out,) = llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)
            outs.append(list(out.outputs[0].token_ids))
            steps.append(drafts[-1])
        return outs, steps

    try:
        result = _passes(llm, one_by_one)
        spec_cfg = llm.llm_engine.vllm_config.speculative_config
        result["block_drop"] = spec_cfg.use_eagle_block_drop() if spec_cfg is not None else False
    finally:
        monkeypatch.undo()
        shutdown(llm)
    return result


def _passes(llm, one_by_one) -> dict:
    """A, then B (hits P), then B after a prefix-cache reset; one_by_one(prompts) -> (outputs, drafts)."""
    def hits() -> int:
        return sum(int(m.value) for m in llm.get_metrics() if m.name == "vllm:prefix_cache_hits")

    pairs = _prompt_pairs()
    out_a, _ = one_by_one([a for a, _ in pairs])
    before = hits()
    out_b, drafts_b = one_by_one([b for _, b in pairs])
    b_hits = hits() - before
    assert llm.reset_prefix_cache()
    out_fresh, drafts_fresh = one_by_one([b for _, b in pairs])
    return {"a": out_a, "b": out_b, "fresh": out_fresh, "b_hits": b_hits, "drafts_b": drafts_b,
            "drafts_fresh": drafts_fresh}


@pytest.fixture(scope="module")
def plain(tiny_target):
    mp = pytest.MonkeyPatch()
    try:
        return _run(tiny_target, None, mp)
    finally:
        mp.undo()


def test_edd_keeps_the_last_block_of_a_hit_and_drafts_as_from_a_fresh_prefill(tiny_target, tiny_edd_drafter,
                                                                               plain, monkeypatch):
    assert plain["b_hits"] == PAIRS * 2 * BLOCK  # every B hits all of P without speculation
    edd = _run(tiny_target, {"method": "eagle3", "model": tiny_edd_drafter, "num_speculative_tokens": 3},
               monkeypatch)
    assert not edd["block_drop"]
    assert edd["b_hits"] == plain["b_hits"]  # vLLM's EAGLE default would hit one block less per B
    for key in ("a", "b", "fresh"):
        assert_same_tokens(plain[key], edd[key])
    assert sum(len(steps) for steps in edd["drafts_b"]) >= PAIRS * 4  # drafted: the comparison is not empty
    assert edd["drafts_b"] == edd["drafts_fresh"]  # the reused drafter cache entries are the fresh ones


def test_eagle3_keeps_vllms_block_drop_and_needs_it(tiny_target, tiny_eagle3_drafter, plain, monkeypatch):
    """The control: an EAGLE-3 drafter's entry at P's last position depends on the next token, so with
    the drop forced off its drafts for B differ from a fresh prefill's; specx leaves its drop on."""
    spec = {"method": "eagle3", "model": tiny_eagle3_drafter, "num_speculative_tokens": 3}
    default = _run(tiny_target, spec, monkeypatch)
    assert default["block_drop"] and default["b_hits"] == PAIRS * BLOCK
    reuse = _run(tiny_target, dict(spec, disable_eagle_block_drop=True), monkeypatch)
    assert reuse["b_hits"] == plain["b_hits"]
    for run in (default, reuse):
        for key in ("a", "b", "fresh"):
            assert_same_tokens(plain[key], run[key])
    assert default["drafts_b"] == default["drafts_fresh"]
    assert reuse["drafts_b"] != reuse["drafts_fresh"]


def run_under_v2(target: str, spec: dict) -> dict:
    """`_run` under the V2 model runner, in a fresh process (tests/vllm/v2_cpu.py): drafts are recorded at
    the drafter (one request at a time, so one row per drafter call)."""
    from tests.vllm.v2_cpu import enable_v2_runner

    enable_v2_runner()
    from vllm import SamplingParams

    from vllm_specx.testing import recording_drafts

    llm = make_llm(target, spec, block_size=BLOCK, enable_prefix_caching=True)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)

    def one_by_one(prompts):
        outs, steps = [], []
        for p in prompts:
            with recording_drafts() as drafts:
                (out,) = llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)
            outs.append(list(out.outputs[0].token_ids))
            steps.append(drafts)
        return outs, steps

    try:
        runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
        assert "vllm.v1.worker.gpu.model_runner" in {c.__module__ for c in type(runner).__mro__}
        return _passes(llm, one_by_one)
    finally:
        shutdown(llm)


@pytest.mark.slow  # ~2 min (V2's interpreted kernels); the V1 runner's twin above is in the default suite
@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the V2 runner on CPU; on a GPU it is the default")
def test_edd_prefix_cache_hits_under_the_v2_runner(tiny_target, tiny_edd_drafter, plain):
    """The same under the GPU build's default V2 runner, whose EAGLE speculator prefills the drafter on its
    own: B hits all of P and its drafts equal those of a fresh prefill."""
    import multiprocessing

    spec = {"method": "eagle3", "model": tiny_edd_drafter, "num_speculative_tokens": 3}
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        edd = pool.apply(run_under_v2, (tiny_target, spec))
    assert edd["b_hits"] == plain["b_hits"] == PAIRS * 2 * BLOCK
    for key in ("a", "b", "fresh"):
        assert_same_tokens(plain[key], edd[key])
    assert sum(len(steps) for steps in edd["drafts_b"]) >= PAIRS * 4
    assert edd["drafts_b"] == edd["drafts_fresh"]
