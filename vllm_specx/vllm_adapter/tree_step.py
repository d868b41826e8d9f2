"""PCT tree verification inside vLLM's model runners: one target pass per tree.

Written for the V1 runner (the CPU build's) below; the V2 runner's hooks (the GPU build's default, run on
CPU by the tests) make the same four moves where V2 keeps the data, at the end of this module.

vLLM 0.32 verifies chains only. A request drafted as a tree reaches the scheduler as an ordinary draft
list, its nodes in BFS order (the scheduler only counts them, and a prefix of a BFS list is a tree);
its shape waits here, by request id, for the step that verifies it:

  1. `_prepare_inputs` (wrapped): node i (node 0 = the root, the token sampled last step) keeps the
     KV slot vLLM computed from consecutive positions, base + i; its RoPE position becomes
     base + depth(i). The step's trees are published in `_STEP`.
  2. attention (the backend's `forward`, wrapped: vLLM-CPU's on CPU, FlashAttention's and Triton
     attention's on GPUs, see tree_backends.py): during a tree step every request attends over the paged
     cache to its context plus those nodes that are its ancestors-or-self (a request without a tree gets
     the causal mask: a chain), through `core.tree_attention.tree_attention_paged` on CPU or the Triton
     kernel of `kernels/tree_attention.py` on GPUs. No CUDA graph may replay a tree step's attention
     (FULL decode graphs are refused at load; PIECEWISE graphs run attention eagerly).
  3. `_sample` (wrapped by sample_match.py, for every specx step): each request's drafts, a chain or its
     tree, are verified by sample-then-match (`core.sample_match`): at each node on the walk vLLM's own
     sampler draws the target's token as plain decoding would (every sampling parameter, the request's
     generator once per emitted token), and the child carrying it is accepted. Accepted nodes + the last
     draw; here (`record_tree_walk`, `move_accepted_kv`) their KV is copied to slots base+1..base+a in
     every layer.
  4. `propose_draft_token_ids` (wrapped): input ids, positions and hidden states rows are permuted so
     that the accepted path comes first. From there on vLLM (scheduler accounting, the EAGLE
     proposer) sees an ordinary chain step that accepted a drafts.

Under V1 every request but structured output may be drafted as a tree (`tree_eligible`); under V2 also
not requests with penalties, bad words or min_tokens (`v2_tree_eligible`): those are drafted and verified
as chains. Lossless either way: the walk accepts a node only if it carries the token the target drew
after its parent's path. Sync scheduling only
(vLLM-CPU always is); state lives in this module, per worker process.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import torch

from vllm_specx.core.tree import node_depth
from vllm_specx.core.tree_attention import tree_attention_paged
from vllm_specx.vllm_adapter import tree_backends
from vllm_specx.vllm_adapter.prom_metrics import specx_metrics


@dataclass
class _TreeRow:
    parents: torch.Tensor  # [n+1] int64, -1 at the root
    depth: torch.Tensor    # [n+1] int64
    tokens: torch.Tensor   # [n+1] int64 (root placeholder 0)
    qs: int                # first packed token of the request (its root)
    base: int              # root position
    path: list[int] = field(default_factory=list)  # accepted nodes, root first (after sampling)


@dataclass
class _Step:
    rows: dict[int, _TreeRow]  # batch index -> tree
    num_tokens: int
    attending: bool = True
    _mask_key: tuple | None = None
    _mask: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)
    caches: list = field(default_factory=list)  # (K, V) views of every cache attended through tree masks
    _attention_args: dict = field(default_factory=dict)  # id(attn metadata) -> `attention_args`

    def tree_mask(self, n_q: list[int]) -> torch.Tensor:
        """[B, N, N] ancestor-or-self masks; causal (a chain) for requests without a tree."""
        key = tuple(n_q)
        if self._mask_key != key:
            n = max(n_q)
            mask = torch.ones(n, n, dtype=torch.bool).tril().repeat(len(n_q), 1, 1)
            for i, row in self.rows.items():
                m = row.parents.numel()
                anc = _ancestor_or_self(row.parents)
                mask[i, :m, :m] = anc
            self._mask_key, self._mask = key, mask
        return self._mask

    def attention_args(self, attn_metadata, device: torch.device):
        """(query_start_loc [B+1] int64, context lens [B], block table [B, max_blocks], ancestor masks
        [B, N, N]) of this step's attention metadata, computed once per step (one host sync), not per layer."""
        key = id(attn_metadata)
        if key not in self._attention_args:
            num_reqs = attn_metadata.seq_lens.shape[0]
            qsl = attn_metadata.query_start_loc.long()[: num_reqs + 1]
            n_q = qsl[1:] - qsl[:-1]
            ctx = attn_metadata.seq_lens.long() - n_q
            mask = self.tree_mask(n_q.tolist()).to(device)
            self._attention_args[key] = (qsl, ctx, attn_metadata.block_table[:num_reqs], mask)
        return self._attention_args[key]


