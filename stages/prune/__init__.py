"""The prune stage: a student cut from its teacher (whole layers, MLP channels), to be healed
by distillation. See `stages.prune.surgery`."""

from stages.prune.surgery import (
    Importance,
    PruneError,
    choose_layers,
    decoder_layers,
    measure_importance,
    num_parameters,
    prune_layers,
    prune_mlp,
)

__all__ = [
    "Importance",
    "PruneError",
    "choose_layers",
    "decoder_layers",
    "measure_importance",
    "num_parameters",
    "prune_layers",
    "prune_mlp",
]
