import json
import math

import pytest
import torch

from vllm_specx.core.early_stop import (
    FEATURE_NAMES,
    ConfidenceLogistic,
    DraftLengthPolicy,
    EarlyStopMLP,
    acceptance_labels_greedy,
    acceptance_labels_sampling,
    branch_child_probs,
    continue_drafting,
    draft_step_features,
    feature_names,
    load_early_stop,
    make_hidden_projection,
    prune_branches,
    save_early_stop,
    topk_and_entropy,
    train_early_stop,
)
from vllm_specx.core.metrics import expected_calibration_error, roc_auc

VOCAB, MAX_DEPTH = 32, 8


def synthetic_steps(n: int, seed: int, true_accept):
    """Random draft distributions -> features; labels ~ Bernoulli(true_accept(top1, depth))."""
    g = torch.Generator().manual_seed(seed)
    sharpness = torch.rand(n, 1, generator=g) * 6.0
    logits = torch.randn(n, VOCAB, generator=g) * sharpness  # [n, V]
    topk, entropy = topk_and_entropy(logits)
    depth = torch.randint(0, MAX_DEPTH, (n,), generator=g)
    path_conf = torch.rand(n, generator=g).pow(depth.float())
    feats = draft_step_features(None, topk, entropy, depth, path_conf)
    p_true = true_accept(topk[:, 0], depth.float())
    labels = torch.bernoulli(p_true, generator=g)
    return feats, labels, p_true


def depth_dependent(top1, depth):  # acceptance falls with depth at fixed confidence
    return torch.sigmoid(3.0 * torch.logit(top1.clamp(1e-4, 1 - 1e-4)) - 0.8 * (depth - 3.5))


def calibrated(top1, depth):  # the draft confidence itself is the acceptance probability
    return top1


def squared(top1, depth):  # draft is over-confident: acceptance is top1^2
    return top1 ** 2


# ----------------------------------------------------------------------------- features


def test_topk_and_entropy_matches_definition():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [10.0, 0.0, -float("inf"), 0.0]])
    topk, ent = topk_and_entropy(logits, k=2)
    assert torch.allclose(topk[0], torch.tensor([0.25, 0.25]))
    assert abs(ent[0].item() - math.log(4)) < 1e-6
    p = torch.softmax(torch.tensor([10.0, 0.0, 0.0]), -1)
    assert torch.allclose(topk[1], p[:2], atol=1e-6)
    assert abs(ent[1].item() + (p * p.log()).sum().item()) < 1e-5  # -inf entry contributes 0
    topk3, _ = topk_and_entropy(torch.zeros(1, 2), k=3)  # V < k pads with zeros
    assert torch.allclose(topk3, torch.tensor([[0.5, 0.5, 0.0]]))


def test_draft_step_features_columns_and_hidden_projection():
    topk = torch.tensor([[0.7, 0.2], [0.4, 0.3]])
    feats = draft_step_features(None, topk, torch.tensor([0.8, 1.2]), torch.tensor([0, 3]),
                                torch.tensor([1.0, 0.5]))
    assert feats.shape == (2, len(FEATURE_NAMES))
    col = {n: feats[:, i] for i, n in enumerate(FEATURE_NAMES)}
    assert torch.allclose(col["margin"], torch.tensor([0.5, 0.1]))
    assert torch.allclose(col["depth"], torch.tensor([0.0, 3.0]))
    assert torch.allclose(col["log_path_conf"], torch.tensor([0.0, math.log(0.5)]))

    proj = make_hidden_projection(16, 4, seed=1)
    hidden = torch.randn(2, 16)
    with_h = draft_step_features(hidden, topk, torch.zeros(2), torch.zeros(2), torch.ones(2), hidden_proj=proj)
    assert with_h.shape == (2, len(feature_names(4)))
    # RMS normalisation: scaling the hidden state does not change its features
    scaled = draft_step_features(hidden * 50, topk, torch.zeros(2), torch.zeros(2), torch.ones(2), hidden_proj=proj)
    assert torch.allclose(with_h, scaled, atol=1e-5)
    with pytest.raises(ValueError, match="draft_hidden"):
        draft_step_features(None, topk, torch.zeros(2), torch.zeros(2), torch.ones(2), hidden_proj=proj)


# ----------------------------------------------------------------------------- labels


def test_acceptance_labels_greedy():
    labels = acceptance_labels_greedy(torch.tensor([3, 5, 7, 7]), torch.tensor([3, 4, 7, 1]))
    assert labels.tolist() == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError):
        acceptance_labels_greedy(torch.tensor([1, 2]), torch.tensor([1]))


