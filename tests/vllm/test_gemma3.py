"""Gemma-3 targets: a tiny random Gemma-3-shaped target (sliding-window and full-attention layers, scaled
embedding, one KV head) decodes in vLLM-CPU as in transformers, and EDD / EAGLE-3 drafters read its hidden
states through specx's SupportsEagle3 class (and vLLM's Transformers backend) with output equal to plain
decoding. The real Gemma-3-270M tests are `slow` (a 240 MB PyPI download)."""

import pytest
import torch

from tests.conftest import PROMPTS, many_prompts
from vllm_specx.testing import assert_same_tokens, generate, make_llm, run_generate, shutdown

SPECX_GEMMA3 = {"architectures": ["SpecxGemma3ForCausalLM"]}


def hf_greedy(folder: str, prompt_ids: list[list[int]], max_tokens: int, to_eos: bool = False) -> list[list[int]]:
    """transformers' greedy continuation of each prompt (fp32, one prompt at a time, no padding); exactly
    max_tokens (EOS suppressed, as vLLM's ignore_eos never picks it on the random targets) unless to_eos."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for ids in prompt_ids:
            x = torch.tensor([ids])
            y = model.generate(x, max_new_tokens=max_tokens, do_sample=False,
                               min_new_tokens=0 if to_eos else max_tokens, attention_mask=torch.ones_like(x))
            outs.append(y[0, len(ids):].tolist())
    return outs


def token_prompts(folder: str, texts: list[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return [tok(t).input_ids for t in texts]


@pytest.fixture(scope="module")
def tiny_gemma3() -> str:
    from vllm_specx.models.tiny import tiny_gemma3_path

    return str(tiny_gemma3_path())


@pytest.fixture(scope="module")
def gemma3_plain(tiny_gemma3):
    """vLLM's native Gemma3ForCausalLM, greedy, on PROMPTS (48 tokens) and 16 numbered prompts (32)."""
    llm = make_llm(tiny_gemma3)
    try:
        return {"base": generate(llm, PROMPTS, max_tokens=48, ignore_eos=True),
                "many": generate(llm, many_prompts(16), max_tokens=32, ignore_eos=True)}
    finally:
        shutdown(llm)


@pytest.fixture(scope="module")
def gemma3_edd_drafter(tiny_gemma3, tmp_path_factory) -> str:
    from vllm_specx.training.export import random_edd_checkpoint

    return str(random_edd_checkpoint(tiny_gemma3, tmp_path_factory.mktemp("edd_gemma3"), num_speculative_tokens=3))


def test_tiny_gemma3_has_sliding_and_full_layers(tiny_gemma3):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_gemma3)
    assert cfg.model_type == "gemma3_text" and cfg.architectures == ["Gemma3ForCausalLM"]
    assert cfg.layer_types == ["sliding_attention"] * 5 + ["full_attention"] and cfg.sliding_window == 16
    assert cfg.head_dim == 32 and cfg.num_key_value_heads == 1 and cfg.tie_word_embeddings


def test_tiny_gemma3_vllm_equals_transformers_greedy(tiny_gemma3, gemma3_plain):
    """Prompts plus 48 tokens run past the 16-token window: the sliding layers are exercised."""
    ids = token_prompts(tiny_gemma3, PROMPTS[:4])
    ref = hf_greedy(tiny_gemma3, ids, 48)
    assert_same_tokens(ref, gemma3_plain["base"].token_ids[:4])
    assert len({tuple(t[:8]) for t in ref}) > 1, "degenerate random target: every prompt continues alike"


def test_specx_gemma3_class_without_drafter_equals_native(tiny_gemma3, gemma3_plain):
    res = run_generate(tiny_gemma3, PROMPTS, max_tokens=48, ignore_eos=True, llm_kwargs={"hf_overrides": SPECX_GEMMA3})
    assert_same_tokens(gemma3_plain["base"].token_ids, res.token_ids)


def test_edd_chain_on_tiny_gemma3_equals_plain(tiny_gemma3, gemma3_edd_drafter, gemma3_plain):
    spec = {"method": "eagle3", "model": gemma3_edd_drafter, "num_speculative_tokens": 3}
    res = run_generate(tiny_gemma3, many_prompts(16), spec, max_tokens=32, ignore_eos=True,
                       llm_kwargs={"hf_overrides": SPECX_GEMMA3})
    assert_same_tokens(gemma3_plain["many"].token_ids, res.token_ids)
    assert res.metrics.num_drafts > 0


def test_edd_trees_on_tiny_gemma3_equal_plain(tiny_gemma3, gemma3_edd_drafter, gemma3_plain, tmp_path, monkeypatch):
    """PCT trees (2 siblings, threshold 0: every step drafts a tree) over the Gemma target's sliding layers;
    no hf_overrides given: make_llm selects the class with auxiliary hidden states itself."""
    import json
    import shutil

    folder = tmp_path / "drafter"
    shutil.copytree(gemma3_edd_drafter, folder)
    cfg = json.loads((folder / "specx_config.json").read_text())
    cfg["tree"] = {"enabled": True, "max_siblings": 2, "threshold": 0.0}
    (folder / "specx_config.json").write_text(json.dumps(cfg))
    monkeypatch.setenv("SPECX_TREE", "1")
    spec = {"method": "eagle3", "model": str(folder), "num_speculative_tokens": 3}
    res = run_generate(tiny_gemma3, PROMPTS, spec, max_tokens=48, ignore_eos=True)
    assert_same_tokens(gemma3_plain["base"].token_ids, res.token_ids)


