"""Tiny random HF checkpoints, built by the tests themselves with transformers (no hub access).

`make_tiny_checkpoint(dir, arch)` writes config.json + safetensors (optionally sharded, with the index) + a small
byte-level BPE tokenizer with a ChatML chat template, and returns the directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Mixture-of-Experts models route each token to a few experts.",
    "A paged KV cache stores keys and values in fixed-size blocks.",
    "Continuous batching lets requests join and leave at every step.",
    "Hello, world! How are you today? I am fine, thank you.",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "def add(a, b):\n    return a + b\n",
    "Zürich, naïve café, 東京, 😀 — unicode text survives.",
]

# Small, but every path is exercised: GQA (4 query heads over 2 KV heads), 2+ layers, tiny experts.
_BASE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    initializer_range=0.1,  # larger than HF's default so greedy choices are not near-ties
    tie_word_embeddings=False,
)

ARCH_OVERRIDES: dict[str, dict] = {
    "LlamaForCausalLM": dict(),
    "MistralForCausalLM": dict(sliding_window=None),
    "Qwen2ForCausalLM": dict(),  # q/k/v biases are part of the architecture
    "Qwen3ForCausalLM": dict(head_dim=32),  # head_dim != hidden/heads, q/k RMSNorm
    "MixtralForCausalLM": dict(num_local_experts=4, num_experts_per_tok=2),
    "Qwen2MoeForCausalLM": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, shared_expert_intermediate_size=80,
        decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=False,
    ),
    "Qwen3MoeForCausalLM": dict(
        num_hidden_layers=3, head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
        decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=True,
    ),
    # MLA (latent 32 + rope 8 cached), q_lora_rank null, group-limited softmax routing, 2 shared experts.
    "DeepseekV2ForCausalLM": dict(
        num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=24, n_routed_experts=8, n_shared_experts=2, moe_intermediate_size=32, num_experts_per_tok=2,
        first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=4, topk_group=2,
        routed_scaling_factor=1.5,
    ),
    # q_lora_rank set, YaRN with mscale != mscale_all_dim, sigmoid routing over groups, renormalised and scaled.
    "DeepseekV3ForCausalLM": dict(
        num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=24, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=32,
        num_experts_per_tok=2, first_k_dense_replace=1, n_group=4, topk_group=2, norm_topk_prob=True,
        routed_scaling_factor=2.5,
        rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=128, beta_fast=32, beta_slow=1,
                          mscale=1.0, mscale_all_dim=0.8),
    ),
    # head_dim 32 != 64/4, half of it rotated, q/k/v bias, q/k norm, sigmoid groups, a shared expert.
    "Glm4MoeForCausalLM": dict(
        head_dim=32, attention_bias=True, use_qk_norm=True, n_routed_experts=8, n_shared_experts=1,
        moe_intermediate_size=32, num_experts_per_tok=2, first_k_dense_replace=1, n_group=2, topk_group=1,
        norm_topk_prob=True, routed_scaling_factor=1.5,
    ),
}


def make_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 384):
    """A byte-level BPE tokenizer trained on a few sentences, saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def tiny_config(arch: str, vocab_size: int, **overrides):
    import transformers

    if arch not in ARCH_OVERRIDES:
        raise KeyError(f"no tiny config for {arch}")
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    kwargs = {**_BASE, **ARCH_OVERRIDES[arch], **overrides}
    cfg = config_cls(vocab_size=vocab_size, **kwargs)
    cfg.architectures = [arch]
    return cfg


def make_tiny_checkpoint(out_dir: str | os.PathLike, arch: str = "LlamaForCausalLM", *, seed: int = 0,
                         max_shard_size: str | None = None, **config_overrides) -> str:
    """Build, save and return a tiny random `arch` checkpoint with a tokenizer in `out_dir`."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(out)
    cfg = tiny_config(arch, vocab_size=len(tokenizer), **config_overrides)
    cfg.eos_token_id = tokenizer.eos_token_id
    cfg.pad_token_id = tokenizer.pad_token_id
    cfg.bos_token_id = None
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(out), **kwargs)
    return str(out)
