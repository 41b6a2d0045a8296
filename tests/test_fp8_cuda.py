"""FP8 end to end on CUDA (skipped without a GPU): the fp8 layers inside a whole engine against the same engine on
the dequantized checkpoint in bf16, greedy tokens compared position by position (a position counts as agreeing
until the first difference; after it the sequences diverge).

Two forms: W8A16 (the fp8 kernels switched off: each layer dequantizes its weight, the bf16 matmul runs) must give
every prompt's first token and >= 70% of positions: the weights are the same bf16 values, but the dequantized model
runs other bf16 kernels (skinny GEMM, fused MoE) whose rounding flips this tiny model's near-ties (seen on an H200:
Llama >= 90%, Qwen3-MoE 77%, first tokens all equal). W8A8 (the kernels, activations rounded
to e4m3 too) is reported and only has to agree on the first token of most prompts: a tiny random model has many
near-ties, so its agreement says little about a real model's (the issue's 95% gate is for real checkpoints)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeserve import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

NEW_TOKENS = 16


def _tokens(path: str, **kw) -> list[list[int]]:
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 300, n).tolist() for n in (3, 9, 17, 30)]
    llm = LLM(model=path, block_size=16, max_num_seqs=8, device="cuda", enforce_eager=True, **kw)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


def _agreement(a, b) -> float:
    same = total = 0
    for x, y in zip(a, b):
        for i, (s, t) in enumerate(zip(x, y)):
            if s != t:
                total += len(x) - i
                break
            same += 1
            total += 1
    return same / total


@pytest.fixture
def no_fp8_kernels(monkeypatch):
    from moeserve.layers.quant import fp8

    for cls in (fp8.Fp8LinearMethod, fp8.Fp8MoEMethod):
        orig = cls.finalize

        def finalize(self, layer, orig=orig):
            orig(self, layer)
            self.use_kernel = False

        monkeypatch.setattr(cls, "finalize", finalize)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3MoeForCausalLM"])
def test_fp8_checkpoint_w8a16_on_cuda(tmp_path, arch, no_fp8_kernels):
    from test_fp8 import make_fp8_pair

    fp8, deq = make_fp8_pair(tmp_path, arch, (32, 32))
    got, ref = _tokens(fp8), _tokens(deq)
    assert all(g[0] == r[0] for g, r in zip(got, ref)), (got, ref)
    assert _agreement(got, ref) >= 0.7, (got, ref)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3MoeForCausalLM"])
@pytest.mark.parametrize("online", [False, True])
def test_fp8_w8a8_on_cuda(tmp_path, arch, online):
    from test_fp8 import make_fp8_pair

    fp8, deq = make_fp8_pair(tmp_path, arch, (32, 32))
    got = _tokens(deq, quantization="fp8") if online else _tokens(fp8)
    ref = _tokens(deq)
    # seen on an H200: block Llama 0.73, Qwen3-MoE 0.52; online Llama 0.28, Qwen3-MoE 0.69
    print(f"{arch} {'online' if online else 'block'} W8A8 greedy agreement {_agreement(got, ref):.2f}")
    assert sum(g[0] == r[0] for g, r in zip(got, ref)) >= 3, (got, ref)


@pytest.mark.parametrize("arch,strategy,style", [("LlamaForCausalLM", "channel", "ct"),
                                                 ("Qwen3MoeForCausalLM", "tensor", "ct"),
                                                 ("Qwen3MoeForCausalLM", "tensor", "autofp8")])
def test_per_row_fp8_checkpoint_w8a8_on_cuda(tmp_path, arch, strategy, style):
    """compressed-tensors / AutoFP8 checkpoints through the per-channel W8A8 GEMM and the fp8 MoE kernel (seen on an
    H100: greedy agreement 0.56 in each of the three, first tokens as the W8A8 test above asks)."""
    from test_fp8 import make_fp8_rows_pair

    fp8, deq = make_fp8_rows_pair(tmp_path, arch, strategy, style)
    got, ref = _tokens(fp8), _tokens(deq)
    print(f"{arch} {strategy} {style} W8A8 greedy agreement {_agreement(got, ref):.2f}")
    assert sum(g[0] == r[0] for g, r in zip(got, ref)) >= 3, (got, ref)
