"""The one training path: a `transformers.Trainer` subclass with distillation losses.

Checkpoints, logging, gradient accumulation, resume and accelerate/FSDP/DeepSpeed come from
`Trainer`; this module only adds what distillation needs: batches that are already collated
(the loader yields whole batches, see `stages.train.loader`), a loss computed on the trained
positions only (the output layer itself runs on ``hidden[loss_mask]``, see `logits_at`, so the
vocabulary-sized tensor is never built for padding or prompt positions), and progress lines a
person can read. The embedded teacher's build and the student stage both train through
`train_model`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import get_last_checkpoint

from stages.align.vocab import VocabMap
from stages.train.losses import distill_loss
from stages.train.options import LossOptions, TrainOptions
from stages.train.xtok_losses import xtok_loss

Log = Callable[[str], None]
SUMMARY_FILE = "train_summary.json"


class _Selection:
    """Whether the output layer already ran on the selected positions only."""

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = mask
        self.applied = False

    def select(self, logits: torch.Tensor) -> torch.Tensor:
        """The [N, V] logits of the selected positions, in row-major order."""
        if self.applied:
            return logits.reshape(-1, logits.shape[-1])
        return logits[self.mask]


@contextmanager
def logits_at(model: torch.nn.Module, mask: torch.Tensor) -> Iterator[_Selection]:
    """Run ``model``'s output layer on the hidden states at ``mask`` [B, L] only.

    A causal LM's last step is ``lm_head(hidden [B, L, H])``, the largest matmul and the
    largest tensor of a student step at a large vocabulary ([B, L, V], padding and prompt
    positions included, then copied again by ``logits[mask]``). Within this context a forward
    pre-hook on ``model.get_output_embeddings()`` hands the head ``hidden[mask]`` as
    [1, N, H] instead, so the model returns [1, N, V] logits of the trained positions, and
    whatever the model does to its logits after the head (soft-capping, scaling) still
    applies. ``select(out.logits)`` gives the [N, V] logits either way: where the model has no
    output layer to hook, or its input is not [B, L, H], the model runs unchanged and
    ``select`` falls back to ``logits[mask]``.
    """
    selection = _Selection(mask)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        yield selection
        return

    def pre_hook(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        hidden = args[0] if args else None
        if selection.applied or not isinstance(hidden, torch.Tensor):
            return None
        if hidden.dim() != 3 or hidden.shape[:2] != mask.shape:
            return None
        selection.applied = True
        return (hidden[mask].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(pre_hook)
    try:
        yield selection
    finally:
        handle.remove()


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What the model is called with for a loader batch, packed (see `collate`) or not.

    A packed batch passes ``position_ids`` and no attention mask: transformers then builds a
    block-diagonal causal mask from where the positions restart (`masking_utils`), for every
    attention implementation. Without a cache only: with one it would skip that detection.
    """
    if "position_ids" in batch:
        return {
            "input_ids": batch["input_ids"],
            "position_ids": batch["position_ids"],
            "use_cache": False,
        }
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


