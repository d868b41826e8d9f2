"""Sampling under specx equals sampling without it (V1 runner, real vLLM on CPU): seeded requests yield plain
decoding's tokens, token for token, with every sampling parameter honoured (vllm_adapter/sample_match.py).

Drafts come from an oracle that drafts each request's plain seeded continuation, corrupted at its second
token for every third request, so both accepted drafts and mismatches are exercised; a second run takes the
random EDD drafter's own drafts (mostly rejected)."""

import pytest
import torch

from tests.conftest import many_prompts

NUM_PROMPTS, MAX_TOKENS, K = 60, 24, 3


def sampling_settings() -> list[dict]:
    """One entry per setting (cycled over the prompts): temperature 0.7 and 1.0, top-p, top-k, min-p,
    penalties, logit bias, min_tokens with bad words and allowed tokens, logprobs, greedy with processors."""
    bias = {11: 4.0, 13: -100.0, 198: 3.0, 220: 2.5}
    return [
        dict(temperature=0.7),
        dict(temperature=1.0),
        dict(temperature=0.8, top_p=0.95),
        dict(temperature=1.0, top_k=20),
        dict(temperature=0.9, min_p=0.05),
        dict(temperature=0.8, presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2),
        dict(temperature=0.8, logit_bias=bias),
        dict(temperature=0.0),
        dict(temperature=0.0, repetition_penalty=1.3, logit_bias=bias),
        dict(temperature=1.0, top_p=0.9, top_k=50, min_p=0.02, min_tokens=12, bad_words=["the", " and"]),
        dict(temperature=0.8, allowed_token_ids=list(range(0, 3000, 3))),  # V2 takes up to 1024
        dict(temperature=1.0, logprobs=2),
    ]


def params_list(num: int, max_tokens: int = MAX_TOKENS, settings: list[dict] | None = None):
    from vllm import SamplingParams

    settings = settings or sampling_settings()
    return [SamplingParams(max_tokens=max_tokens, seed=1000 + i, ignore_eos=True, **settings[i % len(settings)])
            for i in range(num)]


def _generate(target: str, spec: dict | None, prompts: list, params: list, metrics: list | None = None):
    """Outputs of one engine; its spec-decode metrics appended to `metrics` when given."""
    from vllm_specx.testing import make_llm, read_spec_metrics, shutdown

    llm = make_llm(target, spec)
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
        if metrics is not None:
            metrics.append(read_spec_metrics(llm))
        return outs
    finally:
        shutdown(llm)


def token_lists(outs) -> list[list[list[int]]]:
    return [[list(c.token_ids) for c in o.outputs] for o in outs]


def install_chain_oracle(monkeypatch, target: str, prompts: list[str], plain: list[list[int]]) -> dict:
    """Draft lists of V1 steps replaced by each request's plain continuation (K tokens), corrupted at its
    second token for every third prompt. -> counters of oracle drafts."""
    from transformers import AutoTokenizer
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    tok = AutoTokenizer.from_pretrained(target)
    by_prompt = {tuple(tok(p)["input_ids"]): (i, out) for i, (p, out) in enumerate(zip(prompts, plain))}
    original = GPUModelRunner.take_draft_token_ids
    counts = {"oracle_drafts": 0}

    def take_draft_token_ids(self):
        out = original(self)
        if out is None:
            return out
        lists = []
        for rid, ids in zip(out.req_ids, out.draft_token_ids):
            req = self.requests[rid]
            i, ref = by_prompt.get(tuple(req.prompt_token_ids), (None, None))
            if ref is None:
                lists.append(list(ids))
                continue
            n = len(req.output_token_ids)
            chain = list(ref[n: n + K])
            if i % 3 == 0 and len(chain) >= 2:
                chain[1] = (chain[1] + 1) % len(tok)
            counts["oracle_drafts"] += len(chain)
            lists.append(chain)
        out.draft_token_ids = lists
        return out

    monkeypatch.setattr(GPUModelRunner, "take_draft_token_ids", take_draft_token_ids)
    return counts


@pytest.fixture(scope="module")
def seeded_plain(tiny_target):
    """Plain (no speculation) seeded outputs for NUM_PROMPTS prompts across the settings."""
    prompts = many_prompts(NUM_PROMPTS)
    return prompts, _generate(tiny_target, None, prompts, params_list(NUM_PROMPTS))


