"""Learned early stop for speculative drafting (MCSD-style decision model).

After the drafter has produced the distribution for draft token ``d`` of a request, a
small model predicts P(token d is accepted by the target | tokens 0..d-1 were accepted).
Drafting continues while the *expected gain* of one more token is worth its cost:

    path_prob * accept_prob  >  node_threshold

* ``path_prob``: predicted probability that the whole path up to (excluding) token d is
  accepted, i.e. the running product of this model's ``accept_prob`` (1.0 at depth 0).
  Under chain verification token d adds exactly one accepted token iff 0..d are all
  accepted, so ``path_prob * accept_prob`` is its expected contribution.
* ``node_threshold``: marginal cost of drafting + verifying one more token divided by the
  time of one target step (from a cost model; grows with the batch size).

Everything here is engine-free: tensors in, tensors out, no vLLM imports.

Features per draft step (``FEATURE_NAMES``, in order):
    top1_prob      max draft probability                        (draft confidence)
    top2_prob      second largest draft probability
    margin         top1_prob - top2_prob
    entropy        entropy of the draft distribution, nats
    depth          0-based position of the token in the draft
    log_path_conf  log of the product of the draft's probabilities of the tokens already
                   drafted on this path (0.0 at depth 0), clamped at log(1e-12)
  optionally followed by ``hidden_proj_0..P-1``: the RMS-normalised draft hidden state
  times a fixed random projection [H, P] that is stored with the model.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from vllm_specx.core.metrics import expected_calibration_error, reliability_bins, roc_auc

FEATURE_NAMES: tuple[str, ...] = ("top1_prob", "top2_prob", "margin", "entropy", "depth", "log_path_conf")
FORMAT_NAME = "vllm_specx.early_stop"
FORMAT_VERSION = 1
WEIGHTS_FILE = "early_stop.safetensors"
CONFIG_FILE = "early_stop.json"
_MIN_PATH_CONF = 1e-12


# ----------------------------------------------------------------------------- features


def feature_names(hidden_proj_dim: int = 0) -> tuple[str, ...]:
    return FEATURE_NAMES + tuple(f"hidden_proj_{i}" for i in range(hidden_proj_dim))


def topk_and_entropy(
    logits: torch.Tensor,  # [B, V] draft logits, full vocab or a subset (-inf allowed)
    k: int = 2,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (top-k probs [B, k] sorted desc, entropy [B] in nats) of softmax(logits / T).

    With subset logits (speculative vocabulary) the distribution is the one renormalised
    over the subset, which is what the drafter samples from. If V < k the missing
    probabilities are 0.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return top_probs_and_entropy(torch.log_softmax(logits.float() / temperature, dim=-1), k)


def top_probs_and_entropy(logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logp [B, V] log-probabilities (as given: not renormalised) -> (top-k probs [B, k] sorted desc,
    zero-padded when V < k; -sum p log p [B] over the given entries)."""
    p = logp.exp()
    entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)  # [B]
    topk = p.topk(min(k, p.shape[-1]), dim=-1).values  # [B, min(k, V)]
    if topk.shape[-1] < k:
        topk = F.pad(topk, (0, k - topk.shape[-1]))
    return topk, entropy


