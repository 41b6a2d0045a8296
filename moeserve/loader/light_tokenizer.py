"""A converted GGUF tokenizer read back with the `tokenizers` library alone, without importing transformers.

transformers converts a GGUF file's tokenizer once (loader/gguf.py `_tokenizer` keeps the result in a cache
folder). Reading that folder back through transformers costs ~75 MB of resident memory and ~1.5 s (its import
pulls in huggingface_hub, httpx, PIL, ...), while the tokenizer itself is a `tokenizers.Tokenizer` of ~30 MB.
LightTokenizer is that Tokenizer plus what the engine, the server and the detokenizer ask of a tokenizer:
encode / __call__, decode, the special tokens and their ids, and the chat template rendered as transformers
renders it (the same sandboxed Jinja environment and message handling, ported below).

Nothing here guesses what transformers would do: when transformers converts (or first reads back) a cached
tokenizer, `write_sidecar` records the special tokens, the chat template and the flags it holds, and checks that
a LightTokenizer built from the folder encodes, decodes and renders probe inputs exactly as that transformers
tokenizer does. Only then is the sidecar written; without it the loader keeps using transformers. Anything the
class does not implement (or a call with options it does not handle) goes to the transformers tokenizer, built
from the same folder on first use (`to_transformers`).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

SIDECAR = "moeserve_tokenizer.json"
_FORMAT = 1

# Probe inputs for write_sidecar's check: text that exercises normalisation, pre-tokenisation, bytes and the added
# tokens; the chat conversations are rendered with and without a generation prompt.
_PROBE_TEXTS = [
    "Hello world", " leading space, and trailing ", "Zürich, naïve café, 東京, 😀🤖 — ünïcödé.",
    "a\n\n  b\t\tc    d\r\n", "1234567 3.14159 1e-5", "def add(a, b):\n    return a + b  # comment\n",
    "I'm sure they'll've DONE it's", "", " ", "\u00a0\u2028\ufeff\x00", "<unk> <s> </s> [INST] <<SYS>>",
]
_PROBE_CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "2+2?"}],
]


class LightTokenizer:
    """The transformers-equivalent subset of a cached fast tokenizer; see the module docstring."""

    is_fast = True

    def __init__(self, folder: str | Path, info: dict):
        from tokenizers import Tokenizer

        self.name_or_path = str(folder)
        self._info = info
        self._tok = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
        # As transformers' __call__ sets them for a plain call: no truncation, no padding.
        self._tok.no_truncation()
        self._tok.no_padding()
        self._tok.encode_special_tokens = bool(info["split_special_tokens"])
        self.chat_template = info["chat_template"]
        self.special_tokens_map = dict(info["special_tokens_map"])
        self.all_special_tokens = list(info["all_special_tokens"])
        self.all_special_ids = list(info["all_special_ids"])
        self.model_input_names = list(info["model_input_names"])
        self._hf = None

    @classmethod
    def load(cls, folder: str | Path) -> "LightTokenizer | None":
        """The tokenizer of a cache folder whose sidecar transformers' own tokenizer passed; None without one (or
        when the folder is damaged: the caller then reads it with transformers, or converts again)."""
        try:
            info = json.loads((Path(folder) / SIDECAR).read_text())
            if info.get("format") != _FORMAT or not info.get("light"):
                return None
            return cls(folder, info)
        except Exception:  # no sidecar, a damaged file, a tokenizers version that cannot read it
            return None

    # -- special tokens --
    def __getattr__(self, name: str):
        info = self.__dict__.get("_info")
        if info is not None and name in info["special"]:  # bos_token, eos_token_id, ...
            return info["special"][name]
        if name.startswith("_"):  # never for dunders (copy, pickle) or private names
            raise AttributeError(name)
        return getattr(self.to_transformers(), name)

    def to_transformers(self):
        """The transformers tokenizer of the same folder (imports transformers): for what this class leaves out,
        e.g. xgrammar's TokenizerInfo.from_huggingface."""
        if self._hf is None:
            from transformers import PreTrainedTokenizerFast

            self._hf = PreTrainedTokenizerFast.from_pretrained(self.name_or_path, local_files_only=True)
        return self._hf

    @property
    def backend_tokenizer(self):
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __bool__(self) -> bool:
        return True

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    # -- text <-> ids --
    def encode(self, text, add_special_tokens: bool = True, **kwargs) -> list[int]:
        if kwargs or not isinstance(text, str):
            return self.to_transformers().encode(text, add_special_tokens=add_special_tokens, **kwargs)
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text, add_special_tokens: bool = True, **kwargs):
        if kwargs or not isinstance(text, str):
            return self.to_transformers()(text, add_special_tokens=add_special_tokens, **kwargs)
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        out = {"input_ids": ids}
        if "attention_mask" in self.model_input_names:
            out["attention_mask"] = [1] * len(ids)
        if "token_type_ids" in self.model_input_names:
            out["token_type_ids"] = [0] * len(ids)
        return out

    def decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        if kwargs.pop("clean_up_tokenization_spaces", None) or kwargs:
            return self.to_transformers().decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        elif isinstance(token_ids, dict):
            token_ids = token_ids["input_ids"]
        elif hasattr(token_ids, "tolist"):  # a tensor or an array
            token_ids = token_ids.tolist()
            token_ids = [token_ids] if isinstance(token_ids, int) else token_ids
        return self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **kwargs) -> list[str]:
        return [self.decode(s, skip_special_tokens=skip_special_tokens, **kwargs) for s in sequences]

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        if isinstance(ids, int):
            return self._tok.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tok.id_to_token(int(i)) for i in ids if int(i) not in skip]

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            index = self._tok.token_to_id(tokens)
            return self.unk_token_id if index is None else index
        return [self.convert_tokens_to_ids(t) for t in tokens]

    # -- chat --
    def get_chat_template(self, chat_template: str | None = None, tools: list | None = None) -> str:
        if isinstance(self.chat_template, dict):
            return self.to_transformers().get_chat_template(chat_template, tools)
        if chat_template is None:
            if self.chat_template is None:
                return self.to_transformers().get_chat_template(chat_template, tools)  # raises transformers' error
            chat_template = self.chat_template
        return chat_template

    def apply_chat_template(self, conversation, tools=None, documents=None, chat_template: str | None = None,
                            add_generation_prompt: bool = False, continue_final_message: bool | str = False,
                            tokenize: bool = True, **kwargs):
        """transformers' apply_chat_template with tokenize=False (what moeserve calls); anything else (tokenize,
        padding, assistant masks, control-token sanitising, callable tools, named templates) goes to it."""
        if (tokenize or any(k in kwargs for k in _TOKENIZER_ONLY_KWARGS) or isinstance(self.chat_template, dict)
                or any(not isinstance(t, dict) for t in tools or ())):
            return self.to_transformers().apply_chat_template(
                conversation, tools=tools, documents=documents, chat_template=chat_template,
                add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                tokenize=tokenize, **kwargs)
        chat_template = self.get_chat_template(chat_template, tools)
        if isinstance(conversation, (list, tuple)) and len(conversation) == 0:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        if isinstance(conversation, (list, tuple)) and (
                isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages")):
            conversations, is_batched = conversation, True
        else:
            conversations, is_batched = [conversation], False
        conversations = [_normalize_chat_messages(c) for c in conversations]
        if continue_final_message and add_generation_prompt:
            raise ValueError(
                "continue_final_message and add_generation_prompt are not compatible. Use continue_final_message "
                "when you want the model to continue the final message, and add_generation_prompt when you want to "
                "add a header that will prompt it to start a new assistant message instead.")
        rendered = _render(conversations, tools=tools, documents=documents, chat_template=chat_template,
                           continue_final_message=continue_final_message,
                           add_generation_prompt=add_generation_prompt, **{**self.special_tokens_map, **kwargs})
        return rendered if is_batched else rendered[0]

    # -- copies --
    def __deepcopy__(self, memo):
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._tok = self._tok.__class__.from_str(self._tok.to_str())
        new._tok.encode_special_tokens = self._tok.encode_special_tokens
        new._hf = None
        for name in ("special_tokens_map", "all_special_tokens", "all_special_ids", "model_input_names"):
            new.__dict__[name] = type(self.__dict__[name])(self.__dict__[name])
        return new

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tok"], state["_hf"] = self._tok.to_str(), None
        return state

    def __setstate__(self, state):
        from tokenizers import Tokenizer

        split = bool(state["_info"]["split_special_tokens"])
        state["_tok"] = Tokenizer.from_str(state["_tok"])
        state["_tok"].encode_special_tokens = split
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"LightTokenizer(name_or_path={self.name_or_path!r}, vocab_size={len(self)})"


# apply_chat_template arguments that only matter when tokenizing, or that change the rendering (sanitising)
_TOKENIZER_ONLY_KWARGS = ("sanitize_control_tokens", "padding", "truncation", "max_length", "return_tensors",
                          "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs")


def write_sidecar(hf_tok, folder: str | Path) -> bool:
    """Record what LightTokenizer needs from `hf_tok` (transformers' tokenizer of `folder`), marked usable
    ("light": true) if a LightTokenizer of the folder then encodes, decodes and renders the probes exactly as
    `hf_tok` does, else marked transformers-only (so the check runs once per folder). Returns the mark. Raises
    OSError where the folder is not writable."""
    folder = Path(folder)
    info = _sidecar_info(hf_tok)
    ok = False
    if info is not None:
        try:
            ok = _same_behaviour(LightTokenizer(folder, info), hf_tok)
        except Exception:  # e.g. a tokenizer.json this tokenizers version cannot read
            ok = False
    info = dict(info or {"format": _FORMAT}, light=ok)
    tmp = folder / (SIDECAR + ".tmp")
    tmp.write_text(json.dumps(info, ensure_ascii=False, indent=1))
    tmp.replace(folder / SIDECAR)
    return ok


def _sidecar_info(hf_tok) -> dict | None:
    from transformers import PreTrainedTokenizerFast

    if not isinstance(hf_tok, PreTrainedTokenizerFast) or getattr(hf_tok, "clean_up_tokenization_spaces", False):
        return None
    template = hf_tok.chat_template
    if not (template is None or isinstance(template, str)):
        return None  # named templates: transformers picks among them
    special = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
        token, token_id = getattr(hf_tok, name, None), getattr(hf_tok, name + "_id", None)
        if not (token is None or isinstance(token, str)) or not (token_id is None or isinstance(token_id, int)):
            return None
        special[name], special[name + "_id"] = token, token_id
    stm = hf_tok.special_tokens_map
    if not all(isinstance(v, (str, list)) for v in stm.values()):
        return None
    return {"format": _FORMAT, "special": special, "special_tokens_map": stm,
            "all_special_tokens": list(hf_tok.all_special_tokens), "all_special_ids": list(hf_tok.all_special_ids),
            "chat_template": template, "split_special_tokens": bool(hf_tok.split_special_tokens),
            "model_input_names": list(hf_tok.model_input_names)}


def _same_behaviour(light: LightTokenizer, hf_tok) -> bool:
    try:
        def pipeline(tok) -> dict:  # the backend's whole definition, less the per-call truncation and padding
            return {k: v for k, v in json.loads(tok.to_str()).items() if k not in ("truncation", "padding")}

        if pipeline(light.backend_tokenizer) != pipeline(hf_tok.backend_tokenizer) or \
                light.backend_tokenizer.encode_special_tokens != hf_tok.backend_tokenizer.encode_special_tokens:
            return False
        if len(light) != len(hf_tok) or light.vocab_size != hf_tok.vocab_size:
            return False
        texts = _PROBE_TEXTS + light.all_special_tokens + [f"x{t} y{t}{t}" for t in light.all_special_tokens]
        for text in texts:
            for add in (True, False):
                ref = hf_tok(text, add_special_tokens=add)
                if dict(ref) != light(text, add_special_tokens=add) or \
                        hf_tok.encode(text, add_special_tokens=add) != light.encode(text, add_special_tokens=add):
                    return False
            ids = ref["input_ids"]
            for skip in (True, False):
                if hf_tok.decode(ids, skip_special_tokens=skip) != light.decode(ids, skip_special_tokens=skip):
                    return False
        n = len(light)
        sample = sorted(set(range(0, n, max(1, n // 2000))) | set(light.all_special_ids) | {n - 1})
        for skip in (True, False):
            if [hf_tok.decode([i], skip_special_tokens=skip) for i in sample] != \
                    [light.decode([i], skip_special_tokens=skip) for i in sample]:
                return False
        if hf_tok.convert_ids_to_tokens(sample) != light.convert_ids_to_tokens(sample):
            return False
        if light.chat_template is not None:
            for chat in _PROBE_CHATS:
                for gen in (True, False):
                    try:
                        want = hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
                    except Exception as e:  # a template that refuses these messages must refuse them here too
                        want = type(e)
                    try:
                        got = light.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
                    except Exception as e:
                        got = type(e)
                    if got != want:
                        return False
        return True
    except Exception:
        return False


# ---------------------------------------------------------------------------------------------------------------
# Chat template rendering: transformers 5's (utils/chat_template_utils.py, Apache-2.0, © the HuggingFace team),
# ported for tokenize=False: the same sandboxed environment, filters, globals and message handling.
# ---------------------------------------------------------------------------------------------------------------

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


@lru_cache
def _compile_jinja_template(chat_template: str):
    import jinja2
    import jinja2.exceptions
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit()) < (3, 1, 6):
        raise ImportError(
            f"apply_chat_template requires jinja2>=3.1.6 to be installed. Your version is {jinja2.__version__}. "
            "You can upgrade it with `pip install -U jinja2`.")

    class AssistantTracker(Extension):
        # transformers tracks the text of {% generation %} blocks for assistant masks; rendering text it only
        # renders the block's body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_generation_support"), [], [], body).set_lineno(lineno)

        @jinja2.pass_eval_context
        def _generation_support(self, context, caller) -> str:
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}. "
                    "Please rename the attribute.")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[AssistantTracker, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(chat_template)


def _alias_reasoning_fields(chat: list) -> list:
    aliased = []
    for message in chat:
        if isinstance(message, dict):
            reasoning = next((message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None)
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        aliased.append(message)
    return aliased


def _message_objects_to_dicts(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _message_objects_to_dicts(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_message_objects_to_dicts(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_message_objects_to_dicts(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _message_objects_to_dicts(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _message_objects_to_dicts(value.model_dump())
    return value


def _normalize_chat_messages(conversation: Any) -> list[dict]:
    messages = _message_objects_to_dicts(getattr(conversation, "messages", conversation))
    normalized = []
    for message in messages:
        if not isinstance(message, dict):
            raise TypeError(f"Chat messages should be dicts, dataclasses or pydantic models, but got {message!r}.")
        normalized.append({key: value for key, value in message.items() if value is not None})
    return normalized


def _plain_template_data(value: Any) -> Any:
    import numpy as np

    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain_template_data(key): _plain_template_data(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain_template_data(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain_template_data(item) for item in value)
    if isinstance(value, np.generic):
        return _plain_template_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain_template_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain_template_data(value.model_dump())
    return f"<{type(value).__name__}>"


def _render(conversations: list, tools=None, documents=None, chat_template: str | None = None,
            continue_final_message: bool | str = False, add_generation_prompt: bool = False, **kwargs) -> list[str]:
    compiled = _compile_jinja_template(chat_template)
    if tools is not None and any(inspect.isfunction(t) or inspect.ismethod(t) or not isinstance(t, dict)
                                 for t in tools):
        raise ValueError("callable tools go through transformers")  # apply_chat_template routes them there
    if documents is not None:
        for document in documents:
            if not isinstance(document, dict):
                raise TypeError("Documents should be a list of dicts with 'title' and 'text' keys!")
    tool_schemas = _plain_template_data(list(tools) if tools is not None else None)
    documents = _plain_template_data(documents)
    kwargs = _plain_template_data(kwargs)
    rendered = []
    tag = "CONTINUE_FINAL_MESSAGE_TAG "
    for chat in conversations:
        if hasattr(chat, "messages"):
            chat = chat.messages
        chat = _plain_template_data(chat)
        for message in chat:
            if not isinstance(message, dict):
                raise TypeError(f"Chat messages should be dicts, dataclasses or pydantic models, but got {message!r}.")
        chat = _alias_reasoning_fields(chat)
        if continue_final_message:
            if not chat:
                raise ValueError("continue_final_message is set but the conversation is empty!")
            continue_final_message = continue_final_message if isinstance(continue_final_message, str) else "content"
            if (final_message := chat[-1].get(continue_final_message)) is None:
                raise ValueError(f'continue_final_message is set but the final message has no '
                                 f'"{continue_final_message}" to continue!')
            continue_fields = [continue_final_message]
            if continue_final_message in _REASONING_FIELDS:
                continue_fields = [f for f in _REASONING_FIELDS if chat[-1].get(f) == final_message]
            if not any(field in chat_template for field in continue_fields):
                raise ValueError(f'continue_final_message is set to "{continue_final_message}" but this is not an '
                                 f'accepted field in the chat_template')
            elif isinstance(final_message, (list, tuple)):
                for block in reversed(final_message):
                    if "text" in block:
                        final_message = block["text"]
                        block["text"] = block["text"] + tag
                        break
                else:
                    raise ValueError("continue_final_message is set but we could not find any text to continue in "
                                     "the final message!")
            else:
                for field in continue_fields:
                    chat[-1][field] = chat[-1][field] + tag
        text = compiled.render(messages=chat, tools=tool_schemas, documents=documents,
                               add_generation_prompt=add_generation_prompt, **kwargs)
        if continue_final_message:
            if final_message.strip() not in text or tag.strip() not in text:
                raise ValueError(
                    "continue_final_message is set but the final message does not appear in the chat after "
                    "applying the chat template! This can happen if the chat template deletes portions of "
                    "the final message. Please verify the chat template and final message in your chat to "
                    "ensure they are compatible."
                    f"Final message to continue: {final_message.strip()}\nRendered chat:\n{text}")
            loc = text.rindex(tag.strip())
            text = text[:loc] if text[loc: loc + len(tag)] == tag else text[:loc].rstrip()
        rendered.append(text)
    return rendered