# Tree attention: "torch" (core.tree_attention, the CPU implementation) or "triton" (kernels/tree_attention.py:
# compiled on CUDA tensors, interpreted on CPU ones when TRITON_INTERPRET=1; the tests run it inside the
# V2 runner's tree steps this way). SPECX_TREE_ATTENTION sets it at import; tests may set it directly.
ATTENTION_IMPL = [os.environ.get("SPECX_TREE_ATTENTION", "torch")]
_PENDING: dict[str, tuple[list[int], list[int]]] = {}  # req_id -> (node tokens, parents), nodes 1..n
_STEP: list[_Step | None] = [None]
STATS = {"tree_steps": 0, "tree_requests": 0, "sampled_tree_requests": 0, "nodes_verified": 0, "nodes_accepted": 0,
         "triton_attention_calls": 0}


def _ancestor_or_self(parents: torch.Tensor) -> torch.Tensor:
    from vllm_specx.core.tree import ancestor_mask

    return ancestor_mask(parents[None], torch.ones_like(parents, dtype=torch.bool)[None])[0]


def register_tree(req_id: str, tokens: list[int], parents: list[int]) -> None:
    """A tree was handed to the scheduler as req_id's draft list (node k+1 = tokens[k], parent parents[k])."""
    _PENDING[req_id] = (list(tokens), list(parents))


def is_chain(parents: list[int]) -> bool:
    return all(p == i for i, p in enumerate(parents))


def trees_supported(runner) -> bool:
    """Whether this runner verifies trees (`trees_verifiable` with its parallel config and scheduling)."""
    return trees_verifiable(getattr(runner, "parallel_config", None), getattr(runner, "use_async_scheduling", False))


def trees_verifiable(parallel_config, async_scheduling: bool = False) -> bool:
    """Tree steps need a CPU or CUDA platform (with an attention backend specx wraps:
    `tree_attention_problem`, checked when the drafter loads), synchronous scheduling and a single worker:
    with tensor/pipeline parallelism only the output rank takes the draft lists, so the other ranks would
    not know the tree shape (not built yet: those deployments draft chains)."""
    from vllm.platforms import current_platform

    par = parallel_config
    single = par is None or (par.tensor_parallel_size == 1 and par.pipeline_parallel_size == 1)
    return (current_platform.is_cpu() or current_platform.is_cuda()) and not async_scheduling and single


def tree_eligible(sampling_params, has_structured_output: bool = False) -> bool:
    """V1 (sample-then-match verification, sample_match.py): every request but structured output (its
    grammar masks the logits of a chain's positions, not of a tree's nodes)."""
    sp = sampling_params
    return sp is not None and not has_structured_output and getattr(sp, "structured_outputs", None) is None


def v2_tree_eligible(sampling_params) -> bool:
    """V2: V2's sampler reads the rows before a logits row as that row's context (penalties, bad words,
    min_tokens), which for a tree node are not its ancestors: requests with any of those are drafted as
    chains; every other request may be a tree (see `tree_eligible`)."""
    sp = sampling_params
    return (tree_eligible(sp) and not sp.bad_words_token_ids and not sp.min_tokens and sp.presence_penalty == 0.0
            and sp.frequency_penalty == 0.0 and sp.repetition_penalty == 1.0)


# ------------------------------------------------------------------------------------------ hooks
def _tree_row(tree: tuple[list[int], list[int]] | None, drafts: list[int], qs: int,
              positions: torch.Tensor) -> _TreeRow | None:
    """The row of a request whose scheduled drafts (drafts, packed from query row qs: the root, then the
    nodes) are the tree it registered; its nodes' RoPE positions become root + depth in positions (KV
    slots stay root + i: vLLM computed them from consecutive positions). None: not that tree (or only its
    chain part was scheduled), which vLLM verifies as the chain it is."""
    if tree is None or not drafts:
        return None
    tokens, parents = tree
    m = len(drafts)
    if tokens[:m] != list(drafts) or is_chain(parents[:m]):
        return None
    par = torch.tensor([-1] + parents[:m], dtype=torch.long)
    depth = node_depth(par[None])[0]
    base = int(positions[qs])
    positions[qs + 1: qs + 1 + m] = (base + depth[1:]).to(positions.dtype)
    return _TreeRow(par, depth, torch.tensor([0] + list(drafts)), qs, base)


