"""`make demo-onpolicy`: on-policy distillation against off-policy at equal teacher budget.

Every step is a real stage on real data, and every step resumes.

1. Build the embedded teacher and the demo's caches (shared with `make demo`).
2. Per seed, a short SFT start (`onpolicy-init`: hard labels on the ground-truth cache): the
   point on-policy methods start from, as in GKD and the Thinking Machines recipe.
3. From that start, per seed:
   - `onpolicy-rkl`: rounds of student rollouts scored by the teacher, per-token reverse KL;
   - `gkd-1.0`: the same rounds, GKD's generalized JSD(beta) on the teacher's top-k;
   - `gkd-0.5`: half the batches from the rounds, half from the cached ground truth;
   - `soft-kd-budget`: the control: forward KL on a cache of as many teacher-scored tokens
     as the on-policy runs score, for the same number of steps.
   All on one Dask cluster, whose worker keeps the teacher engine and one policy engine warm
   for every run (the policy's weights are swapped in per round).
4. Evaluate every checkpoint on the held-out set; add the rows to `results.json` (rows of
   other demos are kept), rewrite `results.md` and `accuracy.png`.

    python -m pipeline.demo.onpolicy [--out artifacts/demo] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.demo.build import DEFAULT_TEACHER_DIR, build_teacher, summary_line
from pipeline.demo.run import (
    REPO_ROOT,
    DemoSpec,
    Log,
    make_caches,
    publish,
    teacher_row,
    train_section,
)


@dataclass(frozen=True)
class OnPolicyMethod:
    name: str
    loss: dict[str, Any]
    onpolicy_fraction: float
    about: str


METHODS = (
    OnPolicyMethod(
        "onpolicy-rkl",
        {"kind": "sampled_rkl"},
        1.0,
        "on-policy rounds, per-token reverse KL on the sampled tokens",
    ),
    OnPolicyMethod(
        "gkd-1.0",
        {"kind": "jsd", "beta": 0.5},
        1.0,
        "GKD lambda=1: on-policy rounds only, JSD(beta=0.5) on the top-64",
    ),
    OnPolicyMethod(
        "gkd-0.5",
        {"kind": "jsd", "beta": 0.5},
        0.5,
        "GKD lambda=0.5: half on-policy, half cached ground truth, JSD(beta=0.5)",
    ),
)


@dataclass
class OnPolicySpec:
    """The experiment; printed with the results."""

    base: DemoSpec
    init_steps: int = 600
    rounds: int = 10
    prompts_per_round: int = 512
    steps_per_round: int = 16
    batch_size: int = 64
    lr: float = 2e-4
    max_tokens: int = 10

    def to_dict(self) -> dict[str, Any]:
        return {
            "init_steps": self.init_steps,
            "rounds": self.rounds,
            "prompts_per_round": self.prompts_per_round,
            "steps_per_round": self.steps_per_round,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "max_tokens": self.max_tokens,
            "seeds": list(self.base.seeds),
        }


def train_init(spec: OnPolicySpec, caches: dict[str, Path], seed: int, log: Log) -> str:
    """The SFT start of one seed: hard labels on the ground-truth cache."""
    from pipeline.config import DistillConfig
    from pipeline.distill import run_distill

    out = spec.base.out / "students" / "onpolicy-init" / f"seed{seed}"
    cfg = DistillConfig.model_validate(
        {
            "student": {"build": spec.base.student},
            "data": {"sources": [str(caches["train"])], "batch_size": spec.base.batch_size},
            "loss": {"kind": "ce"},
            "overwrite": True,
            "train": train_section(
                out, seed, spec.init_steps, spec.base.lr, spec.base.warmup_steps
            ),
        }
    )
    summary = run_distill(cfg, log=lambda _: None)
    log(f"[demo-onpolicy] SFT start seed {seed}: {summary['train_seconds']:.0f} s")
    return str(out)


def budget_cache(
    spec: OnPolicySpec, rows: int, client: Any, log: Log
) -> tuple[Path, dict[str, int]]:
    """A cache of the first ``rows`` training prompts (the off-policy control's budget), and
    its rows and teacher tokens."""
    from pipeline.config import CacheTeacherConfig
    from pipeline.demo.run import _cache_config
    from pipeline.execute import run_cache_teacher

    train_rows = spec.base.out / "data" / "train.jsonl"
    out = spec.base.out / "cache" / "onpolicy-budget" / f"rows{rows}"
    cfg = _cache_config(spec.base, train_rows, out, generation=False)
    cfg["input"]["limit"] = rows
    summary = run_cache_teacher(
        CacheTeacherConfig.model_validate(cfg), client=client, log=lambda _: None
    )
    log(f"[demo-onpolicy] budget cache: {summary.rows:,} rows, {summary.tokens:,} tokens")
    return out, {"rows": summary.rows, "tokens": summary.tokens}


def run_method(
    spec: OnPolicySpec,
    method: OnPolicyMethod,
    init: str,
    seed: int,
    caches: dict[str, Path],
    client: Any,
) -> dict[str, Any]:
    from pipeline.onpolicy import OnPolicyConfig, run_onpolicy

    out = spec.base.out / "students" / method.name / f"seed{seed}"
    cfg = OnPolicyConfig.model_validate(
        {
            "input": {"path": str(spec.base.out / "data" / "train.jsonl")},
            "teacher": {
                "model": str(REPO_ROOT / DEFAULT_TEACHER_DIR),
                "k": spec.base.k,
                "dtype": "float32",
                "kv_cache_gib": 0.5,
            },
            "student": {"model": init},
            "policy": {"kv_cache_gib": 0.25},
            "generation": {"temperature": 1.0, "max_tokens": spec.max_tokens, "seed": seed},
            "onpolicy": {
                "rounds": spec.rounds,
                "prompts_per_round": spec.prompts_per_round,
                "batch_size": spec.batch_size,
                "onpolicy_fraction": method.onpolicy_fraction,
                "offpolicy": [] if method.onpolicy_fraction == 1 else [str(caches["train"])],
                "shuffle_seed": seed,
            },
            "loss": method.loss,
            "train": train_section(out, seed, spec.steps_per_round, spec.lr, 0),
            "rows_per_shard": spec.prompts_per_round,
            "overwrite": True,
        }
    )
    return run_onpolicy(cfg, client=client, log=lambda _: None)


def run_control(spec: OnPolicySpec, init: str, seed: int, cache: Path) -> dict[str, Any]:
    """Forward KL on the budget cache from the same start, for as many steps."""
    from pipeline.config import DistillConfig
    from pipeline.distill import run_distill

    out = spec.base.out / "students" / "soft-kd-budget" / f"seed{seed}"
    steps = spec.rounds * spec.steps_per_round
    cfg = DistillConfig.model_validate(
        {
            "student": {"model": init},
            "data": {"sources": [str(cache)], "batch_size": spec.batch_size},
            "loss": {"kind": "forward_kl"},
            "overwrite": True,
            "train": train_section(out, seed, steps, spec.lr, 0),
        }
    )
    return run_distill(cfg, log=lambda _: None)


def _row(
    name: str,
    about: str,
    evals: list[dict],
    init_acc: float | None,
    teacher_acc: float,
    **extra: Any,
) -> dict[str, Any]:
    accs = [e["accuracy"] for e in evals]
    mean = statistics.fmean(accs)
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    gap = None
    if init_acc is not None and teacher_acc != init_acc:
        gap = (mean - init_acc) / (teacher_acc - init_acc)
    return {
        "method": name,
        "about": about,
        "accuracy_mean": mean,
        "accuracy_std": std,
        "seeds": [e["seed"] for e in evals],
        "accuracies": accs,
        "gap_recovered": gap,
        "gap_baseline": "onpolicy-init",
        "perplexity": statistics.fmean(e["perplexity"] for e in evals),
        "kl_to_teacher": statistics.fmean(e["kl_to_teacher"] for e in evals),
        **extra,
    }


def run_demo(spec: OnPolicySpec, log: Log = print) -> dict[str, Any]:
    from pipeline.config import ClusterOptions
    from pipeline.execute import dask_client
    from stages.evaluate import EvalOptions, evaluate_checkpoints

    started = time.perf_counter()
    base = spec.base
    base.out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    record = build_teacher(DEFAULT_TEACHER_DIR, log_every=100)
    log(f"[demo-onpolicy] teacher: {summary_line(record, DEFAULT_TEACHER_DIR)}")
    caches = make_caches(base, record["build_fingerprint"], log)
    timings["teacher_and_caches_s"] = time.perf_counter() - t

    t = time.perf_counter()
    inits = {seed: train_init(spec, caches, seed, log) for seed in base.seeds}
    timings["init_s"] = time.perf_counter() - t

    runs: dict[str, dict[int, dict[str, Any]]] = {}
    t = time.perf_counter()
    with dask_client(ClusterOptions(), log) as client:
        total = len(METHODS) * len(base.seeds)
        for i, (method, seed) in enumerate(((m, s) for m in METHODS for s in base.seeds), start=1):
            summary = run_method(spec, method, inits[seed], seed, caches, client)
            per_round = statistics.fmean(x["timings_s"]["round"] for x in summary["rounds"])
            log(
                f"[demo-onpolicy] {i}/{total}: {method.name} seed {seed}: "
                f"{summary['teacher_tokens']:,} teacher tokens, {per_round:.1f} s/round"
            )
            runs.setdefault(method.name, {})[seed] = summary
        # As many ground-truth rows as the rounds sampled: a row is a prompt, its answer and
        # EOS either way, so the teacher scores about as many tokens (both are reported).
        budget, budget_meta = budget_cache(spec, spec.rounds * spec.prompts_per_round, client, log)
    timings["onpolicy_s"] = time.perf_counter() - t

    t = time.perf_counter()
    controls = {seed: run_control(spec, inits[seed], seed, budget) for seed in base.seeds}
    timings["control_s"] = time.perf_counter() - t
    log("[demo-onpolicy] soft-kd-budget students trained")

    t = time.perf_counter()
    checkpoints = [("onpolicy-init", s, inits[s]) for s in base.seeds]
    checkpoints += [
        (name, s, summary["final_student"])
        for name, by in runs.items()
        for s, summary in by.items()
    ]
    checkpoints += [("soft-kd-budget", s, c["output_dir"]) for s, c in controls.items()]
    teacher_path = str(REPO_ROOT / DEFAULT_TEACHER_DIR)
    log(f"[demo-onpolicy] evaluating the teacher and {len(checkpoints)} students")
    results = evaluate_checkpoints(
        [teacher_path] + [p for _, _, p in checkpoints],
        EvalOptions(data=str(caches["heldout"]), threads=2),
        log=lambda msg: log(f"[demo-onpolicy] {msg.strip()}"),
    )
    timings["evaluate_s"] = time.perf_counter() - t
    teacher = results[0]
    evals: dict[str, list[dict]] = {}
    for (name, seed, _), result in zip(checkpoints, results[1:], strict=True):
        evals.setdefault(name, []).append({**result, "seed": seed})

    init_row = _row(
        "onpolicy-init",
        f"the SFT start: {spec.init_steps} steps of hard labels on the ground truth",
        evals["onpolicy-init"],
        None,
        teacher["accuracy"],
        wall_s=None,
    )
    init_acc = init_row["accuracy_mean"]
    rows = [teacher_row(teacher), init_row]
    for method in METHODS:
        by_seed = runs[method.name]
        rounds = [x for s in by_seed.values() for x in s["rounds"]]
        rows.append(
            _row(
                method.name,
                method.about,
                evals[method.name],
                init_acc,
                teacher["accuracy"],
                teacher_tokens=statistics.fmean(s["teacher_tokens"] for s in by_seed.values()),
                train_steps=spec.rounds * spec.steps_per_round,
                round_wall_s=statistics.fmean(x["timings_s"]["round"] for x in rounds),
                round_timings_s={
                    k: statistics.fmean(x["timings_s"][k] for x in rounds)
                    for k in ("rollout", "score", "train")
                },
                wall_s=statistics.fmean(
                    sum(x["timings_s"]["round"] for x in s["rounds"]) for s in by_seed.values()
                ),
            )
        )
    rows.append(
        _row(
            "soft-kd-budget",
            f"control: forward KL on a cache of {budget_meta['rows']:,} ground-truth rows "
            "(as many teacher tokens), same start and steps",
            evals["soft-kd-budget"],
            init_acc,
            teacher["accuracy"],
            teacher_tokens=budget_meta["tokens"],
            train_steps=spec.rounds * spec.steps_per_round,
            wall_s=statistics.fmean(c["train_seconds"] for c in controls.values()),
        )
    )
    meta = {
        "spec": spec.to_dict(),
        "wall_s": time.perf_counter() - started,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    return publish(base.out, rows, meta, "onpolicy", log)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="logitforge demo-onpolicy", description=__doc__)
    parser.add_argument("--out", type=Path, default=DemoSpec.out)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DemoSpec.seeds))
    parser.add_argument("--rounds", type=int, default=OnPolicySpec.rounds)
    parser.add_argument("--prompts-per-round", type=int, default=OnPolicySpec.prompts_per_round)
    parser.add_argument("--steps-per-round", type=int, default=OnPolicySpec.steps_per_round)
    parser.add_argument("--init-steps", type=int, default=OnPolicySpec.init_steps)
    parser.add_argument("--lr", type=float, default=OnPolicySpec.lr)
    args = parser.parse_args(argv)
    spec = OnPolicySpec(
        base=DemoSpec(out=args.out, seeds=tuple(args.seeds)),
        init_steps=args.init_steps,
        rounds=args.rounds,
        prompts_per_round=args.prompts_per_round,
        steps_per_round=args.steps_per_round,
        lr=args.lr,
    )
    run_demo(spec, log=lambda msg: print(msg, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
