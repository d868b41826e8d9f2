"""Write drafter checkpoints (speculators format + specx_config.json) and read them back."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vllm_specx.checkpoint import (
    SPECX_CONFIG_NAME,
    SpecxConfig,
    SpecxConfigError,
    TargetSignature,
    edd_speculators_config,
    load_specx_config,
)
from vllm_specx.core.edd import EddArchConfig, EddDrafter, default_arch_for_target, init_weights_

WEIGHTS_NAME = "model.safetensors"


def target_signature(target_dir: str | Path) -> TargetSignature:
    cfg = json.loads((Path(target_dir) / "config.json").read_text())
    return TargetSignature(
        architecture=(cfg.get("architectures") or ["LlamaForCausalLM"])[0],
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        name_or_path=str(target_dir),
    )


def export_edd(
    drafter: EddDrafter, target: TargetSignature, out_dir: str | Path,
    num_speculative_tokens: int = 5, training: dict | None = None, dtype: torch.dtype = torch.bfloat16,
) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arch = drafter.cfg.to_dict()
    state = {k: v.detach().to(dtype).contiguous() for k, v in drafter.state_dict().items()}
    tmp = out / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "specx_drafter": "edd"})
    os.replace(tmp, out / WEIGHTS_NAME)
    (out / "config.json").write_text(json.dumps(edd_speculators_config(arch, target, num_speculative_tokens), indent=2))
    specx = SpecxConfig(drafter="edd", target=target, num_speculative_tokens=num_speculative_tokens,
                        training={"arch": arch, **(training or {})}).validate()
    (out / SPECX_CONFIG_NAME).write_text(json.dumps(specx.to_dict(), indent=2))
    return out


def target_embedding_and_head(get_tensor, names) -> tuple[torch.Tensor, torch.Tensor]:
    """(embedding, LM head) of an HF target as fp32, from its safetensors reader (`get_tensor`, `names`);
    a tied target has no `lm_head.weight` and gets the embedding back as its head."""
    embed = get_tensor("model.embed_tokens.weight").float()
    return embed, get_tensor("lm_head.weight").float() if "lm_head.weight" in names else embed


def load_edd(folder: str | Path, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor) -> tuple[EddDrafter, SpecxConfig]:
    """Load an exported EDD drafter for training/evaluation in plain PyTorch."""
    specx = load_specx_config(folder)
    if specx.drafter != "edd":
        raise SpecxConfigError(f"{folder} holds a {specx.drafter!r} drafter, not an EDD drafter")
    arch = EddArchConfig(**specx.training["arch"])
    drafter = EddDrafter(arch, embed_weight, lm_head_weight)
    weights = Path(folder) / WEIGHTS_NAME
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises several types on truncated files
        raise SpecxConfigError(f"{weights} cannot be read ({e}); the checkpoint is missing or corrupt.") from e
    drafter.load_state_dict({k: v.float() for k, v in state.items()})
    return drafter, specx


def random_edd_checkpoint(target_dir: str | Path, out_dir: str | Path, seed: int = 0, num_speculative_tokens: int = 3) -> Path:
    """An untrained EDD drafter for `target_dir` (tests: exercises the whole vLLM path)."""
    from transformers import AutoConfig

    tcfg = AutoConfig.from_pretrained(str(target_dir))
    arch = default_arch_for_target(tcfg)
    dummy = torch.zeros(1, 1)
    drafter = EddDrafter(arch, dummy, dummy)
    init_weights_(drafter, seed)
    return export_edd(drafter, target_signature(target_dir), out_dir, num_speculative_tokens,
                      training={"note": "random weights, for tests"})


def eagle3_speculators_config(target: TargetSignature, layer: dict, aux_layer_ids: list[int],
                              num_speculative_tokens: int) -> dict:
    """config.json of an EAGLE-3 drafter in the `speculators` layout (run by vLLM's own eagle3)."""
    return {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "speculators_version": "0.3.0",
        "speculators_config": {
            "algorithm": "eagle3",
            "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": num_speculative_tokens}],
            "verifier": {"name_or_path": target.name_or_path or "unknown", "architectures": [target.architecture]},
        },
        "transformer_layer_config": {"model_type": "llama", "num_hidden_layers": 1, "tie_word_embeddings": False,
                                     "hidden_act": "silu", "num_aux_hidden_states": len(aux_layer_ids), **layer},
        "draft_vocab_size": layer["vocab_size"],
        "target_hidden_size": target.hidden_size,
        "norm_before_residual": True,
        "eagle_aux_hidden_state_layer_ids": aux_layer_ids,
    }


