"""The EDD drafter under vLLM's V2 model runner (the GPU build's default), run on CPU (tests/vllm/v2_cpu.py).

V2 drives the drafter through its own EAGLE speculator (`vllm/v1/worker/gpu/spec_decode/`), not V1's
proposer: these tests check that it is really that code path, that greedy output equals plain decoding,
and that V2 drafts exactly what V1 drafts with the same drafter (the same tokens accepted at every draft
position over the batch), i.e. V2 hands the drafter the same hidden states, positions, tokens and shared
embedding / LM head. Under V2 specx's early stop works on chains (per-request lengths, online feedback
from the target, steps skipped where the cost model says drafting does not pay, prompt-lookup chains
found in V2's token history) and PCT trees (runner-ups as leaves; verified with tree attention, the
greedy walk, the accepted path's KV move and the speculator's inputs permuted, inside V2's own input
preparation, rejection sampler and speculator): the same lengths and tokens as under V1.
"""

import multiprocessing

import pytest
import torch

from tests.conftest import PROMPTS, many_prompts
from tests.vllm.test_early_stop import _drafter_that_stops_paying_above_batch_8, edd_always_confident  # noqa: F401
from tests.vllm.test_lookup import K as LOOKUP_K
from tests.vllm.test_lookup import edd_with_lookup  # noqa: F401
from tests.vllm.test_vocab_modes import _drafter_with_vocab
from tests.vllm.trees import K as TREE_K
from tests.vllm.trees import install_oracle, install_v2_oracle
from vllm_specx.testing import assert_same_tokens, recording_drafts, run_generate

# On a CUDA machine vLLM's default runner is V2 already, and this CPU stand-in does not apply.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the V2 runner on CPU; a GPU's default")

K = 3
MAX_TOKENS = 48  # tiny_plain_outputs["base"]: PROMPTS, 48 tokens


def _spec(drafter: str, k: int = K) -> dict:
    return {"method": "eagle3", "model": drafter, "num_speculative_tokens": k}