def assert_equal_outputs(plain_outs, spec_outs) -> None:
    diverged = [(i, j) for i, (a, b) in enumerate(zip(token_lists(plain_outs), token_lists(spec_outs)))
                for j, (x, y) in enumerate(zip(a, b)) if x != y]
    assert not diverged, f"{len(diverged)} of {len(plain_outs)} requests diverge: {diverged[:8]}"


def test_seeded_chains_equal_plain_decoding_with_every_parameter(tiny_target, tiny_edd_drafter, seeded_plain,
                                                                 monkeypatch):
    from vllm_specx.vllm_adapter import sample_match

    prompts, plain = seeded_plain
    counts = install_chain_oracle(monkeypatch, tiny_target, prompts, [o.outputs[0].token_ids for o in plain])
    before = dict(sample_match.STATS)
    spec = {"method": "eagle3", "model": tiny_edd_drafter, "num_speculative_tokens": K}
    metrics = []
    outs = _generate(tiny_target, spec, prompts, params_list(NUM_PROMPTS), metrics)
    assert_equal_outputs(plain, outs)
    assert sample_match.STATS["steps"] > before["steps"] and counts["oracle_drafts"] > 0
    m = metrics[0]  # the oracle's drafts are accepted up to its corruptions: about 2 per step
    assert m.num_accepted_tokens >= 1.5 * m.num_drafts and m.num_accepted_tokens < m.num_draft_tokens, m
    for o, ref in zip(outs, plain):
        if ref.outputs[0].logprobs is not None:
            got, want = o.outputs[0].logprobs, ref.outputs[0].logprobs
            assert len(got) == len(want) == MAX_TOKENS
            for a, b in zip(got, want):
                assert a.keys() == b.keys()
                assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)


def test_seeded_random_drafts_equal_plain_and_repeat(tiny_target, tiny_edd_drafter, seeded_plain):
    """The drafter's own drafts; the same seeded requests sent twice (with an n=3 request) repeat."""
    from vllm import SamplingParams

    from vllm_specx.testing import make_llm, shutdown

    prompts, plain = seeded_plain
    spec = {"method": "eagle3", "model": tiny_edd_drafter, "num_speculative_tokens": K}
    n3 = SamplingParams(temperature=0.8, top_p=0.95, n=3, seed=123, max_tokens=MAX_TOKENS, ignore_eos=True)
    llm = make_llm(tiny_target, spec)
    try:
        first = llm.generate(prompts + [prompts[0]], params_list(NUM_PROMPTS) + [n3], use_tqdm=False)
        again = llm.generate([prompts[0], prompts[5]], [n3, params_list(6)[5]], use_tqdm=False)
    finally:
        shutdown(llm)
    assert_equal_outputs(plain, first[:NUM_PROMPTS])
    assert token_lists(again) == token_lists([first[NUM_PROMPTS], first[5]])
    assert len({tuple(c) for c in token_lists([first[NUM_PROMPTS]])[0]}) == 3  # three distinct samples
    plain_n3 = _generate(tiny_target, None, [prompts[0]], [n3])
    assert token_lists(plain_n3) == token_lists([first[NUM_PROMPTS]])


def test_seeded_sampling_on_an_attached_eagle3_equals_plain(tiny_target, tiny_eagle3_drafter, seeded_plain,
                                                             monkeypatch, tmp_path):
    """An EAGLE-3 drafter given specx's parts (`vllm-specx attach`) verifies by sample-then-match too: every
    sampling parameter (min_p and logit_bias included, which vLLM refuses for its own eagle3) and seeded
    outputs equal to plain decoding, with oracle drafts (accepted and corrupted)."""
    from vllm_specx.attach import attach_eagle3
    from vllm_specx.vllm_adapter import sample_match

    prompts, plain = seeded_plain
    counts = install_chain_oracle(monkeypatch, tiny_target, prompts, [o.outputs[0].token_ids for o in plain])
    before = dict(sample_match.STATS)
    spec = {"method": "eagle3", "model": str(attach_eagle3(tiny_eagle3_drafter, tmp_path / "attached")),
            "num_speculative_tokens": K}
    metrics = []
    outs = _generate(tiny_target, spec, prompts, params_list(NUM_PROMPTS), metrics)
    assert_equal_outputs(plain, outs)
    assert sample_match.STATS["steps"] > before["steps"] and counts["oracle_drafts"] > 0
    assert metrics[0].num_accepted_tokens >= 1.5 * metrics[0].num_drafts, metrics[0]


