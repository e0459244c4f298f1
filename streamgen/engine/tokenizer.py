"""Tokenizer, chat template, BOS and stop ids of a pulled model.

Uses the `tokenizers` library and renders the chat template with jinja2, so
the serving path needs neither transformers nor torch.

The chat template is the model's own (chat_template.jinja, written at pull
time from the model's files), rendered the way transformers'
apply_chat_template renders it: a sandboxed Jinja environment with
trim_blocks and lstrip_blocks, loop controls, its tojson filter (no HTML
escaping, non-ASCII kept), raise_exception and strftime_now, and the
tokenizer's special tokens (bos_token, eos_token, ...) as variables, so a
template that writes `{{ bos_token }}` gets the real one. The rendered text is
then encoded without adding anything, as transformers does.

A plain prompt is encoded the way transformers' tokenizer encodes text: with
a BOS in front when the model asks for one (`add_bos_token` in the
tokenizer_config.json written at pull time: Gemma, Llama 3; not ChatML
models), unless the text already starts with it.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from streamgen.engine.grammar import Grammars
from streamgen.engine.tools import Tool, ToolCall, call_text, result_text, system_prompt
from streamgen.errors import ValidationError

# End-of-turn markers used by common chat templates. The GGUF-converted
# tokenizer swaps bos and eos, so the template's own marker is the reliable one.
_END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
# The special tokens a template may name, as transformers passes them (its special_tokens_map).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
TOKENIZER_CONFIG = "tokenizer_config.json"


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool result: the call it answers


class ChatPrompt(str):
    """A rendered chat: the template placed every special token itself, so encode() adds none."""


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer, chat_template: str | None, stop_token_ids: frozenset[int],
                 special_tokens: Mapping[str, str] | None = None, add_bos_token: bool = False) -> None:
        """special_tokens: name (SPECIAL_TOKEN_NAMES) -> the token's text, what the template sees;
        add_bos_token: a plain prompt starts with special_tokens["bos_token"]."""
        self._tok = tokenizer
        self.chat_template = chat_template
        self.stop_token_ids = stop_token_ids
        self.special_tokens = dict(special_tokens or {})
        bos = self.special_tokens.get("bos_token")
        self.bos_token_id = tokenizer.token_to_id(bos) if bos else None
        if add_bos_token and self.bos_token_id is None:
            raise ValueError(f"the tokenizer asks for a BOS token but has none in its vocabulary ({bos!r})")
        self.add_bos_token = add_bos_token
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._special = set(tokenizer.get_added_tokens_decoder())
        # Byte-level BPE (GPT-2 style) spells each byte as one printable character.
        self._byte_of = _BYTE_OF if type(tokenizer.decoder).__name__ == "ByteLevel" else None
        self._grammars: Grammars | None = None
        self._grammars_lock = threading.Lock()
        self._compiled = _compile(chat_template) if chat_template else None

    @classmethod
    def from_dir(cls, model_dir: Path) -> TextTokenizer:
        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        template_file = model_dir / "chat_template.jinja"
        template = template_file.read_text() if template_file.exists() else None
        stop_ids = _stop_token_ids(model_dir, tok, template)
        config_file = model_dir / TOKENIZER_CONFIG
        # Builds published before streamgen kept the tokenizer's configuration have none: no BOS, as then.
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        special = {name: text for name in SPECIAL_TOKEN_NAMES if (text := _token_text(config.get(name)))}
        return cls(tok, template, stop_ids, special, bool(config.get("add_bos_token", False)))

    @property
    def template(self) -> str:
        """Which chat template this model is served with, in one line (the server logs it at start-up)."""
        bos = f"; a BOS ({self.special_tokens['bos_token']}) starts every plain prompt" if self.add_bos_token else ""
        if not self.chat_template:
            return f"none: the model ships no chat template, so chat messages are refused and plain prompts served{bos}"
        digest = hashlib.sha256(self.chat_template.encode()).hexdigest()[:12]
        tools = "renders tools itself" if self.renders_tools else "tools described in a system turn"
        return f"the model's own (chat_template.jinja, sha256 {digest}...; {tools}){bos}"

    @property
    def grammars(self) -> Grammars:
        """Constrained decoding for this tokenizer (engine/grammar.py), built on first use: it reads the whole
        vocabulary once, which takes a few hundred milliseconds that unconstrained serving never pays."""
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = Grammars(self._tok.to_str(), self.vocab_size, self.stop_token_ids)
        return self._grammars

    def encode(self, text: str) -> list[int]:
        """Special tokens written in the text (e.g. <|im_start|> from the template) are parsed as such. A rendered
        chat (ChatPrompt) is encoded as it is; plain text gets the model's BOS in front when it asks for one and
        the text does not already start with it."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if self.add_bos_token and not isinstance(text, ChatPrompt) and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a byte-level token can be part of a UTF-8 character)."""
        token = self._tok.id_to_token(token_id)
        if token is None:
            return b""
        if token_id in self._special:
            return token.encode("utf-8")
        if self._byte_of is None:
            return self.decode([token_id]).encode("utf-8")
        return bytes(self._byte_of[c] for c in token if c in self._byte_of)

    @property
    def renders_tools(self) -> bool:
        """The chat template renders tools itself (Qwen's and Hermes's do); otherwise they go in a system turn."""
        return bool(self.chat_template) and "tools" in self.chat_template and "tool_call" in self.chat_template

    def render_chat(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True,
                    tools: Sequence[Tool] = ()) -> ChatPrompt:
        if self._compiled is None:
            raise ValidationError(
                "this model has no chat template; send a plain prompt", param="messages", code="invalid_request"
            )
        schemas = None
        if self.renders_tools:
            turns = [_native(m) for m in messages]
            if tools:
                schemas = [t.as_openai() for t in tools]
        else:
            turns = [_generic(m) for m in messages]
            if tools:
                turns = _with_system(turns, system_prompt(tools))
        try:
            return ChatPrompt(self._compiled.render(
                messages=turns,
                tools=schemas,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            ))
        except TemplateError as exc:
            raise ValidationError(
                f"the chat template rejected these messages: {exc}", param="messages", code="invalid_request"
            ) from exc


