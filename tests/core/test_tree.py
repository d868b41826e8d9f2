import pytest
import torch

from vllm_specx.core.tree import (
    DraftTree,
    append_level,
    build_fixed_tree,
    build_pct_tree,
    build_tree_buffers,
    check_tree,
    expand_level,
    node_depth,
)


def random_trees(B: int, N: int, seed: int, max_children: int = 3):
    """Random BFS-ordered trees padded to N nodes: (parents, node_valid)."""
    g = torch.Generator().manual_seed(seed)
    parents = torch.full((B, N), -1, dtype=torch.long)
    valid = torch.zeros((B, N), dtype=torch.bool)
    for b in range(B):
        n = int(torch.randint(1, N + 1, (1,), generator=g))
        queue, nxt = [0], 1
        while queue and nxt < n:
            p = queue.pop(0)
            for _ in range(int(torch.randint(1, max_children + 1, (1,), generator=g))):
                if nxt < n:
                    parents[b, nxt] = p
                    queue.append(nxt)
                    nxt += 1
        valid[b, :nxt] = True
    return parents, valid


def naive_ancestors(parents, valid, b, i):
    out, j = [], i
    while j >= 0:
        out.append(j)
        j = int(parents[b, j])
    return out[::-1]  # root first


def test_hand_built_tree():
    #      0
    #    1   2
    #   3 4   5
    #         6
    parents = torch.tensor([[-1, 0, 0, 1, 1, 2, 5, -1]])
    valid = torch.tensor([[True] * 7 + [False]])
    check_tree(parents, valid)
    buf = build_tree_buffers(parents, valid, torch.tensor([10]))
    assert buf.depth.tolist() == [[0, 1, 1, 2, 2, 2, 3, 0]]
    assert buf.positions.tolist() == [[10, 11, 11, 12, 12, 12, 13, 10]]
    assert buf.is_leaf.tolist() == [[False, False, False, True, True, False, True, False]]
    assert buf.num_nodes.tolist() == [7]
    assert buf.retrieve_paths.tolist() == [[[0, 1, 3, -1], [0, 1, 4, -1], [0, 2, 5, 6]]]
    assert buf.ancestor_mask[0, 6].tolist() == [True, False, True, False, False, True, True, False]
    assert buf.ancestor_mask[0, 7].tolist() == [False] * 7 + [True]  # padding: diagonal only


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_buffers_match_naive_walk(seed):
    parents, valid = random_trees(B=5, N=13, seed=seed)
    check_tree(parents, valid)
    ctx = torch.tensor([0, 3, 7, 100, 1])
    buf = build_tree_buffers(parents, valid, ctx)
    for b in range(5):
        for i in range(13):
            if not valid[b, i]:
                assert buf.ancestor_mask[b, i].nonzero().flatten().tolist() == [i]
                assert not buf.ancestor_mask[b, :, i][torch.arange(13) != i].any()
                continue
            anc = naive_ancestors(parents, valid, b, i)
            assert buf.depth[b, i] == len(anc) - 1
            assert buf.positions[b, i] == ctx[b] + len(anc) - 1
            assert sorted(buf.ancestor_mask[b, i].nonzero().flatten().tolist()) == sorted(anc)
        leaves = [i for i in range(13) if valid[b, i] and not (valid[b] & (parents[b] == i)).any()]
        assert buf.is_leaf[b].nonzero().flatten().tolist() == leaves
        paths = [[j for j in p if j >= 0] for p in buf.retrieve_paths[b].tolist()]
        assert [p for p in paths if p] == [naive_ancestors(parents, valid, b, i) for i in leaves]


def test_long_chain_depth():
    N = 37
    parents = (torch.arange(N) - 1).unsqueeze(0)
    assert node_depth(parents).tolist() == [list(range(N))]
    buf = build_tree_buffers(parents, torch.ones(1, N, dtype=torch.bool), torch.tensor([0]))
    assert buf.ancestor_mask[0].equal(torch.ones(N, N, dtype=torch.bool).tril())
    assert buf.retrieve_paths.tolist() == [[list(range(N))]]


def test_check_tree_rejects_bad_order():
    with pytest.raises(ValueError):
        check_tree(torch.tensor([[-1, 2, 0]]), torch.ones(1, 3, dtype=torch.bool))


