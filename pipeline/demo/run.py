"""`make demo`: what each distillation method recovers, on the embedded add5 task.

Every step is a real stage on real data, and every step resumes: rerunning skips finished
caches and students.

1. Build the embedded teacher (cached).
2. Cache the teacher on the task's *training* prompts, and on held-out prompts for evaluation
   (`cache-teacher`, vLLM on a local Dask cluster, prompt + answer + EOS).
3. Have the teacher answer the training prompts itself (`generate-teacher`, greedy).
4. Train one student per method and seed (`distill`): same architecture, steps, batch and
   prompts; only the training signal differs.
5. Evaluate the teacher and every student on the held-out set (`evaluate`: accuracy decoded
   with vLLM, perplexity, KL to the teacher).
6. Write `results.json` (one row per method; rows of other demos are kept), `results.md` and
   `accuracy.png`.

    python -m pipeline.demo.run [--out artifacts/demo] [--seeds 0 1 2] [--only soft-kd ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.demo.build import BASELINE_SPEC, DEFAULT_TEACHER_DIR, build_teacher, summary_line
from pipeline.demo.task import DEFAULT_TASK, generate

Log = Callable[[str], None]
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Method:
    """One row of the table: which cache the student reads and which loss it minimises."""

    name: str
    source: str  # "train" (teacher-scored ground truth) or "generated" (teacher's own answers)
    loss: dict[str, Any]
    about: str
    # None: the student shares the teacher's tokenizer; "xtok": the cross-tokenizer demo's
    # student tokenizer (`student_tokenizer`), trained through aligned spans.
    tokenizer: str | None = None


METHODS = (
    Method("baseline", "train", {"kind": "ce"}, "ground-truth completions, CE (SFT)"),
    Method("hard-kd", "generated", {"kind": "ce"}, "teacher-generated completions, CE"),
    Method(
        "soft-kd",
        "train",
        {"kind": "forward_kl", "temperature": 1.0, "alpha": 1.0},
        "cached top-64, forward KL, T=1, rest bucket",
    ),
    Method(
        "soft-kd-rkl",
        "train",
        {"kind": "reverse_kl"},
        "cached top-64, reverse KL, T=1, rest bucket",
    ),
    Method(
        "soft-kd-jsd",
        "train",
        {"kind": "jsd", "beta": 0.5},
        "cached top-64, JSD(beta=0.5), T=1, rest bucket",
    ),
)
# `make demo-xtok`: a student with a tokenizer of another family (SentencePiece-style Unigram,
# "▁" Metaspace, byte fallback), distilled from the same teacher cache through aligned spans.
XTOK_METHODS = (
    Method(
        "xtok-sft",
        "train",
        {"kind": "ce"},
        "other tokenizer: ground-truth completions, CE (SFT)",
        "xtok",
    ),
    Method(
        "xtok-uld",
        "train",
        {"kind": "uld", "alpha": 0.5},
        "other tokenizer: the cache through ULD (+ CE, alpha 0.5)",
        "xtok",
    ),
    Method(
        "xtok-hybrid",
        "train",
        {"kind": "hybrid", "alpha": 0.5, "beta": 0.0},
        "other tokenizer: the cache through the GOLD hybrid (KL mapped, ULD rest; + CE, alpha 0.5)",
        "xtok",
    ),
)
# `make demo-codecs`: the same soft-label student from caches stored three ways. Each reads
# its own cache of the training prompts ("train:<codec>"), made with that codec.
_SOFT = {"kind": "forward_kl", "temperature": 1.0, "alpha": 1.0}
CODEC_METHODS = (
    Method("codec-exact", "train:fp32", _SOFT, "top-64 stored exact (fp32), forward KL, T=1"),
    Method(
        "codec-compact",
        "train:compact",
        _SOFT,
        "top-64 stored compact (drop tail mass <= 1e-4, uint8), forward KL, T=1",
    ),
    Method(
        "codec-sampled",
        "train:sampled",
        _SOFT,
        "12 sampled tokens per position (Sparse Logit Sampling), forward KL, T=1",
    ),
)
ALL_METHODS = METHODS + XTOK_METHODS + CODEC_METHODS
# Each demo: its methods, and its entry under "demos" in results.json.
DEMOS: dict[str, tuple[Method, ...]] = {
    "distill": METHODS,
    "xtok": XTOK_METHODS,
    "codecs": CODEC_METHODS,
}
# The student tokenizer's pieces beyond single characters: the chat template's role markers.
XTOK_PIECES = ("<|user|>", "<|assistant|>", "<|system|>")
XTOK_TOKENIZER_VERSION = 2  # bump when the tokenizer recipe changes (2: built, not trained)


def build_student_tokenizer():
    """The cross-tokenizer demo's student tokenizer: a SentencePiece-style Unigram (Metaspace,
    byte fallback) over the task text's characters and the role markers, scored by frequency.
    Built, not trained: `tokenizers`' Unigram trainer is not reproducible between runs."""
    from pipeline.demo.build import CHAT_TEMPLATE, DEFAULT_SPEC, _tokenizer_corpus
    from pipeline.demo.tokenizers import unigram_metaspace

    return unigram_metaspace(
        _tokenizer_corpus(DEFAULT_SPEC.task, DEFAULT_SPEC.seed),
        pieces=XTOK_PIECES,
        model_max_length=DEFAULT_SPEC.model.max_position_embeddings,
        chat_template=CHAT_TEMPLATE,
    )