def _take_pending() -> dict:
    pending = dict(_PENDING)
    _PENDING.clear()  # trees not verified in this step are stale
    return pending


def _wrap_prepare_inputs(orig):
    @functools.wraps(orig)
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        out = orig(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        _STEP[0] = None
        if not _PENDING:
            return out
        pending, spec, qsl = _take_pending(), scheduler_output.scheduled_spec_decode_tokens, self.query_start_loc.cpu
        rows = {}
        for i, rid in enumerate(self.input_batch.req_ids):
            row = _tree_row(pending.get(rid), spec.get(rid) or [], int(qsl[i]), self.positions)
            if row is not None:
                rows[i] = row
        if rows:
            _STEP[0] = _Step(rows, int(scheduler_output.total_num_scheduled_tokens))
        return out

    _prepare_inputs.__specx_tree__ = True
    return _prepare_inputs


def _wrap_attention_forward(orig, kv_views):
    """An attention backend's `forward(layer, query, key, value, kv_cache, attn_metadata, output)`: during a
    tree step every request attends over its paged cache through its ancestor-or-self mask (a request
    without a tree: the causal mask). kv_views(impl, layer, kv_cache) -> the cache's K and V as
    [num_blocks, block_size, Hkv, D] views. The step's K/V are in the cache already: vLLM writes them
    before forward in every wrapped backend (forward_includes_kv_cache_update is False, checked at load)."""

    @functools.wraps(orig)
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        step = _STEP[0]
        if step is None or not step.attending or attn_metadata is None or \
                attn_metadata.num_actual_tokens != step.num_tokens:
            return orig(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        t = attn_metadata.num_actual_tokens  # (plain attention: every layer checked at load, tree_attention_problem)
        key_cache, value_cache = kv_views(self, layer, kv_cache)
        qsl, ctx, block_table, mask = step.attention_args(attn_metadata, query.device)
        q = query[:t].view(t, -1, key_cache.shape[-1])
        out = _attend(q, qsl, key_cache, value_cache, block_table, ctx, mask, self.scale)
        output[:t].view(t, -1).copy_(out.reshape(t, -1))
        step.stats.update(block_table=block_table, block_size=key_cache.shape[1])
        step.caches.append((key_cache, value_cache))  # the target's layers, for the accepted path's KV move
        return output

    forward.__specx_tree__ = True
    return forward


def _attend(q, qsl, key_cache, value_cache, block_table, ctx, mask, scale) -> torch.Tensor:
    """The Triton kernel on GPUs (and on CPU when ATTENTION_IMPL says so: interpreted); else the torch code."""
    if q.is_cuda or ATTENTION_IMPL[0] == "triton":
        from vllm_specx.kernels.tree_attention import tree_attention_triton

        STATS["triton_attention_calls"] += 1
        return tree_attention_triton(q, qsl, key_cache, value_cache, block_table, ctx, mask, scale)
    return tree_attention_paged(q, qsl, key_cache, value_cache, block_table, ctx, mask, scale)


def _check_attended(step: _Step) -> None:
    if "block_table" not in step.stats:  # never verify a tree that was attended as a chain
        raise RuntimeError("vllm-specx: a tree step ran without specx's tree attention (an attention backend "
                           "specx does not wrap, or a CUDA graph replayed it); set SPECX_TREE=0")


def tree_step_to_verify(has_drafts: bool) -> _Step | None:
    """Called by V1's sampling hook (sample_match._wrap_sample) when the step's logits are ready: the tree
    step to verify (None: none), its attention checked to have run through the tree masks; attention
    leaves tree mode either way."""
    step = _STEP[0]
    if step is None:
        return None
    step.attending = False
    if not has_drafts:
        _STEP[0] = None
        return None
    _check_attended(step)
    STATS["tree_steps"] += 1
    return step


def record_tree_walk(row: _TreeRow, res, sampled_row: torch.Tensor, sampled: bool) -> int:
    """A V1 tree request's verified walk (res: a one-row VerifyResult): `_accept`, counted as a sampled
    tree request when the request samples (temperature > 0). -> tokens emitted."""
    if sampled:
        STATS["sampled_tree_requests"] += 1
    return _accept(row, res, sampled_row)


def move_accepted_kv(step: _Step) -> None:
    """After the walks of a V1 tree step: every accepted node's K/V to slot base + depth (`_move_path_kv`)."""
    _move_path_kv(step)


def _accept(row: _TreeRow, res, sampled_row: torch.Tensor) -> int:
    """Record a request's walk: its accepted path (row.path, root first) and, in sampled_row [K + 1]
    (-1 padded), the accepted draft tokens + the bonus token. -> tokens emitted."""
    n = row.parents.numel()
    a = int(res.num_accepted[0])  # accepted nodes including the root
    row.path = res.accepted_path[0, :a].tolist()
    emitted = res.emitted_tokens(row.tokens[None])[0, :a]  # a-1 accepted draft tokens + the bonus
    sampled_row.fill_(-1)
    sampled_row[:a] = emitted.to(sampled_row.dtype)
    STATS["tree_requests"] += 1
    STATS["nodes_verified"] += n - 1
    STATS["nodes_accepted"] += a - 1
    metrics = specx_metrics()
    if metrics is not None:
        metrics.tree_requests.inc()
        metrics.tree_nodes_verified.inc(n - 1)
        metrics.tree_nodes_accepted.inc(a - 1)
    return a


def _move_path_kv(step: _Step) -> None:
    """Copy each accepted node's K/V from slot base + node to slot base + depth, in every layer that
    attended through the tree masks (the target's)."""
    block_table, bs = step.stats.get("block_table"), step.stats.get("block_size")
    src, dst = [], []
    for i, row in step.rows.items():
        for d, node in enumerate(row.path):
            if node != d:
                src.append((i, row.base + node))
                dst.append((i, row.base + d))
    if not src or block_table is None:
        return

    def slots(pairs):
        req = torch.tensor([r for r, _ in pairs], device=block_table.device)
        pos = torch.tensor([p for _, p in pairs], device=block_table.device)
        return block_table[req, pos // bs].long(), pos % bs

    (sb, so), (db, do) = slots(src), slots(dst)
    layers = {k_view.data_ptr(): (k_view, v_view) for k_view, v_view in step.caches}  # each layer once
    for k_view, v_view in layers.values():
        if k_view.shape[1] != bs:
            continue
        k, v = k_view[sb, so].clone(), v_view[sb, so].clone()  # gather all first: sources never clobbered
        k_view[db, do] = k
        v_view[db, do] = v


def _accepted_path_first(step: _Step | None, tensors) -> None:
    """Permute each tree request's query rows (root, nodes) so that its accepted path comes first, in
    every tensor given (token ids, positions, hidden states): the drafter then sees the chain step that
    accepted that path, which is what vLLM's proposer and scheduler accounting assume."""
    if step is None:
        return
    tensors = _distinct(tensors)
    for row in step.rows.values():
        n = row.parents.numel()
        on_path = set(row.path)
        order = row.path + [j for j in range(n) if j not in on_path]
        src = torch.tensor(order) + row.qs
        dst = torch.arange(n) + row.qs
        for t in tensors:
            t[dst.to(t.device)] = t[src.to(t.device)].clone()


def _wrap_propose_draft_token_ids(orig):
    @functools.wraps(orig)
    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, sampling_metadata, hidden_states,
                                sample_hidden_states, aux_hidden_states, *args, **kwargs):
        step, _STEP[0] = _STEP[0], None
        _accepted_path_first(step, [self.input_ids.gpu, self.input_ids.cpu, self.positions, hidden_states,
                                    *(aux_hidden_states or [])])
        return orig(self, scheduler_output, sampled_token_ids, sampling_metadata, hidden_states,
                    sample_hidden_states, aux_hidden_states, *args, **kwargs)

    propose_draft_token_ids.__specx_tree__ = True
    return propose_draft_token_ids


def _distinct(tensors):
    seen, out = set(), []
    for t in tensors:
        if t is not None and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            out.append(t)
    return out


# ------------------------------------------------------------------------------ V2 runner hooks
# The same four moves under vLLM's V2 model runner (the GPU build's default; on CPU, tests/vllm/v2_cpu.py):
# V2 prepares the step's inputs on the device from its request states, verifies in its own rejection
# sampler (wrapped by sample_match.py: sample-then-match with V2's own position-keyed draws) and hands the
# speculator the whole input batch, so the hooks sit there.
_V2_TREE_OK: dict[str, bool] = {}  # req_id -> may be drafted as a tree (`v2_tree_eligible`)


def v2_tree_ok(req_id: str) -> bool:
    return _V2_TREE_OK.get(req_id, False)


def _wrap_v2_add_requests(orig):
    @functools.wraps(orig)
    def add_requests(self, scheduler_output, *args, **kwargs):
        for rid in scheduler_output.finished_req_ids:
            _V2_TREE_OK.pop(rid, None)
        for new in scheduler_output.scheduled_new_reqs:
            sp = new.sampling_params
            _V2_TREE_OK[new.req_id] = v2_tree_eligible(sp)
        return orig(self, scheduler_output, *args, **kwargs)

    add_requests.__specx_tree__ = True
    return add_requests


def _wrap_v2_prepare_attn(orig):
    """After V2's slot mappings (from consecutive positions: node i's KV slot is root + i), tree nodes'
    positions in input_batch.positions (the model's RoPE input) become root + depth."""

    @functools.wraps(orig)
    def prepare_attn(self, input_batch, *args, **kwargs):
        out = orig(self, input_batch, *args, **kwargs)
        _STEP[0] = None
        if not _PENDING or input_batch.num_draft_tokens_per_req is None:
            _PENDING.clear()
            return out
        pending, qsl = _take_pending(), input_batch.query_start_loc_np
        ids = input_batch.input_ids
        rows = {}
        for i, rid in enumerate(input_batch.req_ids[: input_batch.num_reqs]):
            m, qs = int(input_batch.num_draft_tokens_per_req[i]), int(qsl[i])
            if rid not in pending or m == 0 or int(qsl[i + 1]) - qs != m + 1:
                continue  # (a decode row is the root + its m drafts)
            row = _tree_row(pending[rid], ids[qs + 1: qs + 1 + m].tolist(), qs, input_batch.positions)
            if row is not None:
                rows[i] = row
        if rows:
            _STEP[0] = _Step(rows, int(input_batch.num_tokens))
        return out

    prepare_attn.__specx_tree__ = True
    return prepare_attn


def _wrap_v2_propose(orig):
    """V2's speculator reads the target's input ids, positions and hidden states (and the EAGLE-3 aux
    hidden states) from the rows of input_batch: accepted path first, as under V1."""

    @functools.wraps(orig)
    def propose(self, input_batch, attn_metadata, slot_mappings, last_hidden_states, aux_hidden_states,
                *args, **kwargs):
        step, _STEP[0] = _STEP[0], None
        if not kwargs.get("dummy_run", False):
            _accepted_path_first(step, [input_batch.input_ids, input_batch.positions, last_hidden_states,
                                        *(aux_hidden_states or [])])
        return orig(self, input_batch, attn_metadata, slot_mappings, last_hidden_states, aux_hidden_states,
                    *args, **kwargs)

    propose.__specx_tree__ = True
    return propose


def install_tree_hooks(runner: str = "v1", platform: str | None = None) -> None:
    """Idempotent. Inert unless a tree was registered (`register_tree`). runner: "v1" or "v2"; platform:
    whose attention backends to wrap (tree_backends.TREE_BACKENDS; default: this one's)."""
    import importlib

    from vllm_specx.vllm_adapter.compat import INTERNALS, check_vllm_internals

    platform = platform or tree_backends._platform()
    backends = tree_backends.TREE_BACKENDS.get(platform, ())
    # the load-time check covers the runner's entries; the attention backends' are checked here
    check_vllm_internals(tuple(e for e in INTERNALS if e.runner == "trees"
                               and e.path.split(":")[0] in {m for m, _, _ in backends}))
    if runner == "v2":
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2Runner
        from vllm.v1.worker.gpu.spec_decode.target_dependent_ar.speculator import TargetDependentARSpeculator

        # (V2 verifies tree steps in sample_match's rejection-sampler hook, installed with every specx drafter)
        hooks = [(V2Runner, "add_requests", _wrap_v2_add_requests),
                 (V2Runner, "prepare_attn", _wrap_v2_prepare_attn),
                 (TargetDependentARSpeculator, "propose", _wrap_v2_propose)]
    else:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        # (V1 verifies tree steps in sample_match's `_sample` hook, installed with every specx drafter)
        hooks = [(GPUModelRunner, "_prepare_inputs", _wrap_prepare_inputs),
                 (GPUModelRunner, "propose_draft_token_ids", _wrap_propose_draft_token_ids)]
    for module, name, views in backends:
        hooks.append((getattr(importlib.import_module(module), name), "forward",
                      functools.partial(_wrap_attention_forward, kv_views=views)))
    for owner, name, wrap in hooks:
        if not getattr(getattr(owner, name), "__specx_tree__", False):
            setattr(owner, name, wrap(getattr(owner, name)))
