import json

import pytest
import torch

from vllm_specx.core.cost_model import CostModel, CostModelError, cost_model_path
from vllm_specx.core.tree import build_pct_tree

BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def true_target(B, n, c):
    """Roofline: fixed overhead + max(memory-bound weight/KV reads, compute on B*n tokens)."""
    return 2e-3 + max(5e-3 + 2e-8 * B * c, 4e-5 * B * n * (1 + c / 4096))


def true_draft(B, m):
    return 3e-4 + 2e-5 * B * m


def synthetic_measurements(noise=0.01, seed=0):
    g = torch.Generator().manual_seed(seed)
    jitter = lambda: 1 + noise * float(torch.randn(1, generator=g))  # noqa: E731
    out = []
    for B in BATCHES:
        for n in [1, 2, 4, 8, 16, 32]:
            for c in [256, 1024, 4096]:
                out.append({"kind": "target", "batch_size": B, "nodes_per_request": n,
                            "context_len": c, "time_s": true_target(B, n, c) * jitter()})
        for m in [1, 2, 4, 8, 16]:
            out.append({"kind": "draft", "batch_size": B, "nodes_per_request": m,
                        "time_s": true_draft(B, m) * jitter()})
    return out


@pytest.fixture(scope="module")
def model():
    return CostModel.fit(synthetic_measurements(), machine="synthetic", target="t", drafter="d")


def test_fit_reproduces_measurements(model):
    errs = []
    for m in synthetic_measurements(noise=0.0):
        if m["kind"] == "target":
            pred = model.target_step_time(m["batch_size"], m["nodes_per_request"], m["context_len"])
        else:
            pred = model.draft_step_time(m["batch_size"], m["nodes_per_request"])
        errs.append(abs(pred / m["time_s"] - 1))
    errs = torch.tensor(errs)
    assert float(errs.median()) < 0.03 and float(errs.max()) < 0.15


def test_interpolates_between_batch_buckets(model):
    t32, t48, t64 = (model.target_step_time(b, 4, 1024) for b in (32, 48, 64))
    assert t32 < t48 < t64
    assert abs(t48 / true_target(48, 4, 1024) - 1) < 0.15


def test_threshold_grows_with_batch_and_turns_speculation_off(model):
    thr = [model.node_threshold(B, nodes_in_flight=8, context_len=1024) for B in BATCHES]
    assert all(b >= a - 1e-3 for a, b in zip(thr, thr[1:])), thr
    assert thr[0] < 0.02        # memory-bound: nodes are almost free
    assert thr[-1] >= 1.0       # compute-bound: an extra node costs a whole plain step


def test_trees_shrink_as_batches_grow(model):
    g = torch.Generator().manual_seed(0)
    table = torch.softmax(2.0 * torch.randn(40, 40, generator=g), dim=-1)

    def draft_level(level, frontier, frontier_valid, tree):
        return table[tree.token_ids.gather(1, frontier.clamp(min=0))].topk(3, dim=-1)

    roots = torch.arange(4)
    sizes = []
    for B in BATCHES:
        thr = model.node_threshold(B, 8, torch.full((4,), 1024.0))  # per-request tensor form
        assert thr.shape == (4,)
        tree = build_pct_tree(roots, draft_level, thr, max_depth=6, max_new_nodes=8)
        sizes.append(tree.num_nodes.float().mean().item())
    assert all(b <= a for a, b in zip(sizes, sizes[1:])), sizes
    assert sizes[0] > 10 and sizes[-1] == 1.0  # root only: nothing drafted


def test_save_load_roundtrip(model, tmp_path):
    path = cost_model_path(tmp_path, "H100 80GB", "Qwen/Qwen3-8B", "edd v1")
    assert path.name == "cost__H100_80GB__Qwen_Qwen3-8B__edd_v1.json"
    model.save(path)
    loaded = CostModel.load(path)
    assert loaded == model
    assert loaded.node_threshold(24, 5, 700) == model.node_threshold(24, 5, 700)


def test_load_errors(model, tmp_path):
    d = model.to_dict()
    cases = {
        "version": {**d, "version": 99},
        "missing keys": {k: v for k, v in d.items() if k != "draft_fit"},
        "plane of 4 numbers": {**d, "target_fit": {**d["target_fit"], "planes": [[[1.0]]] * len(BATCHES)}},
        "ascending": {**d, "draft_fit": {**d["draft_fit"], "batch_sizes": BATCHES[::-1]}},
    }
    for needle, bad in cases.items():
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(CostModelError, match=needle):
            CostModel.load(path)
    path.write_text("{not json")
    with pytest.raises(CostModelError, match="not valid JSON"):
        CostModel.load(path)


def test_fit_errors():
    good = synthetic_measurements()
    with pytest.raises(CostModelError, match="missing keys"):
        CostModel.fit(good + [{"kind": "target", "batch_size": 3, "time_s": 1.0}])
    with pytest.raises(CostModelError, match="'kind'"):
        CostModel.fit(good + [{"batch_size": 3}])
    with pytest.raises(CostModelError, match="no 'draft' measurements"):
        CostModel.fit([m for m in good if m["kind"] == "target"])
    one_n = [m for m in good if m["kind"] == "draft" or m["nodes_per_request"] == 1]
    with pytest.raises(CostModelError, match="batch size 1"):
        CostModel.fit(one_n)
