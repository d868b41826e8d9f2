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
