"""Embedded demo: a bundled arithmetic task and the small teacher the project builds itself.

Nothing can be downloaded where logitforge is developed and tested, so the default teacher
for `make cache-teacher` and for the tests is built locally (``pipeline.demo.build``) from the
synthetic task in ``pipeline.demo.task``.
"""