@pytest.fixture(scope="module")
def drafters(tiny_edd_drafter, edd_tree_drafter, edd_always_confident, edd_with_lookup, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("v2")
    vocab = _drafter_with_vocab(tiny_edd_drafter, tmp, "speculative", num_candidates=64, rank=4)
    return {"edd": (_spec(tiny_edd_drafter), {}),
            "edd_speculative_vocab": (_spec(vocab), {}),
            # ships early stop + PCT trees: V2 verifies them with runner-ups as leaves, so does this V1 reference
            "edd_early_stop_trees": (_spec(edd_tree_drafter, TREE_K), {"SPECX_EXPAND_CHILDREN": "0"}),
            # early stop whose lengths vary per request and step: the decision model always says "accept",
            # the target rejects the random drafter, online feedback shortens each request on its own
            "edd_early_stop_feedback": (_spec(edd_always_confident[True], 5), {}),
            # cost model under which drafting pays up to batch 8 only: skipped steps, skipped forwards
            "edd_cost_model": (_drafter_that_stops_paying_above_batch_8(edd_always_confident, tmp), {}),
            # a depth-0 decision model (the drafter keeps one token) + prompt-lookup chains, shipped enabled
            "edd_lookup": (_spec(edd_with_lookup, LOOKUP_K), {})}


# (drafter, prompts, max_tokens, engine options). Small runs: the interpreted V2 kernels run one program
# at a time, over the 49152-token vocabulary, ~1 s per engine step here (64 requests took minutes); the >= 50-prompt
# mixed-batch checks of early stop are the V1 runner's (test_early_stop.py), whose drafting V2 reproduces.
V2_RUNS = {"edd": ("edd", PROMPTS, MAX_TOKENS, {}),
           "edd_speculative_vocab": ("edd_speculative_vocab", PROMPTS, MAX_TOKENS, {}),
           "edd_early_stop_trees": ("edd_early_stop_trees", PROMPTS, 24, {}),
           # trees replaced by oracle trees (tests/vllm/trees.py): wrong chain, the right tokens off it;
           # tree attention by specx's torch implementation, or by the Triton kernel (interpreted)
           "edd_oracle_trees": ("edd_early_stop_trees", many_prompts(16), 24, {"setup": "oracle"}),
           "edd_oracle_trees_triton": ("edd_early_stop_trees", many_prompts(16), 24,
                                       {"setup": "oracle triton"}),
           "edd_early_stop_feedback": ("edd_early_stop_feedback", PROMPTS, MAX_TOKENS, {}),
           "cost_model_batch_16": ("edd_cost_model", many_prompts(16), 16, {"max_num_seqs": 16}),
           "cost_model_batch_1": ("edd_cost_model", many_prompts(16)[:1], 16, {}),
           "edd_lookup": ("edd_lookup", many_prompts(16), 24, {}),
           # 64 prompts in one batch (plain decoding's "many" reference: 64 prompts, 32 tokens)
           "edd_fixed_k_64": ("edd", many_prompts(64), 32, {}),
           "edd_lookup_64": ("edd_lookup", many_prompts(64), 32, {})}
# fixed K is slow (suite time): the default V2 tests run the same EDD model under V2 with
# early stop and trees, each = plain and drafting like V1
FIXED_K = [pytest.param("edd", marks=pytest.mark.slow), pytest.param("edd_speculative_vocab", marks=pytest.mark.slow)]
EARLY_STOP = ["edd_early_stop_feedback"]


def _plain(tiny_plain_outputs, name) -> list[list[int]]:
    """Plain decoding's output for V2 run `name` (references: PROMPTS 48 tokens, many_prompts(64) 32)."""
    _, prompts, max_tokens, _ = V2_RUNS[name]
    ref = tiny_plain_outputs["base"].token_ids if prompts is PROMPTS else tiny_plain_outputs["many"].token_ids
    return [t[:max_tokens] for t in ref[:len(prompts)]]


@pytest.fixture(scope="module")
def v2_runs(tiny_target, drafters, tiny_plain_outputs):
    """name -> the result of V2 run `name` (a `generate_under_v2` row), each run once when a test first asks
    for it (runs of deselected tests cost nothing), all in one spawned process that enables V2."""
    from tests.vllm.v2_cpu import generate_under_v2

    done = {}
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        def result(name: str) -> tuple:
            if name not in done:
                d, prompts, max_tokens, options = V2_RUNS[name]
                if str(options.get("setup")).startswith("oracle"):
                    plain, attention = _plain(tiny_plain_outputs, name), options["setup"].split()[-1]
                    attention = "triton" if attention == "triton" else "torch"
                    options = dict(options, setup=(install_v2_oracle, (tiny_target, prompts, plain, attention)))
                [done[name]] = pool.apply(generate_under_v2,
                                          ([(tiny_target, prompts, drafters[d][0], max_tokens, options)],))
            return done[name]

        yield result


def assert_same_draft_steps(v2_drafts: list[list[int]], v1_drafts: list[list[int]], k: int | None) -> None:
    """Every drafter call under V2 proposed the same tokens for the same requests as the V1 runner's call
    in the same place (rows compared as sets: the runners may order a batch differently). vLLM 0.33's V2
    runner skips drafting in a step after which no scheduled request can use drafts (every request of the
    step finishes; `SchedulerOutput.skip_drafts`), where V1 drafts anyway: V2 may leave out such whole
    steps (k calls each; k=None: early stop, any number of calls), which are never verified; nothing
    else may differ."""
    v2 = [sorted(d) for d in v2_drafts]
    v1 = [sorted(d) for d in v1_drafts]
    assert v2, "no drafter call under V2"
    skipped = len(v1) - len(v2)
    allowed = (0, k, 2 * k) if k is not None else range(0, len(v1) + 1)
    assert skipped in allowed, f"V2 made {len(v2)} drafter calls, V1 {len(v1)} (K = {k})"
    if skipped == 0:
        assert v2 == v1
    else:
        rest = iter(v1)
        assert all(any(call == later for later in rest) for call in v2), "V2's drafts are not V1's"


def _v1_run(tiny_target, prompts, max_tokens, spec, env, monkeypatch, llm_kwargs=None):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with recording_drafts() as drafts:
        res = run_generate(tiny_target, prompts, spec, max_tokens=max_tokens, llm_kwargs=llm_kwargs)
    return res, drafts


def _assert_v2_path(runner_mro, speculator, drafter):
    """Really the V2 runner and its EAGLE speculator, driving specx's drafter class."""
    assert "vllm.v1.worker.gpu.model_runner.GPUModelRunner" in runner_mro
    assert "vllm.v1.worker.gpu_model_runner.GPUModelRunner" not in runner_mro  # V1's
    assert speculator.startswith("vllm.v1.worker.gpu.spec_decode.")
    assert drafter == "vllm_specx.vllm_adapter.edd_model.SpecxEddForCausalLM"


def _assert_drafts_like_v1(name, v2_runs, drafters, tiny_target, monkeypatch, k, drafted: bool = True,
                           v2_head_calls: int = 0):
    """V2's run `name` drafted what V1 drafts with the same drafter, prompts and engine options: the same
    draft tokens at every drafter call, the same number of drafted and accepted tokens at every position.
    drafted=False: a run in which every step was skipped: V1's drafter never reaches its LM head, V2's only
    in `v2_head_calls` K = 0 steps (its prefill row's head, which V2 samples whatever K is)."""
    res, drafts, *_ = v2_runs(name)
    d, prompts, max_tokens, options = V2_RUNS[name]
    options = {k: v for k, v in options.items() if k != "setup"}  # (V2's process only)
    spec, env = drafters[d]
    v1, v1_drafts = _v1_run(tiny_target, prompts, max_tokens, spec, env, monkeypatch, options)
    # The drafts depend on the target's hidden states: feeding V2's drafter its hidden states one row off
    # changes 9 of 138 draft steps here.
    if drafted:
        assert_same_draft_steps(drafts, v1_drafts, k)
    else:
        assert v1_drafts == [] and len(drafts) == v2_head_calls
    assert (res.metrics.num_drafts, res.metrics.num_draft_tokens, res.metrics.accepted_per_pos) == (
        v1.metrics.num_drafts, v1.metrics.num_draft_tokens, v1.metrics.accepted_per_pos)


@pytest.mark.parametrize("name", FIXED_K)
def test_v2_runner_drafts_like_v1_and_equals_plain(name, tiny_target, tiny_plain_outputs, drafters, v2_runs,
                                                    monkeypatch):
    res, drafts, runner_mro, speculator, drafter, stats = v2_runs(name)
    _assert_v2_path(runner_mro, speculator, drafter)
    assert_same_tokens(_plain(tiny_plain_outputs, name), res.token_ids)
    k = drafters[name][0]["num_speculative_tokens"]
    assert stats is None  # no early-stop model shipped
    assert res.metrics.num_drafts > 0 and res.metrics.num_draft_tokens == k * res.metrics.num_drafts  # fixed K
    _assert_drafts_like_v1(name, v2_runs, drafters, tiny_target, monkeypatch, k)


@pytest.mark.parametrize("name", EARLY_STOP)
def test_v2_runner_early_stop_keeps_v1s_lengths_and_equals_plain(name, tiny_target, tiny_plain_outputs, drafters,
                                                                 v2_runs, monkeypatch):
    res, drafts, runner_mro, speculator, drafter, stats = v2_runs(name)
    _assert_v2_path(runner_mro, speculator, drafter)
    assert_same_tokens(_plain(tiny_plain_outputs, name), res.token_ids)
    k = drafters[name][0]["num_speculative_tokens"]
    m = res.metrics
    # per-request lengths reached the scheduler: fewer draft tokens verified than K per draft
    assert m.num_drafts > 0 and m.num_draft_tokens < k * m.num_drafts, m
    # (drafts kept for a request that finishes in the step being verified are never scheduled)
    assert stats is not None and stats["steps"] > 0 and stats["kept"] >= m.num_draft_tokens, stats
    _assert_drafts_like_v1(name, v2_runs, drafters, tiny_target, monkeypatch, None)


def test_v2_runner_verifies_pct_trees_like_v1(tiny_target, tiny_plain_outputs, drafters, v2_runs, monkeypatch):
    """PCT trees under V2: the tree drafter keeps one chain token and two runner-ups beside it (sibling
    threshold 0), written into V2's [B, K] draft block in BFS order and verified as trees: every draft
    token is a tree node, output equals plain decoding, and the drafts, draft counts and accepted tokens
    per position are V1's with the same trees."""
    res, drafts, runner_mro, speculator, drafter, stats = v2_runs("edd_early_stop_trees")
    _assert_v2_path(runner_mro, speculator, drafter)
    assert_same_tokens(_plain(tiny_plain_outputs, "edd_early_stop_trees"), res.token_ids)
    m, trees = res.metrics, stats["trees"]
    assert trees["tree_steps"] > 0 and trees["tree_requests"] >= m.num_drafts > 0, (trees, m)
    # every draft token is a tree node; a tree is the chain token + up to 2 runner-ups
    assert trees["nodes_verified"] == m.num_draft_tokens and m.num_drafts < m.num_draft_tokens <= 3 * m.num_drafts, (
        trees, m)
    _assert_drafts_like_v1("edd_early_stop_trees", v2_runs, drafters, tiny_target, monkeypatch, None)


ORACLE = ["edd_oracle_trees", pytest.param("edd_oracle_trees_triton", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name", ORACLE)
def test_v2_runner_accepts_oracle_trees_side_branches_and_stays_lossless(name, tiny_target, tiny_plain_outputs,
                                                                         drafters, v2_runs, monkeypatch):
    """Oracle trees (chain tokens always wrong, plain decoding's next tokens on side branches: see
    tests/vllm/trees.py) under V2, 16 requests in one batch: output equals plain decoding only if depth
    positions, tree attention (specx's torch implementation; `slow`: the Triton kernel of
    kernels/tree_attention.py, interpreted, inside V2's step, over vLLM-CPU's paged cache), the walk,
    num_sampled / num_rejected and the KV move of the off-chain path are right; the acceptance counts prove the side branches landed. The drafter's proposals after each
    off-chain path equal V1's under the same oracle only if V2's speculator got the accepted path's rows
    first (its hidden states, tokens, positions)."""
    res, drafts, runner_mro, speculator, drafter, stats = v2_runs(name)
    _assert_v2_path(runner_mro, speculator, drafter)
    _, prompts, _, _ = V2_RUNS[name]
    plain = _plain(tiny_plain_outputs, name)
    assert_same_tokens(plain, res.token_ids)
    m, trees = res.metrics, stats["trees"]
    assert trees["tree_requests"] > 0 and m.num_accepted_tokens >= 2.5 * m.num_drafts, (trees, m)
    assert trees["nodes_accepted"] == m.num_accepted_tokens, (trees, m)
    if name.endswith("triton"):  # the kernel attended every tree step
        assert trees["triton_attention_calls"] >= trees["tree_steps"] > 0, trees
    else:
        assert trees["triton_attention_calls"] == 0, trees
    install_oracle(monkeypatch, tiny_target, prompts, plain)
    _assert_drafts_like_v1(name, v2_runs, drafters, tiny_target, monkeypatch, None)


@pytest.mark.slow  # ~1 min; the V1 runner's cost-model tests (test_early_stop.py) are in the default suite
def test_v2_runner_skips_drafting_where_the_cost_model_says_it_does_not_pay(tiny_target, tiny_plain_outputs,
                                                                           drafters, v2_runs, monkeypatch):
    big, *_, big_stats = v2_runs("cost_model_batch_16")
    one, *_, one_stats = v2_runs("cost_model_batch_1")
    assert_same_tokens(_plain(tiny_plain_outputs, "cost_model_batch_16"), big.token_ids)
    assert_same_tokens(_plain(tiny_plain_outputs, "cost_model_batch_1"), one.token_ids)
    # batch 1: drafts on most decode steps; 16 in flight: no step drafts, and the decode steps skip the
    # drafter's forward too (skip_forward, on with a cost model); the prefill step runs it (no skip_prefill)
    assert one.metrics.num_drafts >= 0.5 * one.metrics.num_engine_steps, one.metrics
    assert big.metrics.num_drafts == 0, big.metrics
    assert big_stats["skipped_steps"] >= 15 and big_stats.get("forward_skipped", 0) >= 14, big_stats
    # skipped steps run as vLLM's K = 0 steps: V1 never reaches the drafter's head; V2's K = 0 step still
    # samples its prefill row's head once in each step that runs the drafter's forward (nothing is drafted)
    _assert_drafts_like_v1("cost_model_batch_16", v2_runs, drafters, tiny_target, monkeypatch, None, drafted=False,
                           v2_head_calls=big_stats["skipped_steps"] - big_stats.get("forward_skipped", 0))
    _assert_drafts_like_v1("cost_model_batch_1", v2_runs, drafters, tiny_target, monkeypatch, None)


@pytest.mark.slow  # ~1 min with its V1 run; V1's lookup tests (test_lookup.py) are in the default suite
def test_v2_runner_verifies_prompt_lookup_chains_like_v1(tiny_target, tiny_plain_outputs, drafters, v2_runs,
                                                        monkeypatch):
    """Lookup chains under V2: searched in V2's own token history (`V2TokenHistory`), written into its
    [B, K] draft block where they win, verified: the same draft counts and accepted tokens per position
    as V1 with the same drafter (which reads V1's CPU token ids), and plain decoding's output."""
    res, drafts, runner_mro, speculator, drafter, stats = v2_runs("edd_lookup")
    _assert_v2_path(runner_mro, speculator, drafter)
    assert_same_tokens(_plain(tiny_plain_outputs, "edd_lookup"), res.token_ids)
    m = res.metrics
    # the drafter keeps one token a step: deeper drafts and accepted tokens past depth 0 are lookup chains'
    assert stats["lookup"]["chosen"] > 0 and m.num_draft_tokens > m.num_drafts, (stats, m)
    assert sum(m.accepted_per_pos[1:]) > 5, m
    _assert_drafts_like_v1("edd_lookup", v2_runs, drafters, tiny_target, monkeypatch, None)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["edd_fixed_k_64", "edd_lookup_64"])
def test_v2_runner_equals_plain_on_64_prompts_in_one_batch(name, tiny_target, tiny_plain_outputs, drafters, v2_runs,
                                                           monkeypatch):
    """At least 50 prompts under V2 (the issue's bar for greedy equality), all in flight together: the
    drafter at fixed K, and with early stop + lookup chains (V2's history rows of 64 requests)."""
    res, drafts, runner_mro, speculator, drafter, stats = v2_runs(name)
    _assert_v2_path(runner_mro, speculator, drafter)
    assert len(res.token_ids) == 64
    assert_same_tokens(_plain(tiny_plain_outputs, name), res.token_ids)
    assert res.metrics.num_drafts > 0
    if name == "edd_lookup_64":
        assert stats["lookup"]["chosen"] > 0 and sum(res.metrics.accepted_per_pos[1:]) > 0, (stats, res.metrics)
    k = drafters[V2_RUNS[name][0]][0]["num_speculative_tokens"]
    _assert_drafts_like_v1(name, v2_runs, drafters, tiny_target, monkeypatch, k if stats is None else None)


V2_SAMPLED_REQUESTS = 160  # V1's test sends 400; under V2's interpreted kernels 400 took over 15 min


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_v2_sampled_trees_keep_the_target_distribution(tiny_target, edd_tree_drafter, tiny_plain_outputs):
    """Temperature sampling through trees under V2 (sample-then-match over the oracle's candidates, the
    greedy continuation and its runner-ups, with V2's position-keyed draws): the tokens at output positions
    1-3 follow plain sampling's distribution (V1, no drafter; chi-square homogeneity as in
    tests/vllm/test_tree_stops.py, whose control shows the test detects a biased walk)."""
    from tests.vllm.test_tree_stops import SAMPLED_REQUESTS, TEMPERATURE, _homogeneity_pvalue, _sampled_positions
    from tests.vllm.v2_cpu import generate_under_v2

    prompt = many_prompts(1)[0]
    plain = _sampled_positions(tiny_target, None, prompt)  # V1, SAMPLED_REQUESTS (400) seeds
    ref = tiny_plain_outputs["many"].token_ids[:1]
    run = (tiny_target, [prompt] * V2_SAMPLED_REQUESTS, _spec(edd_tree_drafter, TREE_K), 4,
           {"setup": (install_v2_oracle, (tiny_target, [prompt], ref)), "sampled": TEMPERATURE})
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        [(res, _, runner_mro, *_, stats)] = pool.apply(generate_under_v2, ([run],))
    assert "vllm.v1.worker.gpu.model_runner.GPUModelRunner" in runner_mro
    tree = res.token_ids
    assert all(len(t) == 4 for t in tree)
    trees = stats["trees"]
    assert trees["sampled_tree_requests"] >= V2_SAMPLED_REQUESTS and trees["nodes_accepted"] > 0, trees
    pvalues = [_homogeneity_pvalue([t[k] for t in plain], [t[k] for t in tree]) for k in (1, 2, 3)]
    print("V2 sampled trees: p-values at positions 1-3", pvalues, stats["trees"])
    assert min(pvalues) > 1e-3 / 3, pvalues  # Bonferroni over the three positions
