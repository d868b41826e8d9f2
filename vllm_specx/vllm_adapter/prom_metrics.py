"""specx's own Prometheus metrics, beside vLLM's `vllm:spec_decode_*` counters.

They are counted where drafting happens (the engine-core / worker process). vLLM's API server shows
other processes' metrics on /metrics only in prometheus multiprocess mode (PROMETHEUS_MULTIPROC_DIR
set before the server starts): `vllm-specx serve` sets it to a fresh folder; with `vllm serve`, export
PROMETHEUS_MULTIPROC_DIR=<an empty folder> yourself. Offline (`LLM`) they are in the engine process's
default registry.

  specx:draft_steps_total                 engine steps in which specx chose the draft lengths
  specx:draft_tokens_kept_total           draft tokens sent to the target for verification
  specx:draft_tokens_max_total            draft tokens a fixed-K drafter would have sent
  specx:early_exits_total                 steps whose drafting loop ended before K (every request stopped)
  specx:skipped_steps_total               steps where the cost model said drafting does not pay
  specx:accepted_tokens_per_request_step  histogram: drafts accepted per request per verified step
  specx:tree_requests_total               request steps verified as PCT trees
  specx:tree_nodes_verified_total         draft nodes of those trees verified by the target
  specx:tree_nodes_accepted_total         draft nodes of those trees accepted
  specx:tree_expansions_total             drafter passes that drafted children under runner-up tokens
  specx:tree_runner_ups_expanded_total    runner-up tokens expanded by those passes
  specx:vocab_subset_rows_total           draft rows scored by the SpecVocab / fixed-vocabulary head
  specx:vocab_full_rows_total             draft rows a subset-vocabulary drafter sent to its full head
                                          (batches above vocab.max_batch)
  specx:drafter_rows_skipped_total        prefill rows whose drafter output was not computed (their KV
                                          was): the proposer never reads them
  specx:drafter_forwards_skipped_total    steps that did not pay and skipped the drafter's forward too
                                          (early_stop.skip_forward)
  specx:drafter_blind_requests_total      requests whose prompt a skipped forward left out of the drafter's
                                          KV cache: it drafts nothing for them (early_stop.skip_prefill)
  specx:lookup_chains_total               request steps that verified a prompt-lookup chain
  specx:drafter_chains_total              request steps that verified the drafter's tokens (chain or tree)
  specx:lookup_rows_not_searched_total    request steps whose prompt-lookup search was skipped (no chain
                                          of theirs could clear the step's node threshold)
"""

from __future__ import annotations


PREFIX = "specx:"


class SpecxMetrics:
    def __init__(self):
        from prometheus_client import Counter, Histogram

        def counter(name: str, doc: str):
            return Counter(PREFIX + name, doc)

        self.draft_steps = counter("draft_steps", "engine steps in which specx chose the draft lengths")
        self.tokens_kept = counter("draft_tokens_kept", "draft tokens sent to the target for verification")
        self.tokens_max = counter("draft_tokens_max", "draft tokens a fixed-K drafter would have sent")
        self.early_exits = counter("early_exits", "steps whose drafting loop ended before K")
        self.skipped_steps = counter("skipped_steps", "steps where the cost model said drafting does not pay")
        self.tree_requests = counter("tree_requests", "request steps verified as PCT trees")
        self.tree_nodes_verified = counter("tree_nodes_verified", "draft nodes of PCT trees verified by the target")
        self.tree_nodes_accepted = counter("tree_nodes_accepted", "draft nodes of PCT trees accepted")
        self.tree_expansions = counter("tree_expansions", "drafter passes that drafted children under runner-ups")
        self.tree_runner_ups_expanded = counter("tree_runner_ups_expanded", "runner-up tokens expanded")
        self.vocab_subset_rows = counter("vocab_subset_rows", "draft rows scored by the subset-vocabulary head")
        self.vocab_full_rows = counter("vocab_full_rows",
                                       "draft rows a subset-vocabulary drafter sent to its full head")
        self.drafter_rows_skipped = counter("drafter_rows_skipped",
                                            "prefill rows whose drafter output was not computed (their KV was)")
        self.forwards_skipped = counter("drafter_forwards_skipped",
                                        "steps that did not pay and skipped the drafter's forward too")
        self.blind_requests = counter("drafter_blind_requests",
                                      "requests whose prompt a skipped drafter forward left out: never drafted for")
        self.lookup_not_searched = counter("lookup_rows_not_searched",
                                           "request steps whose prompt-lookup search could not pay and was skipped")
        self.lookup_chains = counter("lookup_chains", "request steps that verified a prompt-lookup chain")
        self.drafter_chains = counter("drafter_chains",
                                      "request steps that verified the drafter's tokens (chain or tree)")
        self.accepted = Histogram(PREFIX + "accepted_tokens_per_request_step",
                                  "draft tokens accepted per request per verified step",
                                  buckets=[i + 0.5 for i in range(16)] + [float("inf")])


_METRICS: list[SpecxMetrics] = []


def specx_metrics() -> SpecxMetrics | None:
    """One set per process (prometheus refuses duplicate names); None without prometheus_client."""
    if not _METRICS:
        try:
            _METRICS.append(SpecxMetrics())
        except ImportError:
            return None
    return _METRICS[0]
