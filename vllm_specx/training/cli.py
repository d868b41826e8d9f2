"""`vllm-specx train`: target model -> EDD drafter checkpoint, in resumable stages.

  data    training prompts; the first --generate of them answered by the target through vLLM
          (greedy), the others paired with reference answers (Alpaca outputs, stdlib source)
  record  teacher-forced target pass: hidden state at the drafter layer + top-k distribution
  fit     KL training of the drafter (--drafter edd, or the eagle3 baseline) with the block mask
  export  speculators-format checkpoint + specx_config.json
  early-stop  MCSD decision model: examples from the drafter in --out (EDD, or with --drafter eagle3 an
          EAGLE-3 checkpoint: exported by `fit`, or another trainer's attached by `vllm-specx attach`, read
          at its own auxiliary layers) on recorded sequences, MLP vs confidence-only logistic (held-out
          AUC / ECE), saved beside the drafter (not in the default --stages; add it explicitly)
  vocab   SpecVocab projection (auxiliary loss, drafter frozen) + fixed reduced vocabulary (EDD only),
          saved beside the drafter; --vocab-mode picks the mode the checkpoint runs in (not in the
          default --stages)
  lookup  prompt-lookup accept table by matched n-gram length, fitted on the target's greedy responses
          (this work dir's and those beside --extra-records), enabling lookup candidates in the
          drafter's specx_config.json (needs its early-stop model; not in the default --stages)
Every stage skips work already on disk in --work-dir, so an interrupted run resumes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

HELP = "train an EDD drafter for a target model (data -> record -> fit -> export)"
STAGES = ("data", "record", "fit", "export", "early-stop", "vocab", "lookup")


def add_arguments(parser) -> None:
    parser.add_argument("--target", default="smollm2",
                        help="HF folder of the target, or 'smollm2' (default) or 'gemma3' (Gemma-3-270M base)")
    parser.add_argument("--work-dir", required=True, help="where data, records and training state live")
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    parser.add_argument("--stages", default="data,record,fit,export", help=f"comma list of {STAGES}")
    parser.add_argument("--generate", type=int, default=64, help="prompts answered by the target via vLLM")
    parser.add_argument("--num-alpaca", type=int, default=999)
    parser.add_argument("--num-code", type=int, default=300)
    parser.add_argument("--num-docs", type=int, default=0,
                        help="document-task prompts (summaries, answers from passages, translations, word "
                             "problems; see training/doc_tasks.py)")
    parser.add_argument("--extra-records", nargs="*", default=None,
                        help="record folders of earlier runs to train on as well; each is split into train / "
                             "validation exactly as in its own run, so with --init-from held-out stays held out")
    parser.add_argument("--init-from", default=None,
                        help="fit: start from this exported EDD drafter's weights (fine-tuning on new records)")
    parser.add_argument("--max-seq-len", type=int, default=384)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--topk", type=int, default=16)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--max-block", type=int, default=8,
                        help="longest drafting block seen in training (deepest draft depth + 1)")
    parser.add_argument("--num-speculative-tokens", type=int, default=5)
    parser.add_argument("--drafter", choices=("edd", "eagle3"), default="edd",
                        help="edd (specx's drafter) or eagle3 (the baseline, run by vLLM's own eagle3 method); "
                             "both train on the same records with the same batches and schedule")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-rank", type=int, default=64, help="vocab stage: rank of the SpecVocab projection")
    parser.add_argument("--vocab-candidates", type=int, default=2048,
                        help="vocab stage: candidates scored exactly per draft step")
    parser.add_argument("--fixed-vocab-size", type=int, default=32768, help="vocab stage: size of the fixed vocabulary")
    parser.add_argument("--vocab-steps", type=int, default=300, help="vocab stage: projection training steps")
    parser.add_argument("--vocab-mode", choices=("full", "fixed", "speculative"), default=None,
                        help="vocab stage: the head the checkpoint runs with (default: keep its vocab_mode)")
    parser.add_argument("--eval-files", nargs="*", default=None,
                        help="evaluation JSONL files whose prompts must never be trained on "
                             "(default: Spec-Bench and GSM8K from ../shared/data when present)")


def run(args) -> int:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from transformers import AutoConfig

    from vllm_specx.core.edd import default_arch_for_target
    from vllm_specx.training import data as D
    from vllm_specx.core.eagle3 import eagle3_arch_for_target
    from vllm_specx.training import fit as F
    from vllm_specx.training.export import eagle3_aux_layer_ids, export_eagle3, export_edd, target_signature

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise SystemExit(f"unknown stage(s) {bad}; choose from {STAGES}")
    if args.init_from and args.drafter != "edd":
        raise SystemExit("--init-from starts an EDD drafter from an exported one: use it with --drafter edd")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    from vllm_specx.models import NAMED_TARGETS, resolve_target

    target = resolve_target(args.target)
    if args.target not in NAMED_TARGETS and not (Path(target) / "config.json").exists():
        raise SystemExit(f"--target {target} has no config.json: give an HF model folder, 'smollm2' or 'gemma3'")
    target_cfg = AutoConfig.from_pretrained(target)
    arch = default_arch_for_target(target_cfg)
    # an EAGLE-3 drafter already in --out (exported, or another trainer's attached with `vllm-specx attach`)
    # is read at its own auxiliary layers
    aux_ids = _drafter_aux_ids(args.out) if args.drafter == "eagle3" else None
    aux_ids = aux_ids or eagle3_aux_layer_ids(target_cfg.num_hidden_layers)
    record_layers = sorted({arch.target_layer_id, *aux_ids})  # one recording serves EDD and EAGLE-3
    eval_files = [Path(f) for f in args.eval_files] if args.eval_files is not None else [
        Path.cwd().parent / "shared/data/spec_bench_question.jsonl", Path.cwd().parent / "shared/data/gsm8k_test.jsonl"]
    responses = [work / "responses_generated.jsonl", work / "responses_reference.jsonl"]

    if "data" in stages:
        alpaca = D.alpaca_pairs(work)[: args.num_alpaca]
        code = D.stdlib_code_pairs(args.num_code, args.seed)
        docs = []
        if args.num_docs:
            from vllm_specx.training.doc_tasks import doc_task_prompts

            docs = [(p, "") for p in doc_task_prompts(D.alpaca_rows(work), work, args.num_docs, args.seed)]
        from vllm_specx.eval_sets import eval_texts

        kept = set(D.drop_eval_overlap([p for p, _ in docs + alpaca + code], eval_files, eval_texts()))
        pairs = [pc for pc in docs + alpaca + code if pc[0] in kept]
        gen_prompts = [p for p, _ in pairs[: args.generate]]
        D.generate_responses(target, gen_prompts, responses[0], args.max_new_tokens, args.max_seq_len + args.max_new_tokens)
        D.reference_responses(target, pairs[args.generate :], responses[1], args.max_seq_len)
        (work / "data_manifest.json").write_text(json.dumps({
            "generated": len(gen_prompts), "reference": len(pairs) - len(gen_prompts),
            "sources": ["llamafactory alpaca_en_demo.json", "python stdlib functions"]
            + (["document tasks: pydoc_data topics, stdlib docstrings, Alpaca outputs, Sphinx catalogues"]
               if docs else []),
            "excluded_eval_files": [str(f) for f in eval_files],
            "excluded_eval_sets": ["spec_bench", "mt_bench", "humaneval"]}, indent=2))
    if "record" in stages:
        merged = work / "responses_all.jsonl"
        rows = []
        for f in responses:
            if f.exists():
                rows += [json.loads(line) for line in f.read_text().splitlines()]
        for r in rows:  # cap length: prompt + response <= max_seq_len
            r["response_ids"] = r["response_ids"][: max(0, args.max_seq_len - len(r["prompt_ids"]))]
        merged.write_text("".join(json.dumps(r) + "\n" for r in rows))
        D.record_target_states(target, merged, work / "records", record_layers, topk=args.topk)
    drafter = None
    if {"fit", "export", "early-stop", "vocab"} & set(stages):
        from safetensors import safe_open

        from vllm_specx.training.export import target_embedding_and_head

        with safe_open(str(Path(target) / "model.safetensors"), "pt") as f:
            embed, lm_head = target_embedding_and_head(f.get_tensor, f.keys())
            init = F.target_init_tensors(f.get_tensor, target_cfg.num_hidden_layers)
        layers = [arch.target_layer_id] if args.drafter == "edd" else aux_ids
        cfg = F.TrainConfig(epochs=args.epochs, lr=args.lr, batch_tokens=args.batch_tokens,
                            max_seq_len=args.max_seq_len, max_block=args.max_block, seed=args.seed)
        folders = [work / "records", *map(Path, args.extra_records or [])]
        sources = []
        for folder in folders:
            shards = sorted(folder.glob("shard_*.safetensors"))
            if not shards:
                raise SystemExit(f"{folder} holds no record shards: run the record stage first")
            sources.append(D.load_records(shards, layers))
        train_recs, val_recs, val_parts = F.split_record_sources(sources, cfg)
        val_by_source = dict(zip(map(str, folders), val_parts))
    if "fit" in stages or "export" in stages:
        if args.drafter == "edd":
            if args.init_from:  # fine-tune: every weight comes from the exported drafter
                from vllm_specx.training.export import load_edd

                drafter, _ = load_edd(args.init_from, embed, lm_head)
                if drafter.cfg != arch:
                    raise SystemExit(f"--init-from {args.init_from} has architecture {drafter.cfg}, this target "
                                     f"needs {arch}: train from scratch (drop --init-from)")
            else:
                drafter = F.build_edd(arch, embed, lm_head, train_recs, args.seed, target_init=init)
        else:
            drafter = F.build_eagle3(eagle3_arch_for_target(target_cfg, aux_ids), embed, lm_head, train_recs,
                                     args.seed, target_init=init)
        report = F.train_drafter(drafter, train_recs, val_recs, cfg, work, args.drafter)
        if len(val_by_source) > 1:
            report["held_out_by_records"] = {
                folder: F.evaluate_drafter(drafter, part, depth=cfg.max_block) for folder, part in val_by_source.items()}
        print(json.dumps({k: v for k, v in report.items() if k != "train"}, indent=2))
        export = export_edd if args.drafter == "edd" else export_eagle3
        training = {"report": report, "command": "vllm-specx train " + " ".join(_argv(args))}
        out = export(drafter, target_signature(target), args.out, args.num_speculative_tokens, training=training)
        print(f"exported {args.drafter} drafter to {out}")
    if "early-stop" in stages:
        from vllm_specx.training.early_stop_data import train_decision_model
        from vllm_specx.training.export import load_eagle3, load_edd

        if drafter is None and args.drafter == "edd":
            drafter, _ = load_edd(args.out, embed, lm_head)
        elif drafter is None:
            drafter = load_eagle3(args.out, embed, lm_head, target_cfg.num_hidden_layers)
        report = train_decision_model(drafter, train_recs, val_recs, args.num_speculative_tokens, Path(args.out),
                                      seed=args.seed)
        _record_command(args.out, "early_stop", args)
        print(json.dumps(report, indent=2))
    if "vocab" in stages:
        from vllm_specx.training.export import load_edd
        from vllm_specx.training.vocab_fit import attach_vocab, train_vocab_head

        if args.drafter != "edd":
            raise SystemExit("the vocab stage fits the vocabulary head of an EDD drafter: use --drafter edd")
        if drafter is None:
            drafter, _ = load_edd(args.out, embed, lm_head)
        report = train_vocab_head(
            drafter, train_recs, val_recs, Path(args.out), rank=args.vocab_rank, num_candidates=args.vocab_candidates,
            fixed_size=args.fixed_vocab_size, steps=args.vocab_steps, always_include=_eos_ids(target_cfg),
            seed=args.seed, command="vllm-specx train " + " ".join(_argv(args)))
        if args.vocab_mode is not None:
            from vllm_specx.checkpoint import load_specx_config

            attach_vocab(args.out, load_specx_config(args.out).vocab, mode=args.vocab_mode)
        print(json.dumps({k: v for k, v in report.items() if k != "loss_curve"}, indent=2))
    if "lookup" in stages:
        from vllm_specx.training.lookup_fit import fit_lookup

        report = fit_lookup(Path(args.out), [work, *[Path(f).parent for f in args.extra_records or []]],
                            command="vllm-specx train " + " ".join(_argv(args)))
        print(json.dumps(report, indent=2))
    return 0


def _record_command(out: str, section: str, args) -> None:
    """The stage's exact command beside its result in the drafter's specx_config.json."""
    from vllm_specx.checkpoint import SPECX_CONFIG_NAME, load_specx_config

    specx = load_specx_config(out)
    getattr(specx, section)["command"] = "vllm-specx train " + " ".join(_argv(args))
    (Path(out) / SPECX_CONFIG_NAME).write_text(json.dumps(specx.validate().to_dict(), indent=2))


def _drafter_aux_ids(folder: str) -> list[int] | None:
    """The auxiliary target layers an EAGLE-3 checkpoint in `folder` reads, or None (no checkpoint yet)."""
    path = Path(folder) / "config.json"
    return json.loads(path.read_text()).get("eagle_aux_hidden_state_layer_ids") if path.exists() else None


def _eos_ids(target_cfg) -> list[int]:
    eos = getattr(target_cfg, "eos_token_id", None)
    return [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]


def _argv(args) -> list[str]:
    skip = {"func", "command", "subcommand"}
    out = []
    for k, v in vars(args).items():
        if k in skip or v is None or callable(v):
            continue
        flag = "--" + k.replace("_", "-")
        out += [flag] + ([str(x) for x in v] if isinstance(v, list) else [str(v)])
    return out
