"""The real models from the package index (docs/models.md), end to end: `make real-models`.

Not in the default run (tests/conftest.py deselects the `real_models` marker unless -m names it): they download
and convert about 750 MB of GGUF into $STREAMGEN_HOME (kept there for later runs), then each is served by a real
`streamgen serve` and asked through the WebSocket and the official OpenAI SDK, and its builds' quality is measured
against its fp32 build. docs/benchmarks.md ("Models") records the last run.

- gemma-3-270m: Gemma 3 270m, a base model with no chat template: plain prompts are served and completed,
  chat messages are refused; its tokenizer asks for a BOS, which every prompt gets.
- qwen2.5-coder-0.5b-instruct: Qwen2.5-Coder 0.5B Instruct, ChatML with tools in its template.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from streamgen.engine.tokenizer import ChatMessage, TextTokenizer
from streamgen.engine.tools import Tool, ToolCall
from streamgen.model_files import Manifest
from streamgen.models.sources import PACKAGED

from conftest import ServerProcess

pytestmark = pytest.mark.real_models

GEMMA, QWEN = "gemma-3-270m", "qwen2.5-coder-0.5b-instruct"
FRANCE = "What is the capital of France?"
# A base model answers a question written as a completion: Gemma 3 270m continues "The capital of France is"
# with " the capital of the country of France", as llama.cpp does on the same file, but this with " Paris".
COMPLETION = "Question: What is the capital of France?\nAnswer:"
WEATHER = Tool("get_weather", "The weather in a city now",
               {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})


@pytest.fixture(scope="session")
def pulled(real_cache):
    """name -> its fp32 build, pulled once into $STREAMGEN_HOME."""
    from streamgen.models.pull import pull

    done: dict[str, Path] = {}

    def get(name: str, quantization: str = "none") -> Path:
        if (name, quantization) not in done:
            done[(name, quantization)] = pull(name, quantization, real_cache)
        return done[(name, quantization)]

    return get


@pytest.fixture(scope="module")
def servers(pulled, real_cache):
    started: dict[str, ServerProcess] = {}

    def get(name: str) -> ServerProcess:
        if name not in started:
            pulled(name)
            started[name] = ServerProcess(real_cache.home, "--model", name, "--quantize", "none", "--max-batch", "4")
            started[name].wait_ready()
        return started[name]

    yield get
    for server in started.values():
        server.stop()


@pytest.mark.parametrize("name", [GEMMA, QWEN])
def test_a_pull_checks_the_joined_file_and_records_what_it_made(pulled, name: str) -> None:
    build = pulled(name)
    manifest = Manifest.read(build)
    pin = PACKAGED[name]
    assert manifest.graph == "gqa"
    assert manifest.source == {"kind": "packaged", "location": pin.pins, "sha256": pin.sha256}
    assert any(n.startswith("validated against the source model: 24 greedy steps agree") for n in manifest.notes)
    family = next(n for n in manifest.notes if n.startswith("family: "))
    tokenizer = json.loads((build / "tokenizer_config.json").read_text())
    if name == GEMMA:
        assert "Gemma 3" in family and "sliding window 512 on 15 of 18 layers" in family
        assert tokenizer["add_bos_token"] is True and tokenizer["bos_token"] == "<bos>"
        assert (build / "licence.html").read_bytes().count(b"Gemma") > 10
        assert not (build / "chat_template.jinja").exists()
    else:
        assert "Qwen2" in family
        assert tokenizer["add_bos_token"] is False
        assert "tools" in (build / "chat_template.jinja").read_text()


def test_qwen_template_renders_tools_itself_as_transformers_does(pulled) -> None:
    from transformers import AutoTokenizer

    build = pulled(QWEN)
    ours = TextTokenizer.from_dir(build)
    theirs = AutoTokenizer.from_pretrained(build)
    assert ours.renders_tools and "renders tools itself" in ours.template
    call = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
    chats = [
        [ChatMessage("user", FRANCE)],
        [ChatMessage("system", "Answer briefly."), ChatMessage("user", FRANCE)],
        [ChatMessage("user", "Weather in Paris?"), ChatMessage("assistant", "", (call,)),
         ChatMessage("tool", '{"celsius": 21}', tool_call_id="call_1")],
    ]
    for messages in chats:
        text = ours.render_chat(messages, tools=[WEATHER])
        plain = [{"role": m.role, "content": m.content} for m in messages]
        for m, turn in zip(messages, plain):
            if m.tool_calls:
                turn["tool_calls"] = [{"id": c.id, "type": "function",
                                       "function": {"name": c.name, "arguments": json.loads(c.arguments)}}
                                      for c in m.tool_calls]
            if m.tool_call_id:
                turn["tool_call_id"] = m.tool_call_id
        expected = theirs.apply_chat_template(plain, tools=[WEATHER.as_openai()], add_generation_prompt=True,
                                              tokenize=False)
        assert text == expected
        assert "<tools>" in text and "get_weather" in text
        assert ours.encode(text) == theirs(expected, add_special_tokens=False)["input_ids"]


def test_gemma_prompts_start_with_its_bos_as_transformers_encodes_them(pulled) -> None:
    from transformers import AutoTokenizer

    build = pulled(GEMMA)
    ours, theirs = TextTokenizer.from_dir(build), AutoTokenizer.from_pretrained(build)
    for text in ("The capital of France is", "Hello world!\nNumbers: 1 22 333 é ü 中文"):
        ids = ours.encode(text)
        assert ids[0] == 2 and ids.count(2) == 1
        assert ids == theirs(text)["input_ids"]
    assert ours.template.startswith("none:") and "BOS (<bos>)" in ours.template


async def _ws(url: str, **body) -> list[dict]:
    import websockets

    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"type": "generate", "id": "r", **body}))
        out = []
        while True:
            out.append(json.loads(await ws.recv()))
            if out[-1]["type"] in ("done", "error"):
                return out


def test_qwen_answers_through_the_websocket_and_the_openai_sdk(servers) -> None:
    import openai

    server = servers(QWEN)
    msgs = asyncio.run(_ws(server.ws_url, messages=[{"role": "user", "content": FRANCE}],
                           params={"temperature": 0, "max_tokens": 32}))
    assert msgs[-1]["type"] == "done" and "Paris" in msgs[-1]["text"]
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as sdk:
        reply = sdk.chat.completions.create(model=QWEN, messages=[{"role": "user", "content": FRANCE}],
                                            temperature=0, max_tokens=32)
        assert reply.choices[0].message.content == msgs[-1]["text"]
        called = sdk.chat.completions.create(
            model=QWEN, messages=[{"role": "user", "content": "What is the weather in Paris now?"}],
            tools=[WEATHER.as_openai()], tool_choice="required", temperature=0, max_tokens=64)
        call = called.choices[0].message.tool_calls[0]
        assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)


def test_gemma_completes_prompts_and_refuses_messages(servers) -> None:
    import openai

    server = servers(GEMMA)
    msgs = asyncio.run(_ws(server.ws_url, prompt=COMPLETION, params={"temperature": 0, "max_tokens": 8}))
    assert msgs[-1]["type"] == "done" and "Paris" in msgs[-1]["text"]
    refused = asyncio.run(_ws(server.ws_url, messages=[{"role": "user", "content": FRANCE}], params={}))
    assert refused[-1]["type"] == "error" and "no chat template" in refused[-1]["message"]
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as sdk:
        done = sdk.completions.create(model=GEMMA, prompt=COMPLETION, temperature=0, max_tokens=8)
        assert done.choices[0].text == msgs[-1]["text"]
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            sdk.chat.completions.create(model=GEMMA, messages=[{"role": "user", "content": FRANCE}])


@pytest.mark.parametrize("name", [GEMMA, QWEN])
def test_the_ready_line_reports_weights_and_kv_memory(servers, name: str) -> None:
    ready = next(line for line in servers(name).output().splitlines() if "server.ready" in line)
    assert "weights_mib" in ready and "kv_cache_mib" in ready and name in ready


@pytest.mark.parametrize("name", [GEMMA, QWEN])
def test_quantized_builds_stay_close_to_fp32(pulled, name: str) -> None:
    """Perplexity, top-1 agreement and KL of each build against the model's own fp32 build (`bench quality`'s
    measure), on the first paragraphs of its texts. `source` keeps the GGUF's own levels."""
    from streamgen.bench.quality import load_texts, run_quality

    directories = {q: pulled(name, q) for q in ("none", "int8", "source")}
    source_notes = Manifest.read(directories["source"]).notes
    assert any("from the GGUF's blocks" in n for n in source_notes)
    rows = {r.quantization: r for r in run_quality(directories, texts=load_texts()[:4], questions=[])}
    assert rows["source"].top1_agreement > 0.85 and rows["source"].mean_kl < 0.1
    assert rows["int8"].top1_agreement > 0.85
