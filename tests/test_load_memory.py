"""The default model's load without a full-size decode transient (issue 14's peak memory): the tied Q8_0 head is
decoded and packed a chunk of rows at a time (Int4CPUMethod.pack_rows), byte for byte what the whole-table decode
gave, and the load's peak stays close to what the model holds once loaded."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from moeserve.layers.quant.gguf_blocks import decode_int4_terms
from moeserve.layers.quant.int4_cpu import Int4CPUMethod
from test_cpu_quant import random_blocks


def _assert_same(got, want):
    assert got is not None and len(got) == len(want)
    for (w, sz), (w0, sz0) in zip(got, want):
        assert w.dtype == w0.dtype and torch.equal(w, w0)
        assert sz.dtype == sz0.dtype and torch.equal(sz, sz0)
    assert (got.dense is None) == (want.dense is None)
    if want.dense is not None:
        assert got.dense.dtype == torch.bfloat16 and torch.equal(got.dense, want.dense)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1", "Q4_K"])
@pytest.mark.parametrize("n,rows", [(200, 64), (200, 128), (200, 1024), (1000, 192), (64, 64)])
@pytest.mark.parametrize("bf16", [True, False])
def test_pack_rows_gives_the_bytes_of_one_whole_pack(qtype, n, rows, bf16):
    k = 256
    data = random_blocks(qtype, n, k, seed=n + rows)
    want = Int4CPUMethod.pack(decode_int4_terms(qtype, data, n, k), bf16_weights=bf16)
    calls = []

    def decode(start, stop):
        calls.append((start, stop))
        return decode_int4_terms(qtype, data[start:stop], stop - start, k)

    got = Int4CPUMethod.pack_rows(decode, n, rows=rows, bf16_weights=bf16)
    _assert_same(got, want)
    assert calls == [(r, min(r + rows, n)) for r in range(0, n, rows)]


def test_pack_rows_without_an_int4_mapping_or_with_odd_chunks():
    assert Int4CPUMethod.pack_rows(lambda a, b: None, 128) is None
    with pytest.raises(ValueError, match="multiple of 64"):
        Int4CPUMethod.pack_rows(lambda a, b: None, 128, rows=100)


def test_default_model_head_is_bit_identical_to_the_whole_table_decode():
    """The real default model: the loaded LM head's int4 terms, scales and bf16 copy (which the embedding reads)
    equal what decoding the whole tied Q8_0 table at once (the loader before the chunked path) packs."""
    from moeserve import LLM
    from moeserve.loader.gguf import default_model_path, read_gguf

    f = read_gguf(default_model_path())
    t = f.tensors["model.embed_tokens.weight"]
    assert t.qtype == "Q8_0" and t.shape == (49152, 576)
    want = Int4CPUMethod.pack(decode_int4_terms(t.qtype, t.data, *t.shape))
    del f, t
    llm = LLM(max_model_len=64, kv_cache_memory_bytes=8 << 20)
    model = llm.llm_engine.executor.worker.model
    head = model.lm_head
    got = type(want)((getattr(head, f"qweight{i}"), getattr(head, f"qscales_zeros{i}"))
                     for i in range(head.num_int4_terms))
    got.dense = head.weight_bf16
    _assert_same(got, want)
    assert model.model.embed_tokens.lookup_table is head.weight_bf16


_PEAK = """
from moeserve import LLM
llm = LLM(max_model_len=174, max_num_seqs=16, kv_cache_memory_bytes=128 << 20)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(int(status["VmHWM"].split()[0]) / 1024, int(status["VmRSS"].split()[0]) / 1024)
"""
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so a child of a large pytest process would
# report its parent's peak.


def test_default_model_load_peak_stays_near_what_is_held():
    """Before the chunked head the load peaked ~100 MB above the RSS it ended at (794 vs 691 MB): the whole Q8_0
    table's decode temporaries. Now the peak is within a few MB of it (measured 674 vs 666-671)."""
    out = subprocess.run([sys.executable, "-c", _PEAK], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    peak, rss = map(float, out.stdout.split()[-2:])
    assert peak - rss < 40, (peak, rss)


_IMPORTS = """
import sys
from moeserve import LLM, SamplingParams
llm = LLM(max_model_len=64, kv_cache_memory_bytes=8 << 20)
tok = llm.get_tokenizer()
text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
                               add_generation_prompt=True)
out = llm.generate([text], SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text
print(type(tok).__name__, sorted({m.split(".")[0] for m in sys.modules} & {"transformers", "sympy", "gguf", "triton"}), repr(out))
"""


def test_a_warm_start_of_the_default_model_imports_no_transformers(tmp_path, monkeypatch):
    """With its tokenizer cached, serving the default GGUF imports neither transformers (~40 MB resident and ~1.5 s
    for the tokenizer through it; loader/light_tokenizer.py reads the cache instead) nor sympy (torch's meta
    to_empty path imported it: +35 MB) nor the gguf package, nor triton (the CPU path runs no kernel of it: +70 MB
    when the runner imported a dataclass from kernels/)."""
    import os
    from pathlib import Path

    from moeserve.loader import gguf as gguf_loader
    from moeserve.loader.gguf import default_model_path

    monkeypatch.setenv("MOESERVE_CACHE_DIR", str(tmp_path))
    gguf_loader._tokenizer(Path(default_model_path()))  # the cold start's conversion, here
    env = dict(os.environ)
    # the kernel tests (tests/triton_kernels.py) set it in this process: CPU layers would then run Triton's
    # interpreter, which a user's start never does
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", _IMPORTS], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[:2] == ["LightTokenizer", "[]"], out.stdout
    assert "Paris" in out.stdout, out.stdout
