"""MCSD early stop inside vLLM (CPU V1 runner): per-request draft lengths, lossless, switchable."""

import json
import shutil

import pytest
import torch

from tests.conftest import many_prompts
from vllm_specx.core.early_stop import FEATURE_NAMES, train_early_stop
from vllm_specx.testing import assert_same_tokens, run_generate, specx_counter
from vllm_specx.training.early_stop_data import attach_early_stop

K = 3


@pytest.fixture(scope="module")
def edd_with_depth_rule(tiny_edd_drafter, tmp_path_factory):
    """The tiny EDD drafter plus a decision model that accepts depth 0 and rejects deeper tokens:
    every request must keep exactly one draft token per step."""
    g = torch.Generator().manual_seed(0)
    n = 3000
    # columns: top1, top2, margin, entropy, depth, log_path_conf, over the ranges a random drafter produces
    feats = torch.rand(n, len(FEATURE_NAMES), generator=g) * torch.tensor([1.0, 1.0, 1.0, 12.0, 1.0, -30.0])
    feats[:, 4] = torch.randint(0, K, (n,), generator=g).float()
    labels = (feats[:, 4] == 0).float()
    model, report = train_early_stop(feats, labels, kind="mlp", epochs=20, seed=0)
    assert report["auc"] > 0.99
    folder = tmp_path_factory.mktemp("edd_es") / "drafter"
    shutil.copytree(tiny_edd_drafter, folder)
    attach_early_stop(folder, model, report, threshold=0.5)
    return str(folder)


def test_early_stop_cuts_drafts_and_stays_lossless(tiny_target, edd_with_depth_rule, tiny_plain_outputs):
    spec = {"method": "eagle3", "model": edd_with_depth_rule, "num_speculative_tokens": K}
    res = run_generate(tiny_target, many_prompts(64), spec, max_tokens=32)
    assert_same_tokens(tiny_plain_outputs["many"].token_ids, res.token_ids)
    m = res.metrics
    assert m.num_drafts > 0
    assert m.num_draft_tokens == m.num_drafts  # one token per request per step, not K
    assert m.accepted_per_pos[1:] == [0] * (K - 1)


def test_switching_early_stop_off_gives_fixed_length_back(tiny_target, edd_with_depth_rule, tiny_plain_outputs,
                                                          monkeypatch):
    monkeypatch.setenv("SPECX_EARLY_STOP", "0")
    spec = {"method": "eagle3", "model": edd_with_depth_rule, "num_speculative_tokens": K}
    res = run_generate(tiny_target, many_prompts(64), spec, max_tokens=32)
    assert_same_tokens(tiny_plain_outputs["many"].token_ids, res.token_ids)
    assert res.metrics.num_drafts > 0 and res.metrics.num_draft_tokens == K * res.metrics.num_drafts


@pytest.fixture(scope="module")
def edd_always_confident(tiny_edd_drafter, tmp_path_factory):
    """A decision model that predicts acceptance ~1 whatever the drafter does, on the random tiny
    drafter whose drafts the target almost always rejects: only feedback from the target can cut them."""
    g = torch.Generator().manual_seed(1)
    feats = torch.rand(2000, len(FEATURE_NAMES), generator=g) * torch.tensor([1.0, 1.0, 1.0, 12.0, 1.0, -30.0])
    labels = torch.ones(2000)
    labels[:20] = 0  # two classes for the report
    model, _ = train_early_stop(feats, labels, kind="mlp", epochs=10, seed=0)
    folders = {}
    for calibrated in (True, False):
        folder = tmp_path_factory.mktemp("edd_conf") / "drafter"
        shutil.copytree(tiny_edd_drafter, folder)
        attach_early_stop(folder, model, {}, threshold=0.3)
        if not calibrated:
            cfg = json.loads((folder / "specx_config.json").read_text())
            cfg["early_stop"]["online_calibration"] = False
            (folder / "specx_config.json").write_text(json.dumps(cfg))
        folders[calibrated] = str(folder)
    return folders


def test_rejected_requests_draft_less_and_stay_lossless(tiny_target, edd_always_confident, tiny_plain_outputs):
    K5 = 5
    got = {}
    for calibrated, folder in edd_always_confident.items():
        spec = {"method": "eagle3", "model": folder, "num_speculative_tokens": K5}
        res = run_generate(tiny_target, many_prompts(64), spec, max_tokens=32)
        assert_same_tokens(tiny_plain_outputs["many"].token_ids, res.token_ids)
        got[calibrated] = res.metrics
    off, on = got[False], got[True]
    assert off.num_accepted_tokens < 0.1 * off.num_draft_tokens  # the random drafter is mostly rejected
    assert off.num_draft_tokens == K5 * off.num_drafts  # confident model alone: always K
    assert on.num_draft_tokens < 0.5 * K5 * on.num_drafts, (on, off)  # feedback: rejected requests draft less