def test_min_p_logit_bias_and_logits_processors_are_allowed_only_for_specx_drafters():
    from types import SimpleNamespace

    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.sample import logits_processor as lp

    from vllm_specx.vllm_adapter.sample_match import install_request_guards

    install_request_guards()  # (the plugin's register() did it in this process already)
    params = SamplingParams(temperature=0.8, min_p=0.1, logit_bias={5: 1.0})
    edd = SimpleNamespace(draft_model_config=SimpleNamespace(architectures=["SpecxEddForCausalLM"]))
    attached = SimpleNamespace(draft_model_config=SimpleNamespace(architectures=["SpecxEagle3ForCausalLM"]))
    eagle3 = SimpleNamespace(draft_model_config=SimpleNamespace(architectures=["LlamaForCausalLMEagle3"]))
    params._validate_spec_decode(edd)  # accepted
    params._validate_spec_decode(attached)
    with pytest.raises(VLLMValidationError, match="min_p and logit_bias"):
        params._validate_spec_decode(eagle3)

    def config(spec):
        return SimpleNamespace(speculative_config=spec, scheduler_config=SimpleNamespace(max_num_seqs=4),
                               model_config=SimpleNamespace(logits_processors=None))

    built = {name: lp.build_logitsprocs(config(spec), "cpu", False, False)
             for name, spec in (("specx", edd), ("eagle3", eagle3), ("plain", None))}
    names = {k: sorted(type(p).__name__ for p in v.all) for k, v in built.items()}
    assert names["specx"] == names["plain"] == ["LogitBiasLogitsProcessor", "MinPLogitsProcessor",
                                                 "MinTokensLogitsProcessor"]
    assert names["eagle3"] == ["MinTokensLogitsProcessor"]
    ban_token = _ban_token_class()
    with pytest.raises(ValueError, match="not supported when speculative decoding"):
        lp.build_logitsprocs(config(eagle3), "cpu", False, False, [ban_token])
    custom = lp.build_logitsprocs(config(edd), "cpu", False, False, [ban_token])
    assert any(isinstance(p, ban_token) for p in custom.all)


def _ban_token_class():
    """A custom logits processor class (only constructed and listed here)."""
    from vllm.v1.sample.logits_processor import LogitsProcessor

    class BanToken(LogitsProcessor):
        def __init__(self, vllm_config, device, is_pin_memory):
            pass

        def is_argmax_invariant(self) -> bool:
            return False

        def update_state(self, batch_update):
            pass

        def apply(self, logits):
            return logits

    return BanToken


def _no_repeat_processor_class():
    """A custom logits processor reading each request's output so far: the last emitted token is banned
    for requests with extra_args {"no_repeat": True}."""
    from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

    class NoRepeat(AdapterLogitsProcessor):
        def is_argmax_invariant(self) -> bool:
            return False

        def new_req_logits_processor(self, params):
            if not (params.extra_args or {}).get("no_repeat"):
                return None

            def ban_last(output_ids, logits):
                if output_ids:
                    logits[output_ids[-1]] = float("-inf")
                return logits

            return ban_last

    return NoRepeat


def test_custom_logits_processor_sees_the_accepted_path(tiny_target, tiny_edd_drafter, monkeypatch):
    """A history-reading custom processor (refused by vLLM under speculation) under specx: seeded and
    greedy outputs equal plain decoding's with the same processor, oracle chains accepted."""
    from vllm import SamplingParams

    from vllm_specx.testing import make_llm, read_spec_metrics, shutdown

    prompts = many_prompts(16)
    params = [SamplingParams(temperature=0.0 if i % 4 == 0 else 1.0, seed=i, max_tokens=MAX_TOKENS, ignore_eos=True,
                             extra_args={"no_repeat": i % 2 == 0}) for i in range(16)]
    processor = _no_repeat_processor_class()

    def run(spec):
        llm = make_llm(tiny_target, spec, logits_processors=[processor])
        try:
            return token_lists(llm.generate(prompts, params, use_tqdm=False)), read_spec_metrics(llm)
        finally:
            shutdown(llm)

    plain, _ = run(None)
    assert all(a != b for t in plain[::2] for a, b in zip(t[0], t[0][1:]))  # the processor acted
    install_chain_oracle(monkeypatch, tiny_target, prompts, [t[0] for t in plain])
    spec, metrics = run({"method": "eagle3", "model": tiny_edd_drafter, "num_speculative_tokens": K})
    assert spec == plain
    assert metrics.num_accepted_tokens >= 1.5 * metrics.num_drafts, metrics


