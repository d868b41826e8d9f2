"""Bad drafters fail at startup with a message that names the problem and the fix."""


import pytest

from vllm_specx.testing import make_llm


def _start_error(target, drafter) -> str:
    with pytest.raises(Exception) as err:
        make_llm(target, {"method": "eagle3", "model": drafter, "num_speculative_tokens": 3}, max_model_len=256)
    # vLLM may wrap the worker's exception; the message chain must carry ours
    text, e = "", err.value
    while e is not None:
        text += f"{e}\n"
        e = e.__cause__ or e.__context__
    return text


def test_edd_drafter_for_another_target_is_refused(tmp_path):
    from vllm_specx.models import tiny_llama_path
    from vllm_specx.training.export import random_edd_checkpoint

    small = tiny_llama_path()
    wide = tiny_llama_path(hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=256)
    drafter = random_edd_checkpoint(small, tmp_path / "edd_small")
    text = _start_error(str(wide), str(drafter))
    assert "does not match the served model" in text and "vllm-specx train" in text, text[-2000:]


def test_truncated_edd_checkpoint_is_refused(tiny_target, tmp_path):
    from vllm_specx.training.export import random_edd_checkpoint

    drafter = random_edd_checkpoint(tiny_target, tmp_path / "edd")
    weights = drafter / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    text = _start_error(tiny_target, str(drafter))
    assert "safetensors" in text.lower() or "corrupt" in text.lower() or "truncated" in text.lower(), text[-2000:]


def test_missing_checkpoint_folder(tiny_target, tmp_path):
    text = _start_error(tiny_target, str(tmp_path / "does-not-exist"))
    assert "does-not-exist" in text, text[-2000:]