def test_acceptance_labels_sampling():
    tok = torch.tensor([0, 1, 2])
    labels = acceptance_labels_sampling(tok, torch.tensor([0.5, 0.1, 0.0]), torch.tensor([0.25, 0.4, 0.3]))
    assert torch.allclose(labels, torch.tensor([1.0, 0.25, 0.0]))
    # full distributions are gathered at the drafted token
    p_full = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.1, 0.7], [0.3, 0.3, 0.4]])
    q_full = torch.tensor([[0.25, 0.75, 0.0], [0.2, 0.4, 0.4], [0.1, 0.1, 0.8]])
    assert torch.allclose(acceptance_labels_sampling(tok, p_full, q_full), torch.tensor([1.0, 0.25, 0.5]))
    with pytest.raises(ValueError, match="> 0"):
        acceptance_labels_sampling(tok, torch.ones(3), torch.tensor([0.5, 0.0, 0.5]))


def test_soft_label_mean_is_the_acceptance_rate():
    # E_q[min(1, p/q)] = 1 - TV(p, q): the soft labels average to the true acceptance rate
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(10), -1)
    q = torch.softmax(torch.randn(10), -1)
    tok = torch.multinomial(q, 200_000, replacement=True, generator=g)
    soft = acceptance_labels_sampling(tok, p[tok], q[tok])
    expected = 1 - 0.5 * (p - q).abs().sum()
    assert abs(soft.mean().item() - expected.item()) < 0.01


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def depth_data():
    return synthetic_steps(12_000, seed=0, true_accept=depth_dependent)


@pytest.fixture(scope="module")
def trained_depth(depth_data):
    feats, labels, _ = depth_data
    mlp, mlp_rep = train_early_stop(feats, labels, kind="mlp", epochs=15, seed=0, val_fraction=0.25)
    log, log_rep = train_early_stop(feats, labels, kind="logistic", epochs=15, seed=0, val_fraction=0.25)
    return mlp, mlp_rep, log, log_rep


def test_mlp_auc_beats_chance_and_logistic_baseline(trained_depth):
    _, mlp_rep, _, log_rep = trained_depth
    assert mlp_rep["n_train"] == 9000 and mlp_rep["n_val"] == 3000
    assert 0.2 < mlp_rep["positive_rate"] < 0.8
    assert mlp_rep["auc"] > 0.75
    assert mlp_rep["auc"] >= log_rep["auc"] - 0.01
    # acceptance depends on depth, which the confidence-only baseline cannot see
    assert mlp_rep["auc"] > log_rep["auc"] + 0.02
    assert mlp_rep["brier"] < log_rep["brier"]


def test_mlp_close_to_bayes_optimal(depth_data, trained_depth):
    feats, labels, p_true = depth_data
    mlp = trained_depth[0]
    pred = mlp.predict_accept_prob(feats)
    assert (pred - p_true).abs().mean() < 0.05
    assert roc_auc(pred, labels) > roc_auc(p_true, labels) - 0.02


def test_calibration_on_calibrated_set():
    feats, labels, p_true = synthetic_steps(16_000, seed=1, true_accept=calibrated)
    _, rep = train_early_stop(feats, labels, kind="mlp", epochs=10, seed=0, val_fraction=0.3)
    assert rep["ece"] < 0.035  # sampling noise alone gives ~0.015 on 4800 held-out rows


def test_training_fixes_overconfident_draft():
    feats, labels, _ = synthetic_steps(16_000, seed=2, true_accept=squared)
    top1 = feats[:, FEATURE_NAMES.index("top1_prob")]
    assert expected_calibration_error(top1, labels) > 0.08  # raw confidence is miscalibrated
    # logit(top1^2) is not linear in logit(top1): the baseline only partly recalibrates
    for kind, tol in (("logistic", 0.05), ("mlp", 0.035)):
        _, rep = train_early_stop(feats, labels, kind=kind, epochs=10, seed=0, val_fraction=0.3)
        assert rep["ece"] < tol, kind


def test_training_is_deterministic_given_seed():
    feats, labels, _ = synthetic_steps(2_000, seed=3, true_accept=depth_dependent)
    a, rep_a = train_early_stop(feats, labels, epochs=3, seed=7)
    b, rep_b = train_early_stop(feats, labels, epochs=3, seed=7)
    c, _ = train_early_stop(feats, labels, epochs=3, seed=8)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert rep_a["auc"] == rep_b["auc"]
    assert not torch.equal(a.net[0].weight, c.net[0].weight)


def test_soft_labels_train():
    feats, _, p_true = synthetic_steps(6_000, seed=4, true_accept=depth_dependent)
    model, rep = train_early_stop(feats, p_true, kind="mlp", epochs=10, seed=0)
    assert (model.predict_accept_prob(feats) - p_true).abs().mean() < 0.05
    assert rep["ece"] < 0.05


