"""Step-time cost model for cost-aware tree pruning (PCT), fitted from measurements.

One model per (machine, target, drafter), stored as JSON. For each measured batch size
(a "bucket") a piecewise-linear roofline fit in the total tokens in flight
T = batch_size * nodes_per_request and the context length c: the max of one or two planes

    t(T, c) = max_k (a_k + b_k*T + d_k*c + e_k*T*c)

(two planes = memory-bound, nearly flat in T, and compute-bound, linear in T; one plane is
kept when the second does not pay for its parameters by AIC). Between buckets, predictions
are interpolated linearly in batch size (the smallest bucket is used below its size,
linear extrapolation from the two largest above).

node_threshold: a node whose path probability is p is worth drafting iff
p * t_target(B, 1, c) > marginal draft + verify cost of one more node per request,
since one accepted token saves one plain target step. So the threshold is
(dt_verify + dt_draft) / t_target(B, 1, c). Once the target is compute-bound the verify
cost of an extra token per request is about a whole plain step, the threshold reaches 1,
and no node can pass (path probs are <= 1): speculation turns itself off.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

COST_MODEL_VERSION = 1
NUM_COEFS = 4  # a, b, d, e as above


class CostModelError(ValueError):
    """Malformed measurements or cost-model file."""


# ----------------------------------------------------------------------------- one fit
def _features(tokens: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """[P, 4] design matrix: 1, T, c, T*c."""
    return torch.stack([torch.ones_like(tokens), tokens, ctx, tokens * ctx], dim=1)


def _active_columns(X: torch.Tensor) -> list[int]:
    """Columns the points can identify: T only if T varies, c only if c varies, T*c if both."""
    vary_t = torch.unique(X[:, 1]).numel() >= 2
    vary_c = torch.unique(X[:, 2]).numel() >= 2
    return [0] + [1] * vary_t + [2] * vary_c + [3] * (vary_t and vary_c)


def _lstsq(X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[4] least-squares plane on the identifiable columns (scaled for conditioning; others 0)."""
    cols = _active_columns(X)
    Xa = X[:, cols]
    scale = Xa.abs().amax(0).clamp(min=1e-30)
    sol = torch.linalg.lstsq(Xa / scale, y[:, None]).solution[:, 0] / scale
    return torch.zeros(NUM_COEFS, dtype=X.dtype).index_copy_(0, torch.tensor(cols), sol)


def _fit_max_of_two(X: torch.Tensor, y: torch.Tensor, on0: torch.Tensor) -> torch.Tensor | None:
    """Convex fit max(plane_0, plane_1) by alternating assignment (Magnani & Boyd), starting
    from the split on0 [P] bool (points on plane 0). Returns [2, 4] planes or None."""
    planes = None
    for _ in range(20):
        if int(on0.sum()) < 2 or int((~on0).sum()) < 2:
            return planes
        planes = torch.stack([_lstsq(X[on0], y[on0]), _lstsq(X[~on0], y[~on0])])
        new_on0 = (X @ planes[0]) >= (X @ planes[1])
        if torch.equal(new_on0, on0):
            break
        on0 = new_on0
    return planes


def _fit_bucket(tokens: torch.Tensor, ctx: torch.Tensor, y: torch.Tensor) -> list[list[float]]:
    """One plane, or max of two (memory- vs compute-bound), whichever has the lower AIC."""
    uniq_t = torch.unique(tokens)
    if uniq_t.numel() < 2:
        raise CostModelError("each batch size needs measurements at >= 2 different node counts")
    X, n = _features(tokens, ctx), y.numel()

    def aic(planes: torch.Tensor) -> float:
        sse = float(((X @ planes.T).amax(1) - y).pow(2).sum())
        return n * math.log(sse / n + 1e-24) + 2 * int((planes != 0).sum())

    best = _lstsq(X, y)[None]
    best_aic = aic(best)
    for knee in uniq_t[:-1].tolist():  # initial split: memory-bound up to the knee
        planes = _fit_max_of_two(X, y, tokens <= knee)
        if planes is not None and aic(planes) < best_aic:
            best, best_aic = planes, aic(planes)
    return best.tolist()


