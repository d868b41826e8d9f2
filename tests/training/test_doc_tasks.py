"""Document-task training prompts (training/doc_tasks.py): shapes, mix, determinism; no network
(the Sphinx message cache is pre-filled)."""

import json
import random

from vllm_specx.training import doc_tasks as T

ALPACA = [{"instruction": "Describe a tree.", "output": " ".join(["Trees grow tall and green in the forest."] * 12)}]


def _cache(tmp_path):
    (tmp_path / "sphinx_messages.json").write_text(json.dumps(
        {"German": [f"Dies ist der deutsche Satz Nummer {i}" for i in range(150)],
         "French": [f"Ceci est la phrase française numéro {i}" for i in range(150)]}))
    return tmp_path


def test_passages_are_long_prose_within_bounds():
    texts = T.passages(ALPACA, min_words=60, max_words=420)
    assert len(texts) > 100  # pydoc_data topics + stdlib docstrings + the Alpaca output
    words = [len(t.split()) for t in texts]
    assert min(words) >= 60 and max(words) <= 420
    assert any("Trees grow tall" in t for t in texts)


def test_prompt_mix_and_determinism(tmp_path):
    cache = _cache(tmp_path)
    prompts = T.doc_task_prompts(ALPACA, cache, 200, seed=3)
    assert prompts == T.doc_task_prompts(ALPACA, cache, 200, seed=3)
    assert prompts != T.doc_task_prompts(ALPACA, cache, 200, seed=4)
    assert len(prompts) == 200 and len(set(prompts)) > 190
    kinds = {
        "summary": sum("ummar" in p for p in prompts),
        "answer": sum("Passage 1:" in p for p in prompts),
        "translate": sum(p.startswith("Translate ") for p in prompts),
    }
    assert 0.3 * 200 <= kinds["summary"] <= 0.4 * 200
    assert 0.3 * 200 <= kinds["answer"] <= 0.4 * 200
    assert 0.15 * 200 <= kinds["translate"] <= 0.25 * 200
    for p in prompts:
        if "Passage 1:" in p:  # passages within max_context_words (+ labels, template and question)
            assert len(p.split()) <= 600 + 40
        if p.startswith("Translate German"):
            assert "deutsche Satz" in p


def test_word_problems_have_numbers():
    rng = random.Random(0)
    for _ in range(20):
        p = T.word_problem(rng)
        assert any(c.isdigit() for c in p) and p.rstrip().endswith(("?", "step."))
