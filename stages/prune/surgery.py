"""Structured pruning of a decoder-only LM: whole layers (depth) and MLP channels (width).

The Minitron recipe makes a student from its teacher: cut, then heal the cut model by
distilling the teacher into it. What to cut is measured on a few real rows in one forward
pass (`measure_importance`):

- a layer's importance is its *block influence* (ShortGPT): 1 - mean cosine similarity of the
  hidden state entering and leaving it, over real tokens. A layer that barely turns its input
  (cosine near 1) can go first;
- an MLP channel's importance is the mean magnitude of its activation, ``act(gate(x)) *
  up(x)``, the input of ``down_proj`` (Minitron's activation-based width score).

The surgery keeps the model a normal transformers checkpoint of the same class (Llama, Qwen2,
Mistral, ... any model whose decoder layers sit in ``model.model.layers`` with a gated MLP),
so transformers and vLLM load it as they load the original.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


class PruneError(ValueError):
    """The model or the request cannot be pruned; the message says why and what to change."""


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The model's decoder layers (``model.model.layers``), or a `PruneError` naming it."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise PruneError(
            f"{type(model).__name__} has no decoder layers at model.model.layers; pruning "
            "supports Llama-style decoder-only models (Llama, Qwen2, Mistral, SmolLM, ...)"
        )
    return layers


def _gated_mlp(layer: torch.nn.Module, index: int) -> torch.nn.Module:
    mlp = getattr(layer, "mlp", None)
    if mlp is None or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        raise PruneError(f"layer {index} has no gated MLP (gate_proj, up_proj, down_proj)")
    return mlp


@dataclass(frozen=True)
class Importance:
    """What `measure_importance` saw on the calibration rows."""

    layers: np.ndarray  # [num_layers] block influence, 1 - mean cos(input, output)
    channels: np.ndarray  # [num_layers, intermediate] mean |down_proj input|
    tokens: int  # real tokens the means are over


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def _recording(model: Any, mask: torch.Tensor) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Forward hooks that sum, over the real tokens in ``mask``, each layer's cosine and each
    MLP channel's |activation|; the hooks fire in layer order, so the lists are too."""
    real = mask.reshape(-1).bool()
    sums: dict[str, list[torch.Tensor]] = {"cos": [], "act": []}
    handles = []
    for i, layer in enumerate(decoder_layers(model)):
        mlp = _gated_mlp(layer, i)

        def on_layer(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            x, y = x.reshape(-1, x.shape[-1])[real], _first(output).reshape(-1, x.shape[-1])[real]
            cos = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1)
            sums["cos"].append(cos.sum())

        def on_down(module, args):
            act = args[0].reshape(-1, args[0].shape[-1])[real]
            sums["act"].append(act.abs().double().sum(0))

        handles.append(layer.register_forward_hook(on_layer, with_kwargs=True))
        handles.append(mlp.down_proj.register_forward_pre_hook(on_down))
    try:
        yield sums
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def measure_importance(model: Any, batches: list[dict[str, torch.Tensor]]) -> Importance:
    """Layer and channel importance over ``batches`` (``input_ids`` and ``attention_mask``,
    right-padded), one forward pass each; padding never counts."""
    layers = decoder_layers(model)
    n = len(layers)
    cos_sum = torch.zeros(n, dtype=torch.float64)
    act_sum: torch.Tensor | None = None
    tokens = 0
    model.eval()
    for batch in batches:
        mask = batch["attention_mask"]
        with _recording(model, mask) as sums:
            model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False)
        cos_sum += torch.stack(sums["cos"])
        acts = torch.stack(sums["act"])  # [n, intermediate]
        act_sum = acts if act_sum is None else act_sum + acts
        tokens += int(mask.sum())
    if tokens == 0 or act_sum is None:
        raise PruneError("the calibration rows have no tokens")
    return Importance(
        layers=(1.0 - cos_sum / tokens).numpy(),
        channels=(act_sum / tokens).numpy(),
        tokens=tokens,
    )


def choose_layers(num_layers: int, keep: int, scores: np.ndarray | None = None) -> list[int]:
    """``keep`` layer indices, ascending: the highest-scoring ones, or evenly spaced (first
    and last included) without scores."""
    if not 1 <= keep <= num_layers:
        raise PruneError(f"cannot keep {keep} of {num_layers} layers")
    if scores is None:
        return np.rint(np.linspace(0, num_layers - 1, keep)).astype(int).tolist()
    # Stable: among equal scores the earlier layer is kept.
    return sorted(np.argsort(-np.asarray(scores), kind="stable")[:keep].tolist())


def prune_layers(model: Any, keep: list[int]) -> Any:
    """Keep only decoder layers ``keep`` (in that order), renumbered 0..len-1; in place."""
    layers = decoder_layers(model)
    n = len(layers)
    if not keep or sorted(set(keep)) != list(keep) or keep[0] < 0 or keep[-1] >= n:
        raise PruneError(f"layers to keep must be ascending distinct indices in 0..{n - 1}: {keep}")
    kept = [layers[i] for i in keep]
    for new, layer in enumerate(kept):
        # The KV cache indexes layers by layer_idx; a gap would break generation.
        for module in (layer, getattr(layer, "self_attn", None)):
            if module is not None and hasattr(module, "layer_idx"):
                module.layer_idx = new
    model.model.layers = torch.nn.ModuleList(kept)
    config = model.config
    config.num_hidden_layers = len(kept)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in keep]
    return model


def _take(linear: torch.nn.Linear, index: torch.Tensor, dim: int) -> torch.nn.Linear:
    weight = linear.weight.detach().index_select(dim, index).clone()
    bias = linear.bias
    if bias is not None and dim == 0:
        bias = bias.detach().index_select(0, index).clone()
    out = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    out = out.to(dtype=weight.dtype, device=weight.device)
    out.weight = torch.nn.Parameter(weight)
    if bias is not None:
        out.bias = torch.nn.Parameter(bias.detach().clone())
    return out


def prune_mlp(model: Any, size: int, channel_scores: np.ndarray) -> Any:
    """Keep the ``size`` highest-scoring MLP channels of every layer (``channel_scores``
    [layers, intermediate], rows in the model's current layer order); in place."""
    layers = decoder_layers(model)
    scores = np.asarray(channel_scores)
    width = _gated_mlp(layers[0], 0).gate_proj.out_features
    if scores.shape != (len(layers), width):
        raise PruneError(f"channel scores {scores.shape} do not match {len(layers)} x {width}")
    if not 1 <= size <= width:
        raise PruneError(f"cannot keep {size} of {width} MLP channels")
    for i, layer in enumerate(layers):
        mlp = _gated_mlp(layer, i)
        keep = torch.from_numpy(np.sort(np.argsort(-scores[i], kind="stable")[:size]))
        mlp.gate_proj = _take(mlp.gate_proj, keep, 0)
        mlp.up_proj = _take(mlp.up_proj, keep, 0)
        mlp.down_proj = _take(mlp.down_proj, keep, 1)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = size
    model.config.intermediate_size = size
    return model


def num_parameters(model: Any) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