def test_train_rejects_bad_inputs():
    feats = torch.rand(10, len(FEATURE_NAMES))
    with pytest.raises(ValueError, match="kind"):
        train_early_stop(feats, torch.zeros(10), kind="tree")
    with pytest.raises(ValueError, match="labels"):
        train_early_stop(feats, torch.zeros(9))
    with pytest.raises(ValueError, match="val_fraction"):
        train_early_stop(feats, torch.zeros(10), val_fraction=1.0)


# ----------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("kind", ["mlp", "logistic"])
def test_save_load_roundtrip(tmp_path, kind):
    feats, labels, _ = synthetic_steps(1_000, seed=5, true_accept=depth_dependent)
    model, _ = train_early_stop(feats, labels, kind=kind, epochs=2, seed=0)
    save_early_stop(model, tmp_path / "es")
    config = json.loads((tmp_path / "es" / "early_stop.json").read_text())
    assert config["kind"] == kind and config["feature_names"] == list(FEATURE_NAMES)
    loaded = load_early_stop(tmp_path / "es", expected_feature_names=FEATURE_NAMES)
    assert type(loaded) is type(model)
    assert torch.equal(loaded.predict_accept_prob(feats), model.predict_accept_prob(feats))


def test_save_load_with_hidden_projection(tmp_path):
    proj = make_hidden_projection(8, 3, seed=0)
    names = feature_names(3)
    model = EarlyStopMLP(names, hidden=16, hidden_proj=proj)
    save_early_stop(model, tmp_path)
    loaded = load_early_stop(tmp_path, expected_feature_names=names)
    assert torch.equal(loaded.hidden_proj, proj)
    x = torch.randn(5, len(names))
    assert torch.equal(loaded.predict_accept_prob(x), model.predict_accept_prob(x))
    with pytest.raises(ValueError, match="hidden_proj"):
        EarlyStopMLP(names, hidden_proj=None)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="early_stop.json"):
        load_early_stop(tmp_path / "nowhere")
    save_early_stop(ConfidenceLogistic(), tmp_path)

    with pytest.raises(ValueError, match="trained on features"):
        load_early_stop(tmp_path, expected_feature_names=feature_names(2))

    weights = tmp_path / "early_stop.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(b"\x00garbage" * 3)
    with pytest.raises(ValueError, match="corrupt"):
        load_early_stop(tmp_path)
    weights.write_bytes(good)

    cfg = tmp_path / "early_stop.json"
    config = json.loads(cfg.read_text())
    cfg.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_early_stop(tmp_path)
    cfg.write_text(json.dumps({**config, "version": 99}))
    with pytest.raises(ValueError, match="version"):
        load_early_stop(tmp_path)
    cfg.write_text(json.dumps({**config, "kind": "mlp"}))  # logistic weights, mlp config
    with pytest.raises(ValueError, match="do not match"):
        load_early_stop(tmp_path)
    cfg.write_text(json.dumps(config))
    assert isinstance(load_early_stop(tmp_path), ConfidenceLogistic)

    weights.unlink()
    with pytest.raises(FileNotFoundError, match="early_stop.safetensors"):
        load_early_stop(tmp_path)


# ----------------------------------------------------------------------------- stop rule


def test_continue_drafting_rule():
    accept = torch.tensor([0.9, 0.5, 0.9, 0.2])
    path = torch.tensor([1.0, 1.0, 0.5, 1.0])
    thr = torch.tensor([0.3, 0.3, 0.3, 0.3])
    assert continue_drafting(accept, path, thr).tolist() == [True, True, True, False]
    assert continue_drafting(accept, path, 0.5).tolist() == [True, False, False, False]


def test_continue_drafting_monotone_and_extremes():
    g = torch.Generator().manual_seed(0)
    accept, path = torch.rand(500, generator=g), torch.rand(500, generator=g)
    prev = torch.ones(500, dtype=torch.bool)
    for t in torch.linspace(0, 1, 21):
        cont = continue_drafting(accept, path, torch.full((500,), t.item()))
        assert not (cont & ~prev).any()  # raising the threshold never resumes drafting
        prev = cont
    ones = torch.ones(500)
    assert not continue_drafting(ones, ones, ones).any()  # threshold >= 1: always stop
    assert not continue_drafting(accept, path, 1.5).any()
    assert continue_drafting(torch.zeros(500), path, 0.0).all()  # threshold 0: never stop


