"""Constrained decoding: a request's output held to a JSON schema, a regex, a choice or a Lark grammar.

The engine is llguidance (one CPU wheel with no Python dependencies; xgrammar
would put torch on the serving path). A request's ConstraintSpec says what it
wants in the transport-neutral terms of server/spec.py; `Grammars.compile`
turns it into an llguidance grammar checked against this model's tokenizer,
refusing with a ValidationError that names the field when it does not
compile, is too large, or needs more work to build than the limits allow.
Compiled grammars are cached by content. Each constrained sequence gets an
LLMatcher; each step the executor fills the masks of the constrained rows
into one [rows, ceil(V/32)] bitmask in a thread while the forward pass runs
(llguidance releases the GIL), and sampling applies a row's mask to its
logits before any other filter. End-of-sequence tokens are in the mask only
where the grammar accepts. Unconstrained rows pay nothing.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import llguidance
import llguidance.numpy as llg_numpy
import numpy as np

from streamgen.errors import ValidationError

# The kinds of constraint, as the API fields name them (docs/openai.md, "Structured output").
KINDS = ("json_schema", "json_object", "regex", "choice", "grammar", "tools")
# Fixed JSON formatting: what a model writes anyway (", " and ": "), and a tool call's text is then the same
# whether it is streamed or not.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_CACHE_SIZE = 256


@dataclass(frozen=True, slots=True)
class ConstraintSpec:
    """What a request asks its output to be. source: the schema (a dict), a regex, choices (a tuple of strings),
    or a Lark grammar. param: the request field it came from, named in any refusal."""

    kind: str
    source: object
    param: str

    def key(self) -> str:
        return json.dumps([self.kind, self.source], sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class CompiledGrammar:
    kind: str
    grammar: str  # llguidance's grammar text, validated against the model's tokenizer
    compile_ms: float  # what it took when it was compiled (0 later, from the cache)
    cached: bool = False


@dataclass(frozen=True, slots=True)
class GrammarLimits:
    max_bytes: int = 32768  # the constraint's own text (schema, regex, grammar) once serialized
    max_compile_ms: float = 200.0  # a grammar that takes longer to build is refused (and remembered as such)


class Grammars:
    """One model's compiled grammars, and the matchers made from them."""

    def __init__(self, tokenizer_json: str, vocab_size: int, stop_ids: frozenset[int]) -> None:
        self.vocab_size = vocab_size
        # End-of-sequence for the grammar is the model's own stop ids: allowed where the grammar accepts.
        self._tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size,
                                                 eos_token=sorted(stop_ids) or None)
        self._cache: OrderedDict[str, str | None] = OrderedDict()  # None: refused as too slow to compile
        self._lock = threading.Lock()
        self.live_matchers = 0  # made and not yet released: what constrained requests in flight hold

    def compile(self, spec: ConstraintSpec, limits: GrammarLimits = GrammarLimits()) -> CompiledGrammar:
        """The spec's grammar, from the cache or compiled now; raises ValidationError naming spec.param."""
        key = spec.key()
        if len(key) > limits.max_bytes:
            raise ValidationError(f"{spec.param} is {len(key)} bytes; this server compiles constraints of at most "
                                  f"{limits.max_bytes}", param=spec.param, code="invalid_constraint")
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                grammar = self._cache[key]
                if grammar is None:
                    raise _too_slow(spec, limits)
                return CompiledGrammar(spec.kind, grammar, 0.0, cached=True)
        start = time.perf_counter()
        grammar = self._check(spec, self._grammar(spec))
        ms = (time.perf_counter() - start) * 1000
        slow = ms > limits.max_compile_ms
        with self._lock:
            self._cache[key] = None if slow else grammar
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        if slow:
            raise _too_slow(spec, limits, ms)
        return CompiledGrammar(spec.kind, grammar, ms)

    def matcher(self, compiled: CompiledGrammar) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self._tokenizer, compiled.grammar, log_level=0)
        self.live_matchers += 1
        return matcher

    def release(self, matcher: llguidance.LLMatcher) -> None:
        self.live_matchers -= 1

    def _grammar(self, spec: ConstraintSpec) -> str:
        try:
            if spec.kind in ("json_schema", "json_object"):
                return llguidance.LLMatcher.grammar_from_json_schema(_safe_integers(spec.source, spec.param),
                                                                     defaults=JSON_OPTIONS)
            if spec.kind == "regex":
                return llguidance.LLMatcher.grammar_from_regex(spec.source)
            if spec.kind == "choice":
                return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(
                    json.dumps(c) for c in spec.source))
            return llguidance.LLMatcher.grammar_from_lark(spec.source)  # grammar, tools
        except (ValueError, TypeError) as exc:
            raise ValidationError(f"{spec.param} is not a valid {spec.kind.replace('_', ' ')}: {str(exc)[:200]}",
                                  param=spec.param, code="invalid_constraint") from None

    def _check(self, spec: ConstraintSpec, grammar: str) -> str:
        """Refuse a grammar that does not compile, or that allows no output at all."""
        problem = llguidance.LLMatcher.validate_grammar(grammar, self._tokenizer, limits=_LIMITS)
        if not problem:
            matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0, limits=_LIMITS)
            mask = llg_numpy.allocate_token_bitmask(1, self.vocab_size)
            llg_numpy.fill_next_token_bitmask(matcher, mask)
            if matcher.is_error():
                problem = matcher.get_error()
            elif not mask.any() and not matcher.is_accepting():
                problem = "it allows no output at all"
        if problem:
            raise ValidationError(f"{spec.param} cannot be used: {_short(problem)}", param=spec.param,
                                  code="invalid_constraint")
        return grammar


