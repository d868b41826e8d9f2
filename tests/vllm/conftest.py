"""Fixtures shared by the vLLM tree tests (test_tree_verify, test_tree_stops, test_compiled_mode,
test_vocab_modes)."""

import shutil

import pytest
import torch

from tests.vllm.trees import K


@pytest.fixture(scope="module")
def edd_tree_drafter(tiny_edd_drafter, tmp_path_factory):
    """Random tiny EDD drafter + a decision model that keeps one chain token (depth 0) + trees on with
    sibling threshold 0: every drafted tree is the chain token, 2 runner-ups at depth 0 and 2 under it."""
    import json

    from vllm_specx.core.early_stop import FEATURE_NAMES, train_early_stop
    from vllm_specx.training.early_stop_data import attach_early_stop

    g = torch.Generator().manual_seed(0)
    feats = torch.rand(3000, len(FEATURE_NAMES), generator=g) * torch.tensor([1.0, 1.0, 1.0, 12.0, 1.0, -30.0])
    feats[:, 4] = torch.randint(0, K, (3000,), generator=g).float()
    model, _ = train_early_stop(feats, (feats[:, 4] == 0).float(), kind="mlp", epochs=20, seed=0)
    folder = tmp_path_factory.mktemp("edd_tree") / "drafter"
    shutil.copytree(tiny_edd_drafter, folder)
    attach_early_stop(folder, model, {}, threshold=0.5)
    cfg = json.loads((folder / "specx_config.json").read_text())
    cfg["tree"] = {"enabled": True, "max_siblings": 2, "threshold": 0.0}
    cfg["early_stop"]["online_calibration"] = False  # keep drafting: the random drafter is always rejected
    (folder / "specx_config.json").write_text(json.dumps(cfg))
    return str(folder)