def student_tokenizer(out: Path, log: Log) -> Path:
    """The demo's student tokenizer, saved once under ``out``."""
    path = out / f"student-tokenizer-unigram-v{XTOK_TOKENIZER_VERSION}"
    if not (path / "tokenizer.json").exists():
        tok = build_student_tokenizer()
        tok.save_pretrained(str(path))
        log(f"[demo] student tokenizer: Unigram, Metaspace, byte fallback, {len(tok)} ids: {path}")
    return path


@dataclass
class DemoSpec:
    """The experiment; changing it changes every number, so it is printed with the results."""

    out: Path = Path("artifacts/demo")
    n_train: int = 8192
    n_heldout: int = 1024
    data_seed: int = 11
    k: int = 64
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 1000
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 60
    student: dict[str, int] = field(
        default_factory=lambda: {
            "hidden_size": BASELINE_SPEC.model.hidden_size,
            "num_layers": BASELINE_SPEC.model.num_layers,
            "num_heads": BASELINE_SPEC.model.num_heads,
            "intermediate_size": BASELINE_SPEC.model.intermediate_size,
        }
    )
    methods: tuple[str, ...] = tuple(m.name for m in METHODS)
    name: str = "distill"  # this demo's entry under "demos" in results.json

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_train": self.n_train,
            "n_heldout": self.n_heldout,
            "data_seed": self.data_seed,
            "k": self.k,
            "seeds": list(self.seeds),
            "steps": self.steps,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "warmup_steps": self.warmup_steps,
            "student": self.student,
        }


def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _cache_config(
    spec: DemoSpec, rows: Path, out: Path, generation: bool, codec: str = "fp16"
) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "input": {"path": str(rows)},
        "prompts": {"append_eos": True},
        "teacher": {
            "model": str(REPO_ROOT / DEFAULT_TEACHER_DIR),
            "k": spec.k,
            "dtype": "float32",
            "kv_cache_gib": 0.5,
        },
        "output": {"path": str(out), "rows_per_shard": 1024, "codec": codec},
    }
    if generation:
        cfg["generation"] = {"max_tokens": 16, "temperature": 0.0}
    return cfg


def make_caches(spec: DemoSpec, teacher_build: str, log: Log) -> dict[str, Path]:
    """The three shard sets every student and the evaluation read (resumable)."""
    from pipeline.config import CacheTeacherConfig
    from pipeline.execute import dask_client, run_cache_teacher

    data = spec.out / "data"
    train = _write_rows(
        data / "train.jsonl", generate(DEFAULT_TASK, spec.n_train, "train", spec.data_seed)
    )
    heldout = _write_rows(
        data / "heldout.jsonl", generate(DEFAULT_TASK, spec.n_heldout, "heldout", spec.data_seed)
    )
    # A cache's plan knows the teacher by path and tokenizer, not by weights: key the folders
    # by the teacher's build so a rebuilt teacher never reuses an old teacher's logits.
    root = spec.out / "cache" / teacher_build
    caches = {
        "train": (train, root / "train", False, "fp16"),
        "heldout": (heldout, root / "heldout", False, "fp16"),
        "generated": (train, root / "train-generated", True, "fp16"),
    }
    for method in ALL_METHODS:  # "train:<codec>": the training prompts, stored with <codec>
        if method.name in spec.methods and ":" in method.source:
            codec = method.source.split(":", 1)[1]
            caches[method.source] = (train, root / f"train-{codec}", False, codec)
    configs = {
        name: CacheTeacherConfig.model_validate(_cache_config(spec, rows, out, gen, codec))
        for name, (rows, out, gen, codec) in caches.items()
    }
    first = next(iter(configs.values()))
    with dask_client(first.cluster, log) as client:
        for name, cfg in configs.items():
            log(f"[demo] {cfg.kind} on {name} prompts -> {cfg.output.path}")
            summary = run_cache_teacher(cfg, client=client, log=lambda _: None)
            log(
                f"[demo]   {summary.rows:,} rows, {summary.tokens:,} tokens "
                f"({summary.shards_run} shards run now, {summary.shards_reused} reused)"
            )
    return {name: out for name, (_, out, _, _) in caches.items()}


