"""Evaluation prompt sets: built-in sets load with their categories; any JSONL with turns/question works."""

import json

import pytest

from vllm_specx.eval_sets import PromptSetUnavailable, load_prompt_set


def test_spec_bench_has_six_categories_of_80():
    rows = load_prompt_set("spec_bench")
    counts = {}
    for cat, _ in rows:
        counts[cat] = counts.get(cat, 0) + 1
    assert counts == {c: 80 for c in ("multi_turn", "translation", "summarization", "qa", "math_reasoning", "rag")}
    picked = load_prompt_set("spec_bench", per_category=4)
    mt = [t for c, t in picked if c == "multi_turn"]
    assert len(picked) == 24 and len(set(mt)) == 4  # spread over the category, not its first topic


def test_wheel_sets_load():
    mt = load_prompt_set("mt_bench")
    he = load_prompt_set("humaneval")
    assert len(mt) == 80 and {c for c, _ in mt} == {"mt_bench"}
    assert len(he) == 164 and all("def " in t for _, t in he)


def test_any_jsonl_with_turns_or_question(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text(json.dumps({"turns": ["hello there"], "category": "greet"}) + "\n"
                 + json.dumps({"question": "what is 2+2?"}) + "\n")
    assert load_prompt_set(str(f)) == [("greet", "hello there"), ("mine", "what is 2+2?")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "no turns"}) + "\n")
    with pytest.raises(ValueError, match="neither `turns` nor `question`"):
        load_prompt_set(str(bad))
    with pytest.raises(PromptSetUnavailable, match="does not exist"):
        load_prompt_set(str(tmp_path / "missing.jsonl"))


def test_gsm8k_questions_come_from_shared_data():
    rows = load_prompt_set("gsm8k", per_category=3)
    assert len(rows) == 3 and all(c == "gsm8k" and t.strip() for c, t in rows)