def make_hidden_projection(hidden_size: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Fixed Gaussian projection [H, P]; entries ~ N(0, 1/H) so projected values are ~N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(hidden_size, dim, generator=g) / math.sqrt(hidden_size)


def draft_step_features(
    draft_hidden: torch.Tensor | None,  # [B, H] or None
    draft_probs_topk: torch.Tensor,  # [B, k] sorted desc, k >= 1
    entropy: torch.Tensor,  # [B]
    depth: torch.Tensor,  # [B] 0-based draft position
    path_confidence: torch.Tensor,  # [B] product of draft probs of tokens before this one
    hidden_proj: torch.Tensor | None = None,  # [H, P]; hidden features only when given
) -> torch.Tensor:  # [B, len(feature_names(P))] float32
    """Feature vector of one draft step; see the module docstring for the columns."""
    if draft_probs_topk.dim() != 2:
        raise ValueError(f"draft_probs_topk must be [B, k], got {tuple(draft_probs_topk.shape)}")
    topk = draft_probs_topk.float()
    top1 = topk[:, 0]
    top2 = topk[:, 1] if topk.shape[1] > 1 else torch.zeros_like(top1)
    log_path = path_confidence.float().clamp_min(_MIN_PATH_CONF).log()
    cols = [top1, top2, top1 - top2, entropy.float(), depth.float(), log_path]
    feats = torch.stack([c.to(top1.device) for c in cols], dim=-1)  # [B, 6]
    if hidden_proj is None:
        return feats
    if draft_hidden is None:
        raise ValueError("hidden_proj was given but draft_hidden is None")
    h = draft_hidden.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True).clamp_min(1e-12))  # RMS-normalise
    return torch.cat([feats, h @ hidden_proj.to(h)], dim=-1)  # [B, 6 + P]


# ----------------------------------------------------------------------------- labels


def acceptance_labels_greedy(
    draft_token: torch.Tensor,  # [N]
    target_argmax: torch.Tensor,  # [N]
) -> torch.Tensor:  # [N] float 0/1
    """Greedy verification accepts a draft token iff it equals the target's argmax."""
    if draft_token.shape != target_argmax.shape:
        raise ValueError(f"shape mismatch: {tuple(draft_token.shape)} vs {tuple(target_argmax.shape)}")
    return (draft_token == target_argmax).float()