def train_section(out: Path, seed: int, steps: int, lr: float, warmup: int) -> dict[str, Any]:
    """A demo student's `train` section: one checkpoint and one log line, at the end, on the
    2 cores; with no warm-up the LR is constant (continued training), else cosine decay."""
    return {
        "output_dir": str(out),
        "steps": steps,
        "lr": lr,
        "warmup_steps": warmup,
        "min_lr_ratio": 1.0 if warmup == 0 else 0.05,
        "seed": seed,
        "save_steps": steps,
        "logging_steps": steps,
        "threads": 2,
    }


def train_students(spec: DemoSpec, caches: dict[str, Path], log: Log) -> dict[str, list[dict]]:
    """One `distill` run per method and seed; finished runs are reused."""
    from pipeline.config import DistillConfig
    from pipeline.distill import run_distill

    runs: dict[str, list[dict]] = {}
    chosen = [m for m in ALL_METHODS if m.name in spec.methods]
    other = student_tokenizer(spec.out, log) if any(m.tokenizer for m in chosen) else None
    total = len(chosen) * len(spec.seeds)
    done = 0
    for method in chosen:
        for seed in spec.seeds:
            done += 1
            out = spec.out / "students" / method.name / f"seed{seed}"
            cfg = DistillConfig.model_validate(
                {
                    "student": {
                        "build": spec.student,
                        **({"tokenizer": str(other)} if method.tokenizer else {}),
                    },
                    "data": {
                        "sources": [str(caches[method.source])],
                        "batch_size": spec.batch_size,
                    },
                    "loss": method.loss,
                    "overwrite": True,  # the demo owns its folders: a changed method retrains
                    "train": train_section(out, seed, spec.steps, spec.lr, spec.warmup_steps),
                }
            )
            t0 = time.perf_counter()
            summary = run_distill(cfg, log=lambda _: None)
            log(
                f"[demo] student {done}/{total}: {method.name} seed {seed} "
                f"({summary['train_seconds']:.0f} s training"
                + (", reused" if time.perf_counter() - t0 < 1 else "")
                + ")"
            )
            runs.setdefault(method.name, []).append(summary)
    return runs


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def teacher_row(teacher: dict[str, Any]) -> dict[str, Any]:
    """The reference row: the teacher's own evaluation."""
    return {
        "method": "teacher",
        "about": "the embedded teacher (1.5M params): reference",
        "accuracy_mean": teacher["accuracy"],
        "accuracy_std": 0.0,
        "seeds": [],
        "accuracies": [teacher["accuracy"]],
        "gap_recovered": 1.0,
        "perplexity": teacher["perplexity"],
        "kl_to_teacher": teacher["kl_to_teacher"],
        "wall_s": None,
    }


