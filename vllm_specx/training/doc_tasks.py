"""Document-task training prompts: summarise, answer from passages, translate, word problems.

The Alpaca + stdlib-code prompts of the first drafter are short instructions; Spec-Bench-style traffic
also has long contexts (summaries of articles, answers grounded in retrieved passages), translation
and arithmetic word problems, on which that drafter accepted 7-18 % of depth-0 drafts. These prompts
give the drafter those shapes from training-only text:

  passages      the Python Language Reference topics shipped in the stdlib (`pydoc_data.topics`),
                long stdlib module docstrings, long Alpaca outputs
  foreign text  the translated messages of Sphinx's message catalogues (`sphinx/locale/*/sphinx.po`,
                from the Sphinx wheel, fetched once)
  word problems generated from templates with seeded random numbers

No evaluation text is used (callers still pass the prompts through `drop_eval_overlap`).
"""

from __future__ import annotations

import ast
import json
import random
import re
import sysconfig
import tempfile
import zipfile
from pathlib import Path

SPHINX_WHEEL = "sphinx==8.1.3"
TRANSLATE_FROM = {"de": "German", "fr": "French", "es": "Spanish", "it": "Italian", "nl": "Dutch",
                  "pt_BR": "Portuguese", "pl": "Polish", "sv": "Swedish", "ca": "Catalan", "ro": "Romanian",
                  "cs": "Czech", "da": "Danish", "fi": "Finnish", "hu": "Hungarian", "id": "Indonesian"}

SUMMARY_TEMPLATES = (
    "Summarize the following text in a few sentences.\n\n{p}",
    "{p}\n\nWrite a short summary of the passage above.",
    "Give a concise summary of this article:\n\n{p}",
    "Read the text below and summarize its main points.\n\n{p}",
)
ANSWER_TEMPLATES = (
    "Answer the question based on the passages below.\n\n{p}\n\nQuestion: {q}",
    "{p}\n\nUsing only the information above, answer: {q}",
    "Context:\n{p}\n\nQuestion: {q}\nAnswer:",
)
QUESTION_TEMPLATES = ("What does the text say about {t}?", "Explain what {t} means according to the passage.",
                      "How is {t} used?", "What is the role of {t}?")


def _paragraphs(text: str) -> list[str]:
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if len(p.split()) >= 12]


def passages(alpaca_rows: list[dict], min_words: int = 60, max_words: int = 420) -> list[str]:
    """Prose passages of min_words..max_words words: consecutive paragraphs of one source, joined."""
    import pydoc_data.topics as topics

    sources = list(topics.topics.values())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        if doc and len(doc.split()) >= min_words:
            sources.append(doc)
    sources += [r["output"] for r in alpaca_rows if len(r.get("output", "").split()) >= min_words]
    out = []
    for text in sources:
        cur: list[str] = []
        for para in _paragraphs(text):
            if cur and len(" ".join(cur + [para]).split()) > max_words:
                out.append("\n\n".join(cur))
                cur = []
            cur.append(para)
        out.append("\n\n".join(cur))
    return [t for t in out if min_words <= len(t.split()) <= max_words]  # drops single overlong paragraphs


def foreign_sentences(cache: Path, min_words: int = 4) -> dict[str, list[str]]:
    """language name -> translated Sphinx messages (placeholders and markup dropped)."""
    out = cache / "sphinx_messages.json"
    if not out.exists():
        from vllm_specx.training.data import pip_download

        with tempfile.TemporaryDirectory() as tmp:
            wheel = pip_download(SPHINX_WHEEL, tmp, binary=True)
            messages = {}
            with zipfile.ZipFile(wheel) as zf:
                for code, language in TRANSLATE_FROM.items():
                    po = zf.read(f"sphinx/locale/{code}/LC_MESSAGES/sphinx.po").decode("utf-8")
                    found = []
                    for block in re.findall(r'msgstr ((?:"(?:[^"\\]|\\.)*"\s*)+)', po)[1:]:  # [0] is the header
                        s = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', block)).replace("\\n", " ").replace('\\"', '"')
                        if len(s.split()) >= min_words and not re.search(r"[%{}<>]|\\", s):
                            found.append(s.strip())
                    messages[language] = found
        out.write_text(json.dumps(messages, ensure_ascii=False, indent=1))
    return json.loads(out.read_text())


def word_problem(rng: random.Random) -> str:
    name = rng.choice(["Maya", "Omar", "Lena", "Ravi", "Sofia", "Tom", "Aiko", "Jonas", "Priya", "Luis"])
    item = rng.choice(["notebooks", "apples", "tickets", "pencils", "cupcakes", "stickers", "books", "plants"])
    a, b, c = rng.randint(2, 19), rng.randint(2, 12), rng.randint(2, 9)
    return rng.choice([
        f"{name} buys {b} {item} at ${a} each and pays with a ${(a * b // 10 + 1) * 10} bill. How much change does {name} get?",
        f"A box holds {a} {item}. {name} has {b} boxes and gives away {c} {item}. How many {item} are left?",
        f"{name} reads {a} pages on Monday and {c} times as many on Tuesday. How many pages did {name} read in total?",
        f"There are {a * b} {item} shared equally among {b} friends. Each friend then gets {c} more. How many does each friend have?",
        f"{name} saves ${a} every week for {b} weeks, then spends ${c} on {item}. How much money is left? Explain step by step.",
    ])


def doc_task_prompts(alpaca_rows: list[dict], cache: Path, n: int, seed: int = 0,
                     max_context_words: int = 600) -> list[str]:
    """n prompts: 35 % summaries, 35 % answers from 1-3 passages, 20 % translations, 10 % word problems."""
    rng = random.Random(seed)
    texts = passages(alpaca_rows)
    rng.shuffle(texts)
    foreign = [(lang, s) for lang, ss in foreign_sentences(cache).items() for s in ss]
    rng.shuffle(foreign)
    n_sum, n_ans, n_tr = int(0.35 * n), int(0.35 * n), int(0.2 * n)
    prompts = [rng.choice(SUMMARY_TEMPLATES).format(p=t) for t in texts[:n_sum]]
    for t in texts[n_sum : n_sum + n_ans]:
        terms = re.findall(r"\b[A-Z][a-z]{3,}\b|`[^`\s]{2,30}`|\b[a-z_]+\(\)", t) or t.split()[:5]
        docs = [t]  # + up to 2 distractor passages, as retrieval returns, within max_context_words
        for d in rng.sample(texts, rng.randint(0, 2)):
            if len(" ".join(docs + [d]).split()) <= max_context_words:
                docs.append(d)
        rng.shuffle(docs)
        body = "\n\n".join(f"Passage {i + 1}: {d}" for i, d in enumerate(docs))
        q = rng.choice(QUESTION_TEMPLATES).format(t=rng.choice(terms).strip("`"))
        prompts.append(rng.choice(ANSWER_TEMPLATES).format(p=body, q=q))
    for i in range(0, min(len(foreign), 3 * n_tr), 3):  # 1-3 messages of one language per prompt
        lang = foreign[i][0]
        group = [s for l, s in foreign[i : i + rng.randint(1, 3)] if l == lang]
        prompts.append(f"Translate {lang} to English:\n{' '.join(group)}")
        if len(prompts) >= n_sum + n_ans + n_tr:
            break
    prompts += [word_problem(rng) for _ in range(n - len(prompts))]
    rng.shuffle(prompts)
    return prompts[:n]
