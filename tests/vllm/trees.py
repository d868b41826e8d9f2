"""Shared by the vLLM tree tests: the draft depth of the tree drafter fixture (tests/vllm/conftest.py)
and oracle trees built from plain decoding, whose chain tokens are always wrong and whose correct
continuation sits on side branches (node layout 1:w1, 2:c1, 3:w2 under c1, 4:c2 under c1, 5:c3 under c2)."""

K = 5


def _oracle(plain_by_prompt: dict, vocab: int):
    def take_trees(ctl, runner, req_ids):
        ctl._trees = None
        trees = []
        for rid in req_ids:
            req = runner.requests[rid]
            ref = plain_by_prompt[tuple(req.prompt_token_ids)]
            nxt = ref[len(req.output_token_ids):][:3]
            if len(nxt) < 3:
                trees.append(([], []))
                continue
            c1, c2, c3 = nxt
            trees.append(([(c1 + 1) % vocab, c1, (c2 + 1) % vocab, c2, c3], [0, 0, 2, 2, 4]))
        return trees

    return take_trees


def install_oracle(monkeypatch, target: str, prompts: list[str], plain: list[list[int]]) -> None:
    """Replace drafted trees by oracle trees built from each prompt's plain greedy output."""
    from transformers import AutoTokenizer

    from vllm_specx.vllm_adapter.draft_length import ChainStopController

    tok = AutoTokenizer.from_pretrained(target)
    by_prompt = {tuple(tok(p)["input_ids"]): out for p, out in zip(prompts, plain)}
    monkeypatch.setattr(ChainStopController, "take_trees", _oracle(by_prompt, len(tok)))