def test_prune_branches_uses_per_request_threshold():
    accept = torch.tensor([[0.9, 0.4, 0.1], [0.9, 0.4, 0.1]])
    path = torch.tensor([[1.0, 1.0, 1.0], [0.5, 0.5, 0.5]])
    keep = prune_branches(accept, path, torch.tensor([0.3, 0.3]))
    assert keep.tolist() == [[True, True, False], [True, False, False]]
    keep = prune_branches(accept, path, torch.tensor([0.0, 1.0]))
    assert keep.tolist() == [[True, True, True], [False, False, False]]


def test_branch_child_probs_put_the_models_estimate_on_the_best_child_and_share_the_rest():
    conf = torch.tensor([[0.6, 0.3], [0.6, 0.3], [0.5, 0.0], [0.0, 0.0]])  # [R, c]; row 3: not drafted
    accept = torch.tensor([0.2, 1.0, 0.9, 0.7])
    out = branch_child_probs(conf, accept)
    # row 0: the best child 0.2; the other shares 1 - 0.2 in proportion to its confidence among the rest (0.3 / 0.4)
    expect = torch.tensor([[0.2, 0.8 * 0.3 / 0.4], [1.0, 0.0], [0.9, 0.0], [0.0, 0.0]])
    assert torch.allclose(out, expect, atol=1e-6), out
    assert (out.sum(-1) <= 1 + 1e-6).all()  # exclusive events
    # a confident drafter whose listed runner-ups already hold all the rest: still a distribution
    out = branch_child_probs(torch.tensor([[0.9999999, 1e-7]]), torch.tensor([0.1]))
    assert out.sum() <= 1 + 1e-6 and out[0, 0] == pytest.approx(0.1)
    # shapes [B, D, m, c] with accept [B, D, m]
    assert branch_child_probs(torch.rand(2, 3, 4, 2), torch.rand(2, 3, 4)).shape == (2, 3, 4, 2)


# ----------------------------------------------------------------------------- chain policy


def run_chain(policy, accept_per_step, batch, threshold=None):  # accept_per_step [K', B]
    policy.begin(batch, threshold)
    for accept in accept_per_step:
        policy.step(accept_prob=accept)
        if policy.done:
            break
    return policy.num_tokens


def test_fixed_policy_equals_k():
    policy = DraftLengthPolicy.fixed(4)
    feats = torch.rand(3, len(FEATURE_NAMES))
    policy.begin(3)
    steps = 0
    while not policy.done:
        assert policy.step(feats).all()
        steps += 1
    assert steps == 4 and policy.num_tokens.tolist() == [4, 4, 4]
    assert not policy.step(feats).any()  # beyond K nothing is kept
    assert policy.num_tokens.tolist() == [4, 4, 4]
    assert run_chain(DraftLengthPolicy.fixed(0), torch.rand(3, 2), 2).tolist() == [0, 0]


def test_model_policy_lengths():
    model = ConfidenceLogistic()  # predicts top1_prob itself
    policy = DraftLengthPolicy(max_k=5, model=model)
    policy.begin(3, torch.tensor([0.3, 0.3, 0.0]))
    top1 = torch.tensor([0.9, 0.5, 0.01])
    steps = 0
    while not policy.done:
        feats = draft_step_features(None, torch.stack([top1, 1 - top1], -1), torch.zeros(3),
                                    torch.full((3,), steps), torch.ones(3))
        policy.step(feats)
        steps += 1
    # request 0: 0.9^k > 0.3 for k <= 11 -> capped at 5; request 1: 0.5, 0.25 -> 1 token;
    # request 2: threshold 0 never stops early -> 5 tokens
    assert policy.num_tokens.tolist() == [5, 1, 5]


def test_model_policy_stopped_request_stays_stopped():
    accept = torch.tensor([[0.9, 0.2], [0.9, 0.99], [0.9, 0.99]])  # [K, B]
    lengths = run_chain(DraftLengthPolicy(3, ConfidenceLogistic()), accept, 2, torch.tensor([0.5, 0.5]))
    assert lengths.tolist() == [3, 0]


def test_model_policy_lengths_monotone_in_threshold():
    g = torch.Generator().manual_seed(0)
    accept = torch.rand(8, 64, generator=g)  # [K, B]
    prev = None
    for t in [0.0, 0.05, 0.2, 0.5, 0.9, 1.0]:
        lengths = run_chain(DraftLengthPolicy(8, ConfidenceLogistic()), accept, 64, torch.full((64,), t))
        if prev is not None:
            assert (lengths <= prev).all()
        prev = lengths
        if t == 0.0:
            assert (lengths == 8).all()
        if t == 1.0:
            assert (lengths == 0).all()


def test_model_policy_requires_threshold():
    with pytest.raises(ValueError, match="node_threshold"):
        DraftLengthPolicy(4, ConfidenceLogistic()).begin(2)