def acceptance_labels_sampling(
    draft_token: torch.Tensor,  # [N]
    p_target_of_token: torch.Tensor,  # [N] p(token), or [N, V] full target probs
    q_draft_of_token: torch.Tensor,  # [N] q(token), or [N, V] full draft probs
) -> torch.Tensor:  # [N] float in [0, 1]
    """Soft label min(1, p/q): the acceptance probability of the drafted token under
    speculative sampling. Training with BCE on it estimates P(accept | features)."""

    def of_token(x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return x.gather(1, draft_token.long().unsqueeze(1)).squeeze(1)
        return x

    p, q = of_token(p_target_of_token).double(), of_token(q_draft_of_token).double()
    if p.shape != draft_token.shape or q.shape != draft_token.shape:
        raise ValueError(f"expected [N] probabilities, got p {tuple(p.shape)} q {tuple(q.shape)}")
    if bool((q <= 0).any()):
        raise ValueError("q_draft_of_token must be > 0 for a token that was drafted")
    return (p.clamp_min(0) / q).clamp(max=1.0).float()


# ----------------------------------------------------------------------------- models


class _AcceptModel(nn.Module):
    """Common part: feature names, optional hidden projection, predict_accept_prob."""

    kind = ""

    def __init__(self, names: tuple[str, ...] | list[str], hidden_proj: torch.Tensor | None):
        super().__init__()
        self.feature_names = tuple(names)
        n_proj = sum(n.startswith("hidden_proj_") for n in self.feature_names)
        if (hidden_proj.shape[1] if hidden_proj is not None else 0) != n_proj:
            raise ValueError(f"{n_proj} hidden_proj_* features but hidden_proj is "
                             f"{None if hidden_proj is None else tuple(hidden_proj.shape)}")
        self.register_buffer("hidden_proj", hidden_proj)  # [H, P] or None

    @property
    def num_features(self) -> int:
        return len(self.feature_names)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [B, F] -> [B] logits
        raise NotImplementedError

    @torch.no_grad()
    def predict_accept_prob(self, features: torch.Tensor) -> torch.Tensor:  # [B, F] -> [B]
        if features.shape[-1] != self.num_features:
            raise ValueError(f"expected {self.num_features} features, got {features.shape[-1]}")
        return torch.sigmoid(self(features.float()))

    def fit_normalization(self, features: torch.Tensor) -> None:  # [N, F]
        pass


class EarlyStopMLP(_AcceptModel):
    """Standardise -> Linear(F, hidden) -> ReLU -> Linear(hidden, 1)."""

    kind = "mlp"

    def __init__(self, names=FEATURE_NAMES, hidden: int = 32, hidden_proj: torch.Tensor | None = None):
        super().__init__(names, hidden_proj)
        n = self.num_features
        self.register_buffer("feat_mean", torch.zeros(n))
        self.register_buffer("feat_std", torch.ones(n))
        self.net = nn.Sequential(nn.Linear(n, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def fit_normalization(self, features: torch.Tensor) -> None:
        self.feat_mean.copy_(features.mean(0))
        self.feat_std.copy_(features.std(0, unbiased=False).clamp_min(1e-6))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = (features - self.feat_mean) / self.feat_std  # [B, F]
        return self.net(x).squeeze(-1)  # [B]


class ConfidenceLogistic(_AcceptModel):
    """Baseline: sigmoid(w * logit(top1_prob) + b). Initialised to w=1, b=0, i.e. trusting
    the draft confidence as is; training turns it into Platt-style recalibration."""

    kind = "logistic"

    def __init__(self, names=FEATURE_NAMES, hidden_proj: torch.Tensor | None = None):
        super().__init__(names, hidden_proj)
        if "top1_prob" not in self.feature_names:
            raise ValueError("ConfidenceLogistic needs a 'top1_prob' feature")
        self.col = self.feature_names.index("top1_prob")
        self.weight = nn.Parameter(torch.ones(()))
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        p = features[:, self.col].clamp(1e-6, 1 - 1e-6)  # [B]
        return self.weight * torch.logit(p) + self.bias  # [B]


MODEL_KINDS: dict[str, type[_AcceptModel]] = {"mlp": EarlyStopMLP, "logistic": ConfidenceLogistic}


# ----------------------------------------------------------------------------- training


def _split(n: int, val_fraction: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=g)
    n_val = int(round(n * val_fraction))
    return perm[n_val:], perm[:n_val]  # train idx, val idx


def evaluate_early_stop(model: _AcceptModel, features: torch.Tensor, labels: torch.Tensor) -> dict:
    """Held-out metrics. AUC thresholds soft labels at 0.5; ECE/Brier use them as is."""
    if features.shape[0] == 0:
        nan = float("nan")
        return {"auc": nan, "ece": nan, "brier": nan, "reliability": []}
    probs = model.predict_accept_prob(features)  # [N]
    y = labels.float()
    return {
        "auc": roc_auc(probs, y),
        "ece": expected_calibration_error(probs, y),
        "brier": float(((probs - y) ** 2).mean()),
        "reliability": reliability_bins(probs, y),
    }


@contextlib.contextmanager
def _single_thread():
    """Tiny tensors: intra-op threading only adds overhead (7x slower on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def train_early_stop(
    features: torch.Tensor,  # [N, F]
    labels: torch.Tensor,  # [N] 0/1 or soft in [0, 1]
    kind: str = "mlp",
    epochs: int = 30,
    lr: float = 3e-3,
    seed: int = 0,
    val_fraction: float = 0.2,
    batch_size: int = 256,
    names: tuple[str, ...] | None = None,  # defaults to feature_names(F - 6) with no projection
    hidden_proj: torch.Tensor | None = None,  # [H, P] used to build the hidden features
    weight_decay: float = 1e-4,
) -> tuple[_AcceptModel, dict]:
    """Adam on BCE-with-logits over mini-batches; deterministic for a given seed (on CPU).

    report = {auc, ece, brier, reliability} on the held-out split + {n_train, n_val,
    positive_rate (mean label over all N), kind}."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind must be one of {sorted(MODEL_KINDS)}, got {kind!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"need features [N, F] and labels [N], got {tuple(features.shape)}, {tuple(labels.shape)}")
    x, y = features.detach().float().cpu(), labels.detach().float().cpu()
    if names is None:
        names = feature_names(x.shape[1] - len(FEATURE_NAMES))
    if len(names) != x.shape[1]:
        raise ValueError(f"{len(names)} feature names for {x.shape[1]} feature columns")

    g = torch.Generator().manual_seed(seed)
    train_idx, val_idx = _split(x.shape[0], val_fraction, g)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MODEL_KINDS[kind](names, hidden_proj=hidden_proj)
    model.fit_normalization(x[train_idx])

    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    with _single_thread():
        for _ in range(epochs):
            order = train_idx[torch.randperm(train_idx.numel(), generator=g)]
            for batch in order.split(batch_size):
                loss = F.binary_cross_entropy_with_logits(model(x[batch]), y[batch])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        model.eval()
        report = evaluate_early_stop(model, x[val_idx], y[val_idx])
    report.update(n_train=int(train_idx.numel()), n_val=int(val_idx.numel()),
                  positive_rate=float(y.mean()) if y.numel() else float("nan"), kind=kind)
    return model, report


# ----------------------------------------------------------------------------- save / load


def save_early_stop(model: _AcceptModel, path_dir: str | Path) -> Path:
    """Writes <dir>/early_stop.safetensors and <dir>/early_stop.json."""
    from safetensors.torch import save_file

    path = Path(path_dir)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path / WEIGHTS_FILE))
    config = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "kind": model.kind,
              "feature_names": list(model.feature_names)}
    if isinstance(model, EarlyStopMLP):
        config["hidden"] = model.net[0].out_features
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return path


