"""Sample-then-match verification (core/sample_match.py) on a toy Markov target: seeded speculative output
equals plain seeded decoding token for token, one draw per emitted token, and the output distribution is
the target's (chi-square)."""

import pytest
import torch

from tests.core.test_tree_verify import SHAPES, chi2_pvalue
from vllm_specx.core.sample_match import chain_parents, pack_drafts, sample_then_match
from vllm_specx.core.tree_verify import greedy_accept

V = 6


def toy_target(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Target P[prev, next] and a draft model Q[prev, next] over V tokens."""
    g = torch.Generator().manual_seed(seed)
    P = torch.softmax(1.5 * torch.randn(V, V, generator=g), dim=-1)
    Q = torch.softmax(0.7 * torch.randn(V, V, generator=g) + P.log(), dim=-1)
    return P, Q


def draw_one(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from probs [V] the way vLLM's sampler draws it: argmax(probs / q), q ~ Exp(1)."""
    q = torch.empty_like(probs).exponential_(generator=generator)
    return int((probs / q).argmax())


def draft_tree(Q: torch.Tensor, root: int, shape: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic tree under root: node i is its parent's rank-th most likely token under Q."""
    tokens = [root]
    for i in range(1, len(shape)):
        rank = sum(1 for j in range(1, i) if shape[j] == shape[i])
        tokens.append(int(Q[tokens[shape[i]]].argsort(descending=True, stable=True)[rank]))
    return torch.tensor(tokens), torch.tensor(shape)


def plain_decode(P: torch.Tensor, first: int, num: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    out = [first]
    while len(out) < num:
        out.append(draw_one(P[out[-1]], g))
    return out


def speculative_decode(P, Q, firsts: list[int], num: int, seeds: list[int], shape: list[int],
                       draw_dead: bool = False):
    """Every request drafts the same tree shape each step; -> outputs, draws per request. draw_dead: also
    draw (wrongly) for requests whose walk has stopped."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    outs = [[f] for f in firsts]
    draws = [0] * len(firsts)
    while min(len(o) for o in outs) < num:
        trees = [draft_tree(Q, o[-1], shape) for o in outs]
        token_ids, parents, valid = pack_drafts([t for t, _ in trees], [p for _, p in trees])

        def draw(node, alive):
            tokens = torch.zeros(len(outs), dtype=torch.long)
            for b in range(len(outs)):
                if alive[b] or draw_dead:
                    draws[b] += 1
                    tokens[b] = draw_one(P[token_ids[b, node[b]]], gens[b])
            return tokens

        res = sample_then_match(token_ids, parents, valid, draw)
        emitted = res.emitted_tokens(token_ids)
        for b, o in enumerate(outs):
            o.extend(emitted[b, : int(res.num_accepted[b])].tolist())
    return [o[:num] for o in outs], draws, [len(o) for o in outs]


@pytest.mark.parametrize("name", list(SHAPES))
def test_seeded_output_equals_plain_decoding_token_for_token(name):
    P, Q = toy_target(seed=1)
    firsts, seeds = [b % V for b in range(16)], [100 + b for b in range(16)]
    spec, draws, lengths = speculative_decode(P, Q, firsts, 40, seeds, SHAPES[name])
    for b in range(16):
        assert spec[b] == plain_decode(P, firsts[b], 40, seeds[b]), b
    # one draw per emitted token: nodes after the first mismatch consume nothing
    assert draws == [n - 1 for n in lengths]


def test_drafts_are_accepted():
    P, Q = toy_target(seed=1)
    tokens, parents = draft_tree(Q, 0, SHAPES["bushy"])
    token_ids, par, valid = pack_drafts([tokens] * 4000, [parents] * 4000)
    g = torch.Generator().manual_seed(0)

    def draw(node, alive):
        return torch.multinomial(P[token_ids.gather(1, node[:, None])[:, 0]], 1, generator=g)[:, 0]

    res = sample_then_match(token_ids, par, valid, draw)
    assert float(res.num_accepted.float().mean()) > 1.3
    # the distribution of the first two emitted tokens is the target's
    em = res.emitted_tokens(token_ids)
    first = em[:, 0]
    second = torch.where(res.num_accepted >= 2, em[:, 1], torch.multinomial(P[first], 1, generator=g)[:, 0])
    assert chi2_pvalue(torch.bincount(first, minlength=V), P[0]) > 1e-3
    joint = P[0][:, None] * P
    assert chi2_pvalue(torch.bincount(first * V + second, minlength=V * V), joint) > 1e-3


def test_negative_control_draws_after_a_mismatch_break_seeded_equality():
    """Drawing for nodes after the first mismatch (a draw plain decoding never makes) is detected."""
    P, Q = toy_target(seed=1)
    firsts, seeds = [b % V for b in range(16)], [100 + b for b in range(16)]
    spec, _, _ = speculative_decode(P, Q, firsts, 40, seeds, SHAPES["bushy"], draw_dead=True)
    assert sum(spec[b] != plain_decode(P, firsts[b], 40, seeds[b]) for b in range(16)) >= 8


def test_argmax_draw_equals_greedy_walk():
    P, Q = toy_target(seed=2)
    trees = [draft_tree(Q, r % V, SHAPES["narrow_root"]) for r in range(12)]
    token_ids, parents, valid = pack_drafts([t for t, _ in trees], [p for _, p in trees])
    argmax = P[token_ids].argmax(-1)  # [B, N]

    res = sample_then_match(token_ids, parents, valid, lambda node, alive: argmax.gather(1, node[:, None])[:, 0])
    ref = greedy_accept(token_ids, parents, valid, argmax)
    assert torch.equal(res.accepted_path, ref.accepted_path) and torch.equal(res.bonus_token, ref.bonus_token)


def test_ragged_chains_and_trees_in_one_batch():
    """Chains of different lengths (0 drafts included) and a tree, padded together."""
    tokens = [torch.tensor([5]), torch.tensor([5, 1, 2]), torch.tensor([5, 1, 3, 2])]
    parents = [chain_parents(0), chain_parents(2), torch.tensor([-1, 0, 0, 2])]
    token_ids, par, valid = pack_drafts(tokens, parents)
    # target: always token 2 after token 5 ... after 1 -> 2, after 3 -> 2, after 2 -> 4
    nxt = {5: 3, 1: 2, 3: 2, 2: 4, 0: 0}
    seen = []

    def draw(node, alive):
        seen.append(alive.tolist())
        return torch.tensor([nxt[int(token_ids[b, node[b]])] for b in range(3)])

    res = sample_then_match(token_ids, par, valid, draw)
    assert res.num_accepted.tolist() == [1, 1, 3]
    assert res.emitted_tokens(token_ids).tolist() == [[3, -1, -1], [3, -1, -1], [3, 2, 4]]
    assert seen == [[True, True, True], [False, False, True], [False, False, True]]
