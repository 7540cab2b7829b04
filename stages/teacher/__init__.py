"""Teacher stage: score token sequences with a teacher and store sparse top-k logprobs.

`engine` holds the typed boundary (options, scored output, the engine protocol);
`vllm_engine` is the production engine, `hf_engine` the transformers reference used as a
test oracle and benchmark floor; `stage` turns one prompt shard into one logit shard.
"""

from stages.teacher.engine import ScoredTokens, TeacherEngine, TeacherOptions, load_engine

__all__ = ["ScoredTokens", "TeacherEngine", "TeacherOptions", "load_engine"]