@dataclass
class BucketedFit:
    """Time model: per measured batch size, the max of 1-2 planes over (1, T, c, T*c)."""

    batch_sizes: list[int]            # ascending
    planes: list[list[list[float]]]   # [buckets][1 or 2][4]

    @classmethod
    def fit(cls, points: list[tuple[int, float, float, float]]) -> "BucketedFit":
        """points: (batch_size, nodes_per_request, context_len, time_s)."""
        data = torch.tensor(points, dtype=torch.float64)
        sizes = sorted({int(p[0]) for p in points})
        planes = []
        for bs in sizes:
            rows = data[data[:, 0] == bs]
            try:
                planes.append(_fit_bucket(rows[:, 0] * rows[:, 1], rows[:, 2], rows[:, 3]))
            except CostModelError as e:
                raise CostModelError(f"batch size {bs}: {e}") from None
        return cls(sizes, planes)

    def _bucket(self, i: int, batch_size: float, nodes: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        X = _features((batch_size * nodes).flatten(), ctx.flatten())
        planes = torch.tensor(self.planes[i], dtype=torch.float64)  # [K, 4]
        return (X @ planes.T).amax(1).reshape(nodes.shape)

    def predict(self, batch_size: int, nodes_per_request, context_len=0.0):
        """Seconds per step; context_len may be a tensor (e.g. [B] per request)."""
        nodes = torch.as_tensor(nodes_per_request, dtype=torch.float64)
        ctx = torch.as_tensor(context_len, dtype=torch.float64)
        nodes, ctx = torch.broadcast_tensors(nodes, ctx)
        sizes = self.batch_sizes
        if len(sizes) == 1 or batch_size <= sizes[0]:
            return self._bucket(0, batch_size, nodes, ctx)
        hi = next((i for i, s in enumerate(sizes) if s >= batch_size), len(sizes) - 1)
        lo = hi - 1
        w = (batch_size - sizes[lo]) / (sizes[hi] - sizes[lo])  # > 1 extrapolates upward
        t_lo = self._bucket(lo, batch_size, nodes, ctx)
        t_hi = self._bucket(hi, batch_size, nodes, ctx)
        return t_lo + w * (t_hi - t_lo)


# ----------------------------------------------------------------------------- model
_TARGET_KEYS = ("batch_size", "nodes_per_request", "context_len", "time_s")
_DRAFT_KEYS = ("batch_size", "nodes_per_request", "time_s")


def _points(measurements: list[dict], kind: str, keys: tuple[str, ...]) -> list[tuple]:
    out = []
    for i, m in enumerate(measurements):
        if m.get("kind") not in ("target", "draft"):
            raise CostModelError(f"measurement {i}: 'kind' must be 'target' or 'draft', got {m.get('kind')!r}")
        if m["kind"] != kind:
            continue
        missing = [k for k in keys if k not in m]
        if missing:
            raise CostModelError(f"measurement {i} ({kind}): missing keys {missing}")
        if m["batch_size"] < 1 or m["nodes_per_request"] < 1 or m["time_s"] <= 0:
            raise CostModelError(f"measurement {i} ({kind}): need batch_size, nodes_per_request >= 1, time_s > 0")
        out.append((int(m["batch_size"]), float(m["nodes_per_request"]),
                    float(m.get("context_len", 0.0)), float(m["time_s"])))
    if not out:
        raise CostModelError(f"no '{kind}' measurements")
    return out


@dataclass
class CostModel:
    """Target verify-step and per-level draft-step times for one (machine, target, drafter)."""

    machine: str
    target: str
    drafter: str
    target_fit: BucketedFit  # t(batch, nodes per request incl. root, context)
    draft_fit: BucketedFit   # one draft level: t(batch, nodes drafted per request, context)
    version: int = COST_MODEL_VERSION

    @classmethod
    def fit(cls, measurements: list[dict], machine: str = "", target: str = "", drafter: str = "") -> "CostModel":
        """measurements: dicts with kind='target' (batch_size, nodes_per_request, context_len,
        time_s) or kind='draft' (batch_size, nodes_per_request, time_s, optional context_len)."""
        return cls(machine, target, drafter,
                   BucketedFit.fit(_points(measurements, "target", _TARGET_KEYS)),
                   BucketedFit.fit(_points(measurements, "draft", _DRAFT_KEYS)))

    def target_step_time(self, batch_size: int, nodes_per_request=1, context_len=0.0):
        """Seconds per verify step (float, or a tensor if an argument is a tensor)."""
        t = self.target_fit.predict(batch_size, nodes_per_request, context_len).clamp(min=1e-9)
        return _like_inputs(t, nodes_per_request, context_len)

    def draft_step_time(self, batch_size: int, nodes_per_request=1, context_len=0.0):
        """Seconds per draft level (float, or a tensor if an argument is a tensor)."""
        t = self.draft_fit.predict(batch_size, nodes_per_request, context_len).clamp(min=0.0)
        return _like_inputs(t, nodes_per_request, context_len)

    def node_threshold(self, batch_size: int, nodes_in_flight=1, context_len=0.0,
                       draft_nodes_per_level=None):
        """Marginal (draft + verify) cost of one more node per request / plain target step time.

        nodes_in_flight: tree nodes per request (incl. root) currently verified; context_len:
        scalar or [B] tensor (each request is costed as if the batch shared its context).
        Returns a float (a float64 tensor if an argument is a tensor); >= 1 means: draft nothing.
        """
        n = torch.as_tensor(nodes_in_flight, dtype=torch.float64)
        m = n if draft_nodes_per_level is None else torch.as_tensor(draft_nodes_per_level, dtype=torch.float64)
        verify = self.target_fit.predict(batch_size, n + 1, context_len) - self.target_fit.predict(batch_size, n, context_len)
        draft = self.draft_fit.predict(batch_size, m + 1, context_len) - self.draft_fit.predict(batch_size, m, context_len)
        base = self.target_fit.predict(batch_size, 1, context_len).clamp(min=1e-9)
        return _like_inputs((verify + draft).clamp(min=0.0) / base, nodes_in_flight, context_len)

    def first_token_threshold(self, batch_size: int, context_len=0.0) -> float:
        """Whole cost of speculating at all (verify 2 tokens instead of 1, plus drafting 1 token per
        request, which includes the drafter's fixed per-step work) / plain target step. >= 1: even a
        certainly accepted token does not pay at this batch size, so do not draft at all."""
        base = self.target_fit.predict(batch_size, 1, context_len).clamp(min=1e-9)
        extra = (self.target_fit.predict(batch_size, 2, context_len) - base
                 + self.draft_fit.predict(batch_size, 1, context_len))
        return float((extra.clamp(min=0.0) / base).max())

    # ------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "cost model") -> "CostModel":
        _require(d, ("version",), where)
        if d["version"] != COST_MODEL_VERSION:
            raise CostModelError(f"{where}: version {d['version']!r} is not supported "
                                 f"(expected {COST_MODEL_VERSION}); re-run the measurement")
        _require(d, ("machine", "target", "drafter", "target_fit", "draft_fit"), where)
        return cls(d["machine"], d["target"], d["drafter"],
                   _fit_from_dict(d["target_fit"], f"{where}: target_fit"),
                   _fit_from_dict(d["draft_fit"], f"{where}: draft_fit"))

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "CostModel":
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise CostModelError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise CostModelError(f"{path}: expected a JSON object")
        return cls.from_dict(d, where=str(path))


def _like_inputs(t: torch.Tensor, *args):
    return t if any(isinstance(a, torch.Tensor) for a in args) else float(t)


def _require(d: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise CostModelError(f"{where}: missing keys {missing}")


def _fit_from_dict(d: dict, where: str) -> BucketedFit:
    _require(d, ("batch_sizes", "planes"), where)
    sizes, planes = d["batch_sizes"], d["planes"]
    if not sizes or len(sizes) != len(planes):
        raise CostModelError(f"{where}: batch_sizes and planes must be non-empty and equally long")
    if any(b2 <= b1 for b1, b2 in zip(sizes, sizes[1:])) or sizes[0] < 1:
        raise CostModelError(f"{where}: batch_sizes must be positive and strictly ascending")
    if any(not p or any(len(c) != NUM_COEFS for c in p) for p in planes):
        raise CostModelError(f"{where}: each bucket needs >= 1 plane of {NUM_COEFS} numbers")
    return BucketedFit([int(s) for s in sizes], [[[float(x) for x in c] for c in p] for p in planes])


def cost_model_path(directory: str | Path, machine: str, target: str, drafter: str) -> Path:
    """Canonical file name for one (machine, target, drafter) triple."""
    slug = lambda s: re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_") or "unknown"  # noqa: E731
    return Path(directory) / f"cost__{slug(machine)}__{slug(target)}__{slug(drafter)}.json"
