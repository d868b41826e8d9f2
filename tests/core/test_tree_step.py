"""tree_step's V2-runner hooks on synthetic steps (no engine): the rejection-sampler wrapper replaces a
tree request's output row from the walk over its logits (read before V2 may scale them in place), and
the speculator wrapper hands V2's speculator the accepted path's rows first. The end-to-end checks
(oracle trees, the same drafts as V1) are tests/vllm/test_v2_runner.py's."""

from types import SimpleNamespace

import numpy as np
import torch

from vllm_specx.vllm_adapter import tree_step
from vllm_specx.vllm_adapter.tree_step import _Step, _TreeRow

VOCAB = 16


def _tree_step(qs: int) -> _Step:
    """One request (batch row 1) whose query starts at packed row qs: root 0; nodes 1:w1, 2:c1 (both under
    the root), 3:w2 and 4:c2 (under c1), 5:c3 (under c2). Tokens: node i is token 10 + i."""
    parents = torch.tensor([-1, 0, 0, 2, 2, 4])
    row = _TreeRow(parents, torch.tensor([0, 1, 1, 2, 2, 3]), torch.tensor([0, 11, 12, 13, 14, 15]), qs, base=40)
    return _Step({1: row}, num_tokens=qs + 6, stats={"block_table": torch.zeros(2, 4, dtype=torch.long),
                                                     "block_size": 16, "isa": "vec"})


def test_v2_rejection_sampler_wrapper_writes_the_walk_into_v2s_output():
    step = _tree_step(qs=1)
    tree_step._STEP[0] = step
    # logits rows: request 0 has 1 row (no drafts), request 1 its root + 5 nodes
    logits = torch.zeros(7, VOCAB)
    after = {0: 12, 2: 14, 4: 15, 5: 3}  # the target's argmax after node i: path root -> c1 -> c2 -> c3, bonus 3
    for node, tok in after.items():
        logits[1 + node, tok] = 5.0
    logits[1 + 1, 7] = logits[1 + 3, 7] = 5.0  # after w1 / w2 (not on the path)
    batch = SimpleNamespace(cu_num_logits_np=np.array([0, 1, 7]), idx_mapping_np=np.array([3, 0]))
    states = SimpleNamespace(temperature=SimpleNamespace(np=np.zeros(4, dtype=np.float32)),
                             seeds=SimpleNamespace(np=np.arange(4)))
    sampler = SimpleNamespace(sampler=SimpleNamespace(sampling_states=states))  # batch row 1: state row 0, greedy

    def v2_sampler(self, logits, input_batch):
        logits.zero_()  # V2 scales logits in place: the walk must have read them before
        return SimpleNamespace(sampled_token_ids=torch.full((2, 6), 9), num_sampled=torch.tensor([1, 1]),
                               num_rejected=torch.tensor([0, 5]))

    try:
        out = tree_step._wrap_v2_rejection_sample(v2_sampler)(sampler, logits, batch)
    finally:
        tree_step._STEP[0] = None
    assert out.sampled_token_ids[1].tolist() == [12, 14, 15, 3, -1, -1]  # c1 c2 c3 + bonus
    assert out.sampled_token_ids[0].tolist() == [9] * 6  # a request without a tree keeps V2's row
    assert out.num_sampled.tolist() == [1, 4] and out.num_rejected.tolist() == [0, 2]  # 6 logits rows - 4
    assert step.rows[1].path == [0, 2, 4, 5] and not step.attending