def _cost_model_where_drafting_stops_paying_above_batch_8(machine=None):
    from vllm_specx.calibrate import machine_id
    from vllm_specx.core.cost_model import CostModel

    pts = []
    for b in (1, 8, 16, 64):
        for n in (1, 2, 3):
            pts.append({"kind": "target", "batch_size": b, "nodes_per_request": n, "context_len": 0,
                        "time_s": 0.01 + 0.0005 * b * n})
            pts.append({"kind": "draft", "batch_size": b, "nodes_per_request": n, "time_s": 0.003 + 0.0005 * b * n})
    cost = CostModel.fit(pts, machine=machine or machine_id(), target="tiny", drafter="tiny")
    assert cost.first_token_threshold(1) < 0.5 and cost.first_token_threshold(8) < 1.0
    assert cost.first_token_threshold(16) >= 1.0 and cost.first_token_threshold(64) >= 1.0
    return cost


def _drafter_that_stops_paying_above_batch_8(edd_always_confident, tmp_path) -> dict:
    """Speculative config of the always-confident tiny drafter with a cost model of this machine under
    which drafting pays up to batch 8 only."""
    folder = tmp_path / "drafter"
    shutil.copytree(edd_always_confident[False], folder)
    _cost_model_where_drafting_stops_paying_above_batch_8().save(folder / "cost_model.json")
    return {"method": "eagle3", "model": str(folder), "num_speculative_tokens": 3}


def _generate_shrinking_batch(tiny_target, spec, tiny_plain_outputs, then_one: bool = False):
    """64 greedy requests of different lengths at once (they finish at different steps, so the batch
    shrinks into the sizes where drafting pays), checked against plain decoding. then_one: one more request
    in the same engine afterwards, checked too. -> (metrics after the 64, after the extra one or None)"""
    from vllm import SamplingParams

    from vllm_specx.testing import make_llm, read_spec_metrics, shutdown

    lengths = [4 + (i * 7) % 29 for i in range(64)]
    llm = make_llm(tiny_target, spec, max_num_seqs=64)
    try:
        outs = llm.generate(many_prompts(64), [SamplingParams(temperature=0, max_tokens=m) for m in lengths],
                            use_tqdm=False)
        many = read_spec_metrics(llm)
        one = llm.generate(many_prompts(64)[:1], SamplingParams(temperature=0, max_tokens=32),
                           use_tqdm=False) if then_one else None
        after_one = read_spec_metrics(llm) if then_one else None
    finally:
        shutdown(llm)
    want = [t[:m] for t, m in zip(tiny_plain_outputs["many"].token_ids, lengths)]
    assert_same_tokens(want, [list(o.outputs[0].token_ids) for o in outs])
    if then_one:
        assert_same_tokens(tiny_plain_outputs["many"].token_ids[:1], [list(one[0].outputs[0].token_ids)])
    return many, after_one


def test_cost_model_turns_drafting_off_at_large_batch(tiny_target, edd_always_confident, tiny_plain_outputs,
                                                      tmp_path):
    spec = _drafter_that_stops_paying_above_batch_8(edd_always_confident, tmp_path)
    big = run_generate(tiny_target, many_prompts(64), spec, max_tokens=32, llm_kwargs={"max_num_seqs": 64})
    assert_same_tokens(tiny_plain_outputs["many"].token_ids, big.token_ids)
    one = run_generate(tiny_target, many_prompts(64)[:1], spec, max_tokens=32)
    assert_same_tokens(tiny_plain_outputs["many"].token_ids[:1], one.token_ids)
    # batch 1: a draft every decode step; 64 requests in flight: drafting only once few remain
    assert one.metrics.num_drafts >= 0.5 * one.metrics.num_engine_steps
    assert big.metrics.num_drafts < 0.2 * 64 * 31, big.metrics