def test_expand_level_threshold_and_cap():
    frontier_prob = torch.tensor([[1.0, 0.5], [1.0, 0.0]])
    frontier_valid = torch.tensor([[True, True], [True, False]])
    child_probs = torch.tensor([[[0.6, 0.3], [0.9, 0.1]], [[0.5, 0.2], [0.9, 0.9]]])
    child_ids = torch.tensor([[[10, 11], [12, 13]], [[20, 21], [22, 23]]])
    exp = expand_level(frontier_prob, frontier_valid, child_probs, child_ids,
                       torch.tensor([0.25, 0.1]), max_new_nodes=3)
    # request 0: path probs 0.6, 0.3, 0.45, 0.05 -> keep 0.6, 0.45, 0.3 (cap 3, threshold 0.25)
    assert exp.keep[0].tolist() == [True, True, True]
    assert exp.token_ids[0].tolist() == [10, 12, 11]
    assert exp.parent_slot[0].tolist() == [0, 1, 0]
    assert torch.allclose(exp.path_prob[0], torch.tensor([0.6, 0.45, 0.3]))
    # request 1: invalid frontier slot ignored; 0.5 and 0.2 pass 0.1
    assert exp.keep[1].tolist() == [True, True, False]
    assert exp.token_ids[1, :2].tolist() == [20, 21]


def markov_drafter(table: torch.Tensor, k: int):
    """Drafter whose next-token distribution depends only on the frontier node's token."""
    def draft_level(level, frontier, frontier_valid, tree):
        tok = tree.token_ids.gather(1, frontier.clamp(min=0))  # [B, F]
        probs, ids = table[tok].topk(k, dim=-1)                # [B, F, k]
        return probs, ids
    return draft_level


def _table(V, seed, sharp=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharp * torch.randn(V, V, generator=g), dim=-1)


def test_pct_tree_is_valid_and_pruned():
    table = _table(V=50, seed=3)
    roots = torch.tensor([1, 7, 42, 9])
    thr = torch.tensor([0.0, 0.05, 0.3, 1.0])
    tree = build_pct_tree(roots, markov_drafter(table, 4), thr, max_depth=5, max_new_nodes=6)
    check_tree(tree.parents, tree.node_valid)
    assert tree.token_ids[:, 0].tolist() == roots.tolist()
    n = tree.num_nodes.tolist()
    assert n[0] == 1 + 4 + 4 * 6 and n[0] >= n[1] >= n[2] and n[3] == 1  # level 0 has only k=4 children; thr>=1: none
    for b in range(4):
        for i in range(1, n[b]):
            p = int(tree.parents[b, i])
            expect = tree.path_prob[b, p] * table[tree.token_ids[b, p], tree.token_ids[b, i]]
            assert torch.isclose(tree.path_prob[b, i], expect)
            assert tree.path_prob[b, i] > thr[b]
    buf = build_tree_buffers(tree.parents, tree.node_valid, torch.zeros(4, dtype=torch.long))
    assert int(buf.depth[1].max()) <= 5


def test_fixed_tree_keeps_best_budget_and_is_closed():
    table = _table(V=30, seed=5, sharp=1.5)
    roots = torch.tensor([0, 3, 11])
    full = build_pct_tree(roots, markov_drafter(table, 3), 0.0, max_depth=4,
                          max_new_nodes=9, max_frontier=3)
    tree = build_fixed_tree(roots, markov_drafter(table, 3), topk=3, max_depth=4, node_budget=10)
    check_tree(tree.parents, tree.node_valid)
    assert tree.num_nodes.tolist() == [11, 11, 11]
    for b in range(3):
        best = full.path_prob[b, 1:full.num_nodes[b]].sort(descending=True).values[:10]
        got = tree.path_prob[b, 1:].sort(descending=True).values
        assert torch.allclose(best, got)
        # BFS order: depth never decreases along the node order
        depth = node_depth(tree.parents)[b]
        assert (depth[1:] >= depth[:-1]).all()


def test_draft_tree_capacity_is_respected():
    tree = DraftTree.new(torch.tensor([5]), capacity=3)
    table = _table(V=10, seed=0)
    fn = markov_drafter(table, 4)
    frontier = torch.zeros((1, 1), dtype=torch.long)
    probs, ids = fn(0, frontier, torch.ones(1, 1, dtype=torch.bool), tree)
    exp = expand_level(torch.ones(1, 1), torch.ones(1, 1, dtype=torch.bool), probs, ids, 0.0, 4)
    new = append_level(tree, exp, frontier)
    assert new.tolist() == [[1, 2, -1, -1]] and tree.num_nodes.tolist() == [3]


