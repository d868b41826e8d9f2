"""PCT trees inside vLLM when requests end inside an accepted path, are preempted, or share cached
prefixes. Oracle trees (test_tree_verify.py) make every step accept 3 side-branch tokens + the bonus
token, so outputs grow 4 tokens per step and stops land inside accepted paths; every output is
compared with a plain engine run on the same requests."""

import pytest

from tests.conftest import many_prompts
from tests.vllm.trees import K, install_oracle
from vllm_specx.testing import assert_same_tokens, make_llm, shutdown, specx_counter


def _generate(target: str, spec: dict | None, prompts: list[str], params: list, **llm_kwargs):
    llm = make_llm(target, spec, **llm_kwargs)
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
        metrics = {m.name: m for m in llm.get_metrics()}
    finally:
        shutdown(llm)
    return outs, metrics


def _counter(metrics: dict, name: str) -> int:
    m = metrics.get(name)
    return int(m.value) if m is not None else 0


def test_requests_stopping_inside_accepted_tree_paths(tiny_target, edd_tree_drafter, tiny_plain_outputs, monkeypatch):
    """max_tokens, stop strings and stop token ids (the EOS path) that fall inside a step's accepted
    path: same tokens, text and finish reason as plain decoding."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from vllm_specx.vllm_adapter import tree_step

    prompts = many_prompts(64)[:32]
    plain_32 = tiny_plain_outputs["many"].token_ids[:32]
    tok = AutoTokenizer.from_pretrained(tiny_target)
    params = []
    for i, ref in enumerate(plain_32):
        kind = i % 4
        if kind == 0:  # lengths 14, 15 end inside a 4-token step (outputs grow 1, 5, 9, 13, ...)
            params.append(SamplingParams(temperature=0.0, max_tokens=14 + i % 8 // 4))
        elif kind == 1:
            params.append(SamplingParams(temperature=0.0, max_tokens=32, stop=[tok.decode(ref[10:12])]))
        elif kind == 2:
            params.append(SamplingParams(temperature=0.0, max_tokens=32, stop_token_ids=[ref[6 + i % 3]]))
        else:
            params.append(SamplingParams(temperature=0.0, max_tokens=32))
    plain, _ = _generate(tiny_target, None, prompts, params)
    install_oracle(monkeypatch, tiny_target, prompts, plain_32)

    def exported(name):  # specx's Prometheus counters
        return specx_counter(f"tree_{name}")

    before_exported = {n: exported(n) for n in ("requests", "nodes_verified", "nodes_accepted")}
    before = dict(tree_step.STATS)
    spec = {"method": "eagle3", "model": edd_tree_drafter, "num_speculative_tokens": K}
    tree, metrics = _generate(tiny_target, spec, prompts, params)
    for i, (a, b) in enumerate(zip(plain, tree)):
        assert list(b.outputs[0].token_ids) == list(a.outputs[0].token_ids), i
        assert b.outputs[0].text == a.outputs[0].text, i
        assert b.outputs[0].finish_reason == a.outputs[0].finish_reason, i
    finished_early = [len(o.outputs[0].token_ids) for o in plain if len(o.outputs[0].token_ids) < 32]
    assert len(finished_early) >= 16 and any((n - 1) % 4 for n in finished_early)  # stops inside paths
    assert tree_step.STATS["nodes_accepted"] - before["nodes_accepted"] >= 2 * _counter(
        metrics, "vllm:spec_decode_num_drafts")
    for name, key in (("requests", "tree_requests"), ("nodes_verified", "nodes_verified"),
                      ("nodes_accepted", "nodes_accepted")):
        assert exported(name) - before_exported[name] == tree_step.STATS[key] - before[key] > 0, name


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_trees_under_preemption_and_prefix_caching(tiny_target, edd_tree_drafter, monkeypatch, prefix_caching):
    """A KV cache too small for the batch (requests preempted and recomputed), prompts sharing a long
    prefix (cached blocks reused): oracle trees stay lossless."""
    from vllm import SamplingParams

    shared = "You are a careful assistant. Answer briefly and do not repeat the question back. " * 4
    prompts = [shared + p for p in many_prompts(24)]
    params = [SamplingParams(temperature=0.0, max_tokens=32) for _ in prompts]
    plain, _ = _generate(tiny_target, None, prompts, params)
    plain_ids = [list(o.outputs[0].token_ids) for o in plain]
    install_oracle(monkeypatch, tiny_target, prompts, plain_ids)
    spec = {"method": "eagle3", "model": edd_tree_drafter, "num_speculative_tokens": K}
    tree, metrics = _generate(tiny_target, spec, prompts, params, block_size=32, enable_prefix_caching=prefix_caching,
                              num_gpu_blocks_override=KV_BLOCKS_FOR_PREEMPTION)
    assert_same_tokens(plain_ids, [list(o.outputs[0].token_ids) for o in tree])
    assert _counter(metrics, "vllm:num_preemptions") > 0
    if prefix_caching:
        assert _counter(metrics, "vllm:prefix_cache_hits") > 0
    assert _counter(metrics, "vllm:spec_decode_num_accepted_tokens") >= 2 * _counter(metrics, "vllm:spec_decode_num_drafts")


# 24 requests of ~110 prompt + 32 output tokens need ~5 blocks of 32 tokens each (120 for the batch,
# 2 of them shareable prefix): 40 blocks force preemption and recomputation.
KV_BLOCKS_FOR_PREEMPTION = 40


def _homogeneity_pvalue(a: list[int], b: list[int], min_count: int = 10) -> float:
    """Two-sample chi-square test that token samples a and b come from one distribution; tokens seen
    fewer than `min_count` times in both samples together are pooled into one cell."""
    import collections

    import torch

    ca, cb = collections.Counter(a), collections.Counter(b)
    common = [t for t in set(ca) | set(cb) if ca[t] + cb[t] >= min_count]
    rows = [[ca[t] for t in common] + [len(a) - sum(ca[t] for t in common)],
            [cb[t] for t in common] + [len(b) - sum(cb[t] for t in common)]]
    obs = torch.tensor(rows, dtype=torch.float64)
    obs = obs[:, obs.sum(0) > 0]
    exp = obs.sum(1, keepdim=True) * obs.sum(0, keepdim=True) / obs.sum()
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = torch.tensor(float(obs.shape[1] - 1))
    return float(torch.special.gammaincc(dof / 2, stat / 2)) if dof > 0 else 1.0


SAMPLED_REQUESTS, TEMPERATURE = 400, 0.15  # the tiny random target: a few likely tokens per position


def _sampled_positions(target: str, spec: dict | None, prompt: str, seeded: bool = True) -> list[list[int]]:
    from vllm import SamplingParams

    params = [SamplingParams(temperature=TEMPERATURE, seed=s if seeded else None, max_tokens=4, ignore_eos=True)
              for s in range(SAMPLED_REQUESTS)]
    outs, _ = _generate(target, spec, [prompt] * SAMPLED_REQUESTS, params)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    assert all(len(t) == 4 for t in tokens)
    return tokens


def _accept_first_child(token_ids, parents, node_valid, draw, max_depth=None):
    """A broken walk for the control: the first child of every node is accepted whatever was drawn."""
    import torch

    from vllm_specx.core.sample_match import sample_then_match
    from vllm_specx.core.tree_verify import children_table

    first = children_table(parents, node_valid)[:, :, 0]  # [B, N]

    def biased(node, alive):
        drawn = draw(node, alive)
        child = first.gather(1, node[:, None])[:, 0]
        return torch.where(child >= 0, token_ids.gather(1, child.clamp(min=0)[:, None])[:, 0], drawn)

    return sample_then_match(token_ids, parents, node_valid, biased, max_depth)


def test_sampled_trees_keep_the_target_distribution(tiny_target, edd_tree_drafter, tiny_plain_outputs, monkeypatch):
    """Temperature sampling through trees (sample-then-match over the oracle's candidates, which are the
    greedy continuation and its runner-ups): seeded requests equal plain seeded sampling token for token,
    and unseeded ones follow the same distribution at output positions 1-3 (chi-square homogeneity
    against the 400 seeded plain samples)."""
    from vllm_specx.vllm_adapter import sample_match, tree_step

    prompt = many_prompts(1)[0]
    install_oracle(monkeypatch, tiny_target, [prompt], tiny_plain_outputs["many"].token_ids[:1])
    plain = _sampled_positions(tiny_target, None, prompt)
    before = dict(tree_step.STATS)
    spec = {"method": "eagle3", "model": edd_tree_drafter, "num_speculative_tokens": K}
    assert _sampled_positions(tiny_target, spec, prompt) == plain
    assert tree_step.STATS["sampled_tree_requests"] - before["sampled_tree_requests"] >= SAMPLED_REQUESTS
    assert tree_step.STATS["nodes_accepted"] > before["nodes_accepted"]  # candidates were accepted
    tree = _sampled_positions(tiny_target, spec, prompt, seeded=False)
    pvalues = [_homogeneity_pvalue([t[k] for t in plain], [t[k] for t in tree]) for k in (1, 2, 3)]
    assert min(pvalues) > 1e-3 / 3, pvalues  # Bonferroni over the three positions

    # Control: a walk that accepts a node's first candidate whatever the target drew over-samples
    # candidates: detected.
    monkeypatch.setattr(sample_match, "sample_then_match", _accept_first_child)
    wrong = _sampled_positions(tiny_target, spec, prompt, seeded=False)
    assert min(_homogeneity_pvalue([t[k] for t in plain], [t[k] for t in wrong]) for k in (1, 2, 3)) < 1e-4