# JSON integers beyond 2**53 lose precision in JavaScript, and an unbounded integer lets a small model write
# digits until max_tokens: an integer the schema does not bound is kept within the safe range.
SAFE_INTEGER = 2**53 - 1
MAX_SCHEMA_DEPTH = 64
_SUBSCHEMAS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties", "contains", "not", "if", "then", "else", "propertyNames")


def _safe_integers(schema: object, param: str) -> object:
    """A copy of the schema whose unbounded integers are bounded to +-SAFE_INTEGER; too deep a schema is refused."""

    def walk(node: object, depth: int) -> object:
        if depth > MAX_SCHEMA_DEPTH:
            raise ValidationError(f"{param} nests deeper than {MAX_SCHEMA_DEPTH} levels", param=param,
                                  code="invalid_constraint")
        if not isinstance(node, dict):
            return node
        out = dict(node)
        kinds = out.get("type")
        if kinds == "integer" or (isinstance(kinds, list) and "integer" in kinds):
            if "minimum" not in out and "exclusiveMinimum" not in out:
                out["minimum"] = -SAFE_INTEGER
            if "maximum" not in out and "exclusiveMaximum" not in out:
                out["maximum"] = SAFE_INTEGER
        for key in _SUBSCHEMAS:
            if isinstance(out.get(key), dict):
                out[key] = {k: walk(v, depth + 1) for k, v in out[key].items()}
        for key in _SCHEMA_LISTS:
            if isinstance(out.get(key), list):
                out[key] = [walk(v, depth + 1) for v in out[key]]
        for key in _SCHEMA_VALUES:
            if isinstance(out.get(key), (dict, list)):
                out[key] = ([walk(v, depth + 1) for v in out[key]] if isinstance(out[key], list)
                            else walk(out[key], depth + 1))
        return out

    return walk(schema, 0)


# llguidance's own bounds on the work of one grammar, as it ships them; errors name no schema internals.
_LIMITS = llguidance.LLParserLimits(verbose_errors=False)


def _too_slow(spec: ConstraintSpec, limits: GrammarLimits, ms: float | None = None) -> ValidationError:
    took = f"took {ms:.0f} ms" if ms is not None else "takes too long"
    return ValidationError(f"{spec.param} {took} to compile; this server allows {limits.max_compile_ms:g} ms "
                           "(--max-compile-ms): simplify it", param=spec.param, code="invalid_constraint")


def _short(message: str) -> str:
    return message.splitlines()[0][:300] if message else "unknown error"


class MaskFiller:
    """Fills the masks of one step's constrained rows in a thread of its own, while the forward pass runs."""

    def __init__(self) -> None:
        self._executor = llguidance.LLExecutor(num_threads=1)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.bitmask = np.empty((0, 0), dtype=np.int32)
        self.seconds = 0.0

    def start(self, matchers: list[tuple[llguidance.LLMatcher, int]], rows: int, vocab_size: int) -> None:
        """Begin filling rows' masks: matchers pairs each matcher with its row in the step's sampled batch."""
        self.bitmask = llg_numpy.allocate_token_bitmask(rows, vocab_size)  # all allowed: unconstrained rows
        self._error = None

        def fill() -> None:
            start = time.perf_counter()
            try:
                llg_numpy.fill_next_token_bitmask_par(self._executor, matchers, self.bitmask)
            except BaseException as exc:  # noqa: BLE001 - raised on the step's thread by wait()
                self._error = exc
            self.seconds = time.perf_counter() - start

        self._thread = threading.Thread(target=fill, name="streamgen-masks", daemon=True)
        self._thread.start()

    def wait(self) -> np.ndarray:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error
        return self.bitmask


def allowed_tokens(bitmask_row: np.ndarray, vocab_size: int) -> np.ndarray:
    """One row of a bitmask as a bool array [V]."""
    return np.unpackbits(bitmask_row.view(np.uint8), bitorder="little")[:vocab_size].astype(bool)