def _read_config(path: Path) -> dict:
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"early-stop config {path / CONFIG_FILE} is not valid JSON: {e}") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
        raise ValueError(f"{path / CONFIG_FILE} is not an early-stop config (format != {FORMAT_NAME!r})")
    if config.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path / CONFIG_FILE}: unsupported version {config.get('version')!r}, "
                         f"this build reads version {FORMAT_VERSION}")
    if config.get("kind") not in MODEL_KINDS:
        raise ValueError(f"{path / CONFIG_FILE}: unknown kind {config.get('kind')!r}")
    if not isinstance(config.get("feature_names"), list):
        raise ValueError(f"{path / CONFIG_FILE}: missing 'feature_names' list")
    return config


def load_early_stop(
    path_dir: str | Path,
    expected_feature_names: tuple[str, ...] | list[str] | None = None,
    device: str | torch.device = "cpu",
) -> _AcceptModel:
    """Loads a model written by save_early_stop, in eval mode.

    Raises FileNotFoundError for a missing directory/file and ValueError for a corrupt
    file, a weights/config mismatch, or feature names that differ from
    ``expected_feature_names`` (when given)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path_dir)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"early-stop model: {path / name} not found "
                                    f"(expected {CONFIG_FILE} + {WEIGHTS_FILE} written by save_early_stop)")
    config = _read_config(path)
    names = tuple(config["feature_names"])
    if expected_feature_names is not None and tuple(expected_feature_names) != names:
        raise ValueError(f"early-stop model {path} was trained on features {list(names)}, "
                         f"but the caller computes {list(expected_feature_names)}")
    try:
        tensors = load_file(str(path / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"early-stop weights {path / WEIGHTS_FILE} are corrupt: {e}") from e

    cls = MODEL_KINDS[config["kind"]]
    kwargs = {"hidden": int(config.get("hidden", 32))} if cls is EarlyStopMLP else {}
    model = cls(names, hidden_proj=tensors.get("hidden_proj"), **kwargs)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ValueError(f"early-stop weights {path / WEIGHTS_FILE} do not match config {CONFIG_FILE}: {e}") from e
    return model.to(device).eval()


# ----------------------------------------------------------------------------- stop rule


def continue_drafting(
    accept_prob: torch.Tensor,  # [B] predicted P(next token accepted | path accepted)
    path_prob: torch.Tensor,  # [B] predicted P(path so far accepted); 1.0 at depth 0
    node_threshold: torch.Tensor | float,  # [B] or scalar: cost of one token / target step
) -> torch.Tensor:  # [B] bool
    """Continue iff path_prob * accept_prob > node_threshold.

    A threshold <= 0 (free drafting) always continues; since the gain is <= 1, a
    threshold >= 1 always stops."""
    gain = path_prob * accept_prob.clamp(0.0, 1.0)
    thr = torch.as_tensor(node_threshold, dtype=gain.dtype, device=gain.device)
    return (gain > thr) | (thr <= 0)


def prune_branches(
    accept_prob: torch.Tensor,  # [B, W] per frontier node of a draft tree
    path_prob: torch.Tensor,  # [B, W] predicted P(path to the node's parent accepted)
    node_threshold: torch.Tensor | float,  # [B] or scalar
) -> torch.Tensor:  # [B, W] bool: keep (and expand) this node
    thr = torch.as_tensor(node_threshold, dtype=accept_prob.dtype, device=accept_prob.device)
    if thr.dim() == 1:
        thr = thr[:, None]  # [B, 1]
    return continue_drafting(accept_prob, path_prob, thr)


def branch_child_probs(
    child_conf: torch.Tensor,  # [..., c] draft probs of a branch node's children, best first; 0: not drafted
    accept_prob: torch.Tensor,  # [...] decision model's P(the best child is accepted | the node is)
) -> torch.Tensor:  # [..., c]
    """Acceptance estimates of the children of a tree-branch node whose draft step the decision model
    has read: its estimate replaces the best child's draft confidence, and the other children share the
    rest, 1 - accept_prob, in proportion to their draft probabilities (the target emits one token, so
    the events exclude each other). A child whose path estimate falls to the node threshold is not
    kept: the decision model stops the branch there, as it stops a chain."""
    p = accept_prob.float().clamp(0.0, 1.0)[..., None]  # [..., 1]
    conf = child_conf.float()
    others = conf[..., 1:]
    share = torch.maximum(1.0 - conf[..., :1], others.sum(-1, keepdim=True)).clamp_min(1e-12)
    out = torch.cat([p, others * (1.0 - p) / share], dim=-1)
    return torch.where(conf > 0, out, torch.zeros_like(out))


# ----------------------------------------------------------------------------- chain policy


class DraftLengthPolicy:
    """Per-request draft length for chain drafting, one engine step at a time.

        policy.begin(batch_size, node_threshold)   # node_threshold [B] (model policy only)
        for d in range(policy.max_k):
            feats = draft_step_features(...)         # [B, F] for draft token d
            keep = policy.step(feats)                # [B] bool: token d is in the draft
            if policy.done:
                break
        policy.num_tokens                            # [B] int64 in [0, max_k]

    A request that stops stays stopped. ``DraftLengthPolicy.fixed(K)`` (model=None) keeps
    exactly K tokens per request and ignores features, i.e. plain fixed-length drafting.
    """

    def __init__(self, max_k: int, model: _AcceptModel | None = None):
        if max_k < 0:
            raise ValueError(f"max_k must be >= 0, got {max_k}")
        self.max_k = max_k
        self.model = model
        self.begin(0)

    @classmethod
    def fixed(cls, k: int) -> "DraftLengthPolicy":
        return cls(k, model=None)

    def begin(self, batch_size: int, node_threshold: torch.Tensor | float | None = None,
              device: str | torch.device = "cpu") -> None:
        if self.model is not None and node_threshold is None and batch_size > 0:
            raise ValueError("a model-driven DraftLengthPolicy needs node_threshold")
        self.node_threshold = torch.as_tensor(0.0 if node_threshold is None else node_threshold,
                                              dtype=torch.float32, device=device)
        self.path_prob = torch.ones(batch_size, device=device)  # [B]
        self.num_tokens = torch.zeros(batch_size, dtype=torch.long, device=device)  # [B]
        self.active = torch.full((batch_size,), self.max_k > 0, dtype=torch.bool, device=device)  # [B]

    @property
    def done(self) -> bool:
        return not bool(self.active.any())

    def step(self, features: torch.Tensor | None = None,
             accept_prob: torch.Tensor | None = None) -> torch.Tensor:  # -> [B] bool
        """Decide on the current draft token of every request (features [B, F], or a
        precomputed accept_prob [B]). Returns which requests keep it."""
        if self.model is None:
            keep = self.active.clone()
        else:
            if accept_prob is None:
                if features is None:
                    raise ValueError("model-driven policy needs features or accept_prob")
                accept_prob = self.model.predict_accept_prob(features)
            accept_prob = accept_prob.to(self.path_prob)
            keep = self.active & continue_drafting(accept_prob, self.path_prob, self.node_threshold)
            self.path_prob = torch.where(keep, self.path_prob * accept_prob, self.path_prob)
        self.num_tokens += keep.long()
        self.active = keep & (self.num_tokens < self.max_k)
        return keep


class OnlineAcceptCalibration:
    """Per-request correction of the decision model from what the target actually accepted.

    The decision model sees only the drafter's state; a request whose drafts keep being rejected
    (a context the drafter does not know) should draft less next step even when the drafter looks
    confident. Per request we keep exponentially decayed sums of accepted tokens and of the tokens
    the model expected to be accepted (sum of raw path probabilities over the tokens kept), and scale
    the model's accept probability by (accepted + prior) / (expected + prior). Both sums decay every
    step, also on steps that drafted nothing, so a request that stopped drafting returns to scale 1
    and tries again (exponential back-off). Requests are keyed by id; ids absent from a step are
    dropped, so the table never outgrows the running batch.

    shared_decay (None: off) adds an engine-wide ratio, decayed over the steps that verified anything:
    requests then start from (and back off to) what the whole engine's drafts earned instead of 1. A
    short request sees too few of its own steps to learn that the model is over-confident on today's
    traffic; at large batches every token it wrongly keeps is paid for in verification.
    """

    def __init__(self, decay: float = 0.7, prior: float = 2.0, max_scale: float = 1.5,
                 shared_decay: float | None = None):
        if not 0.0 <= decay < 1.0 or prior <= 0.0:
            raise ValueError(f"decay must be in [0, 1) and prior > 0, got decay={decay}, prior={prior}")
        if shared_decay is not None and not 0.0 <= shared_decay < 1.0:
            raise ValueError(f"shared_decay must be in [0, 1) or None, got {shared_decay}")
        self.decay, self.prior, self.max_scale, self.shared_decay = decay, prior, max_scale, shared_decay
        self._sums: dict[str, tuple[float, float]] = {}  # req_id -> (accepted, expected)
        self._shared = (0.0, 0.0)  # engine-wide (accepted, expected), decayed per step with evidence
        # req_id -> scale since the last update: a step asks for the same scales several times (lookup's
        # search bound, preemption, choice), and they change only in `update`
        self._scale_of: dict[str, float] = {}

    def centre(self) -> float:
        """The scale of a request with no evidence of its own: 1, or the engine-wide ratio."""
        if self.shared_decay is None:
            return 1.0
        acc, exp = self._shared
        return min((acc + self.prior) / (exp + self.prior), self.max_scale)

    def scales(self, req_ids: list[str]) -> torch.Tensor:  # -> [B]
        missing = [r for r in req_ids if r not in self._scale_of]
        if missing:
            self._scale_of.update(zip(missing, self._compute_scales(missing)))
        return torch.tensor([self._scale_of[r] for r in req_ids], dtype=torch.float32)

    def _compute_scales(self, req_ids: list[str]) -> list[float]:
        centre = self.centre()
        out = []
        for r in req_ids:
            acc, exp = self._sums.get(r, (0.0, 0.0))
            out.append(min((acc + self.prior * centre) / (exp + self.prior), self.max_scale))
        return out

    def update(self, req_ids: list[str], accepted: list[int], expected: list[float]) -> None:
        """One verified step: per request, tokens accepted and tokens the model expected (0, 0 when
        the request drafted nothing)."""
        new = {}
        for r, a, e in zip(req_ids, accepted, expected):
            acc, exp = self._sums.get(r, (0.0, 0.0))
            new[r] = (acc * self.decay + a, exp * self.decay + e)
        self._sums, self._scale_of = new, {}
        if self.shared_decay is not None and sum(expected) > 0:
            acc, exp = self._shared
            self._shared = (acc * self.shared_decay + sum(accepted), exp * self.shared_decay + sum(expected))


class DraftingPayoff:
    """Whether a whole step of drafting pays at this batch size, from what recent drafting steps earned.

    The per-node decision (`DraftLengthPolicy`) weighs one more token against its marginal cost, but the
    drafter's first level runs for every request of the batch before any request can stop: at large
    batches that fixed cost is paid on every step even when almost every request then stops at depth 0.
    Drafting a step pays when the tokens it adds outweigh that cost:

        accepted per request  >  (draft level for all + verify of the kept tokens) / plain step
                                 = cost_ratio(batch_size, kept fraction)

    Per batch-size bucket (powers of two) we keep exponentially decayed means of accepted tokens per
    request and of the fraction of requests that kept a draft, over the steps that drafted. A bucket
    with no evidence starts from the nearest smaller bucket's estimate (a larger batch keeps fewer
    tokens at a higher cost, so what did not pay there rarely pays here), or drafts when there is none.
    A bucket that does not pay skips, but drafts one step in `explore_every` so that its estimate
    follows the drafter (and the traffic) back up; each exploring step that finds it still not paying
    doubles that interval, up to `max_explore_every` (at 64 in flight on 2 CPU cores an exploring step
    costs ~1/4 of a plain step, the drafter's head and vLLM's rejection sampler over 64 rows).
    """

    def __init__(self, cost_ratio, decay: float = 0.9, explore_every: int = 16, max_explore_every: int = 128):
        if not 0.0 <= decay < 1.0 or not 1 <= explore_every <= max_explore_every:
            raise ValueError(f"decay must be in [0, 1) and 1 <= explore_every <= max_explore_every, got "
                             f"{decay}, {explore_every}, {max_explore_every}")
        self.cost_ratio = cost_ratio  # (batch_size, kept_fraction) -> cost of a drafting step / plain step
        self.decay, self.explore_every, self.max_explore_every = decay, explore_every, max_explore_every
        self._buckets: dict[int, list[float]] = {}  # bucket -> [accepted per request, kept fraction]
        self._skipped: dict[int, int] = {}  # bucket -> steps skipped in a row
        self._interval: dict[int, int] = {}  # bucket -> skipped steps before the next exploring step

    @staticmethod
    def bucket(batch_size: int) -> int:
        return max(int(batch_size), 1).bit_length()

    def update(self, batch_size: int, accepted: int, kept: int) -> None:
        """A verified drafting step: `accepted` tokens over the batch, `kept` requests had drafts."""
        b = max(int(batch_size), 1)
        a, f = accepted / b, kept / b
        est = self._buckets.get(self.bucket(b))
        if est is None:
            self._buckets[self.bucket(b)] = [a, f]
        else:
            est[0] = self.decay * est[0] + (1 - self.decay) * a
            est[1] = self.decay * est[1] + (1 - self.decay) * f

    def estimate(self, batch_size: int) -> tuple[float, float] | None:
        est = self._buckets.get(self.bucket(batch_size))
        return None if est is None else (est[0], est[1])

    def pays(self, batch_size: int) -> bool:
        key = self.bucket(batch_size)
        est = self._buckets.get(key)
        if est is None:  # no evidence at this batch size: start from the nearest smaller one's
            below = [k for k in self._buckets if k < key]
            if below:
                est = self._buckets[key] = list(self._buckets[max(below)])
        if est is None or est[0] >= self.cost_ratio(batch_size, est[1]):
            self._skipped[key], self._interval[key] = 0, self.explore_every
            return True
        self._skipped[key] = self._skipped.get(key, 0) + 1
        interval = self._interval.get(key, self.explore_every)
        if self._skipped[key] >= interval:  # explore; if it still does not pay, wait twice as long
            self._skipped[key], self._interval[key] = 0, min(2 * interval, self.max_explore_every)
            return True
        return False
