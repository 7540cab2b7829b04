"""Rollout stage: a student checkpoint samples completions of prompt rows (on-policy data).

`stage` turns one prompt shard into one rollout shard: `storage.schema.ROLLOUT_SCHEMA` rows
(prompt + sampled completion, the policy's logprob of each sampled token, the policy version).
The engine is any teacher engine loaded with the student checkpoint: sampling is generation.
"""

from stages.rollout.stage import RolloutShardTask, run_rollout_shard

__all__ = ["RolloutShardTask", "run_rollout_shard"]