def test_vllm_eagle3_on_tiny_gemma3_equals_plain(tiny_gemma3, gemma3_plain, tmp_path):
    from vllm_specx.training.export import random_eagle3_checkpoint

    drafter = random_eagle3_checkpoint(tiny_gemma3, tmp_path / "eagle3")
    spec = {"method": "eagle3", "model": str(drafter), "num_speculative_tokens": 3}
    res = run_generate(tiny_gemma3, PROMPTS, spec, max_tokens=48, ignore_eos=True,
                       llm_kwargs={"hf_overrides": SPECX_GEMMA3})
    assert_same_tokens(gemma3_plain["base"].token_ids, res.token_ids)
    assert res.metrics.num_draft_tokens == 3 * res.metrics.num_drafts > 0


@pytest.mark.slow
def test_edd_on_tiny_gemma3_transformers_backend_equals_plain(tiny_gemma3, gemma3_edd_drafter, gemma3_plain):
    """The alternative without specx's class: vLLM's Transformers modeling backend implements SupportsEagle3."""
    spec = {"method": "eagle3", "model": gemma3_edd_drafter, "num_speculative_tokens": 3}
    res = run_generate(tiny_gemma3, PROMPTS, spec, max_tokens=48, ignore_eos=True,
                       llm_kwargs={"model_impl": "transformers"})
    assert_same_tokens(gemma3_plain["base"].token_ids, res.token_ids)


def test_native_gemma3_refuses_eagle3_clearly(tiny_gemma3, gemma3_edd_drafter):
    """vLLM's own Gemma3ForCausalLM has no auxiliary hidden states: vLLM refuses at start. That is why
    make_llm (and serve) pick SpecxGemma3ForCausalLM for an eagle3 run unless hf_overrides or model_impl is
    given; model_impl="vllm" keeps vLLM's class here."""
    spec = {"method": "eagle3", "model": gemma3_edd_drafter, "num_speculative_tokens": 3}
    with pytest.raises(Exception, match="EAGLE3"):
        run_generate(tiny_gemma3, PROMPTS[:1], spec, max_tokens=4, llm_kwargs={"model_impl": "vllm"})



# ------------------------------------------------------------------------ the real Gemma-3-270M (slow)
GEMMA_PROMPTS = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
                 "Once upon a time, in a small village by the sea,", "Water boils at a temperature of"]


@pytest.mark.slow
def test_gemma3_270m_materialises_and_vllm_equals_transformers_greedy():
    """Text prompts through vLLM's own tokenizer (which must add <bos>) give transformers' greedy tokens."""
    import json
    from pathlib import Path

    from vllm_specx.models.gemma3 import check_materialised, gemma3_path

    folder = str(gemma3_path())
    cfg = json.loads((Path(folder) / "config.json").read_text())
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"]) == (262144, 640, 18)
    assert "quantization_config" not in cfg and cfg["architectures"] == ["Gemma3ForCausalLM"]
    assert check_materialised(folder) < 20
    ids = token_prompts(folder, GEMMA_PROMPTS)
    assert all(x[0] == 2 for x in ids), "the tokenizer must add <bos>"
    from transformers import AutoTokenizer

    from vllm_specx.models import end_of_turn_id, user_prompt_ids

    tok = AutoTokenizer.from_pretrained(folder)
    assert user_prompt_ids(tok, GEMMA_PROMPTS[0]) == ids[0] and end_of_turn_id(tok) == tok.eos_token_id == 1
    ref = hf_greedy(folder, ids, 24, to_eos=True)
    llm = make_llm(folder)
    try:
        res = generate(llm, GEMMA_PROMPTS, max_tokens=24)
    finally:
        shutdown(llm)
    assert_same_tokens(ref, res.token_ids)


@pytest.mark.slow
def test_gemma3_270m_random_edd_chain_equals_plain(tmp_path):
    """specx's Gemma-3 class feeds an EDD drafter (head_dim 256, 262k vocabulary) without changing output."""
    from vllm_specx.models.gemma3 import gemma3_path
    from vllm_specx.training.export import random_edd_checkpoint

    folder = str(gemma3_path())
    plain = run_generate(folder, GEMMA_PROMPTS[:3], max_tokens=24)
    drafter = random_edd_checkpoint(folder, tmp_path / "edd", num_speculative_tokens=3)
    spec = {"method": "eagle3", "model": str(drafter), "num_speculative_tokens": 3}
    res = run_generate(folder, GEMMA_PROMPTS[:3], spec, max_tokens=24)  # make_llm picks the Gemma-3 class
    assert_same_tokens(plain.token_ids, res.token_ids)
    assert res.metrics.num_drafts > 0
