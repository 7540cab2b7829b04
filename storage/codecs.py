"""Codecs for the top-k log-probabilities stored in logit shards.

A codec maps float32 log-probabilities ``[..., k]`` to a compact storage dtype and back.
Only ``topk_logprobs`` goes through a codec: ids are exact int32 and ``next_logprob`` is a
single float32 per position, so compressing them buys little and costs fidelity.

Known codecs (bytes per value before Parquet compression):

- ``fp32`` (4 B): lossless.
- ``fp16`` (2 B, the default): IEEE half precision. Relative error <= 2**-11 (~4.9e-4) for
  |x| >= 2**-14; below that (subnormals) absolute error <= 2**-25. ``-inf`` and NaN are kept;
  finite values beyond the half range (|x| > 65504) saturate to +-65504 instead of turning
  into infinities, so a finite logprob never decodes to ``-inf``.
- ``q8`` (1 B): uint8 linear quantisation of the logprob over ``[min_logprob, 0]``
  (``min_logprob`` defaults to -20.0). Code ``c`` decodes to
  ``min_logprob * (1 - c / 255)``: 256 evenly spaced levels including both endpoints exactly.
  The max absolute error inside the range is half a step, ``|min_logprob| / 510``
  (0.0392157 for -20.0). Values below ``min_logprob`` (including ``-inf`` and NaN) clip to
  ``min_logprob``; positive values clip to 0. exp(-20) ~ 2e-9, so the clipped tail carries no
  visible probability mass.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

_FP16_MAX = float(np.finfo(np.float16).max)  # 65504.0


class Codec(ABC):
    """A way to store the teacher's top-k entries; rebuilt by name on the reading side.

    ``name`` and ``params`` are what goes into shard metadata, so
    ``get_codec(codec.name, **codec.params)`` rebuilds an equal codec on the reading side.
    Two families: a `ValueCodec` stores all k entries per position and only re-encodes the
    values; a `SparseCodec` (``storage.sparse_codecs``) stores a variable number of entries
    per position and decodes back to the same ``[T, k]`` arrays, padded with ``-inf``.
    """

    name: ClassVar[str]
    sparse: ClassVar[bool] = False

    @property
    def params(self) -> dict[str, Any]:
        return {}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Codec) and other.name == self.name and other.params == self.params

    def __hash__(self) -> int:
        return hash((self.name, tuple(sorted(self.params.items()))))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"


class ValueCodec(Codec):
    """Vectorised encoder/decoder between float32 logprobs and a storage dtype; ids stay
    exact int32 and every position keeps all k entries."""

    value_type: ClassVar[pa.DataType]

    @abstractmethod
    def encode(self, logprobs: np.ndarray) -> np.ndarray:
        """float32 ``[..., k]`` -> storage dtype, same shape."""

    @abstractmethod
    def decode(self, values: np.ndarray) -> np.ndarray:
        """Storage dtype ``[..., k]`` -> float32, same shape."""

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(self.value_type.to_pandas_dtype())


class FP32Codec(ValueCodec):
    """Lossless: what the engine produced, bit for bit."""

    name = "fp32"
    value_type = pa.float32()

    def encode(self, logprobs: np.ndarray) -> np.ndarray:
        return np.asarray(logprobs, dtype=np.float32)

    def decode(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=np.float32)


class FP16Codec(ValueCodec):
    """Half precision: halves the bytes with ~3 significant digits, plenty for soft labels."""

    name = "fp16"
    value_type = pa.float16()

    def encode(self, logprobs: np.ndarray) -> np.ndarray:
        x = np.asarray(logprobs, dtype=np.float32)
        # Saturate finite out-of-range values so that only a true -inf is stored as -inf.
        clipped = np.clip(x, -_FP16_MAX, _FP16_MAX)
        clipped = np.where(np.isinf(x), x, clipped)
        return clipped.astype(np.float16)

    def decode(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=np.float16).astype(np.float32)


class Q8Codec(ValueCodec):
    """uint8 linear quantisation over ``[min_logprob, 0]`` with exact endpoints."""

    name = "q8"
    value_type = pa.uint8()
    levels: ClassVar[int] = 255

    def __init__(self, min_logprob: float = -20.0) -> None:
        min_logprob = float(min_logprob)
        if not math.isfinite(min_logprob) or min_logprob >= 0.0:
            raise ValueError(f"q8 min_logprob must be finite and < 0, got {min_logprob}")
        self.min_logprob = min_logprob
        # A lookup table keeps decode exact at both endpoints (0 decodes to min_logprob, 255 to 0)
        # and makes it one gather instead of arithmetic per value.
        self._table = np.linspace(min_logprob, 0.0, self.levels + 1).astype(np.float32)

    @property
    def params(self) -> dict[str, Any]:
        return {"min_logprob": self.min_logprob}

    @property
    def max_abs_error(self) -> float:
        """Worst-case |decode(encode(x)) - x| for x in [min_logprob, 0]: half a step."""
        return -self.min_logprob / (2 * self.levels)

    def encode(self, logprobs: np.ndarray) -> np.ndarray:
        x = np.array(logprobs, dtype=np.float32)  # a copy: the steps below work in place
        x[np.isnan(x)] = self.min_logprob
        np.clip(x, self.min_logprob, 0.0, out=x)  # also maps -inf to min, +inf to 0
        x -= np.float32(self.min_logprob)
        x *= np.float32(self.levels / -self.min_logprob)
        np.rint(x, out=x)
        return x.astype(np.uint8)

    def decode(self, values: np.ndarray) -> np.ndarray:
        return self._table[np.asarray(values, dtype=np.uint8)]


_VALUE_CODECS: dict[str, type[Codec]] = {c.name: c for c in (FP32Codec, FP16Codec, Q8Codec)}


def _registry() -> dict[str, type[Codec]]:
    from storage.sparse_codecs import SPARSE_CODECS  # it builds on the classes above

    return {**_VALUE_CODECS, **{c.name: c for c in SPARSE_CODECS}}


VALUE_CODECS: tuple[str, ...] = tuple(_VALUE_CODECS)  # every position keeps all k entries
KNOWN_CODECS: tuple[str, ...] = (*VALUE_CODECS, "compact", "sampled")
DEFAULT_CODEC = "fp16"


def get_codec(name: str, **params: Any) -> Codec:
    """Build a codec by name; ``params`` are the codec's keyword parameters (as stored)."""
    cls = _registry().get(name)
    if cls is None:
        raise ValueError(f"unknown codec {name!r}; known codecs: {', '.join(KNOWN_CODECS)}")
    try:
        return cls(**params)
    except TypeError as e:
        raise ValueError(f"bad parameters for codec {name!r}: {params} ({e})") from e
