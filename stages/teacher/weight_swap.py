"""A vLLM worker extension that swaps a loaded model's weights for another checkpoint's.

Why: evaluating or rolling out many checkpoints of one architecture (students of a demo, the
rounds of on-policy training) would otherwise start a new `vllm.LLM` per checkpoint, tens of
seconds each on a CPU; a swap takes tens of milliseconds.

vLLM's own `reload_weights(weights_path=...)` re-reads every tensor in place, but a tied
`lm_head` gets no tensor of its own from the checkpoint, so its CPU GEMM kernel (a packed copy
made after loading) is never rebuilt and the logits keep using the old embedding. Measured
on vLLM 0.32 CPU: 65 of 256 greedy sequences differed from a fresh engine. Re-running the
head's `process_weights_after_loading` after the reload makes the swap bit-exact.

Loaded into vLLM's worker processes by name (`worker_extension_cls`); only a method name and
a path string cross the process boundary, no pickled code.
"""

from __future__ import annotations

import logging

# vLLM warns "<Layer>: Failed to load weights" for every module the checkpoint has no tensor
# for: the rotary embedding (it has none) and the tied head (repacked below). Expected here.
_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class WeightSwap:
    """Mixed into vLLM's worker class: call through `LLM.collective_rpc("swap_weights", ...)`."""

    def swap_weights(self, path: str) -> list[str]:
        """Load every tensor of the checkpoint folder ``path`` in place; returns repacked heads."""
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

        logging.getLogger(_RELOAD_LOGGER).setLevel(logging.ERROR)
        self.reload_weights(weights_path=path)  # type: ignore[attr-defined]
        repacked = []
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        for name, module in model.named_modules():
            if isinstance(module, ParallelLMHead) and module.weight.numel() > 0:
                module.quant_method.process_weights_after_loading(module)
                repacked.append(name)
        return repacked