def export_eagle3(
    drafter, target: TargetSignature, out_dir: str | Path, num_speculative_tokens: int = 5,
    training: dict | None = None, dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """A trained `core.eagle3.Eagle3Drafter` as an EAGLE-3 checkpoint for vLLM's own `eagle3` method
    (no embed/lm_head tensors: vLLM shares the target's, as in training)."""
    arch = drafter.cfg
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous()  # d2t stays int64
             for k, v in drafter.state_dict().items()}
    tmp = out / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "specx_drafter": "eagle3"})
    os.replace(tmp, out / WEIGHTS_NAME)
    layer = {"vocab_size": arch.vocab_size, "hidden_size": arch.hidden_size, "intermediate_size": arch.intermediate_size,
             "num_attention_heads": arch.num_attention_heads, "num_key_value_heads": arch.num_key_value_heads,
             "head_dim": arch.head_dim, "rms_norm_eps": arch.rms_norm_eps,
             "max_position_embeddings": arch.max_position_embeddings, "rope_theta": arch.rope_theta}
    cfg = eagle3_speculators_config(target, layer, list(arch.aux_layer_ids), num_speculative_tokens)
    cfg["draft_vocab_size"] = arch.draft_vocab_size or arch.vocab_size
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    specx = SpecxConfig(drafter="eagle3", target=target, num_speculative_tokens=num_speculative_tokens,
                        training={"arch": arch.to_dict(), **(training or {})}).validate()
    (out / SPECX_CONFIG_NAME).write_text(json.dumps(specx.to_dict(), indent=2))
    return out


