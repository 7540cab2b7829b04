"""Evaluate stage: held-out task accuracy (decoded with vLLM), perplexity and KL to the teacher."""

from stages.evaluate.metrics import (
    HeldOut,
    answer_text,
    decode_answers,
    exact_match,
    held_out_rows,
    score_student,
)

__all__ = [
    "HeldOut",
    "answer_text",
    "decode_answers",
    "exact_match",
    "held_out_rows",
    "score_student",
]
