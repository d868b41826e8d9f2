"""specx's parts on an existing EAGLE-3 drafter (`vllm-specx attach`), inside vLLM (CPU V1 runner): with and
without a reduced draft vocabulary (d2t), greedy output equals plain decoding, the parts act, and the
original folder stays a plain vLLM eagle3 drafter."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import many_prompts
from vllm_specx.attach import attach_eagle3
from vllm_specx.checkpoint import SpecxConfigError, load_specx_config
from vllm_specx.core.early_stop import FEATURE_NAMES, train_early_stop
from vllm_specx.testing import assert_same_tokens, run_generate
from vllm_specx.training.early_stop_data import attach_early_stop

K = 4


def _depth_rule_model():
    """A decision model that accepts depth 0 and rejects deeper tokens (one drafter token per step)."""
    g = torch.Generator().manual_seed(0)
    feats = torch.rand(3000, len(FEATURE_NAMES), generator=g) * torch.tensor([1.0, 1.0, 1.0, 12.0, 1.0, -30.0])
    feats[:, 4] = torch.randint(0, K, (3000,), generator=g).float()
    model, _ = train_early_stop(feats, (feats[:, 4] == 0).float(), kind="mlp", epochs=20, seed=0)
    return model


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def eagle3_d2t(tiny_target, tmp_path_factory) -> str:
    from vllm_specx.training.export import random_eagle3_checkpoint

    return str(random_eagle3_checkpoint(tiny_target, tmp_path_factory.mktemp("eagle3_d2t"), draft_vocab_size=4096))


@pytest.fixture(scope="module", params=["full_vocab", "d2t"])
def attached(request, tiny_eagle3_drafter, eagle3_d2t, tmp_path_factory):
    """(kind, original folder, its digest before attach, attached folder with the depth-rule decision model,
    a lookup table and tree settings, the last two off unless switched on by SPECX_LOOKUP / SPECX_TREE)."""
    src = Path(tiny_eagle3_drafter if request.param == "full_vocab" else eagle3_d2t)
    before = _digest(src)
    out = attach_eagle3(src, tmp_path_factory.mktemp("attached") / "drafter", num_speculative_tokens=K)
    attach_early_stop(out, _depth_rule_model(), {}, threshold=0.5)
    cfg = json.loads((out / "specx_config.json").read_text())
    cfg["early_stop"]["online_calibration"] = False  # keep drafting: the random drafter is always rejected
    cfg["lookup"] = {"enabled": False, "first_accept": [0.3, 0.6, 0.8, 0.95], "deeper_accept": [0.6, 0.7, 0.85, 0.95]}
    cfg["tree"] = {"enabled": False, "max_siblings": 2, "threshold": 0.0}
    (out / "specx_config.json").write_text(json.dumps(cfg))
    return request.param, src, before, out


def test_attach_links_weights_and_leaves_the_original_alone(attached):
    _, src, before, out = attached
    assert _digest(src) == before
    links = sorted(p for p in out.iterdir() if p.suffix == ".safetensors")
    assert links and all(p.is_symlink() and p.resolve().parent == src.resolve() for p in links)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["speculators_model_type"] == "specx_eagle3"
    assert cfg["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == K
    specx = load_specx_config(out)
    assert specx.drafter == "eagle3" and (out / specx.training["attached_to"]).resolve() == src.resolve()
    # attaching again keeps the trained parts
    attach_eagle3(src, out, num_speculative_tokens=K)
    assert load_specx_config(out).early_stop["kind"] == "mlp"


def test_attach_refuses_what_it_cannot_attach_to(tiny_edd_drafter, tiny_eagle3_drafter, tmp_path):
    with pytest.raises(SpecxConfigError, match="not an EAGLE-3 drafter"):
        attach_eagle3(tiny_edd_drafter, tmp_path / "x")
    with pytest.raises(SpecxConfigError, match="new folder"):
        attach_eagle3(tiny_eagle3_drafter, tiny_eagle3_drafter)
    with pytest.raises(SpecxConfigError, match="another checkpoint"):
        attach_eagle3(tiny_eagle3_drafter, tiny_edd_drafter)


def test_attach_command_line(tiny_eagle3_drafter, tmp_path, capsys):
    from vllm_specx.cli import main

    assert main(["attach", tiny_eagle3_drafter, "--out", str(tmp_path / "d"), "--num-speculative-tokens", "2"]) == 0
    assert '"method": "eagle3"' in capsys.readouterr().out
    assert load_specx_config(tmp_path / "d").num_speculative_tokens == 2


def test_attached_parts_act_and_output_equals_plain(tiny_target, attached, tiny_plain_outputs, monkeypatch):
    """64 prompts, greedy. Full vocabulary: early stop alone keeps one drafter token per step (vLLM's eagle3
    drafts K). Both kinds: with lookup chains (deeper drafts, accepted past depth 0) and PCT trees
    (runner-ups as leaves) on as well. Every output equals plain decoding."""
    from vllm_specx.vllm_adapter import tree_step

    kind, _, _, out = attached
    plain = tiny_plain_outputs["many"].token_ids
    spec = {"method": "eagle3", "model": str(out), "num_speculative_tokens": K}
    if kind == "full_vocab":
        stopped = run_generate(tiny_target, many_prompts(64), spec, max_tokens=32)
        assert_same_tokens(plain, stopped.token_ids)
        assert stopped.metrics.num_drafts > 0 and stopped.metrics.num_draft_tokens == stopped.metrics.num_drafts
    monkeypatch.setenv("SPECX_LOOKUP", "1")
    monkeypatch.setenv("SPECX_TREE", "1")
    before = dict(tree_step.STATS)
    res = run_generate(tiny_target, many_prompts(64), spec, max_tokens=32)
    assert_same_tokens(plain, res.token_ids)
    assert res.metrics.num_draft_tokens > res.metrics.num_drafts  # lookup chains run deeper
    assert sum(res.metrics.accepted_per_pos[1:]) > 20  # ... and are accepted past depth 0
    assert tree_step.STATS["tree_steps"] > before["tree_steps"]
    assert tree_step.STATS["nodes_verified"] > before["nodes_verified"]


@pytest.mark.slow  # the digest check above shows the folder untouched; this runs it
def test_the_original_folder_stays_a_plain_vllm_eagle3_drafter(tiny_target, attached, tiny_plain_outputs):
    _, src, _, _ = attached
    res = run_generate(tiny_target, many_prompts(64), {"method": "eagle3", "model": str(src),
                                                       "num_speculative_tokens": K}, max_tokens=32)
    assert_same_tokens(tiny_plain_outputs["many"].token_ids, res.token_ids)
    assert res.metrics.num_draft_tokens == K * res.metrics.num_drafts  # vLLM's fixed K, no specx parts


def test_attached_vocab_modes_other_than_full_are_refused(tiny_target, attached):
    *_, out = attached
    cfg = json.loads((out / "specx_config.json").read_text())
    bad = out.parent / "bad"
    bad.mkdir(exist_ok=True)
    for p in out.iterdir():
        if not (bad / p.name).exists():
            (bad / p.name).symlink_to(p.resolve())
    (bad / "specx_config.json").unlink()
    (bad / "specx_config.json").write_text(json.dumps(dict(cfg, vocab_mode="fixed", vocab={"fixed_size": 1024})))
    with pytest.raises(Exception, match="vocab_mode 'fixed' is not available for an attached EAGLE-3"):
        run_generate(tiny_target, many_prompts(2), {"method": "eagle3", "model": str(bad), "num_speculative_tokens": K},
                     max_tokens=4)


@pytest.mark.slow
def test_sampled_trees_on_attached_eagle3_keep_the_target_distribution(tiny_target, attached, tiny_plain_outputs,
                                                                       monkeypatch):
    """Temperature sampling through PCT trees on an attached EAGLE-3 drafter (oracle candidates: the greedy
    continuation and its runner-ups): seeded requests equal plain seeded sampling token for token, and
    unseeded ones follow plain decoding's distribution at output positions 1-3 (chi-square homogeneity)."""
    from tests.vllm.test_tree_stops import SAMPLED_REQUESTS, _homogeneity_pvalue, _sampled_positions
    from tests.vllm.trees import K as TREE_K
    from tests.vllm.trees import install_oracle
    from vllm_specx.vllm_adapter import tree_step

    *_, out = attached
    monkeypatch.setenv("SPECX_TREE", "1")
    prompt = many_prompts(1)[0]
    install_oracle(monkeypatch, tiny_target, [prompt], tiny_plain_outputs["many"].token_ids[:1])
    plain = _sampled_positions(tiny_target, None, prompt)
    before = dict(tree_step.STATS)
    spec = {"method": "eagle3", "model": str(out), "num_speculative_tokens": TREE_K}
    assert _sampled_positions(tiny_target, spec, prompt) == plain
    assert tree_step.STATS["sampled_tree_requests"] - before["sampled_tree_requests"] >= SAMPLED_REQUESTS
    assert tree_step.STATS["nodes_accepted"] > before["nodes_accepted"]
    tree = _sampled_positions(tiny_target, spec, prompt, seeded=False)
    pvalues = [_homogeneity_pvalue([t[k] for t in plain], [t[k] for t in tree]) for k in (1, 2, 3)]
    assert min(pvalues) > 1e-3 / 3, pvalues  # Bonferroni over the three positions


@pytest.mark.slow  # ~1 min (a spawned V2 process); V1 above is in the default suite
def test_attached_eagle3_under_the_v2_runner(tiny_target, attached, tiny_plain_outputs, monkeypatch):
    """Under vLLM's V2 model runner (the GPU default) the attached drafter is built as SpecxEagle3ForCausalLM,
    early stop keeps one drafter token per step, lookup chains run deeper, and output equals plain decoding."""
    import multiprocessing

    from tests.vllm.v2_cpu import generate_under_v2

    *_, out = attached
    spec = {"method": "eagle3", "model": str(out), "num_speculative_tokens": K}
    monkeypatch.setenv("SPECX_LOOKUP", "1")  # the spawned process starts with this environment
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        [(res, drafts, _, _, drafter, _)] = pool.apply(generate_under_v2, ([(tiny_target, many_prompts(64), spec, 32)],))
    assert drafter == "vllm_specx.vllm_adapter.eagle3_model.SpecxEagle3ForCausalLM"
    assert_same_tokens(tiny_plain_outputs["many"].token_ids, res.token_ids)
    assert drafts and res.metrics.num_draft_tokens > res.metrics.num_drafts  # lookup chains past depth 0
    assert sum(res.metrics.accepted_per_pos[1:]) > 20