def _compile(template: str):
    """The template in transformers' environment (transformers.utils.chat_template_utils._compile_jinja_template),
    less its `{% generation %}` tag, which only marks assistant tokens for training."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters; transformers' does not, and exposes these options.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _token_text(value: str | Mapping | None) -> str | None:
    """A special token as tokenizer_config.json writes it: its text, or an AddedToken's dict with a content."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _native(m: ChatMessage) -> dict:
    """A message as templates that know tools read it: OpenAI's shape, a call's arguments as an object."""
    turn: dict = {"role": m.role, "content": m.content}
    if m.tool_calls:
        turn["tool_calls"] = [{"id": c.id, "type": "function",
                               "function": {"name": c.name, "arguments": json.loads(c.arguments)}}
                              for c in m.tool_calls]
    if m.tool_call_id is not None:
        turn["tool_call_id"] = m.tool_call_id
    return turn


def _generic(m: ChatMessage) -> dict:
    """A message for a template that knows no tools: calls written out in the model's format, a result as a
    user turn."""
    if m.role == "tool":
        return {"role": "user", "content": result_text(m.content)}
    content = m.content
    if m.tool_calls:
        content = (content + "\n" if content else "") + call_text(m.tool_calls)
    return {"role": m.role, "content": content}


def _with_system(turns: list[dict], text: str) -> list[dict]:
    """The tools' description as the system turn (after the request's own system text, if any)."""
    if turns and turns[0]["role"] == "system":
        return [{"role": "system", "content": turns[0]["content"] + "\n\n" + text}, *turns[1:]]
    return [{"role": "system", "content": text}, *turns]


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-to-character table, inverted: printable bytes stand for themselves, the rest are shifted
    to code points from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF = _byte_level_alphabet()


def _raise_template_error(message: str) -> None:
    raise TemplateError(message)


def _stop_token_ids(model_dir: Path, tok: Tokenizer, template: str | None) -> frozenset[int]:
    """eos ids from config.json and generation_config.json, plus the template's end marker."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        path = model_dir / name
        if path.exists():
            ids.update(_as_ids(json.loads(path.read_text()).get("eos_token_id")))
    for marker in _END_OF_TURN_MARKERS:
        if template and marker in template and (tid := tok.token_to_id(marker)) is not None:
            ids.add(tid)
    return frozenset(ids)


def _as_ids(value: int | Iterable[int] | None) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}