def test_v2_speculator_wrapper_puts_the_accepted_path_first():
    step = _tree_step(qs=2)
    step.rows[1].path = [0, 2, 4, 5]
    ids = torch.arange(10) * 10
    positions = torch.arange(10) + 100
    hidden, aux = torch.arange(10.0)[:, None].repeat(1, 3), [torch.arange(10.0)[:, None] * -1]
    batch = SimpleNamespace(input_ids=ids.clone(), positions=positions.clone())
    seen = {}

    def v2_propose(self, input_batch, attn_metadata, slot_mappings, last_hidden_states, aux_hidden_states, *a, **kw):
        seen.update(ids=input_batch.input_ids.clone(), positions=input_batch.positions.clone(),
                    hidden=last_hidden_states[:, 0].clone(), aux=aux_hidden_states[0][:, 0].clone())

    tree_step._STEP[0] = step
    tree_step._wrap_v2_propose(v2_propose)(None, batch, None, None, hidden, aux)
    order = [0, 1] + [2 + j for j in (0, 2, 4, 5, 1, 3)] + [8, 9]  # rows 2..7 = the request's root + nodes
    assert seen["ids"].tolist() == ids[order].tolist() and seen["positions"].tolist() == positions[order].tolist()
    assert seen["hidden"].tolist() == [float(i) for i in order] and seen["aux"].tolist() == [-float(i) for i in order]
    assert tree_step._STEP[0] is None  # the step is consumed

    tree_step._STEP[0] = step  # a dummy run (profiling, warm-up) is never permuted
    batch = SimpleNamespace(input_ids=ids.clone(), positions=positions.clone())
    tree_step._wrap_v2_propose(v2_propose)(None, batch, None, None, hidden.clone(), [aux[0].clone()], dummy_run=True)
    assert seen["ids"].tolist() == ids.tolist()


def test_v2_sampled_tree_walks_draw_from_the_requests_temperature_and_seed():
    """A sampled request's walk (batch row 1 -> V2 state row 0) uses its temperature: at a temperature
    where the target's choices are near-certain the greedy path comes out; the same seed repeats."""
    def run(temperature, seed):
        step = _tree_step(qs=0)
        tree_step._STEP[0] = step
        logits = torch.zeros(6, VOCAB)
        for node, tok in {0: 12, 2: 14, 4: 15, 5: 3}.items():
            logits[node, tok] = 1.0
        batch = SimpleNamespace(cu_num_logits_np=np.array([0, 0, 6]), idx_mapping_np=np.array([1, 0]))
        states = SimpleNamespace(temperature=SimpleNamespace(np=np.array([temperature, 0.0], dtype=np.float32)),
                                 seeds=SimpleNamespace(np=np.array([seed, 0])))
        zeros = torch.zeros(2, dtype=torch.long)
        out = SimpleNamespace(sampled_token_ids=torch.zeros(2, 6, dtype=torch.long), num_sampled=zeros.clone(),
                              num_rejected=zeros.clone())
        try:
            tree_step._wrap_v2_rejection_sample(lambda self, lg, ib: out)(
                SimpleNamespace(sampler=SimpleNamespace(sampling_states=states)), logits, batch)
        finally:
            tree_step._STEP[0] = None
        return out.sampled_token_ids[1].tolist()

    assert run(0.01, 5) == [12, 14, 15, 3, -1, -1]  # logit gap 1 / 0.01: sampling is greedy here
    hot = [run(20.0, s) for s in range(8)]  # nearly uniform over 16 tokens: the first node is mostly rejected
    assert hot == [run(20.0, s) for s in range(8)] and len({tuple(h) for h in hot}) > 1


def test_v2_trees_only_for_requests_that_trees_can_serve():
    def params(**kw):
        base = dict(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, logprobs=None, logit_bias=None,
                    bad_words_token_ids=None, allowed_token_ids=None, min_tokens=0, presence_penalty=0.0,
                    frequency_penalty=0.0, repetition_penalty=1.0, structured_outputs=None)
        return SimpleNamespace(**{**base, **kw})

    new = [SimpleNamespace(req_id=r, sampling_params=p) for r, p in
           (("greedy", params()), ("sampled", params(temperature=0.8)), ("logprobs", params(logprobs=2)),
            ("top_p", params(temperature=0.8, top_p=0.9)))]
    add = tree_step._wrap_v2_add_requests(lambda self, out: None)
    add(None, SimpleNamespace(finished_req_ids=set(), scheduled_new_reqs=new))
    assert [tree_step.v2_tree_ok(r) for r in ("greedy", "sampled", "logprobs", "top_p", "unknown")] == [
        True, True, False, False, False]
    add(None, SimpleNamespace(finished_req_ids={"greedy"}, scheduled_new_reqs=[]))
    assert not tree_step.v2_tree_ok("greedy")  # forgotten when it finishes
