"""`vllm-specx demo` (the README's main command) end to end on the tiny target: both engines run, outputs
are compared, and the printed figures are consistent with each other."""

from __future__ import annotations

import json

from vllm_specx.cli import build_parser


def test_demo_runs_both_engines_and_reports_consistent_figures(tiny_target, tiny_edd_drafter, capsys):
    from vllm_specx import demo

    args = build_parser().parse_args(["demo", "--target", tiny_target, "--drafter", tiny_edd_drafter,
                                      "--num-prompts", "3", "--max-tokens", "12", "--json"])
    assert demo.run(args) == 0  # non-zero when greedy outputs differ
    stdout = capsys.readouterr().out
    out = json.loads(stdout[stdout.rindex("\n{") + 1:] if not stdout.startswith("{") else stdout)  # the JSON summary
    assert out["greedy_outputs_identical"] is True and out["prompts"] == 3 and out["num_speculative_tokens"] == 3
    assert out["target"] == tiny_target.rstrip("/").rsplit("/", 1)[-1]
    assert out["tokens_per_target_pass"]["plain"] == 1.0  # one token per plain pass: the pass counter is right
    assert out["tokens_per_target_pass"]["edd"] >= 1.0
    assert 0 <= out["edd_steps_with_drafts"] <= out["edd_target_passes"]
    assert out["ngram_outputs_identical"] is True and out["tokens_per_target_pass"]["ngram"] >= 1.0
    assert abs(out["speedup_vs_ngram"] * out["ngram_speedup"] - out["speedup"]) < 1e-9  # one run's ratios
    assert out["speedup"] > 0 and out["lookup_candidates"] is False  # the random drafter has no lookup table


def test_demo_leaves_its_process_able_to_start_an_eagle_style_engine(tiny_target, tiny_edd_drafter, capsys):
    """vLLM's ngram runs in its own process: after it imported numba here, an EAGLE-style engine (every
    later test's) would fail to start in this process."""
    from vllm_specx import demo
    from vllm_specx.testing import generate, make_llm, shutdown

    args = build_parser().parse_args(["demo", "--target", tiny_target, "--drafter", tiny_edd_drafter,
                                      "--num-prompts", "1", "--max-tokens", "4", "--json"])
    assert demo.run(args) == 0
    llm = make_llm(tiny_target, {"method": "eagle3", "model": tiny_edd_drafter, "num_speculative_tokens": 2})
    try:
        assert len(generate(llm, ["hello"], max_tokens=4).token_ids[0]) >= 1
    finally:
        shutdown(llm)