def _mean_or_none(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else statistics.fmean(values)  # type: ignore[arg-type]


def summarise(
    spec: DemoSpec,
    teacher: dict[str, Any],
    evals: dict[str, list[dict]],
    runs: dict[str, list[dict]],
) -> list[dict[str, Any]]:
    """One row per method (plus the teacher), with the gap recovered over its baseline: SFT
    with the same tokenizer (`baseline`, or `xtok-sft` for cross-tokenizer students)."""
    rows: list[dict[str, Any]] = [teacher_row(teacher)]
    for method in ALL_METHODS:
        if method.name not in evals:
            continue
        base_name = "xtok-sft" if method.tokenizer else "baseline"
        base = (
            statistics.fmean(r["accuracy"] for r in evals[base_name])
            if base_name in evals
            else None
        )
        gap = teacher["accuracy"] - base if base is not None else None
        accs = [r["accuracy"] for r in evals[method.name]]
        mean, std = _mean_std(accs)
        rows.append(
            {
                "method": method.name,
                "about": method.about,
                "accuracy_mean": mean,
                "accuracy_std": std,
                "seeds": list(spec.seeds),
                "accuracies": accs,
                "gap_recovered": (mean - base) / gap if gap else None,
                **({"gap_baseline": base_name} if method.tokenizer else {}),
                "perplexity": _mean_or_none([r["perplexity"] for r in evals[method.name]]),
                "kl_to_teacher": _mean_or_none([r["kl_to_teacher"] for r in evals[method.name]]),
                "wall_s": statistics.fmean(r["train_seconds"] for r in runs[method.name]),
            }
        )
    return rows


def merge_results(
    path: Path, rows: list[dict], meta: dict[str, Any], demo: str = "distill"
) -> dict[str, Any]:
    """results.json keeps other demos' rows; this demo's methods replace their old rows."""
    try:
        old = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        old = {}
    mine = {r["method"] for r in rows}
    kept = [r for r in old.get("rows", []) if r["method"] not in mine]
    doc = {"rows": kept + rows, "demos": {**old.get("demos", {}), demo: meta}}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def _cell(value: Any, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def render_markdown(rows: list[dict], demos: dict[str, Any]) -> str:
    """One table of every demo's rows, then what each demo ran."""
    lines = [
        "| method | student trained on | held-out exact match (mean ± std) | gap recovered "
        "| perplexity | KL to teacher | teacher tokens | train wall (s) | s/round |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        gap = "" if r["gap_recovered"] is None else f"{100 * r['gap_recovered']:.0f}%"
        if r.get("gap_baseline"):
            gap += f" (vs `{r['gap_baseline']}`)"
        acc = f"{r['accuracy_mean']:.3f}" + (f" ± {r['accuracy_std']:.3f}" if r["seeds"] else "")
        lines.append(
            f"| `{r['method']}` | {r['about']} | {acc} | {gap} | {_cell(r['perplexity'], '.3f')} "
            f"| {_cell(r['kl_to_teacher'], '.4f')} | {_cell(r.get('teacher_tokens'), ',.0f')} "
            f"| {_cell(r.get('wall_s'), '.0f')} | {_cell(r.get('round_wall_s'), '.1f')} |"
        )
    lines.append("")
    if "distill" in demos:
        meta = demos["distill"]
        spec = meta["spec"]
        lines.append(
            f"`make demo`: students {spec['student']} Llama, {spec['steps']} steps of "
            f"{spec['batch_size']} rows from {spec['n_train']:,} training prompts, seeds "
            f"{spec['seeds']}; held-out: {spec['n_heldout']:,} prompts; teacher cache "
            f"top-{spec['k']}, fp16. Wall time {meta['wall_s']:.0f} s."
        )
    if "xtok" in demos:
        meta = demos["xtok"]
        spec = meta["spec"]
        lines.append(
            f"`make demo-xtok`: the same students, steps and data as `make demo`, with a "
            f"SentencePiece-style Unigram tokenizer (Metaspace, byte fallback), trained from "
            f"the same teacher cache through byte-aligned spans; seeds {spec['seeds']}. "
            f"Perplexity and KL are per teacher token, so they are left blank for these rows. "
            f"Wall time {meta['wall_s']:.0f} s."
        )
    if "codecs" in demos:
        meta = demos["codecs"]
        spec = meta["spec"]
        lines.append(
            f"`make demo-codecs`: the `soft-kd` student, steps and data of `make demo`, each "
            f"from a cache of the same training prompts stored with another codec (exact fp32, "
            f"`compact`, `sampled`); seeds {spec['seeds']}. The seed noise is the ± column. "
            f"Wall time {meta['wall_s']:.0f} s."
        )
    if "onpolicy" in demos:
        meta = demos["onpolicy"]
        spec = meta["spec"]
        lines.append(
            f"`make demo-onpolicy`: from a {spec['init_steps']}-step SFT start, "
            f"{spec['rounds']} rounds of {spec['prompts_per_round']} prompts (one sample each, "
            f"T=1, at most {spec['max_tokens']} tokens) and {spec['steps_per_round']} steps of "
            f"{spec['batch_size']} rows per round, lr {spec['lr']}, seeds {spec['seeds']}. "
            f"Wall time {meta['wall_s']:.0f} s."
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy per method: every seed as a dot, the mean as a bar, teacher/baseline lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    students = [r for r in rows if r["method"] != "teacher"]
    teacher = next(r for r in rows if r["method"] == "teacher")
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    names = [r["method"] for r in students]
    means = [r["accuracy_mean"] for r in students]
    stds = [r["accuracy_std"] for r in students]
    colors = ["#9e9e9e" if n == "baseline" else "#4c72b0" for n in names]
    ax.bar(names, means, yerr=stds, capsize=6, color=colors, alpha=0.8, label="mean ± std")
    for i, r in enumerate(students):
        ax.scatter([i] * len(r["accuracies"]), r["accuracies"], color="black", s=14, zorder=3)
    ax.axhline(teacher["accuracy_mean"], color="#c44e52", ls="--", label="teacher")
    base = next((r for r in students if r["method"] == "baseline"), None)
    if base is not None:
        ax.axhline(base["accuracy_mean"], color="#555555", ls=":", label="baseline (SFT)")
    ax.set_ylabel("held-out exact match")
    ax.set_ylim(0, 1.05)
    ax.set_title("add5: what each distillation signal recovers (dots: seeds)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_demo(spec: DemoSpec, log: Log = print) -> dict[str, Any]:
    from stages.evaluate import EvalOptions, evaluate_checkpoints

    started = time.perf_counter()
    spec.out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    record = build_teacher(DEFAULT_TEACHER_DIR, log_every=100)
    log(f"[demo] teacher: {summary_line(record, DEFAULT_TEACHER_DIR)}")
    timings = {"teacher_s": time.perf_counter() - t}

    t = time.perf_counter()
    caches = make_caches(spec, record["build_fingerprint"], log)
    timings["caches_s"] = time.perf_counter() - t

    t = time.perf_counter()
    runs = train_students(spec, caches, log)
    timings["students_s"] = time.perf_counter() - t

    t = time.perf_counter()
    teacher_path = str(REPO_ROOT / DEFAULT_TEACHER_DIR)
    students = [(name, r["output_dir"]) for name, rs in runs.items() for r in rs]
    log(f"[demo] evaluating the teacher and {len(students)} students")
    results = evaluate_checkpoints(
        [teacher_path] + [p for _, p in students],
        EvalOptions(data=str(caches["heldout"]), threads=2),
        log=lambda msg: log(f"[demo] {msg.strip()}"),
    )
    timings["evaluate_s"] = time.perf_counter() - t
    evals: dict[str, list[dict]] = {}
    for (name, _), result in zip(students, results[1:], strict=True):
        evals.setdefault(name, []).append(result)
    rows = summarise(spec, results[0], evals, runs)
    meta = {
        "spec": spec.to_dict(),
        "wall_s": time.perf_counter() - started,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    return publish(spec.out, rows, meta, spec.name, log)


def publish(out: Path, rows: list[dict], meta: dict[str, Any], demo: str, log: Log) -> dict:
    """Merge this demo's rows into results.json, rewrite results.md and the plot, report."""
    doc = merge_results(out / "results.json", rows, meta, demo)
    table = render_markdown(doc["rows"], doc["demos"])
    (out / "results.md").write_text(table)
    plot(doc["rows"], out / "accuracy.png")
    log("")
    log(table)
    log(
        f"[{demo}] done in {meta['wall_s']:.0f} s ("
        + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in meta["timings_s"].items())
        + f"); wrote {out}/results.json, results.md, accuracy.png"
    )
    return doc


def main(argv: list[str] | None = None, demo: str = "distill") -> int:
    """`logitforge demo`, `demo-xtok` (cross-tokenizer rows) or `demo-codecs` (codec rows)."""
    methods = DEMOS[demo]
    prog = "logitforge demo" if demo == "distill" else f"logitforge demo-{demo}"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("--out", type=Path, default=DemoSpec.out)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DemoSpec.seeds))
    parser.add_argument("--steps", type=int, default=DemoSpec.steps)
    parser.add_argument("--n-train", type=int, default=DemoSpec.n_train)
    parser.add_argument("--n-heldout", type=int, default=DemoSpec.n_heldout)
    parser.add_argument(
        "--only", nargs="+", choices=[m.name for m in methods], help="run only these methods"
    )
    args = parser.parse_args(argv)
    spec = DemoSpec(
        out=args.out,
        seeds=tuple(args.seeds),
        steps=args.steps,
        n_train=args.n_train,
        n_heldout=args.n_heldout,
        methods=tuple(args.only) if args.only else tuple(m.name for m in methods),
        name=demo,
    )
    run_demo(spec, log=lambda msg: print(msg, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
