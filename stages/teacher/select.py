"""Choose and load a teacher engine by name, apart from the types every engine imports.

Imports are lazy: vLLM is heavy, and a transformers-only job never needs it.
"""

from __future__ import annotations

from stages.teacher.engine import TeacherEngine, TeacherOptions


def load_engine(options: TeacherOptions) -> TeacherEngine:
    """Build the engine named by `options.engine` (imports are lazy: vLLM is heavy)."""
    if options.engine == "vllm":
        from stages.teacher.vllm_engine import VllmTeacher

        return VllmTeacher(options)
    from stages.teacher.hf_engine import HFTeacher

    return HFTeacher(options)
