"""The prune stage: kept layers and shapes, identity when nothing is cut, the importance scores
on a model whose redundant layer is known, and the checkpoint `logitforge prune` writes
loading in transformers and in vLLM with the logits of the in-memory model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from bench.student_step import _Tokenizer
from pipeline.cli import main
from pipeline.prune import RECORD_FILE, PruneConfig, calibration_batches, run_prune
from stages.prune import (
    PruneError,
    choose_layers,
    measure_importance,
    num_parameters,
    prune_layers,
    prune_mlp,
)
from stages.train.options import StudentArch
from stages.train.student import build_llama
from tests.conftest import TEST_K


def _model(layers: int = 4, seed: int = 0):
    arch = StudentArch(hidden_size=64, num_layers=layers, num_heads=2, intermediate_size=96)
    return build_llama(arch, _Tokenizer(96), seed=seed).eval()


def _batches(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (4, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[2:, 12:] = 0  # padded rows: padding must not count
    return [{"input_ids": ids, "attention_mask": mask}]


@torch.no_grad()
def _logits(model, batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_keeping_every_layer_and_channel_is_the_identity() -> None:
    model, batch = _model(), _batches()[0]
    before = _logits(model, batch)
    importance = measure_importance(model, [batch])
    prune_layers(model, [0, 1, 2, 3])
    prune_mlp(model, 96, importance.channels)
    torch.testing.assert_close(_logits(model, batch), before, rtol=0, atol=0)


def test_kept_layers_shapes_and_config() -> None:
    model = _model(layers=5)
    originals = [model.model.layers[i] for i in (0, 2, 4)]
    before = num_parameters(model)
    prune_layers(model, [0, 2, 4])
    assert list(model.model.layers) == originals  # the same modules, in order
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    assert model.config.num_hidden_layers == 3
    scores = np.tile(np.arange(96.0), (3, 1))  # higher index, more important
    gate = model.model.layers[1].mlp.gate_proj.weight.detach().clone()
    down = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    prune_mlp(model, 40, scores)
    mlp = model.model.layers[1].mlp
    assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (40, 64)
    assert mlp.down_proj.weight.shape == (64, 40)
    torch.testing.assert_close(mlp.gate_proj.weight, gate[56:])  # the top 40 channels kept
    torch.testing.assert_close(mlp.down_proj.weight, down[:, 56:])
    assert model.config.intermediate_size == 40
    layer = 4 * 64 * 64 + 3 * 64 * 96 + 2 * 64  # q, k, v, o; gate, up, down; two norms
    assert before - num_parameters(model) == 2 * layer + 3 * (3 * 64 * (96 - 40))
    # Generation still works (the KV cache indexes the renumbered layers).
    out = model.generate(_batches()[0]["input_ids"][:1, :5], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)


def test_a_layer_that_does_nothing_has_no_block_influence_and_goes_first() -> None:
    model = _model(layers=4)
    with torch.no_grad():  # layer 2 adds nothing to the residual stream: output == input
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    importance = measure_importance(model, _batches())
    assert importance.layers[2] == pytest.approx(0.0, abs=1e-9)
    assert (importance.layers[[0, 1, 3]] > 1e-3).all()
    assert importance.tokens == 4 * 20 - 2 * 8
    assert choose_layers(4, 3, importance.layers) == [0, 1, 3]
    # Channel scores are mean |act(gate(x)) * up(x)| over real tokens, by hand for layer 0.
    x = {}
    handle = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(
        lambda m, a: x.setdefault("act", a[0])
    )
    batch = _batches()[0]
    _logits(model, batch)
    handle.remove()
    real = batch["attention_mask"].bool()
    np.testing.assert_allclose(
        importance.channels[0], x["act"][real].abs().mean(0).double().numpy(), rtol=1e-5
    )


def test_choose_layers_and_refusals() -> None:
    assert choose_layers(30, 6) == [0, 6, 12, 17, 23, 29]  # evenly spaced, ends included
    assert choose_layers(30, 1) == [0]
    assert choose_layers(4, 2, np.array([0.1, 0.5, 0.5, 0.2])) == [1, 2]
    with pytest.raises(PruneError, match="cannot keep 5 of 4"):
        choose_layers(4, 5)
    with pytest.raises(PruneError, match="ascending distinct"):
        prune_layers(_model(), [2, 1])
    with pytest.raises(PruneError, match="cannot keep 97 of 96"):
        prune_mlp(_model(), 97, np.zeros((4, 96)))
    with pytest.raises(ValidationError, match="calibration"):
        PruneConfig(model="m", output="o", layers=2)  # importance needs rows to measure on


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, teacher_dir: Path, train_cache: Path) -> tuple[Path, dict]:
    """The embedded teacher (3 layers) pruned to 2 by `logitforge prune`, width 288 of 576."""
    out = tmp_path_factory.mktemp("prune") / "student"
    config = tmp_path_factory.mktemp("prune-config") / "prune.yaml"
    config.write_text(
        json.dumps(
            {
                "model": str(teacher_dir),
                "output": str(out),
                "layers": 2,
                "intermediate_size": 288,
                "calibration": {"data": str(train_cache), "rows": 16},
            }
        )
    )
    summary = out.parent / "summary.json"
    assert main(["prune", "--config", str(config), "--summary-json", str(summary)]) == 0
    return out, json.loads(summary.read_text())


def test_prune_writes_a_checkpoint_transformers_loads(pruned, teacher_dir: Path) -> None:
    out, record = pruned
    assert json.loads((out / RECORD_FILE).read_text()) == record
    assert record["layers"] == [3, 2] and len(record["kept_layers"]) == 2
    assert record["intermediate_size"] == 288 and len(record["block_influence"]) == 3
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.num_hidden_layers == 2 and model.config.intermediate_size == 288
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()
    assert num_parameters(model) == record["parameters"][1] < record["parameters"][0]
    # The same cut, measured and done in memory, gives the saved checkpoint's logits.
    cfg = PruneConfig.model_validate(record["config"])
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    importance = measure_importance(teacher, calibration_batches(cfg.calibration, pad_id=0))
    assert importance.tokens == record["calibration_tokens"]
    keep = choose_layers(3, 2, importance.layers)
    assert keep == record["kept_layers"]
    prune_mlp(prune_layers(teacher, keep), 288, importance.channels[keep])
    batch = _batches()[0]
    torch.testing.assert_close(_logits(model, batch), _logits(teacher, batch))
    # A rerun of the same config is a no-op; the record is what the first run wrote.
    assert run_prune(cfg, log=lambda _: None) == record


@pytest.mark.slow
def test_vllm_serves_the_pruned_checkpoint_like_transformers(pruned, train_cache) -> None:
    from stages.teacher import TeacherOptions
    from stages.teacher.hf_engine import HFTeacher
    from stages.teacher.vllm_engine import VllmTeacher
    from storage.reader import ShardSet

    out, _ = pruned
    rows = ShardSet.open(str(train_cache)).read_shard(0)
    sequences = [
        rows.input_ids[rows.row_offsets[i] : rows.row_offsets[i + 1]].tolist() for i in range(8)
    ]
    options = TeacherOptions(model=str(out), k=TEST_K, dtype="float32", kv_cache_gib=0.25)
    reference = HFTeacher(options.model_copy(update={"engine": "transformers"}), device="cpu")
    want = reference.score(sequences)
    engine = VllmTeacher(options)
    try:
        got = engine.score(sequences)
    finally:
        engine.close()
    np.testing.assert_allclose(got.topk_logprobs, want.topk_logprobs, atol=2e-3)
    assert (got.topk_ids[:, 0] == want.topk_ids[:, 0]).mean() > 0.99


def test_full_vocabulary_kl_by_hand() -> None:
    from stages.evaluate.metrics import full_kl

    teacher = torch.tensor([[0.0, np.log(2.0)], [5.0, 5.0]])
    student = torch.tensor([[0.0, 0.0, 30.0], [1.0, 1.0, -3.0]])  # one padded vocabulary id
    want = [np.log(2 / 3) / 3 + 2 * np.log(4 / 3) / 3, 0.0]
    np.testing.assert_allclose(full_kl(teacher, student).numpy(), want, atol=1e-12)


def test_score_against_teacher_bounds_the_cached_kl(pruned, teacher_dir, train_cache) -> None:
    """The teacher against itself: KL 0, agreement 1. The pruned student: its full KL is at
    least the cache's top-k-plus-rest KL (a coarser partition of the same distributions)."""
    from stages.evaluate.metrics import held_out_batches, score_against_teacher, score_student
    from stages.train.loader import LogitSource

    out, _ = pruned
    source = LogitSource.open(str(train_cache))
    data = held_out_batches(source, pad_id=0, batch_size=128)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    student = AutoModelForCausalLM.from_pretrained(out)
    itself = score_against_teacher(teacher, teacher, data)
    assert itself["kl_full"] == pytest.approx(0.0, abs=1e-9)
    assert itself["top1_agreement"] == 1.0
    full = score_against_teacher(student, teacher, data)
    cached = score_student(student, data)
    assert full["tokens"] == cached["tokens"] > 0
    assert full["perplexity"] == pytest.approx(cached["perplexity"], rel=1e-4)
    assert full["kl_full"] >= cached["kl_to_teacher"] - 1e-3 > 0


def test_calibration_on_another_tokenizers_cache_is_refused(train_cache: Path) -> None:
    from pipeline.prune import CalibrationOptions
    from stages.train.loader import SourceError

    opts = CalibrationOptions(data=str(train_cache), rows=4)
    assert sum(int(b["attention_mask"].sum()) for b in calibration_batches(opts, 0)) > 0
    with pytest.raises(SourceError, match="tokenizer"):
        calibration_batches(opts, 0, tokenizer_fp="0" * 64)