def test_steps_that_do_not_pay_can_skip_the_drafters_forward_losslessly(tiny_target, edd_always_confident,
                                                                        tiny_plain_outputs, tmp_path, monkeypatch):
    """skip_forward (SPECX_SKIP_FORWARD=1): at batch sizes where drafting does not pay, decode-only steps
    return before the drafter's forward; prefills still run it, and outputs stay those of plain decoding
    also when drafting resumes with holes in the drafter's KV cache (as requests finish)."""
    from vllm_specx.vllm_adapter.draft_length import ChainStopController

    spec = _drafter_that_stops_paying_above_batch_8(edd_always_confident, tmp_path)
    skipped = []
    orig = ChainStopController.forward_skipped

    def counted(self):
        out = orig(self)
        skipped.append(out)
        return out

    monkeypatch.setattr(ChainStopController, "forward_skipped", counted)  # the engine runs in this process
    monkeypatch.setenv("SPECX_SKIP_FORWARD", "1")
    before = specx_counter("drafter_forwards_skipped")
    metrics, _ = _generate_shrinking_batch(tiny_target, spec, tiny_plain_outputs)
    assert sum(skipped) > 5, sum(skipped)  # decode steps with many requests in flight skipped the forward
    assert specx_counter("drafter_forwards_skipped") - before == sum(skipped)  # on /metrics
    assert metrics.num_drafts > 0  # the tail (few requests left) drafted again, over a KV cache with holes
    skipped.clear()
    one = run_generate(tiny_target, many_prompts(64)[:1], spec, max_tokens=32)
    assert_same_tokens(tiny_plain_outputs["many"].token_ids[:1], one.token_ids)
    assert not any(skipped) and one.metrics.num_drafts >= 0.5 * one.metrics.num_engine_steps


def test_skip_prefill_leaves_new_requests_drafter_blind_losslessly(tiny_target, edd_always_confident,
                                                                   tiny_plain_outputs, tmp_path, monkeypatch):
    """skip_prefill (SPECX_SKIP_PREFILL=1): at batch sizes where drafting does not pay, steps with prefills
    skip the drafter's forward too; the requests they leave out of the drafter's KV cache draft nothing for
    the rest of their life, also when drafting pays again in the tail. Outputs are plain decoding's; a
    request arriving when drafting pays is drafted for."""
    from vllm_specx.vllm_adapter.draft_length import ChainStopController

    spec = _drafter_that_stops_paying_above_batch_8(edd_always_confident, tmp_path)
    seen_steps = []  # (request ids, lengths, drafter-blind requests) of every armed step
    orig_finish = ChainStopController.finish

    def recorded(self):
        ids, blind = self._req_ids, set(self._blind)
        lengths = orig_finish(self)
        if lengths is not None and ids is not None:
            seen_steps.append((list(ids), lengths, blind))
        return lengths

    monkeypatch.setattr(ChainStopController, "finish", recorded)  # the engine runs in this process
    monkeypatch.setenv("SPECX_SKIP_PREFILL", "1")
    before = specx_counter("drafter_blind_requests")
    many, both = _generate_shrinking_batch(tiny_target, spec, tiny_plain_outputs, then_one=True)
    blind = specx_counter("drafter_blind_requests") - before
    assert blind >= 32, blind  # most of the 64 prompts skipped
    tail = [(ids, n, blind) for ids, n, blind in seen_steps if 0 < len(ids) <= 8 and blind & set(ids)]
    assert tail, "the tail (batch <= 8: drafting pays) never held a drafter-blind request"
    assert all(k == 0 for ids, n, blind in tail for r, k in zip(ids, n) if r in blind)  # blind: no drafts
    assert both.num_drafts - many.num_drafts >= 10, (many, both)  # the new request was drafted for


def test_cost_model_of_another_machine_is_ignored(edd_always_confident, tmp_path):
    from vllm_specx.checkpoint import load_specx_config
    from vllm_specx.vllm_adapter.draft_length import load_controller

    folder = tmp_path / "drafter"
    shutil.copytree(edd_always_confident[False], folder)
    es = load_specx_config(folder).early_stop
    _cost_model_where_drafting_stops_paying_above_batch_8().save(folder / "cost_model.json")
    here = load_controller(folder, es, 3)
    assert not here.drafting_pays(64) and here.drafting_pays(1)
    _cost_model_where_drafting_stops_paying_above_batch_8("another GPU x8").save(folder / "cost_model.json")
    elsewhere = load_controller(folder, es, 3)
    assert elsewhere.drafting_pays(64) and elsewhere.threshold_for_batch(64) == es["threshold"]


