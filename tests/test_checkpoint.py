"""specx_config.json validation: every malformed input gives a clear error naming the problem."""

import json
import random

import pytest

from vllm_specx.checkpoint import SpecxConfig, SpecxConfigError, load_specx_config

GOOD = {"drafter": "edd", "target": {"architecture": "LlamaForCausalLM", "vocab_size": 49152, "hidden_size": 576,
                                     "num_hidden_layers": 30}}


def test_good_config_roundtrip(tmp_path):
    cfg = SpecxConfig.from_dict(GOOD)
    (tmp_path / "specx_config.json").write_text(json.dumps(cfg.to_dict()))
    assert load_specx_config(tmp_path) == cfg


@pytest.mark.parametrize("mutation, message", [
    (lambda d: d.pop("drafter"), "missing required key 'drafter'"),
    (lambda d: d.update(drafter="medusa"), "drafter must be 'edd' or 'eagle3'"),
    (lambda d: d.update(vocab_mode="tiny"), "vocab_mode must be one of"),
    (lambda d: d.update(num_speculative_tokens=0), "num_speculative_tokens"),
    (lambda d: d.update(num_speculative_tokens="5"), "num_speculative_tokens"),
    (lambda d: d.update(unknown_key=1), "unknown keys ['unknown_key']"),
    (lambda d: d["target"].pop("vocab_size"), "'target' needs"),
    (lambda d: d["target"].update(vocab_size=-3), "target.vocab_size must be a positive integer"),
    (lambda d: d.update(format_version=99), "format_version 99"),
    (lambda d: d.update(tree=[1, 2]), "'tree' must be an object"),
    (lambda d: d.update(tree={"expand_children": 17}), "tree.expand_children"),
    (lambda d: d.update(tree={"branch_decision": "yes"}), "tree.branch_decision"),
    (lambda d: d.update(vocab=[1]), "'vocab' must be an object"),
    (lambda d: d.update(vocab_mode="speculative"), "needs a 'vocab' section"),
    (lambda d: d.update(vocab={"path": "/abs/vocab.safetensors"}), "vocab.path must be a file name inside"),
    (lambda d: d.update(vocab={"num_candidates": 0}), "vocab.num_candidates must be an integer in [1, 49152]"),
    (lambda d: d.update(vocab={"num_candidates": 50000}), "vocab.num_candidates must be an integer in [1, 49152]"),
    (lambda d: d.update(vocab={"return_topk": True}), "vocab.return_topk"),
    (lambda d: d.update(lookup=[0.5]), "'lookup' must be an object"),
    (lambda d: d.update(lookup={"first_accept": [0.5], "deeper_accept": [0.5], "max_n": 4}),
     "unknown lookup keys ['max_n']"),
    (lambda d: d.update(lookup={"first_accept": [0.5, 0.9], "deeper_accept": [0.5]}),
     "lists of equal length"),
    (lambda d: d.update(lookup={"first_accept": [1.5], "deeper_accept": [0.5]}), "lists of equal length"),
    (lambda d: d.update(lookup={"first_accept": [0.5], "deeper_accept": [0.5], "preempt_expected": 0}),
     "lookup.preempt_expected"),
    (lambda d: d.update(lookup={"first_accept": [0.5], "deeper_accept": [0.5], "shared_calibration": 1.0}),
     "lookup.shared_calibration"),
    (lambda d: d.update(lookup={"first_accept": [0.5], "deeper_accept": [0.5], "shared_calibration": True}),
     "lookup.shared_calibration"),
    (lambda d: d.update(lookup={"first_accept": [0.5], "deeper_accept": [0.5], "min_n": 2}),
     "lookup.min_n must be an integer in [1, 1]"),
    (lambda d: d.update(lookup={"enabled": "yes", "first_accept": [0.5], "deeper_accept": [0.5]}),
     "lookup.enabled must be true or false"),
    (lambda d: d.update(lookup={"enabled": True, "first_accept": [0.5], "deeper_accept": [0.5]}),
     "lookup needs the early_stop section"),
    (lambda d: d.update(early_stop={"path": "early_stop", "skip_forward": "yes"}),
     "early_stop.skip_forward must be true or false"),
    (lambda d: d.update(early_stop={"path": "early_stop", "skip_prefill": 1}),
     "early_stop.skip_prefill must be true or false"),
    (lambda d: d.update(early_stop={"path": "early_stop", "skip_forward": False, "skip_prefill": True}),
     "skip_prefill skips the drafter's forward on prefill steps too, so it needs skip_forward"),
])
def test_bad_configs_are_named(mutation, message):
    data = json.loads(json.dumps(GOOD))
    mutation(data)
    with pytest.raises(SpecxConfigError) as err:
        SpecxConfig.from_dict(data)
    assert message in str(err.value)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(SpecxConfigError, match="is missing"):
        load_specx_config(tmp_path)
    (tmp_path / "specx_config.json").write_text("{not json")
    with pytest.raises(SpecxConfigError, match="not valid JSON"):
        load_specx_config(tmp_path)


def test_fuzz_never_crashes_with_other_errors():
    """Random structural mutations either parse or raise SpecxConfigError, never anything else."""
    rng = random.Random(0)
    values = [None, 0, -1, 1.5, "x", [], {}, True, 10**9, {"a": 1}]
    for _ in range(500):
        data = json.loads(json.dumps(GOOD))
        for _ in range(rng.randint(1, 3)):
            where = data if rng.random() < 0.6 else data["target"] if isinstance(data.get("target"), dict) else data
            key = rng.choice(list(where) + ["tree", "vocab_mode", "extra"])
            where[key] = rng.choice(values)
        try:
            SpecxConfig.from_dict(data)
        except SpecxConfigError:
            pass
