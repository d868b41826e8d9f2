import pytest
import torch

import vllm_specx.core.tree_verify as tv
from vllm_specx.core.tree import node_depth
from vllm_specx.core.tree_verify import (
    accepted_node_mask,
    children_table,
    draft_confidence_ece,
    greedy_accept,
    sample_accept,
)

V, ROWS, ALPHA = 6, 12000, 1e-3
SHAPES = {
    "bushy": [-1, 0, 0, 0, 1, 1, 4, 2],
    "chain": [-1, 0, 1, 2],
    "narrow_root": [-1, 0, 1, 1, 1, 2, 2, 3, 5],
}


# ----------------------------------------------------------------------------- stats
def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; cells with expected < 5 are pooled."""
    counts, probs = counts.double().flatten(), probs.double().flatten()
    if bool((counts[probs == 0] > 0).any()):
        return 0.0  # an impossible outcome was observed
    expected = probs * counts.sum()
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum(0, keepdim=True)])
    exp = torch.cat([expected[~small], expected[small].sum(0, keepdim=True)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = torch.tensor(float(obs.numel() - 1))
    return float(torch.special.gammaincc(dof / 2, stat / 2))  # chi2 survival function


def test_chi2_pvalue_sanity():
    probs = torch.tensor([0.5, 0.3, 0.2])
    assert chi2_pvalue(torch.tensor([500, 300, 200]), probs) > 0.99
    assert chi2_pvalue(torch.tensor([600, 250, 150]), probs) < 1e-6
    # chi2 sf at the 95% quantile of 2 dof (5.991) is 0.05
    assert abs(float(torch.special.gammaincc(torch.tensor(1.0), torch.tensor(5.991 / 2))) - 0.05) < 1e-3


# ----------------------------------------------------------------------------- a toy LM
def toy_lm(seed: int, depth: int):
    """Target P[d, prev, next] and draft Q[d, prev, next] over V tokens (Markov, depth-aware)."""
    g = torch.Generator().manual_seed(seed)
    P = torch.softmax(1.5 * torch.randn(depth + 1, V, V, generator=g), dim=-1)
    Q = torch.softmax(0.5 * torch.randn(depth + 1, V, V, generator=g) + P.log(), dim=-1)
    return P, Q


def make_batch(shape, form: str, seed: int):
    """ROWS copies of one tree; tokens drafted from Q (top-k for form a, i.i.d. for form b)."""
    parents = torch.tensor(shape).expand(ROWS, -1).clone()
    N = parents.shape[1]
    valid = torch.ones_like(parents, dtype=torch.bool)
    depth = node_depth(parents)[0]
    P, Q = toy_lm(seed, int(depth.max()) + 1)
    g = torch.Generator().manual_seed(seed + 100)
    tokens = torch.zeros_like(parents)
    rank = [sum(1 for j in range(1, i) if shape[j] == shape[i]) for i in range(N)]
    for i in range(1, N):
        q = Q[depth[shape[i]], tokens[:, shape[i]]]  # [ROWS, V]
        if form == "a":
            tokens[:, i] = q.argsort(dim=-1, descending=True, stable=True)[:, rank[i]]
        else:
            tokens[:, i] = torch.multinomial(q, 1, generator=g)[:, 0]
    target = P[depth, tokens]  # [ROWS, N, V]
    draft = Q[depth, tokens]
    return tokens, parents, valid, target, (draft if form == "b" else None), P


def emitted_pair(res, tokens, P, g):
    """(first, second) emitted tokens; the second is drawn from the target if only one was emitted."""
    em = res.emitted_tokens(tokens)
    first = em[:, 0]
    fresh = torch.multinomial(P[1, first], 1, generator=g)[:, 0]
    second = torch.where(res.num_accepted >= 2, em[:, 1], fresh)
    return first, second


def run_and_test(shape, form, seed):
    tokens, parents, valid, target, draft, P = make_batch(shape, form, seed)
    g = torch.Generator().manual_seed(seed + 7)
    res = sample_accept(tokens, parents, valid, target, generator=g, draft_probs=draft)
    first, second = emitted_pair(res, tokens, P, g)
    p_first = chi2_pvalue(torch.bincount(first, minlength=V), P[0, 0])
    joint = P[0, 0][:, None] * P[1]  # [V, V]
    p_pair = chi2_pvalue(torch.bincount(first * V + second, minlength=V * V), joint)
    return p_first, p_pair, res


# ----------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("form", ["a", "b"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_sampling_is_lossless(form, name):
    p_first, p_pair, res = run_and_test(SHAPES[name], form, seed=len(name))
    assert p_first > ALPHA and p_pair > ALPHA, (p_first, p_pair)
    assert float(res.num_accepted.float().mean()) > 1.3  # drafts do get accepted


def test_negative_control_wrong_residual_is_detected(monkeypatch):
    def no_residual(p, tok):  # bug: rejected candidates keep their mass
        return p.gather(1, tok[:, None])[:, 0], p
    monkeypatch.setattr(tv, "_accept_point_mass", no_residual)
    p_first, p_pair, _ = run_and_test(SHAPES["bushy"], "a", seed=5)
    assert p_first < 1e-6 and p_pair < 1e-6


def test_negative_control_wrong_specinfer_rule_is_detected(monkeypatch):
    def always_ratio_of_target(p, q, tok):  # bug: acceptance ignores q
        return p.gather(1, tok[:, None])[:, 0], tv._normalize((p - q).clamp(min=0.0), p)
    monkeypatch.setattr(tv, "_accept_sampled", always_ratio_of_target)
    p_first, _, _ = run_and_test(SHAPES["bushy"], "b", seed=5)
    assert p_first < 1e-6


def test_one_hot_target_sampling_equals_greedy():
    tokens, parents, valid, target, _, _ = make_batch(SHAPES["narrow_root"], "a", seed=3)
    tokens, parents, valid, target = tokens[:500], parents[:500], valid[:500], target[:500]
    argmax = target.argmax(-1)
    one_hot = torch.nn.functional.one_hot(argmax, V).double()
    s = sample_accept(tokens, parents, valid, one_hot, generator=torch.Generator().manual_seed(0))
    gr = greedy_accept(tokens, parents, valid, argmax)
    assert torch.equal(s.accepted_path, gr.accepted_path) and torch.equal(s.bonus_token, gr.bonus_token)


# ----------------------------------------------------------------------------- greedy
def test_greedy_hand_tree():
    #        0(t=7)
    #   1(t=3)   2(t=4)
    #   3(t=5)   4(t=5)  5(t=6)
    parents = torch.tensor([[-1, 0, 0, 1, 2, 2, -1]] * 3)
    valid = torch.tensor([[True] * 6 + [False]] * 3)
    tokens = torch.tensor([[7, 3, 4, 5, 5, 6, 0]] * 3)
    argmax = torch.tensor([
        [4, 9, 6, 9, 9, 8, 9],   # 0 -> 2 -> 5, bonus 8
        [3, 5, 9, 1, 9, 9, 9],   # 0 -> 1 -> 3, bonus 1
        [9, 9, 9, 9, 9, 9, 9],   # nothing accepted, bonus 9
    ])
    res = greedy_accept(tokens, parents, valid, argmax)
    assert res.accepted_path.tolist() == [[0, 2, 5], [0, 1, 3], [0, -1, -1]]
    assert res.num_accepted.tolist() == [3, 3, 1]
    assert res.bonus_token.tolist() == [8, 1, 9]
    assert res.emitted_tokens(tokens).tolist() == [[4, 6, 8], [3, 5, 1], [9, -1, -1]]
    assert accepted_node_mask(res.accepted_path, 7)[0].tolist() == [1, 0, 1, 0, 0, 1, 0]


def naive_greedy(tokens, parents, valid, argmax, b):
    cur, path = 0, [0]
    while True:
        kids = [j for j in range(parents.shape[1]) if valid[b, j] and parents[b, j] == cur]
        match = [j for j in kids if tokens[b, j] == argmax[b, cur]]
        if not match:
            return path, int(argmax[b, cur])
        cur = match[0]
        path.append(cur)


def test_greedy_matches_naive_walk_on_random_trees():
    g = torch.Generator().manual_seed(1)
    B, N = 64, 12
    parents = torch.stack([torch.tensor([-1] + [int(torch.randint(0, i, (1,), generator=g))
                                                 for i in range(1, N)]) for _ in range(B)])
    valid = torch.arange(N)[None, :] < torch.randint(1, N + 1, (B, 1), generator=g)
    parents = torch.where(valid, parents, -1)
    tokens = torch.randint(0, 3, (B, N), generator=g)
    argmax = torch.randint(0, 3, (B, N), generator=g)
    res = greedy_accept(tokens, parents, valid, argmax)
    for b in range(B):
        path, bonus = naive_greedy(tokens, parents, valid, argmax, b)
        assert res.accepted_path[b, : len(path)].tolist() == path
        assert (res.accepted_path[b, len(path):] == -1).all() and res.bonus_token[b] == bonus


def test_children_table_order():
    parents = torch.tensor([[-1, 0, 0, 1, 0, 1, -1]])
    valid = torch.tensor([[True] * 6 + [False]])
    assert children_table(parents, valid)[0].tolist() == [
        [1, 2, 4], [3, 5, -1], [-1, -1, -1], [-1, -1, -1], [-1, -1, -1], [-1, -1, -1], [-1, -1, -1]]


def test_draft_confidence_ece():
    conf = torch.tensor([[1.0, 0.9, 0.9, 0.1, 0.1]])
    accepted = torch.tensor([[True, True, True, False, False]])
    mask = torch.tensor([[False, True, True, True, True]])
    assert abs(draft_confidence_ece(conf, accepted, mask) - 0.1) < 1e-6