def test_cost_model_of_this_machine_is_found_beside_another_machines(edd_always_confident, tmp_path):
    """A drafter shipped to two kinds of machine carries one cost model each (cost_models/<machine>/);
    calibrating on a second machine writes there and keeps the first machine's file."""
    from vllm_specx.calibrate import MACHINES_DIR, default_cost_model_path, find_cost_model, machine_id
    from vllm_specx.checkpoint import load_specx_config
    from vllm_specx.vllm_adapter.draft_length import load_controller

    folder = tmp_path / "drafter"
    shutil.copytree(edd_always_confident[False], folder)
    es = load_specx_config(folder).early_stop
    assert default_cost_model_path(str(folder)) == folder / "cost_model.json"  # nothing there yet
    _cost_model_where_drafting_stops_paying_above_batch_8("another GPU x8").save(folder / "cost_model.json")
    ours = default_cost_model_path(str(folder))
    assert ours.parent.parent == folder / MACHINES_DIR and ours.name == "cost_model.json"
    assert load_controller(folder, es, 3).threshold_for_batch(64) == es["threshold"]  # only the foreign file
    _cost_model_where_drafting_stops_paying_above_batch_8().save(ours)
    model, path, others = find_cost_model(folder, ["cost_model.json"])
    assert path == ours and model.machine == machine_id() and others == ["another GPU x8"]
    here = load_controller(folder, es, 3)
    assert not here.drafting_pays(64) and here.drafting_pays(1)
    assert default_cost_model_path(str(folder)) == ours  # recalibrating here replaces this machine's file only


def test_cost_model_measured_in_the_active_vocab_mode_wins(edd_always_confident, tmp_path):
    """A draft step's cost depends on the LM-head mode: `cost_model.<mode>.json` is used in that mode."""
    from vllm_specx.checkpoint import load_specx_config
    from vllm_specx.vllm_adapter.draft_length import load_controller

    folder = tmp_path / "drafter"
    shutil.copytree(edd_always_confident[False], folder)
    es = load_specx_config(folder).early_stop
    _cost_model_where_drafting_stops_paying_above_batch_8().save(folder / "cost_model.speculative.json")
    assert not load_controller(folder, es, 3, vocab_mode="speculative").drafting_pays(64)
    full = load_controller(folder, es, 3, vocab_mode="full")  # no cost_model.json: the fixed threshold
    assert full.drafting_pays(64) and full.threshold_for_batch(64) == es["threshold"]


def _engine_config(async_scheduling=False, adaptive=False, dp=1, cudagraph="NONE"):
    from types import SimpleNamespace

    from vllm.config.compilation import CUDAGraphMode

    return SimpleNamespace(scheduler_config=SimpleNamespace(async_scheduling=async_scheduling),
                           speculative_config=SimpleNamespace(enable_adaptive_verification=adaptive),
                           parallel_config=SimpleNamespace(data_parallel_size=dp),
                           compilation_config=SimpleNamespace(cudagraph_mode=CUDAGraphMode[cudagraph]))


def test_early_stop_is_refused_where_per_request_lengths_cannot_be_honoured(monkeypatch):
    """Where the scheduler would verify K placeholders per request, or V2 would not let specx see each
    draft step, the drafter drafts at fixed K (with the reason logged) instead of verifying -1 tokens."""
    from vllm.platforms import current_platform

    from vllm_specx.vllm_adapter.drafter_parts import early_stop_problem

    for runner in ("v1", "v2"):
        assert early_stop_problem(_engine_config(), runner) is None
        assert "async scheduling" in early_stop_problem(_engine_config(async_scheduling=True), runner)
    # V1 does not care about V2's own machinery
    assert early_stop_problem(_engine_config(adaptive=True, dp=2, cudagraph="FULL_AND_PIECEWISE"), "v1") is None
    assert "adaptive verification" in early_stop_problem(_engine_config(adaptive=True), "v2")
    assert "data parallelism" in early_stop_problem(_engine_config(dp=2), "v2")
    # CUDA graphs over the draft steps: only off the CPU (the CPU build captures none)
    assert early_stop_problem(_engine_config(cudagraph="FULL_AND_PIECEWISE"), "v2") is None
    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self: False)
    assert "CUDA graphs" in early_stop_problem(_engine_config(cudagraph="FULL_AND_PIECEWISE"), "v2")
    assert "CUDA graphs" in early_stop_problem(_engine_config(cudagraph="FULL_DECODE_ONLY"), "v2")
    assert early_stop_problem(_engine_config(cudagraph="PIECEWISE"), "v2") is None
    assert early_stop_problem(_engine_config(cudagraph="NONE"), "v2") is None