class DistillTrainer(Trainer):
    """`Trainer` whose batches carry sparse teacher targets for the trained positions."""

    def __init__(
        self,
        *args: Any,
        loss: LossOptions,
        num_workers: int = 0,
        vocab_map: VocabMap | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.loss_options = loss
        self.num_workers = num_workers
        self.vocab_map = vocab_map
        self._map_tensors: tuple[torch.Tensor, torch.Tensor] | None = None
        self._parts: dict[str, float] = {}
        self._parts_n = 0
        self.tokens_seen = 0

    def get_train_dataloader(self) -> DataLoader:
        # The dataset yields collated batches: no sampler, no collator, batch_size=None.
        loader = DataLoader(
            self.train_dataset,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=False,
        )
        return self.accelerator.prepare(loader)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ):
        mask = inputs["loss_mask"]
        # Only trained positions reach the output layer and the vocabulary-wide loss.
        with logits_at(self.accelerator.unwrap_model(model), mask) as at:
            out = model(**model_inputs(inputs))
        logits = at.select(out.logits)
        if "span_start" in inputs:
            loss, parts = self._span_loss(logits, inputs, mask)
        else:
            loss, parts = self._token_loss(logits, inputs, mask)
        if self.loss_options.kind == "ce":
            parts = {}  # the loss is the CE: nothing more to report
        for key, value in parts.items():
            self._parts[key] = self._parts.get(key, 0.0) + value
        self._parts_n += 1
        self.tokens_seen += int(mask.sum())
        return (loss, out) if return_outputs else loss

    def _token_loss(
        self, logits: torch.Tensor, inputs: dict[str, torch.Tensor], mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Same tokenizer: one teacher distribution per student position."""
        topk_ids, topk_logprobs = inputs.get("topk_ids"), inputs.get("topk_logprobs")
        opts = self.loss_options
        return distill_loss(
            logits,
            inputs["target_ids"][mask],
            None if topk_ids is None else topk_ids[mask],
            None if topk_logprobs is None else topk_logprobs[mask],
            kind=opts.kind,
            temperature=opts.temperature,
            alpha=opts.alpha,
            beta=opts.beta,
            tail=opts.tail,
            next_logprob=inputs["next_logprob"][mask],
            policy_logprob=inputs["policy_logprob"][mask],
        )

    def _span_loss(
        self, logits: torch.Tensor, inputs: dict[str, torch.Tensor], mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Cross-tokenizer: one teacher target per aligned span (see `collate_aligned`)."""
        opts = self.loss_options
        start = inputs["span_start"][mask]
        vocab_map = student_mapped = None
        if self.vocab_map is not None:
            if self._map_tensors is None or self._map_tensors[0].device != logits.device:
                # The model's vocabulary may be padded beyond the tokenizer's: no id maps there.
                mapped = torch.zeros(logits.shape[-1], dtype=torch.bool)
                image = torch.from_numpy(self.vocab_map.student_mapped)
                mapped[: len(image)] = image[: logits.shape[-1]]
                forward = torch.from_numpy(self.vocab_map.teacher_to_student)
                self._map_tensors = (forward.to(logits.device), mapped.to(logits.device))
            vocab_map, student_mapped = self._map_tensors
        return xtok_loss(
            logits,
            inputs["target_ids"][mask],
            start,
            torch.cumsum(start.long(), 0) - 1,
            int(start.sum()),
            inputs["span_topk_ids"][mask][start],
            inputs["span_topk_logprobs"][mask][start],
            inputs["span_chain"][mask][start],
            kind=opts.kind,
            temperature=opts.temperature,
            alpha=opts.alpha,
            beta=opts.beta,
            matched_weight=opts.matched_weight,
            unmatched_weight=opts.unmatched_weight,
            vocab_map=vocab_map,
            student_mapped=student_mapped,
        )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._parts_n and "loss" in logs:
            for key, value in self._parts.items():
                logs[f"loss_{key}"] = round(value / self._parts_n, 5)
            self._parts, self._parts_n = {}, 0
        super().log(logs, start_time)


class _Progress(TrainerCallback):
    """One readable line per logging step, and the last logged values for the summary."""

    def __init__(self, log: Log, total: int) -> None:
        self.log = log
        self.total = total
        self.started = time.perf_counter()
        self.last: dict[str, float] = {}

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if not logs or "loss" not in logs:
            return
        self.last = dict(logs)
        parts = " ".join(f"{k[5:]} {v:.4f}" for k, v in logs.items() if k.startswith("loss_"))
        elapsed = time.perf_counter() - self.started
        self.log(
            f"  step {state.global_step}/{self.total} loss {logs['loss']:.4f}"
            + (f" ({parts})" if parts else "")
            + f" lr {logs.get('learning_rate', 0):.2e} | {elapsed:.0f} s"
        )


@dataclass
class TrainResult:
    output_dir: str
    steps: int
    resumed_from: str | None
    final_loss: float | None
    train_seconds: float
    tokens_trained: int

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def training_arguments(opts: TrainOptions, num_workers: int = 0) -> TrainingArguments:
    """The recipe as `TrainingArguments` (AdamW, warm-up, cosine to min_lr_ratio * lr)."""
    return TrainingArguments(
        output_dir=opts.output_dir,
        max_steps=opts.steps,
        learning_rate=opts.lr,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": opts.min_lr_ratio},
        warmup_steps=opts.warmup_steps,
        weight_decay=opts.weight_decay,
        adam_beta1=0.9,
        adam_beta2=opts.adam_beta2,
        max_grad_norm=opts.grad_clip,
        gradient_accumulation_steps=opts.grad_accum,
        seed=opts.seed,
        data_seed=opts.seed,
        save_strategy="steps" if opts.save_steps else "no",
        save_steps=opts.save_steps or 500,
        save_total_limit=opts.save_total_limit,
        logging_steps=opts.logging_steps,
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=num_workers,
        remove_unused_columns=False,
        label_names=[],
    )


def train_model(
    model: torch.nn.Module,
    dataset: IterableDataset,
    train: TrainOptions,
    loss: LossOptions,
    *,
    tokenizer: Any = None,
    num_workers: int = 0,
    save_final: bool = True,
    vocab_map: VocabMap | None = None,
    log: Log = print,
) -> TrainResult:
    """Train ``model`` in place for ``train.steps`` steps, resuming from the last checkpoint.

    Killing a run and calling this again with the same arguments continues from the newest
    ``checkpoint-*`` in ``train.output_dir`` (weights, optimizer, scheduler, RNG and data
    position). With ``save_final`` the model (and tokenizer) is saved in ``output_dir``,
    loadable by ``from_pretrained`` and servable by vLLM.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars would bury the progress lines
    threads = torch.get_num_threads()
    if train.threads:
        torch.set_num_threads(train.threads)
    try:
        trainer = DistillTrainer(
            model=model,
            args=training_arguments(train, num_workers),
            train_dataset=dataset,
            processing_class=tokenizer,
            loss=loss,
            num_workers=num_workers,
            vocab_map=vocab_map,
        )
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        progress = _Progress(log, train.steps)
        trainer.add_callback(progress)
        last = get_last_checkpoint(train.output_dir) if Path(train.output_dir).is_dir() else None
        if last:
            log(f"  resuming from {last}")
        t0 = time.perf_counter()
        trainer.train(resume_from_checkpoint=last)
        seconds = time.perf_counter() - t0
        if save_final:
            trainer.save_model(train.output_dir)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    final = progress.last.get("loss")
    return TrainResult(
        output_dir=train.output_dir,
        steps=trainer.state.global_step,
        resumed_from=last,
        final_loss=None if final is None or math.isnan(final) else float(final),
        train_seconds=round(seconds, 2),
        tokens_trained=trainer.tokens_seen,
    )


def write_summary(output_dir: str | Path, summary: dict[str, Any]) -> None:
    """The completion marker of a training run, written last."""
    path = Path(output_dir) / SUMMARY_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def read_summary(output_dir: str | Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(output_dir) / SUMMARY_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
