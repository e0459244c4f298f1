"""Tokenizer, chat template and stop ids of a pulled model.

Uses the `tokenizers` library and renders the chat template with jinja2, so
the serving path needs neither transformers nor torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from streamgen.errors import ValidationError

# End-of-turn markers used by common chat templates. The GGUF-converted
# tokenizer swaps bos and eos, so the template's own marker is the reliable one.
_END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer, chat_template: str | None, stop_token_ids: frozenset[int]) -> None:
        self._tok = tokenizer
        self.chat_template = chat_template
        self.stop_token_ids = stop_token_ids
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._template = None
        if chat_template:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            self._template = env.from_string(chat_template)

    @classmethod
    def from_dir(cls, model_dir: Path) -> TextTokenizer:
        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        template_file = model_dir / "chat_template.jinja"
        template = template_file.read_text() if template_file.exists() else None
        stop_ids = _stop_token_ids(model_dir, tok, template)
        return cls(tok, template, stop_ids)

    def encode(self, text: str) -> list[int]:
        # Special tokens written in the text (e.g. <|im_start|> from the
        # template) are parsed as such; nothing is added around the text.
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def render_chat(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise ValidationError(
                "this model has no chat template; send a plain prompt", param="messages", code="invalid_request"
            )
        try:
            return self._template.render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token="",
                eos_token="",
            )
        except TemplateError as exc:
            raise ValidationError(
                f"the chat template rejected these messages: {exc}", param="messages", code="invalid_request"
            ) from exc


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
