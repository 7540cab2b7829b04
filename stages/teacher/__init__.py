"""Teacher stage: score token sequences with a teacher and store sparse top-k logprobs.

`engine` holds the typed boundary (options, scored and generated outputs, the engine
protocol) and `select` picks an engine by name; `vllm_engine` is the production engine (with
`weight_swap`, its in-place checkpoint swap), `hf_engine` the transformers reference used as
a test oracle and benchmark floor; `stage` turns one prompt shard into one logit shard,
scoring the rows or first generating their completions (`generated`).
"""

from stages.teacher.engine import (
    Generated,
    GenerationOptions,
    ScoredTokens,
    TeacherEngine,
    TeacherOptions,
)
from stages.teacher.select import load_engine

__all__ = [
    "Generated",
    "GenerationOptions",
    "ScoredTokens",
    "TeacherEngine",
    "TeacherOptions",
    "load_engine",
]
