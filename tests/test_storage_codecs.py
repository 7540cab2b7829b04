"""Codec round trips: exactness of fp32, fp16 precision and -inf, q8's pinned error bound."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from storage.codecs import KNOWN_CODECS, VALUE_CODECS, Q8Codec, get_codec


def _logprobs(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Realistic top-k logprobs: log-softmax of random logits, sorted descending."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=4.0, size=shape).astype(np.float32)
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -np.sort(-lp, axis=-1).astype(np.float32)


def test_known_codecs_and_value_types() -> None:
    assert KNOWN_CODECS == ("fp32", "fp16", "q8", "compact", "sampled")
    assert get_codec("fp32").value_type == pa.float32()
    assert get_codec("fp16").value_type == pa.float16()
    assert get_codec("q8").value_type == pa.uint8()
    assert get_codec("q8").params == {"min_logprob": -20.0}
    assert get_codec("q8", min_logprob=-8).params == {"min_logprob": -8.0}
    assert get_codec("fp16").params == {}


def test_unknown_codec_lists_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown codec 'int4'.*fp32, fp16, q8"):
        get_codec("int4")


def test_bad_codec_params() -> None:
    with pytest.raises(ValueError, match="bad parameters"):
        get_codec("fp16", min_logprob=-3.0)
    with pytest.raises(ValueError, match="finite and < 0"):
        get_codec("q8", min_logprob=0.0)
    with pytest.raises(ValueError, match="finite and < 0"):
        get_codec("q8", min_logprob=float("-inf"))


def test_codec_rebuilds_from_name_and_params() -> None:
    codec = get_codec("q8", min_logprob=-12.5)
    assert get_codec(codec.name, **codec.params) == codec
    assert get_codec("q8") != codec


def test_fp32_is_exact_including_specials() -> None:
    x = _logprobs((50, 16))
    x[0, -1] = -np.inf
    x[1, -1] = np.nan
    codec = get_codec("fp32")
    enc = codec.encode(x)
    assert enc.dtype == np.float32
    np.testing.assert_array_equal(codec.decode(enc), x)


def test_fp16_relative_error_and_specials() -> None:
    codec = get_codec("fp16")
    x = _logprobs((200, 32))
    enc = codec.encode(x)
    assert enc.dtype == np.float16 and enc.shape == x.shape
    dec = codec.decode(enc)
    assert dec.dtype == np.float32
    normal = np.abs(x) >= 2.0**-14
    rel = np.abs(dec[normal] - x[normal]) / np.abs(x[normal])
    assert rel.max() <= 2.0**-11 < 1e-3
    # Subnormal half values: absolute error at most half the subnormal spacing 2**-24.
    assert np.abs(dec[~normal] - x[~normal]).max(initial=0.0) <= 2.0**-25

    special = np.array([[-np.inf, np.nan, -1e5, -65504.0, 0.0]], dtype=np.float32)
    out = codec.decode(codec.encode(special))
    assert out[0, 0] == -np.inf
    assert np.isnan(out[0, 1])
    # A finite logprob beyond the half range saturates instead of becoming -inf.
    assert out[0, 2] == -65504.0 and out[0, 3] == -65504.0 and out[0, 4] == 0.0


def test_q8_error_bound_is_half_a_step() -> None:
    codec = get_codec("q8")
    assert isinstance(codec, Q8Codec)
    # 256 levels over [-20, 0]: step 20/255, worst case half a step = 20/510.
    assert codec.max_abs_error == pytest.approx(0.0392156862745098, abs=1e-15)
    grid = np.linspace(-20.0, 0.0, 100_001, dtype=np.float32).reshape(-1, 1)
    dec = codec.decode(codec.encode(grid))
    err = np.abs(dec.astype(np.float64) - grid.astype(np.float64)).max()
    assert err <= codec.max_abs_error + 1e-6
    assert err >= codec.max_abs_error - 1e-3  # the bound is attained, not loose


def test_q8_exact_values() -> None:
    codec = get_codec("q8")
    x = np.array([[-20.0, 0.0, -10.0, -np.inf, -100.0, np.nan, 1.5]], dtype=np.float32)
    codes = codec.encode(x)
    assert codes.dtype == np.uint8
    # -10 -> 10 * 255/20 = 127.5 -> rint -> 128 (round half to even).
    np.testing.assert_array_equal(codes, [[0, 255, 128, 0, 0, 0, 255]])
    dec = codec.decode(codes)
    assert dec.dtype == np.float32
    assert dec[0, 0] == np.float32(-20.0) and dec[0, 1] == 0.0  # endpoints exact
    assert dec[0, 2] == pytest.approx(-20.0 * 127 / 255, abs=1e-6)  # -9.9607843
    # Below the range clips to min_logprob.
    assert dec[0, 3] == dec[0, 4] == dec[0, 5] == np.float32(-20.0)


def test_q8_custom_range() -> None:
    codec = get_codec("q8", min_logprob=-5.0)
    assert codec.max_abs_error == pytest.approx(5.0 / 510)
    x = _logprobs((100, 8), seed=3)
    inside = x >= -5.0
    err = np.abs(codec.decode(codec.encode(x)) - x)
    assert err[inside].max() <= codec.max_abs_error + 1e-6
    np.testing.assert_array_equal(codec.decode(codec.encode(x))[~inside], np.float32(-5.0))


@pytest.mark.parametrize("name", VALUE_CODECS)
def test_codecs_preserve_shape_and_storage_dtype(name: str) -> None:
    codec = get_codec(name)
    x = _logprobs((3, 4, 5))
    enc = codec.encode(x)
    assert enc.shape == x.shape
    assert enc.dtype == codec.numpy_dtype
    assert codec.decode(enc).shape == x.shape
