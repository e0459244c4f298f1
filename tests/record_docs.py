"""Regenerate what the docs show, from the code and from a live server.

    .venv/bin/python tests/record_docs.py              # tables, and examples recorded from a real server
    .venv/bin/python tests/record_docs.py --tables     # only the tables (no model needed)
    .venv/bin/python tests/record_docs.py --batch      # the tables and docs/batch.md's run (no server)

- Generated from the code: README's settings table, and the error tables of
  docs/protocol.md and docs/openai.md (streamgen/config.py, streamgen/errors.py).
- Recorded from `streamgen serve` on the default model: docs/protocol.md's
  example exchange and docs/openai.md's curl and SDK outputs.
- docs/batch.md: its example input file is generated from BATCH_EXAMPLE below; its
  run (the command's summary and output file, then a rerun that resumes) is
  recorded from `streamgen batch` on the default model.

Each part sits between `<!-- generated: NAME -->` (or `recorded:`) and
`<!-- /generated -->` markers. tests/test_docs.py fails when a generated part
no longer matches the code.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PROTOCOL = ROOT / "docs" / "protocol.md"
OPENAI = ROOT / "docs" / "openai.md"
BATCH = ROOT / "docs" / "batch.md"
QUESTION = "What is the capital of France?"


def settings_table() -> str:
    from streamgen.config import Settings, default_text, env_name, flag_name, help_of

    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for f in fields(Settings):
        default = default_text(f.name)
        rows.append(f"| `{flag_name(f.name)}` | `{env_name(f.name)}` | {default if default is not None else 'unset'} "
                    f"| {help_of(f.name).replace('|', '/')} |")
    return "\n".join(rows)


def protocol_errors_table() -> str:
    from streamgen.errors import ERROR_CODES

    rows = ["| code | when |", "|---|---|"]
    rows += [f"| `{code}` | {e.when} |" for code, e in ERROR_CODES.items() if e.where in ("request", "ws")]
    return "\n".join(rows)


def openai_errors_table() -> str:
    from streamgen.errors import ERROR_CODES
    from streamgen.server.openai_schema import ERROR_TYPES

    by_status: dict[int, list[str]] = {}
    for code, e in ERROR_CODES.items():
        if e.where in ("request", "http") or code == "unauthorized":
            by_status.setdefault(e.status, []).append(code)
    rows = ["| status | `type` | codes |", "|---|---|---|"]
    for status in sorted(by_status):
        codes = by_status[status]
        kinds = sorted({ERROR_TYPES.get(c, "invalid_request_error") for c in codes})
        rows.append(f"| {status} | {', '.join(f'`{k}`' for k in kinds)} | {', '.join(f'`{c}`' for c in codes)} |")
    return "\n".join(rows)


# docs/batch.md's example: requests sharing a system prompt, a plain completion, a refused value, a duplicate.
_SYSTEM = "You are a geography teacher. Answer in one short sentence."
BATCH_EXAMPLE = [
    {"custom_id": "france", "method": "POST", "url": "/v1/chat/completions",
     "body": {"messages": [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": QUESTION}],
              "temperature": 0, "max_tokens": 32}},
    {"custom_id": "japan", "method": "POST", "url": "/v1/chat/completions",
     "body": {"messages": [{"role": "system", "content": _SYSTEM},
                           {"role": "user", "content": "What is the capital of Japan?"}],
              "temperature": 0, "max_tokens": 32}},
    {"custom_id": "story", "method": "POST", "url": "/v1/completions",
     "body": {"prompt": "The lighthouse keeper opened the bottle and read", "temperature": 0, "max_tokens": 24}},
    {"custom_id": "too-hot", "method": "POST", "url": "/v1/chat/completions",
     "body": {"messages": [{"role": "user", "content": "Hi"}], "temperature": 12}},
    {"custom_id": "france", "method": "POST", "url": "/v1/completions", "body": {"prompt": "Bonjour"}},
]


def batch_input() -> str:
    return "```\n" + "".join(json.dumps(line) + "\n" for line in BATCH_EXAMPLE) + "```"


GENERATED: dict[tuple[Path, str], Callable[[], str]] = {
    (README, "settings"): settings_table,
    (PROTOCOL, "errors"): protocol_errors_table,
    (OPENAI, "errors"): openai_errors_table,
    (BATCH, "batch-input"): batch_input,
}


def block(text: str, kind: str, name: str) -> str:
    """The body between a marker pair (the test compares it with what the code generates)."""
    match = re.search(rf"<!-- {kind}: {re.escape(name)} -->\n(.*?)<!-- /{kind} -->", text, flags=re.S)
    if match is None:
        raise KeyError(f"no `<!-- {kind}: {name} -->` block")
    return match.group(1).strip("\n")


def replace_block(text: str, kind: str, name: str, body: str) -> str:
    block(text, kind, name)  # it must exist
    pattern = rf"(<!-- {kind}: {re.escape(name)} -->\n).*?(<!-- /{kind} -->)"
    return re.sub(pattern, lambda m: m.group(1) + body.strip("\n") + "\n" + m.group(2), text, flags=re.S)


# ---- recorded from a live server -----------------------------------------------------


def _line(direction: str, message: dict) -> str:
    return f"{direction} {json.dumps(message, ensure_ascii=False)}"


async def _protocol_exchange(ws_url: str) -> str:
    import websockets

    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "The current weather in a city",
        "parameters": {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}}
    frames = [
        {"type": "generate", "id": "r1", "messages": [{"role": "user", "content": QUESTION}],
         "params": {"temperature": 0}},
        {"type": "ping", "id": "p1"},
        {"type": "generate", "id": "r2", "prompt": "Hi", "params": {"top_p": 1.5}},
        {"type": "generate", "id": "r3", "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
         "tools": [weather], "tool_choice": "required", "parallel_tool_calls": False,
         "params": {"temperature": 0, "max_tokens": 60}},
    ]
    out = []
    async with websockets.connect(ws_url) as ws:
        for frame in frames:
            out.append(_line(">", frame))
            await ws.send(json.dumps(frame))
            while True:
                msg = json.loads(await ws.recv())
                out.append(_line("<", msg))
                if msg["type"] in ("done", "error", "pong"):
                    break
    return "```\n" + "\n".join(out) + "\n```"


def _curl(base_url: str) -> str:
    body = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": QUESTION}],
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    result = subprocess.run(["curl", "-sN", f"{base_url}/v1/chat/completions", "-H", "content-type: application/json",
                             "-d", json.dumps(body)], capture_output=True, text=True, check=True, timeout=120)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    return "Its output:\n\n```\n" + "\n".join(lines) + "\n```"


def _sdk(base_url: str) -> str:
    from openai import OpenAI

    with OpenAI(base_url=f"{base_url}/v1", api_key="unused unless the server has --api-key") as client:
        text = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
            model="SmolLM2-135M-Instruct", temperature=0, stream=True,
            messages=[{"role": "user", "content": QUESTION}]) if chunk.choices)
    return "It prints:\n\n```\n" + text + "\n```"


STRUCTURED_EXAMPLE = '''from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused unless the server has --api-key")
person = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
          "properties": {"name": {"type": "string", "maxLength": 30},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "city": {"type": "string", "enum": ["Paris", "London", "Rome"]}}}
reply = client.chat.completions.create(
    model="SmolLM2-135M-Instruct", temperature=0, max_tokens=80,
    messages=[{"role": "user", "content": "Make up a person who lives in Europe."}],
    response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": person, "strict": True}})
print(reply.choices[0].message.content)

weather = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}}
reply = client.chat.completions.create(
    model="SmolLM2-135M-Instruct", temperature=0, max_tokens=80, tools=[weather], tool_choice="required",
    parallel_tool_calls=False, messages=[{"role": "user", "content": "What is the weather in Paris?"}])
choice = reply.choices[0]
print(choice.finish_reason, [(c.function.name, c.function.arguments) for c in choice.message.tool_calls])
'''


def _structured(base_url: str) -> str:
    """The example above, run against the server; the printed lines recorded."""
    source = STRUCTURED_EXAMPLE.replace("http://127.0.0.1:8000", base_url)
    result = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, check=True, timeout=300)
    return (f"For example, with the `openai` SDK:\n\n```python\n{STRUCTURED_EXAMPLE}```\n\nIt prints:\n\n"
            f"```\n{result.stdout.strip()}\n```")


def record(base_url: str, ws_url: str) -> dict[tuple[Path, str], str]:
    return {
        (PROTOCOL, "exchange"): asyncio.run(_protocol_exchange(ws_url)),
        (OPENAI, "openai-curl"): _curl(base_url),
        (OPENAI, "openai-sdk"): _sdk(base_url),
        (OPENAI, "openai-structured"): _structured(base_url),
    }


def _batch_run() -> str:
    """`streamgen batch` on the example, its output file, then the same command again (a resume)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        source, output = Path(tmp) / "requests.jsonl", Path(tmp) / "answers.jsonl"
        source.write_text("".join(json.dumps(line) + "\n" for line in BATCH_EXAMPLE))
        command = ["streamgen", "batch", "requests.jsonl", "-o", "answers.jsonl", "--price-per-hour", "1.0"]
        runs = [subprocess.run([sys.executable, "-m", *command], cwd=tmp, capture_output=True, text=True,
                               check=True, timeout=600) for _ in range(2)]
        answers = output.read_text()
    first, again = (run.stderr.strip().splitlines()[-1] for run in runs)
    shown = " ".join(command)
    return (f"```\n$ {shown}\n{first}\n```\n\n`answers.jsonl`, one line per input line, in the order the "
            f"requests finished:\n\n```\n{answers}```\n\nThe same command again finds every request answered:"
            f"\n\n```\n$ {shown}\n{again}\n```")


def main() -> int:
    parts = {key: make() for key, make in GENERATED.items()}
    kinds = {key: "generated" for key in parts}
    if "--batch" in sys.argv or "--tables" not in sys.argv:
        parts[(BATCH, "batch-run")] = _batch_run()
        kinds[(BATCH, "batch-run")] = "recorded"
    if "--tables" not in sys.argv and "--batch" not in sys.argv:
        sys.path.insert(0, str(Path(__file__).parent))
        from conftest import ServerProcess

        from streamgen.model_files import streamgen_home

        server = ServerProcess(streamgen_home(), "--rate-limit", "0")
        try:
            server.wait_ready()
            recorded = record(server.url, server.ws_url)
        finally:
            server.stop()
        parts.update(recorded)
        kinds.update({key: "recorded" for key in recorded})
    for (path, name), body in parts.items():
        path.write_text(replace_block(path.read_text(), kinds[(path, name)], name, body))
        print(f"{path.relative_to(ROOT)}: {kinds[(path, name)]} {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