def eagle3_aux_layer_ids(num_layers: int) -> list[int]:
    """EAGLE-3's low / middle / high target layers (vLLM numbering: the input of layer id)."""
    if num_layers < 6:  # too shallow for three distinct layers (vLLM de-duplicates repeated ids)
        return list(range(num_layers))
    return sorted({2, num_layers // 2, num_layers - 3})  # 6 layers: [2, 3]


def random_eagle3_checkpoint(target_dir: str | Path, out_dir: str | Path, seed: int = 0,
                             num_speculative_tokens: int = 3, draft_vocab_size: int | None = None) -> Path:
    """An untrained EAGLE-3 drafter for `target_dir` (tests vLLM's eagle3 path; no hub download).
    Written by `export_eagle3`, so the tests that run it also cover the baseline's export.
    draft_vocab_size: a reduced draft vocabulary (its own head and a `d2t` map onto a random sorted subset
    of the target's ids, always holding the first 256), as reduced-vocabulary EAGLE-3 checkpoints ship."""
    from transformers import AutoConfig

    from vllm_specx.core.eagle3 import Eagle3Drafter, eagle3_arch_for_target

    tcfg = AutoConfig.from_pretrained(str(target_dir))
    arch = eagle3_arch_for_target(tcfg, eagle3_aux_layer_ids(tcfg.num_hidden_layers))
    arch.draft_vocab_size = draft_vocab_size
    dummy = torch.zeros(1, 1)
    drafter = Eagle3Drafter(arch, dummy, dummy)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in drafter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5 if p.dim() == 2 else torch.ones(p.shape))
        if drafter.reduced_vocab:
            rest = 256 + torch.randperm(arch.vocab_size - 256, generator=g)[: draft_vocab_size - 256]
            ids = torch.cat([torch.arange(256), rest.sort().values])
            drafter.d2t.copy_(ids - torch.arange(draft_vocab_size))
    return export_eagle3(drafter, target_signature(target_dir), out_dir, num_speculative_tokens,
                         training={"note": "random weights, for tests"})


def load_eagle3(folder: str | Path, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor,
                target_num_layers: int | None = None):
    """An EAGLE-3 checkpoint in the speculators layout (this project's export, or another trainer's: tensors
    named `midlayer.*` or `layers.0.*`, with or without its own `embed_tokens`, `lm_head` and `d2t`) as a
    plain-PyTorch `core.eagle3.Eagle3Drafter`, for the training stages that run the drafter (early stop).
    target_num_layers: the target's depth, for checkpoints that do not list their auxiliary layers."""
    from vllm_specx.core.eagle3 import Eagle3ArchConfig, Eagle3Drafter

    folder = Path(folder)
    try:
        cfg = json.loads((folder / "config.json").read_text())
        layer = cfg["transformer_layer_config"]
    except (OSError, ValueError, KeyError) as e:
        raise SpecxConfigError(f"{folder} is not an EAGLE-3 checkpoint in the speculators format ({e}).") from e
    unsupported = [k for k in ("norm_before_fc", "fc_norm", "norm_output") if cfg.get(k)]
    if cfg.get("norm_before_residual", True) is False or layer.get("rope_scaling") or unsupported \
            or layer.get("num_hidden_layers", 1) != 1:
        raise SpecxConfigError(
            f"{folder}: the training stages model one-layer EAGLE-3 drafters with norm_before_residual and plain "
            f"RoPE; this one differs ({unsupported or 'layers / norm placement / rope_scaling'}). Attach it "
            "without trained parts, or give it a decision model trained elsewhere.")
    aux = cfg.get("eagle_aux_hidden_state_layer_ids") or (
        eagle3_aux_layer_ids(target_num_layers) if target_num_layers else None)
    if not aux:
        raise SpecxConfigError(f"{folder}/config.json lists no eagle_aux_hidden_state_layer_ids; pass the target.")
    hidden, heads = layer["hidden_size"], layer["num_attention_heads"]
    arch = Eagle3ArchConfig(
        vocab_size=layer["vocab_size"], hidden_size=hidden, target_hidden_size=cfg.get("target_hidden_size") or hidden,
        num_attention_heads=heads, num_key_value_heads=layer.get("num_key_value_heads", heads),
        head_dim=layer.get("head_dim") or hidden // heads, intermediate_size=layer["intermediate_size"],
        aux_layer_ids=tuple(aux), rms_norm_eps=layer.get("rms_norm_eps", 1e-5),
        rope_theta=layer.get("rope_theta", 10000.0), max_position_embeddings=layer.get("max_position_embeddings", 8192),
        draft_vocab_size=cfg.get("draft_vocab_size"))
    state: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        try:
            state.update(load_file(str(f)))
        except Exception as e:  # safetensors raises several types on truncated files
            raise SpecxConfigError(f"{f} cannot be read ({e}); the checkpoint is missing or corrupt.") from e
    state = {k.replace("layers.0.", "midlayer."): v for k, v in state.items() if k != "t2d"}
    embed = state.pop("embed_tokens.weight", embed_weight)
    reduced = arch.draft_vocab_size not in (None, arch.vocab_size)  # then lm_head.weight is the draft head
    drafter = Eagle3Drafter(arch, embed, lm_head_weight if reduced else state.pop("lm_head.weight", lm_head_weight))
    missing, unexpected = drafter.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise SpecxConfigError(f"{folder}: EAGLE-3 tensors do not match its config.json (missing {missing}, "
                               f"unexpected {unexpected}).")
    return drafter

