"""The GGUF tokenizer read back without transformers (loader/light_tokenizer.py): it encodes, decodes and renders
chat templates exactly as transformers' tokenizer of the same cache folder, its sidecar is written only when that
holds, and what it does not implement goes to transformers."""

from __future__ import annotations

import copy
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import pytest

from moeserve.loader import gguf as gguf_loader
from moeserve.loader.gguf import default_model_path
from moeserve.loader.light_tokenizer import SIDECAR, LightTokenizer, write_sidecar

TEXTS = [
    "Hello world", " leading space, and trailing ", "Zürich, naïve café, 東京, 😀🤖 — ünïcödé.",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>raw special tokens<|im_end|>",
    "a\n\n  b\t\tc    d\r\n", "1234567 3.14159 1e-5", "def add(a, b):\n    return a + b  # comment\n", "",
]

# A template with what chat templates of larger models use: namespace, loop controls, tojson, tools and documents,
# raise_exception, reasoning fields, {% generation %}, and the special-token variables.
RICH_TEMPLATE = """{{ bos_token }}{%- set ns = namespace(last_user=-1, n=0) -%}
{%- for m in messages %}{% if m['role'] == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor -%}
{%- if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% if not loop.last %},{% endif %}{% endfor %}</tools>
{% endif -%}
{%- if documents %}{% for d in documents %}[{{ d.title }}] {{ d.text }}
{% endfor %}{% endif -%}
{%- for m in messages -%}
  {%- if m['role'] not in ['system', 'user', 'assistant', 'tool'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif -%}
  {%- if m['role'] == 'tool' %}{% continue %}{% endif -%}
  <|im_start|>{{ m['role'] }}
  {%- if m.get('reasoning_content') and loop.index0 > ns.last_user %}<think>{{ m['reasoning_content'] }}</think>{% endif %}
{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}
{%- if m.get('tool_calls') %}{% for c in m['tool_calls'] %}<call>{{ c['function'] | tojson(indent=1) }}</call>{% endfor %}{% endif %}
<|im_end|>
{% endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}{% endif -%}"""

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! 😀", "reasoning_content": "greet back"},
     {"role": "user", "content": "2+2?", "name": None}],
    [{"role": "user", "content": "Call it"},
     {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function":
                                                        {"name": "f", "arguments": {"x": 1, "é": "ü"}}}]},
     {"role": "tool", "content": "{\"y\": 2}"}, {"role": "user", "content": "thanks"}],
]
TOOLS = [{"type": "function", "function": {"name": "f", "description": "a <b>tool</b> & more",
                                           "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(LightTokenizer, transformers' tokenizer) of one freshly converted cache folder of the default model."""
    from transformers import PreTrainedTokenizerFast

    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("MOESERVE_CACHE_DIR", str(cache))
    try:
        light = gguf_loader._tokenizer(Path(default_model_path()))
    finally:
        mp.undo()
    assert isinstance(light, LightTokenizer)
    return light, PreTrainedTokenizerFast.from_pretrained(light.name_or_path, local_files_only=True)


def test_encode_decode_and_special_tokens_match_transformers(pair):
    light, ref = pair
    for name in ("bos_token", "eos_token", "unk_token", "pad_token", "bos_token_id", "eos_token_id", "unk_token_id",
                 "pad_token_id", "special_tokens_map", "all_special_tokens", "all_special_ids", "chat_template",
                 "vocab_size", "name_or_path", "model_input_names", "is_fast"):
        assert getattr(light, name) == getattr(ref, name), name
    assert len(light) == len(ref) and light.get_vocab() == ref.get_vocab()
    for text in TEXTS:
        for add in (True, False):
            assert light(text, add_special_tokens=add) == dict(ref(text, add_special_tokens=add)), text
            assert light.encode(text, add_special_tokens=add) == ref.encode(text, add_special_tokens=add), text
        ids = ref.encode(text)
        for skip in (True, False):
            assert light.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
        assert light.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
        assert light.convert_ids_to_tokens(ids, skip_special_tokens=True) == \
            ref.convert_ids_to_tokens(ids, skip_special_tokens=True)
    every = list(range(len(ref)))
    assert [light.decode([i]) for i in every] == [ref.decode([i]) for i in every]  # the detokenizer's calls
    assert light.decode(5) == ref.decode(5)
    assert light.batch_decode([[1, 2, 3], [4]], skip_special_tokens=True) == \
        ref.batch_decode([[1, 2, 3], [4]], skip_special_tokens=True)
    toks = ["<|im_start|>", "hello", "not-a-token-at-all"]
    assert light.convert_tokens_to_ids(toks) == ref.convert_tokens_to_ids(toks)
    assert light.convert_tokens_to_ids("hello") == ref.convert_tokens_to_ids("hello")


def _both(light, ref, *args, **kwargs):
    """Both renderings, or both exceptions' types."""
    out = []
    for tok in (light, ref):
        try:
            out.append(tok.apply_chat_template(*args, tokenize=False, **kwargs))
        except Exception as e:  # noqa: BLE001
            out.append(type(e))
    return out


def test_chat_templates_render_as_transformers_renders_them(pair):
    light, ref = pair
    for template in (None, RICH_TEMPLATE):
        for chat in CHATS:
            for kwargs in ({"add_generation_prompt": True}, {"add_generation_prompt": False},
                           {"continue_final_message": True}, {"tools": TOOLS, "add_generation_prompt": True},
                           {"documents": [{"title": "T", "text": "body"}], "enable_thinking": False,
                            "add_generation_prompt": True},
                           {"bos_token": "<override>", "custom": [1, {"a": None}]}):
                got, want = _both(light, ref, chat, chat_template=template, **kwargs)
                assert got == want, (template is None, chat, kwargs)
        got, want = _both(light, ref, CHATS, chat_template=template, add_generation_prompt=True)  # batched
        assert isinstance(want, list) and got == want
    cont = CHATS[1][:3]  # continue the assistant's message, and its reasoning
    for field in (True, "content", "reasoning_content"):
        got, want = _both(light, ref, cont, chat_template=RICH_TEMPLATE, continue_final_message=field)
        assert got == want, field


def test_chat_template_errors_are_transformers_errors(pair):
    light, ref = pair
    bad_role = [{"role": "robot", "content": "x"}]
    cases = [([], {}), (bad_role, {"chat_template": RICH_TEMPLATE}),
             (CHATS[0], {"add_generation_prompt": True, "continue_final_message": True}),
             (CHATS[0], {"chat_template": "{% set ns = namespace(_private=1) %}x"}),
             (CHATS[0], {"chat_template": "{{ ''.__class__ }}"}),
             (CHATS[0], {"chat_template": "{{ messages[0].content.__init__ }}"}),
             (["not a dict"], {}), (CHATS[0], {"documents": ["not a dict"]})]
    for chat, kwargs in cases:
        got, want = _both(light, ref, chat, **kwargs)
        assert got == want, (chat, kwargs)


def test_message_objects_are_read_as_dicts(pair):
    light, ref = pair

    @dataclass
    class Msg:
        role: str
        content: str | None

    chat = [Msg("user", "hi"), Msg("assistant", None)]
    got, want = _both(light, ref, chat, chat_template=RICH_TEMPLATE)
    assert got == want and isinstance(got, str)


def test_other_calls_go_to_transformers(pair):
    light, ref = pair
    assert light._hf is None or light._hf is not ref
    ids = light.apply_chat_template(CHATS[0], add_generation_prompt=True)  # tokenize=True: transformers' answer
    assert dict(ids) == dict(ref.apply_chat_template(CHATS[0], add_generation_prompt=True))
    assert light.added_tokens_encoder == ref.added_tokens_encoder  # not implemented here: delegated
    assert light("a b", return_tensors="pt")["input_ids"].tolist() == ref("a b", return_tensors="pt")["input_ids"].tolist()
    assert light.decode([1, 2], clean_up_tokenization_spaces=True) == ref.decode([1, 2], clean_up_tokenization_spaces=True)
    with pytest.raises(AttributeError):
        light._no_such_private_name  # noqa: B018


def test_copies_and_pickles_are_independent_and_equal(pair):
    light, _ = pair
    for other in (copy.deepcopy(light), pickle.loads(pickle.dumps(light))):
        assert other._tok is not light._tok and other._hf is None
        assert other.encode(TEXTS[2]) == light.encode(TEXTS[2]) and other.eos_token_id == light.eos_token_id
        assert other.apply_chat_template(CHATS[0], tokenize=False) == light.apply_chat_template(CHATS[0], tokenize=False)
        other.all_special_ids.append(-1)
        assert -1 not in light.all_special_ids


def test_structured_outputs_accept_the_light_tokenizer(pair):
    from moeserve.engine.structured import Grammars
    from moeserve.sampling_params import StructuredOutputsParams

    light, _ = pair
    grammars = Grammars(light, 49152, {2})
    assert grammars.state(StructuredOutputsParams(choice=["yes", "no"])) is not None


def test_sidecar_is_written_for_an_older_entry_and_refused_when_behaviour_differs(tmp_path, monkeypatch, pair):
    from transformers import PreTrainedTokenizerFast

    monkeypatch.setenv("MOESERVE_CACHE_DIR", str(tmp_path))
    path = Path(default_model_path())
    first = gguf_loader._tokenizer(path)
    (entry,) = (tmp_path / "tokenizers").iterdir()
    assert isinstance(first, LightTokenizer) and json.loads((entry / SIDECAR).read_text())["light"] is True
    (entry / SIDECAR).unlink()  # an entry converted before the sidecar existed: transformers reads it, adds one
    assert isinstance(gguf_loader._tokenizer(path), LightTokenizer) and (entry / SIDECAR).is_file()

    hf = PreTrainedTokenizerFast.from_pretrained(str(entry), local_files_only=True)
    hf.clean_up_tokenization_spaces = True  # a flag this class does not follow: never light
    assert write_sidecar(hf, entry) is False
    assert LightTokenizer.load(entry) is None
    assert not isinstance(gguf_loader._tokenizer(path), LightTokenizer)  # transformers', and no re-check
    assert json.loads((entry / SIDECAR).read_text())["light"] is False

    hf = PreTrainedTokenizerFast.from_pretrained(str(entry), local_files_only=True)
    hf.add_tokens(["<|not_in_the_folder|>"])  # its backend no longer the folder's tokenizer.json: caught
    assert write_sidecar(hf, entry) is False
    assert write_sidecar(PreTrainedTokenizerFast.from_pretrained(str(entry), local_files_only=True), entry) is True
    assert isinstance(gguf_loader._tokenizer(path), LightTokenizer)


def test_ggml_type_table_is_gguf_s():
    import gguf

    for type_id, (name, block, size) in gguf_loader._GGML_TYPES.items():
        qtype = gguf.GGMLQuantizationType(type_id)
        assert (qtype.name, *gguf.GGML_QUANT_SIZES[qtype]) == (name, block, size)
    assert gguf_loader._ggml_type(14) == ("Q6_K", 256, 210)  # not in the table: gguf's
