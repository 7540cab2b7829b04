"""Evaluate stage: held-out task accuracy (decoded with vLLM), perplexity and KL to the teacher."""

from stages.evaluate.evaluate import EvalOptions, evaluate_checkpoints, render_table
from stages.evaluate.metrics import (
    HeldOut,
    answer_text,
    decode_answers,
    exact_match,
    full_kl,
    held_out_rows,
    score_against_teacher,
    score_student,
)

__all__ = [
    "EvalOptions",
    "HeldOut",
    "answer_text",
    "decode_answers",
    "evaluate_checkpoints",
    "exact_match",
    "full_kl",
    "held_out_rows",
    "render_table",
    "score_against_teacher",
    "score_student",
]
