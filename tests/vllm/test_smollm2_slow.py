"""Slow: the real SmolLM2-135M target with the bundled EDD drafter (run with -m slow)."""

import json
from pathlib import Path

import pytest

from vllm_specx.testing import assert_same_tokens, generate, make_llm, shutdown

BUNDLED = Path(__file__).resolve().parents[2] / "vllm_specx" / "assets" / "edd-smollm2-135m"
SPEC_BENCH = Path(__file__).resolve().parents[3] / "shared" / "data" / "spec_bench_question.jsonl"


def _prompts(n):
    from transformers import AutoTokenizer

    from vllm_specx.models import smollm2_path

    tok = AutoTokenizer.from_pretrained(str(smollm2_path()))
    if SPEC_BENCH.exists():
        rows = [json.loads(x) for x in SPEC_BENCH.read_text().splitlines()]
        texts = [r["turns"][0] for r in rows][:: max(1, len(rows) // n)][:n]
    else:
        from tests.conftest import many_prompts
        texts = many_prompts(n)
    return [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
            for t in texts]


@pytest.mark.slow
def test_bundled_edd_equals_plain_on_smollm2_60_prompts():
    from vllm_specx.models import smollm2_path

    target = str(smollm2_path())
    prompts = _prompts(60)
    llm = make_llm(target)
    try:
        plain = generate(llm, prompts, max_tokens=64)
    finally:
        shutdown(llm)
    llm = make_llm(target, {"method": "eagle3", "model": str(BUNDLED), "num_speculative_tokens": 5})
    try:
        spec = generate(llm, prompts, max_tokens=64)
    finally:
        shutdown(llm)
    assert_same_tokens(plain.token_ids, spec.token_ids)
    # a trained drafter must actually be accepted, not merely harmless
    assert spec.metrics.mean_acceptance_length > 1.3, spec.metrics
