"""The student model: an existing causal LM, or a small Llama built locally from a spec.

Built students use the tokenizer they are given (the cache's teacher tokenizer by default), so
the vocabulary and the special token ids line up with the cached top-k ids. The embedded
teacher is built by the same function.
"""

from __future__ import annotations

from typing import Any

import torch

from stages.train.options import StudentArch, StudentOptions

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_MAX_BUILT_CONTEXT = 4096


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:  # batches are right-padded; any id works as padding
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_llama(arch: StudentArch, tokenizer: Any, seed: int, dtype: str = "float32") -> Any:
    """A freshly initialised Llama of shape ``arch`` over ``tokenizer``'s vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    context = arch.max_position_embeddings or min(
        int(getattr(tokenizer, "model_max_length", _MAX_BUILT_CONTEXT)), _MAX_BUILT_CONTEXT
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_heads,
        head_dim=arch.hidden_size // arch.num_heads,
        max_position_embeddings=context,
        tie_word_embeddings=arch.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype=dtype,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(_DTYPES[dtype])
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    return model


def load_student(opts: StudentOptions, default_tokenizer: str, seed: int) -> tuple[Any, Any]:
    """(model, tokenizer) for ``opts``; ``default_tokenizer`` is the cache's teacher model."""
    tokenizer = load_tokenizer(
        opts.tokenizer or opts.model or default_tokenizer, opts.trust_remote_code
    )
    if opts.build is not None:
        return build_llama(opts.build, tokenizer, seed, opts.dtype), tokenizer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        opts.model, dtype=_DTYPES[opts.dtype], trust_remote_code=opts.trust_remote_code
    )
    return model, tokenizer
