"""Startup checks of a drafter against the served target: clear errors, never silent mismatch."""

from __future__ import annotations

from vllm_specx.checkpoint import SpecxConfigError


def check_edd_against_target(draft_hf_config, target_model_config) -> None:
    """Raise SpecxConfigError when the EDD drafter was not built for the served target."""
    target = target_model_config.hf_config
    text_cfg = getattr(target, "text_config", target)
    problems = []
    t_vocab = target_model_config.get_vocab_size()
    if draft_hf_config.vocab_size != t_vocab:
        problems.append(f"vocabulary {draft_hf_config.vocab_size} vs target {t_vocab}")
    t_hidden = text_cfg.hidden_size
    if getattr(draft_hf_config, "target_hidden_size", None) != t_hidden:
        problems.append(f"target hidden size {getattr(draft_hf_config, 'target_hidden_size', None)} vs served {t_hidden}")
    if draft_hf_config.hidden_size != t_hidden:
        problems.append(f"embedding width {draft_hf_config.hidden_size} vs target embedding {t_hidden}")
    n_layers = target_model_config.get_total_num_hidden_layers()
    layer_ids = list(getattr(draft_hf_config, "eagle_aux_hidden_state_layer_ids", []) or [])
    if len(layer_ids) != 1 or not 0 <= layer_ids[0] < n_layers:
        problems.append(f"target layer ids {layer_ids} for a target with {n_layers} layers")
    if problems:
        raise SpecxConfigError(
            "EDD drafter does not match the served model (" + "; ".join(problems) + "). It was trained "
            "for another target: train one for this model with `vllm-specx train --target <model>`, or "
            "serve the target the drafter was made for."
        )


def check_drafter_folder(folder: str) -> None:
    """specx_config.json valid and every safetensors file readable to its end, before vLLM loads it."""
    from pathlib import Path

    from safetensors import safe_open

    from vllm_specx.checkpoint import load_specx_config

    load_specx_config(folder)
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise SpecxConfigError(f"{folder} has no *.safetensors weights; re-export the drafter with `vllm-specx train`.")
    for f in files:
        try:
            with safe_open(str(f), "pt") as fh:
                for name in fh.keys():
                    fh.get_slice(name)
        except Exception as e:  # noqa: BLE001 - safetensors raises several types on damaged files
            raise SpecxConfigError(
                f"drafter weights {f} are corrupt or truncated ({e}); re-export or re-copy the checkpoint."
            ) from e


def check_environment_for_specx(runner: str | None = None) -> None:
    """Refuse to run a specx drafter on an unsupported vLLM (register() only warns).
    runner: "v1"/"v2", the model runner in use (None: check what both rely on)."""
    from vllm_specx.vllm_adapter.compat import check_vllm_internals, version_problem

    problem = version_problem()
    if problem:
        raise RuntimeError(f"vllm-specx: {problem}")
    check_vllm_internals(runner=runner)
