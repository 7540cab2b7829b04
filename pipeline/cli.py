"""`logitforge` command line: cache-teacher, generate-teacher, rollout, distill, onpolicy,
prune, align, evaluate, demo, demo-xtok, demo-codecs, demo-onpolicy, inspect, push, pull."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

DEFAULT_CONFIG = "configs/cache-teacher.yaml"


def _overrides(args: argparse.Namespace, **keys: str) -> list[str]:
    """The `--set` overrides, then one per CLI flag given (flag name -> config key)."""
    overrides = list(args.set or [])
    for flag, key in keys.items():
        value = getattr(args, flag)
        if value:
            overrides.append(f"{key}={'true' if value is True else value}")
    return overrides


def _write_json(path: str | None, data: object) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2) + "\n")


def _cache_teacher(args: argparse.Namespace) -> int:
    from pipeline.config import CacheTeacherConfig, RolloutConfig, load_config
    from pipeline.execute import run_cache_teacher

    overrides = _overrides(
        args,
        output="output.path",
        scheduler="cluster.scheduler",
        n_workers="cluster.n_workers",
        overwrite="output.overwrite",
    )
    model = RolloutConfig if args.command == "rollout" else CacheTeacherConfig
    cfg = load_config(args.config, overrides, model)
    if args.command == "generate-teacher" and cfg.generation is None:
        raise ValueError(f"{args.config} has no `generation:` section; generate-teacher needs one")
    summary = run_cache_teacher(cfg, log=lambda msg: print(msg, flush=True), verify=args.verify)
    print(summary.render(), flush=True)
    _write_json(args.summary_json, summary.as_dict())
    return 0


def _distill(args: argparse.Namespace) -> int:
    from pipeline.config import DistillConfig, load_config
    from pipeline.distill import run_distill

    overrides = _overrides(args, output="train.output_dir", overwrite="overwrite")
    cfg = load_config(args.config, overrides, DistillConfig)
    summary = run_distill(cfg, log=lambda msg: print(msg, flush=True))
    _write_json(args.summary_json, summary)
    return 0


def _onpolicy(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.onpolicy import OnPolicyConfig, run_onpolicy

    overrides = _overrides(
        args, output="train.output_dir", scheduler="cluster.scheduler", overwrite="overwrite"
    )
    cfg = load_config(args.config, overrides, OnPolicyConfig)
    summary = run_onpolicy(cfg, log=lambda msg: print(msg, flush=True))
    _write_json(args.summary_json, summary)
    return 0


def _prune(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.prune import PruneConfig, run_prune

    cfg = load_config(args.config, _overrides(args, output="output"), PruneConfig)
    record = run_prune(cfg, log=lambda msg: print(msg, flush=True))
    _write_json(args.summary_json, record)
    return 0


def _align(args: argparse.Namespace) -> int:
    from pipeline.distill import check_alignment, teacher_aligner
    from stages.train.loader import open_sources
    from stages.train.student import load_tokenizer

    sources = open_sources(args.cache)
    aligner = teacher_aligner(sources, load_tokenizer(args.student_tokenizer), args.include_prompt)
    report = check_alignment(aligner, sources, args.shards, lambda msg: print(msg, flush=True))
    _write_json(args.summary_json, report)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from pipeline.config import apply_overrides, load_yaml
    from stages.evaluate import EvalOptions, evaluate_checkpoints, render_table

    data = load_yaml(args.config) if args.config else {}
    if args.data:
        data["data"] = args.data
    opts = EvalOptions.model_validate(apply_overrides(data, list(args.set or [])))
    results = evaluate_checkpoints(args.model, opts, log=lambda msg: print(msg, flush=True))
    print(render_table(results), flush=True)
    _write_json(args.output_json, results)
    return 0


def _build_teacher(args: argparse.Namespace) -> int:
    from pipeline.demo.build import main as build_main

    return build_main(args.extra)


def _demo(args: argparse.Namespace) -> int:
    """`demo`, `demo-xtok` or `demo-codecs`: which one is set on the subcommand (``demo``)."""
    from pipeline.demo.run import main as demo_main

    return demo_main(args.extra, demo=args.demo)


def _demo_onpolicy(args: argparse.Namespace) -> int:
    from pipeline.demo.onpolicy import main as demo_main

    return demo_main(args.extra)


def _inspect(args: argparse.Namespace) -> int:
    from storage.reader import ShardSet

    shard_set = ShardSet.open(args.path)
    print(shard_set.metadata.model_dump_json(indent=2))
    paths = shard_set.shard_paths()
    print(f"{len(paths)} complete shard(s)")
    return 0


def _push(args: argparse.Namespace) -> int:
    from pipeline.hub import push_shard_set

    result = push_shard_set(
        args.dir,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        allow_partial=args.allow_partial,
        log=lambda msg: print(msg, flush=True),
    )
    print(f"pushed {len(result.files)} files to {result.repo_id}: {result.commit_url}", flush=True)
    _write_json(args.summary_json, result.as_dict())
    return 0


def _pull(args: argparse.Namespace) -> int:
    from pipeline.hub import pull_shard_set

    report = pull_shard_set(
        args.repo_id,
        args.dir,
        revision=args.revision,
        allow_partial=args.allow_partial,
        log=lambda msg: print(msg, flush=True),
    )
    _write_json(
        args.summary_json,
        {"shards": report.plan.num_shards, "complete": len(report.complete), "rows": report.rows},
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="logitforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    for name, help_text, default in (
        (
            "cache-teacher",
            "cache a teacher's top-k logprobs into a Parquet shard set",
            DEFAULT_CONFIG,
        ),
        (
            "generate-teacher",
            "have the teacher generate completions, stored with their top-k logprobs",
            "configs/generate-teacher.yaml",
        ),
        (
            "rollout",
            "have a student checkpoint sample completions (on-policy data) into a shard set",
            "configs/rollout.yaml",
        ),
    ):
        cache = sub.add_parser(name, help=help_text)
        cache.add_argument("--config", default=default, help="YAML config")
        cache.add_argument(
            "--set", action="append", metavar="KEY=VALUE", help="override, e.g. teacher.k=32"
        )
        cache.add_argument("--output", help="output folder or fsspec URL (output.path)")
        cache.add_argument("--scheduler", help="address of a running Dask scheduler")
        cache.add_argument("--n-workers", type=int, help="LocalCluster worker processes")
        cache.add_argument(
            "--overwrite", action="store_true", help="replace a shard set made from another config"
        )
        cache.add_argument(
            "--verify",
            action="store_true",
            help="also re-hash every done shard (sha256, as Dask tasks) before resuming; by "
            "default a rerun checks completion records and sizes only",
        )
        cache.add_argument("--summary-json", help="also write the summary as JSON here")
        cache.set_defaults(func=_cache_teacher)

    distill = sub.add_parser("distill", help="train a student from cached teacher logits")
    distill.add_argument("--config", default="configs/distill.yaml", help="YAML config")
    distill.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override, e.g. loss.temperature=2"
    )
    distill.add_argument("--output", help="train.output_dir")
    distill.add_argument(
        "--overwrite", action="store_true", help="replace a run made with another config"
    )
    distill.add_argument("--summary-json", help="also write the summary as JSON here")
    distill.set_defaults(func=_distill)

    onpolicy = sub.add_parser(
        "onpolicy", help="rounds of student rollouts, teacher scoring and training"
    )
    onpolicy.add_argument("--config", default="configs/onpolicy.yaml", help="YAML config")
    onpolicy.add_argument("--set", action="append", metavar="KEY=VALUE", help="override")
    onpolicy.add_argument("--output", help="train.output_dir (the run's root)")
    onpolicy.add_argument("--scheduler", help="address of a running Dask scheduler")
    onpolicy.add_argument(
        "--overwrite", action="store_true", help="replace a run made with another config"
    )
    onpolicy.add_argument("--summary-json", help="also write the summary as JSON here")
    onpolicy.set_defaults(func=_onpolicy)

    prune = sub.add_parser(
        "prune", help="cut a student from a checkpoint: whole layers and MLP channels"
    )
    prune.add_argument("--config", default="configs/smollm2/prune.yaml", help="YAML config")
    prune.add_argument("--set", action="append", metavar="KEY=VALUE", help="override")
    prune.add_argument("--output", help="where the pruned checkpoint goes (output)")
    prune.add_argument("--summary-json", help="also write the record as JSON here")
    prune.set_defaults(func=_prune)

    align = sub.add_parser(
        "align",
        help="check how a cache aligns to another tokenizer (rows kept, dropped, span shapes, "
        "vocabulary map) before distilling into it",
    )
    align.add_argument("--cache", action="append", required=True, help="shard set (repeatable)")
    align.add_argument("--student-tokenizer", required=True, help="path or hub id")
    align.add_argument("--shards", type=int, help="align only the first N shards of each cache")
    align.add_argument("--include-prompt", action="store_true", help="train prompt spans too")
    align.add_argument("--summary-json", help="write the report here")
    align.set_defaults(func=_align)

    evaluate = sub.add_parser(
        "evaluate", help="held-out accuracy (vLLM), perplexity and KL to the teacher"
    )
    evaluate.add_argument(
        "--model", action="append", required=True, help="checkpoint folder (repeat for more)"
    )
    evaluate.add_argument("--data", help="held-out teacher shard set (the `data` option)")
    evaluate.add_argument("--config", help="YAML with evaluate options")
    evaluate.add_argument("--set", action="append", metavar="KEY=VALUE", help="override")
    evaluate.add_argument("--output-json", help="write the results here")
    evaluate.set_defaults(func=_evaluate)

    build = sub.add_parser(
        "build-teacher",
        help="build the embedded arithmetic teacher (options: see build-teacher --help)",
        add_help=False,  # --help and every option belong to pipeline.demo.build
    )
    build.set_defaults(func=_build_teacher, passthrough=True)

    demo = sub.add_parser(
        "demo",
        help="the whole story on the embedded task (options: see demo --help)",
        add_help=False,
    )
    demo.set_defaults(func=_demo, demo="distill", passthrough=True)

    demo_xtok = sub.add_parser(
        "demo-xtok",
        help="cross-tokenizer rows: a student with another tokenizer from the same cache",
        add_help=False,
    )
    demo_xtok.set_defaults(func=_demo, demo="xtok", passthrough=True)

    demo_codecs = sub.add_parser(
        "demo-codecs",
        help="codec rows: the same student from exact, compact and sampled caches",
        add_help=False,
    )
    demo_codecs.set_defaults(func=_demo, demo="codecs", passthrough=True)

    demo_onpolicy = sub.add_parser(
        "demo-onpolicy",
        help="on-policy rounds vs off-policy at equal teacher budget (see demo-onpolicy --help)",
        add_help=False,
    )
    demo_onpolicy.set_defaults(func=_demo_onpolicy, passthrough=True)

    inspect = sub.add_parser("inspect", help="print a shard set's metadata")
    inspect.add_argument("path")
    inspect.set_defaults(func=_inspect)

    push = sub.add_parser(
        "push",
        help="upload a complete shard set (card, shards, .logitforge bookkeeping) to a Hub "
        "dataset repo; token from HF_TOKEN or `hf auth login`; rerun to resume",
    )
    push.add_argument("dir", help="local shard set folder")
    push.add_argument("repo_id", help="dataset repo, owner/name")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--revision", help="branch to push to (created if missing)")
    push.add_argument(
        "--allow-partial",
        action="store_true",
        help="push the complete shards of an unfinished set (default: refuse)",
    )
    push.add_argument("--summary-json", help="also write the result as JSON here")
    push.set_defaults(func=_push)

    pull = sub.add_parser(
        "pull", help="download a Hub dataset repo into a folder and verify it as a shard set"
    )
    pull.add_argument("repo_id", help="dataset repo, owner/name")
    pull.add_argument("dir", help="local folder to download into")
    pull.add_argument("--revision", help="branch, tag or commit")
    pull.add_argument(
        "--allow-partial",
        action="store_true",
        help="accept a set with incomplete shards (they are reported, not read)",
    )
    pull.add_argument("--summary-json", help="also write the result as JSON here")
    pull.set_defaults(func=_pull)
    return parser


VERBOSE_ENV = "LOGITFORGE_VERBOSE"
# What a default run silences in the driver and in every process it starts (Dask workers and
# vLLM's engine processes inherit the environment): vLLM's warnings about its own CPU setup
# (Triton, libiomp, model runner), deprecation warnings inside dependencies, torch's NUMA
# binding notice, transformers' notices while planning. Errors still surface everywhere.
_QUIET_ENV = {
    "VLLM_LOGGING_LEVEL": "ERROR",
    "DASK_LOGGING__DISTRIBUTED": "error",
    "TORCH_CPP_LOG_LEVEL": "ERROR",
    "TRANSFORMERS_VERBOSITY": "error",
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning,ignore::UserWarning",
}


def quiet_engines(verbose: bool = False) -> None:
    """Keep a run's output to logitforge's progress and summary, unless ``verbose``.

    Set before vLLM, Dask and torch are imported; variables the user set still win.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
        return
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    import warnings

    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `--verbose` anywhere on the line (passthrough commands such as `demo` included): every
    # dependency's logs and warnings, as they come.
    verbose = "--verbose" in argv
    argv = [a for a in argv if a != "--verbose"]
    parser = build_parser()
    parser.add_argument("--verbose", action="store_true", help="show every dependency's logs")
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    quiet_engines(verbose)
    logging.basicConfig(level=os.environ.get("LOGITFORGE_LOG_LEVEL", "WARNING"))
    from pydantic import ValidationError

    from pipeline.hub import HubError
    from stages.prompts import InputError
    from stages.prune import PruneError
    from stages.train.loader import SourceError
    from storage.manifest import PlanMismatchError

    try:
        return args.func(args)
    except (
        HubError,
        InputError,
        PlanMismatchError,
        PruneError,
        SourceError,
        ValidationError,
        FileNotFoundError,
        ValueError,
    ) as e:
        print(f"logitforge: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
