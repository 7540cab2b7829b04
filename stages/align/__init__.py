"""Cross-tokenizer alignment: byte-exact token spans, the vocabulary map, span targets.

- `spans`: which teacher and student tokens cover the same bytes (vectorised, O(n + m)).
- `tokens`: each token's exact UTF-8 bytes, checked against the text (round trip).
- `vocab`: teacher id -> student id, by the bytes each writes (Ġ / ▁ / <0xNN> normalised).
- `aligner`: teacher-cache rows -> student rows with one teacher target per aligned span.
"""