def test_chain_with_siblings_keeps_paying_siblings_within_budget():
    from vllm_specx.core.tree import chain_with_siblings, check_tree

    chain_ids = torch.tensor([[10, 11, 12], [20, 21, 22]])
    chain_len = torch.tensor([3, 1])
    chain_path = torch.tensor([[0.6, 0.4, 0.2], [0.5, 0.3, 0.1]])
    sib_ids = torch.tensor([[[30, 31], [32, 33], [34, 35]], [[40, 41], [42, 43], [44, 45]]])
    sib_probs = torch.tensor([[[0.3, 0.05], [0.25, 0.1], [0.2, 0.1]], [[0.4, 0.2], [0.3, 0.1], [0.3, 0.1]]])
    tree = chain_with_siblings(chain_ids, chain_len, chain_path, sib_ids, sib_probs, 0.12, node_budget=4)
    check_tree(tree.parents, tree.node_valid)
    got = []
    for b in range(2):
        n = int(tree.node_valid[b].sum())
        got.append({(int(tree.token_ids[b, i]), int(tree.parents[b, i])) for i in range(1, n)})
        assert n - 1 <= 4
    # request 0 (gains): chain 0.6, 0.4, 0.2; depth-0 sibs 0.3, 0.05; depth-1 sibs 0.6*.25=.15, .06;
    # depth-2 sibs .4*.2=.08, .04 -> above 0.12 and best 4: chain 10 (.6), 11 (.4), sib 30 (.3), 12 (.2)
    tok = {int(t): i for i, t in enumerate(tree.token_ids[0].tolist()) if tree.node_valid[0, i]}
    assert set(tok) - {0} == {10, 11, 30, 12}
    assert int(tree.parents[0, tok[30]]) == 0 and int(tree.parents[0, tok[11]]) == tok[10]
    assert int(tree.parents[0, tok[12]]) == tok[11]
    # request 1: chain cut at 1 (early stop): only depth-0 nodes and siblings of depth 1 hanging off 20
    tok1 = {int(t) for i, t in enumerate(tree.token_ids[1].tolist()) if tree.node_valid[1, i]} - {0}
    assert tok1 == {20, 40, 41, 42}  # .5, .4, .2, .5*.3=.15 (all > .12); 21 was not kept by early stop
    # a threshold of 1 keeps no sibling (the chain nodes follow early stop, which applies its own threshold)
    none = chain_with_siblings(chain_ids, chain_len, chain_path, sib_ids, sib_probs, 1.0, node_budget=4)
    assert int(none.node_valid[:, 1:].sum()) == 3 + 1  # chain nodes follow early stop, not the threshold


def test_siblings_to_expand_and_their_children_in_the_tree():
    """Children drafted under kept siblings join the tree when their path prob (sibling path x child
    confidence) pays; the budget keeps the best nodes, closed under ancestors; layout stays topological."""
    from vllm_specx.core.tree import chain_with_siblings, check_tree, siblings_to_expand

    chain_ids = torch.tensor([[10, 11, 12]])
    chain_len = torch.tensor([2])
    chain_path = torch.tensor([[0.6, 0.3, 0.1]])
    sib_ids = torch.tensor([[[20, 21], [22, 23], [24, 25]]])
    sib_probs = torch.tensor([[[0.3, 0.05], [0.4, 0.1], [0.2, 0.1]]])
    # sibling paths: depth 0: 0.3, 0.05; depth 1: 0.6*0.4=0.24, 0.06; depth 2: 0.3*0.2=0.06, 0.03
    expand = siblings_to_expand(chain_len, chain_path, sib_probs, 0.1, node_budget=4)
    # nodes by score: chain0 0.6, sib(0,0) 0.3, chain1 0.3, sib(1,0) 0.24, ...: ranks < 3 expandable
    assert expand.tolist() == [[[True, False], [False, False], [False, False]]]
    assert siblings_to_expand(chain_len, chain_path, sib_probs, 0.1, node_budget=5)[0, 1, 0]
    assert not siblings_to_expand(chain_len, chain_path, sib_probs, 0.35, node_budget=8).any()

    child_ids = torch.zeros(1, 3, 2, 2, dtype=torch.long)
    child_probs = torch.zeros(1, 3, 2, 2)
    child_ids[0, 0, 0] = torch.tensor([30, 31])
    child_probs[0, 0, 0] = torch.tensor([0.9, 0.05])   # paths 0.27 (kept), 0.015 (below threshold)
    child_ids[0, 1, 1] = torch.tensor([32, 33])
    child_probs[0, 1, 1] = torch.tensor([0.99, 0.5])   # under a sibling that is not kept: never in the tree
    tree = chain_with_siblings(chain_ids, chain_len, chain_path, sib_ids, sib_probs, 0.1, node_budget=4,
                               child_ids=child_ids, child_probs=child_probs)
    check_tree(tree.parents, tree.node_valid)
    n = int(tree.num_nodes[0])
    nodes = dict(zip(tree.token_ids[0, 1:n].tolist(), tree.parents[0, 1:n].tolist()))
    tok = tree.token_ids[0].tolist()
    # best 4: chain0 0.6, sib 20 0.3, chain1 0.3, child 30 0.27 (beats sib 22 at 0.24)
    assert set(nodes) == {10, 20, 11, 30}
    assert tok[nodes[30]] == 20 and tok[nodes[11]] == 10 and nodes[10] == 0 and nodes[20] == 0
    assert torch.allclose(tree.path_prob[0, tok.index(30)], torch.tensor(0.27))
    # without children: the same call gives the chain-with-siblings tree
    plain = chain_with_siblings(chain_ids, chain_len, chain_path, sib_ids, sib_probs, 0.1, node_budget=4)
    assert set(plain.token_ids[0, 1:int(plain.num_nodes[0])].tolist()) == {10, 20, 11, 22}
