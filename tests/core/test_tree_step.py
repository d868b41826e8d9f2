"""tree_step's V2-runner hooks on synthetic steps (no engine): sample-then-match over V2's draws walks a
tree request's nodes and writes its output row (vllm_adapter/sample_match.py), and the speculator wrapper
hands V2's speculator the accepted path's rows first. The end-to-end checks
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


class _FakeV2Sampler:
    """V2's sampler for `sample_match.v2_verify_step`: draws `drawn` for the logits rows (counted in calls)."""

    def __init__(self, drawn: list[int], temperature: list[float]):
        self.drawn, self.calls = drawn, []
        self.req_states = SimpleNamespace(prefill_len=SimpleNamespace(gpu=None))
        self.sampling_states = SimpleNamespace(temperature=SimpleNamespace(np=np.array(temperature)))

    def __call__(self, logits, input_batch):
        self.calls.append(logits.shape[0])
        return SimpleNamespace(sampled_token_ids=torch.tensor(self.drawn)[:, None], logprobs_tensors=None,
                               num_nans=None)


def _fake_v2(monkeypatch, inputs: list[int], drawn: list[int], cu: list[int], temperature: list[float]):
    """A V2 rejection sampler over len(cu) - 1 requests (logits rows cu[i]..cu[i+1]) whose rows' input
    tokens are `inputs`; vLLM's two Triton helpers replaced by their meaning. -> (it, input batch)."""
    from vllm.v1.worker.gpu import input_batch as v2_input_batch
    from vllm.v1.worker.gpu.spec_decode import rejection_sampler as v2_rejection

    monkeypatch.setattr(v2_rejection, "gather_draft_sampled", lambda *args: (torch.tensor(inputs), None))
    monkeypatch.setattr(v2_input_batch, "get_num_sampled_and_rejected",
                        lambda num_sampled, seq_lens, cu, idx, prefill: (num_sampled, cu.diff() - num_sampled))
    n = len(cu) - 1
    batch = SimpleNamespace(input_ids=None, positions=None, logits_indices=None, expanded_idx_mapping=None,
                            expanded_local_pos=None, num_reqs=n, cu_num_logits_np=np.array(cu),
                            cu_num_logits=torch.tensor(cu), idx_mapping=None, idx_mapping_np=np.arange(n),
                            seq_lens=None)
    return SimpleNamespace(sampler=_FakeV2Sampler(drawn, temperature), num_speculative_steps=5), batch


def test_v2_sample_match_walks_chains_and_trees_over_v2s_own_draws(monkeypatch):
    """Request 0: a chain of 2 drafts (rows 0-2); request 1: the tree of `_tree_step` (rows 3-8). V2's
    sampler draws every row once; each request walks its drafts over those draws."""
    from vllm_specx.vllm_adapter import sample_match

    step = _tree_step(qs=3)
    tree_step._STEP[0] = step
    inputs = [7, 21, 22] + [0, 11, 12, 13, 14, 15]  # row inputs: root, then the drafts / nodes
    drawn = [21, 5, 9] + [12, 7, 14, 7, 15, 3]  # chain: 21 accepted, then 5 != 22; tree: c1 c2 c3 + bonus 3
    draw, batch = _fake_v2(monkeypatch, inputs, drawn, [0, 3, 9], [0.8, 0.0])
    try:
        out = sample_match.v2_verify_step(draw, torch.zeros(9, VOCAB), batch, None, tree_step.tree_step_to_verify(True))
    finally:
        tree_step._STEP[0] = None
    assert draw.sampler.calls == [9]  # one draw of every row
    assert out.sampled_token_ids.tolist() == [[21, 5, -1, -1, -1, -1], [12, 14, 15, 3, -1, -1]]
    assert out.num_sampled.tolist() == [2, 4] and out.num_rejected.tolist() == [1, 2]
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


def test_v2_sample_match_keeps_the_mismatching_draw_and_drafts_grammar_refused(monkeypatch):
    """A request whose first draft mismatches emits the draw at its root; invalid drafts never match."""
    from vllm_specx.vllm_adapter import sample_match

    draw, batch = _fake_v2(monkeypatch, [7, 21, 22], [21, 22, 9], [0, 3], [0.8])
    out = sample_match.v2_verify_step(draw, torch.zeros(3, VOCAB), batch, None, None)
    assert out.sampled_token_ids[0].tolist()[:3] == [21, 22, 9] and out.num_sampled.tolist() == [3]
    invalid = torch.tensor([False, False, True])  # the grammar refuses the second draft
    out = sample_match.v2_verify_step(draw, torch.zeros(3, VOCAB), batch, invalid, None)
    assert out.sampled_token_ids[0].tolist()[:3] == [21, 22, -1] and out.num_sampled.tolist() == [2]


def test_v2_trees_only_for_requests_that_trees_can_serve():
    def params(**kw):
        base = dict(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, logprobs=None, logit_bias=None,
                    bad_words_token_ids=None, allowed_token_ids=None, min_tokens=0, presence_penalty=0.0,
                    frequency_penalty=0.0, repetition_penalty=1.0, structured_outputs=None)
        return SimpleNamespace(**{**base, **kw})

    new = [SimpleNamespace(req_id=r, sampling_params=p) for r, p in
           (("greedy", params()), ("sampled", params(temperature=0.8)), ("logprobs", params(logprobs=2)),
            ("top_p", params(temperature=0.8, top_p=0.9)), ("penalty", params(temperature=0.8, presence_penalty=0.5)),
            ("grammar", params(structured_outputs=object())))]
    add = tree_step._wrap_v2_add_requests(lambda self, out: None)
    add(None, SimpleNamespace(finished_req_ids=set(), scheduled_new_reqs=new))
    names = ("greedy", "sampled", "logprobs", "top_p", "penalty", "grammar", "unknown")
    assert [tree_step.v2_tree_ok(r) for r in names] == [True, True, True, True, False, False, False]
    add(None, SimpleNamespace(finished_req_ids={"greedy"}, scheduled_new_reqs=[]))
    assert not tree_step.v2_tree_ok("greedy")  # forgotten when it finishes
