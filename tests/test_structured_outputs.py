"""Structured outputs (engine/structured.py, server/structured.py): a random tiny model's tokens, drawn with
random sampling, always follow the asked-for JSON schema, choice or regex; offline and through the real server.
A grammared request beside ungrammared ones leaves their tokens as they are alone."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest
from tiny_checkpoints import make_tiny_checkpoint

from moeserve import LLM, SamplingParams
from moeserve.sampling_params import InvalidSamplingParam
from moeserve.server.process import ServerProcess

pytest.importorskip("xgrammar")

MAX_MODEL_LEN = 1024
PROMPTS = ["Hello", "Paris is the capital of", "one two three", "The weather", "Name a color:"]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "ok": {"type": "boolean"},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 3},
    },
    "required": ["name", "ok", "kind"],
    "additionalProperties": False,
}
CHOICES = ["yes", "no", "maybe not"]
REGEX = r"[a-c]{2,5}-\d\d"


def assert_valid(text: str) -> None:
    # strict=False: xgrammar's JSON strings take raw control characters (only \r and \n are kept out), which a
    # random model draws; Python's json refuses them unless told not to.
    value = json.loads(text, strict=False)
    try:
        import jsonschema
    except ImportError:
        assert isinstance(value["name"], str) and isinstance(value["ok"], bool) and value["kind"] in ("cat", "dog", "bird")
    else:
        jsonschema.validate(value, SCHEMA)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("structured"), "LlamaForCausalLM",
                                max_position_embeddings=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(model=ckpt, max_model_len=MAX_MODEL_LEN, device="cpu")


def sampled(max_tokens: int = 80, **kw) -> SamplingParams:
    return SamplingParams(temperature=1.0, max_tokens=max_tokens, **kw)


# -- offline --

def test_json_schema_answers_validate(llm):
    outs = llm.generate(PROMPTS * 2, sampled(structured_outputs={"json": SCHEMA}))
    texts = set()
    for o in outs:
        c = o.outputs[0]
        assert c.finish_reason == "stop", c.text
        assert_valid(c.text)
        texts.add(c.text)
    assert len(texts) > 1  # random sampling: not one forced answer


def test_json_object_is_an_object(llm):
    for o in llm.generate(PROMPTS, sampled(max_tokens=200, structured_outputs={"json_object": True})):
        c = o.outputs[0]
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.text, strict=False), dict)
        else:  # cut at max_tokens: still a prefix of an object
            assert c.text.startswith("{")


def test_choice_is_always_one_of_them(llm):
    outs = llm.generate(PROMPTS * 4, sampled(structured_outputs={"choice": CHOICES}))
    got = {o.outputs[0].text for o in outs}
    assert got <= set(CHOICES) and len(got) > 1


def test_regex_always_matches(llm):
    for o in llm.generate(PROMPTS * 2, sampled(structured_outputs={"regex": REGEX})):
        assert re.fullmatch(REGEX, o.outputs[0].text), o.outputs[0].text


def test_grammar_ebnf(llm):
    ebnf = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'
    for o in llm.generate(PROMPTS, sampled(max_tokens=60, structured_outputs={"grammar": ebnf})):
        c = o.outputs[0]
        assert re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)" if c.finish_reason == "stop"
                            else r"\([0-9+]*", c.text), c.text


def test_uncompilable_specs_fail_at_construction():
    for spec, field in [({"json": {"type": "nosuch"}}, "structured_outputs.json"),
                        ({"json": "{not json"}, "structured_outputs.json"),
                        ({"regex": "a("}, "structured_outputs.regex"),
                        ({"grammar": 'root ::= "a" |'}, "structured_outputs.grammar"),
                        ({"choice": []}, "structured_outputs.choice"),
                        ({"json": SCHEMA, "regex": "a"}, "structured_outputs"),
                        ({"nosuch": 1}, "structured_outputs")]:
        with pytest.raises(InvalidSamplingParam) as e:
            SamplingParams(structured_outputs=spec)
        assert e.value.param == field, spec


def test_ungrammared_tokens_unchanged_beside_grammared(llm):
    plain = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    seeded = SamplingParams(temperature=1.0, seed=7, max_tokens=24, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:2], [plain, seeded])]
    mixed = llm.generate(PROMPTS[:2] + PROMPTS[2:4],
                         [plain, seeded, sampled(structured_outputs={"json": SCHEMA}),
                          sampled(structured_outputs={"regex": REGEX})])
    assert [o.outputs[0].token_ids for o in mixed[:2]] == alone
    assert_valid(mixed[2].outputs[0].text)
    assert re.fullmatch(REGEX, mixed[3].outputs[0].text)


def test_nothing_left_allocated_after_a_bad_request(llm):
    engine = llm.llm_engine
    free = engine.kv.pool.num_free
    with pytest.raises(ValueError):
        llm.generate("Hello", SamplingParams(structured_outputs={"regex": "(("}))
    assert not engine.requests and not engine.has_unfinished_requests() and engine.kv.pool.num_free == free


# -- the server --

@pytest.fixture(scope="module")
def server(ckpt):
    args = [ckpt, "--device", "cpu", "--served-model-name", "tiny", "--max-model-len", str(MAX_MODEL_LEN),
            "--async-scheduling"]
    with ServerProcess(args) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def test_server_json_schema_chat(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}}
    for prompt in PROMPTS:
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                           temperature=1.0, max_tokens=80, response_format=fmt)
        assert r.choices[0].finish_reason == "stop"
        assert_valid(r.choices[0].message.content)


def test_server_json_object_and_guided_extras(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=200,
                                       response_format={"type": "json_object"}, temperature=1.0)
    c = r.choices[0]
    assert c.message.content.startswith("{") and (c.finish_reason == "length" or isinstance(json.loads(c.message.content, strict=False), dict))
    r = client.completions.create(model="tiny", prompt="Pick:", max_tokens=20, n=6, temperature=1.0,
                                  extra_body={"guided_choice": CHOICES})
    assert {c.text for c in r.choices} <= set(CHOICES)
    r = client.completions.create(model="tiny", prompt="Code:", max_tokens=20, n=4, temperature=1.0,
                                  extra_body={"structured_outputs": {"regex": REGEX}})
    assert all(re.fullmatch(REGEX, c.text) for c in r.choices)
    stream = client.completions.create(model="tiny", prompt="Code:", max_tokens=20, temperature=1.0, stream=True,
                                       extra_body={"guided_regex": REGEX})
    assert re.fullmatch(REGEX, "".join(ch.choices[0].text for ch in stream if ch.choices))
    r = client.completions.create(model="tiny", prompt="Pet:", max_tokens=80, temperature=1.0,
                                  extra_body={"guided_json": SCHEMA})
    assert_valid(r.choices[0].text)


@pytest.mark.parametrize("body, field", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nosuch"}}}},
     "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"guided_regex": "a("}, "guided_regex"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_grammar": "root ::= "}, "guided_grammar"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
])
def test_server_uncompilable_is_a_400_naming_the_field(server, body, field):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field
    ok = httpx.post(server.url + "/v1/completions", timeout=30, json={"prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200
