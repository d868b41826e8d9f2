"""Shared by the vLLM tree tests: the draft depth of the tree drafter fixture (tests/vllm/conftest.py)
and oracle trees built from plain decoding, whose chain tokens are always wrong and whose correct
continuation sits on side branches (node layout 1:w1, 2:c1, 3:w2 under c1, 4:c2 under c1, 5:c3 under c2)."""

K = 5


def _oracle_tree(ref: list[int], num_out: int, vocab: int) -> tuple[list[int], list[int]]:
    """The oracle tree after num_out tokens of plain output ref (empty near its end)."""
    nxt = ref[num_out:][:3]
    if len(nxt) < 3:
        return [], []
    c1, c2, c3 = nxt
    return [(c1 + 1) % vocab, c1, (c2 + 1) % vocab, c2, c3], [0, 0, 2, 2, 4]


def _oracle(plain_by_prompt: dict, vocab: int):
    def take_trees(ctl, runner, req_ids):
        ctl._trees = None
        trees = []
        for rid in req_ids:
            req = runner.requests[rid]
            ref = plain_by_prompt[tuple(req.prompt_token_ids)]
            trees.append(_oracle_tree(ref, len(req.output_token_ids), vocab))
        return trees

    return take_trees


def _by_prompt(target: str, prompts: list[str], plain: list[list[int]]) -> tuple[dict, int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target)
    return {tuple(tok(p)["input_ids"]): out for p, out in zip(prompts, plain)}, len(tok)


def install_oracle(monkeypatch, target: str, prompts: list[str], plain: list[list[int]]) -> None:
    """Replace drafted trees by oracle trees built from each prompt's plain greedy output."""
    from vllm_specx.vllm_adapter.draft_length import ChainStopController

    monkeypatch.setattr(ChainStopController, "take_trees", _oracle(*_by_prompt(target, prompts, plain)))


def install_v2_oracle(runner, target: str, prompts: list[str], plain: list[list[int]], attention: str = "torch"):
    """The same oracle under the V2 runner (a `generate_under_v2` setup, in its process): each request's
    prompt and output so far are read from V2's request states. attention: tree_step.ATTENTION_IMPL for
    the run ("triton": the GPU kernel, interpreted). Returns the undo."""
    from vllm_specx.vllm_adapter import tree_step
    from vllm_specx.vllm_adapter.draft_length import ChainStopController

    by_prompt, vocab = _by_prompt(target, prompts, plain)
    states = runner.req_states

    def take_trees(ctl, input_batch, req_ids):
        ctl._trees = None
        trees = []
        for rid, idx in zip(req_ids, input_batch.idx_mapping[: len(req_ids)].tolist()):
            n, p = int(states.total_len.gpu[idx]), int(states.prompt_len.np[idx])
            tokens = states.all_token_ids.gpu[idx, :n].tolist()
            trees.append(_oracle_tree(by_prompt[tuple(tokens[:p])], n - p, vocab))
        return trees

    original, impl = ChainStopController.take_trees, tree_step.ATTENTION_IMPL[0]
    ChainStopController.take_trees, tree_step.ATTENTION_IMPL[0] = take_trees, attention

    def undo():
        ChainStopController.take_trees, tree_step.ATTENTION_IMPL[0] = original, impl

    return undo