def test_seeded_trees_equal_plain_decoding_with_every_parameter(tiny_target, edd_tree_drafter, seeded_plain,
                                                                monkeypatch):
    """Oracle trees (tests/vllm/trees.py) built from the plain seeded outputs: their chain tokens are wrong
    and the seeded continuation sits on side branches, which sample-then-match must take."""
    from tests.vllm.trees import K as TREE_K
    from tests.vllm.trees import install_oracle
    from vllm_specx.vllm_adapter import tree_step

    prompts, plain = seeded_plain
    install_oracle(monkeypatch, tiny_target, prompts, [list(o.outputs[0].token_ids) for o in plain])
    before = dict(tree_step.STATS)
    spec = {"method": "eagle3", "model": edd_tree_drafter, "num_speculative_tokens": TREE_K}
    metrics = []
    outs = _generate(tiny_target, spec, prompts, params_list(NUM_PROMPTS), metrics)
    assert_equal_outputs(plain, outs)
    assert tree_step.STATS["sampled_tree_requests"] - before["sampled_tree_requests"] > 0
    accepted = tree_step.STATS["nodes_accepted"] - before["nodes_accepted"]
    assert accepted == metrics[0].num_accepted_tokens >= 2.5 * metrics[0].num_drafts, metrics[0]


# ------------------------------------------------------------------------------------------ V2 runner
V2_PROMPTS, V2_MAX_TOKENS = 12, 12  # the interpreted V2 kernels take ~1 s per engine step on CPU


def v2_settings() -> list[dict]:
    """The settings but top-k / top-p: V2's Triton top-k/top-p kernel fails in Triton's interpreter (plain
    decoding too), so the CPU stand-in for V2 cannot run them."""
    return [s for s in sampling_settings() if "top_k" not in s and "top_p" not in s]


def _v2_plain_chain_and_tree_outputs(target: str, edd_drafter: str, tree_drafter: str):
    """In a fresh process under the V2 runner (tests/vllm/v2_cpu.py): the seeded requests plain, with the
    EDD drafter's chains, and with oracle trees built from the plain outputs. -> three token lists, and
    tree_step.STATS gained by the tree run."""
    from tests.vllm.v2_cpu import enable_v2_runner

    enable_v2_runner()
    from tests.vllm.trees import K as TREE_K
    from tests.vllm.trees import install_v2_oracle
    from vllm_specx.testing import make_llm, shutdown
    from vllm_specx.vllm_adapter import tree_step

    prompts = many_prompts(V2_PROMPTS)
    outputs, stats = [], {}
    for spec in (None, {"method": "eagle3", "model": edd_drafter, "num_speculative_tokens": K},
                 {"method": "eagle3", "model": tree_drafter, "num_speculative_tokens": TREE_K}):
        llm = make_llm(target, spec)
        undo = None
        try:
            if spec is not None and spec["model"] == tree_drafter:
                runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
                undo = install_v2_oracle(runner, target, prompts, [o[0] for o in outputs[0]])
            before = dict(tree_step.STATS)
            outs = llm.generate(prompts, params_list(V2_PROMPTS, V2_MAX_TOKENS, v2_settings()), use_tqdm=False)
            stats = {k: v - before[k] for k, v in tree_step.STATS.items()}
        finally:
            if undo is not None:
                undo()
            shutdown(llm)
        outputs.append(token_lists(outs))
    return outputs, stats


@pytest.mark.slow  # about 14 min here: V2's kernels interpreted, three engines
@pytest.mark.timeout(2400)
@pytest.mark.skipif(torch.cuda.is_available(), reason="the V2 runner on CPU; a GPU's default")
def test_v2_seeded_chains_and_trees_equal_plain_decoding(tiny_target, tiny_edd_drafter, edd_tree_drafter):
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        (plain, chains, trees), stats = pool.apply(_v2_plain_chain_and_tree_outputs,
                                                   (tiny_target, tiny_edd_drafter, edd_tree_drafter))
    assert chains == plain, [i for i, (a, b) in enumerate(zip(plain, chains)) if a != b]
    assert trees == plain, [i for i, (a, b) in enumerate(zip(plain, trees)) if a != b]
    assert stats["sampled_tree_requests"] > 0 and stats["nodes_accepted"] > 0, stats
