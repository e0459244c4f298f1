"""Convert and export with transformers and Optimum. Export extra only.

Nothing here is imported by the serving path; the heavy imports happen
inside the functions so that `streamgen --help` stays fast.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from streamgen import DISTRIBUTION
from streamgen.errors import PullError

EXPORT_TASK = "text-generation-with-past"
_TOOLS = ("optimum", "optimum-onnx", "transformers", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "gguf")


def require_export_tools() -> None:
    missing = []
    for module in ("optimum.exporters.onnx", "transformers", "torch", "onnx"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module.split(".")[0])
    if missing:
        raise PullError(
            f"pulling a model needs the export tools ({', '.join(missing)} missing); "
            f"install them with: pip install '{DISTRIBUTION}[export]' (in the checkout: pip install '.[export]')"
        )


def tool_versions() -> dict[str, str]:
    versions = {}
    for name in _TOOLS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


# ---- expected messages, each left out where it is logged --------------------------------------------------------

# (logger, message pattern, why it is expected and harmless). A filter sits on the logger that emits the record
# (a filter on a parent would not see it) and drops only what its pattern matches: anything else still shows.
EXPECTED_LOGS: tuple[tuple[str, str, str], ...] = (
    # Optimum's exporter passes `torch_dtype=` to transformers 4.57, which renamed it `dtype`; same meaning.
    ("transformers.configuration_utils", r"`torch_dtype` is deprecated! Use `dtype` instead!$",
     "optimum-onnx 0.1.0 still passes the renamed argument"),
    ("transformers.modeling_utils", r"`torch_dtype` is deprecated! Use `dtype` instead!$",
     "optimum-onnx 0.1.0 still passes the renamed argument"),
    # The message itself says it is expected, and to ignore it for a tokenizer loaded from a GGUF: our case.
    ("transformers.models.llama.tokenization_llama_fast", r"You are using the default legacy behaviour of the ",
     "the GGUF conversion's tokenizer; fix_gguf_tokenizer replaces its decoder afterwards"),
    # transformers 4.57.3+ says this of every local directory whose config.json a 4.57.3+ transformers wrote,
    # whatever its model type (its check is meant for Mistral tokenizers); streamgen serves tokenizer.json with
    # the tokenizers library, which this flag does not change.
    ("transformers.tokenization_utils_base", r"The tokenizer you are loading from '.*' with an incorrect regex "
     r"pattern", "transformers 4.57.6 misreads every directory it saved itself as a Mistral tokenizer"),
    # A tied lm_head and embedding become two initializers (a Gather's and a MatMul's, transposed), which
    # Optimum cannot merge; the graph is right, and quantized builds untie the lm_head anyway (models/graph.py).
    # Optimum logs the header, then one tab-indented record per parameter: those go with it.
    ("optimum", r"Found different candidate ONNX initializers \(likely duplicate\) for the tied weights:$",
     "tied embedding and lm_head, exported as two initializers"),
)


QUANTIZER_LOGGER = "onnxruntime.quantization.matmul_nbits_quantizer"
VALIDATION_LOGGER = "optimum.exporters.onnx.convert"


class _Expected(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)
        self._continuing = False  # the header matched: its tab-indented detail records follow

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a filter must never end the build it reports on
            return True
        if self.pattern.match(message):
            self._continuing = True
            return False
        if self._continuing and message.startswith("\t"):
            return False
        self._continuing = False
        return True


class _ValidationSummary(logging.Filter):
    """Optimum's validation of the plain export, when outputs are off by more than its tolerance (1e-5, tighter
    than float32 rounding through every layer), logs two lines per output (90 of them for the default model).
    This leaves out the per-output lines and turns the report that follows them into one line with the largest
    difference, which still shows how far off the export is. A record it does not recognise passes unchanged."""

    _OUTPUT = re.compile(r"\t\t-\[x\] values not close enough, max diff: \S+ \(atol: \S+\)$")
    _REPORT = re.compile(r"The ONNX export succeeded with the warning: The maximum absolute difference between the "
                         r"output of the reference model and the ONNX exported model is not within the set "
                         r"tolerance (?P<atol>[^:\s]+):\n(?P<rows>.*)", re.DOTALL)
    _DIFF = re.compile(r"^- .+: max diff = ([0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)", re.MULTILINE)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
            if self._OUTPUT.match(message):
                return False
            if (found := self._REPORT.match(message)) and (diffs := self._DIFF.findall(found.group("rows"))):
                n = len(diffs)
                record.msg = (f"Optimum's validation: {n} output{'s' * (n != 1)} differ{'s' * (n == 1)} from the "
                              f"source model by up to {max(map(float, diffs)):.2g}, above its tolerance "
                              f"{found.group('atol')}")
                record.args = None
        except Exception:  # noqa: BLE001 - a filter must never end the build it reports on
            pass
        return True


@contextmanager
def expected_messages_quiet() -> Iterator[None]:
    """Leave out the export tools' expected messages (EXPECTED_LOGS) while a build runs, and shorten Optimum's
    validation report to one line. Tracing's warnings are left out by export_onnx and export_gqa; the
    GroupQueryAttention node's missing shape inference by giving its outputs their types (models/gqa.py)."""
    installed: list[tuple[logging.Logger, logging.Filter]] = []
    for name, pattern, _why in EXPECTED_LOGS:
        installed.append((logging.getLogger(name), _Expected(pattern)))
    installed.append((logging.getLogger(VALIDATION_LOGGER), _ValidationSummary()))
    for logger, expected in installed:
        logger.addFilter(expected)
    # ONNX Runtime's MatMulNBits quantizer logs a line per graph node at INFO (hundreds per build), and its
    # module turns the root logger on at INFO when imported (logging.basicConfig): its own warnings stay.
    quantizer = logging.getLogger(QUANTIZER_LOGGER)
    level = quantizer.level
    quantizer.setLevel(logging.WARNING)
    try:
        yield
    finally:
        quantizer.setLevel(level)
        for logger, expected in installed:
            logger.removeFilter(expected)


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF into a Hugging Face directory (safetensors, fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def export_onnx(model: str | Path, out_dir: Path) -> None:
    """Optimum's text-generation-with-past export, with its own validation."""
    from optimum.exporters.onnx import main_export

    # Tracing warns about every data-dependent branch in transformers' code;
    # they are expected for this export and Optimum's validation checks the result.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main_export(str(model), output=out_dir, task=EXPORT_TASK, device="cpu", do_validation=True)
    if not (out_dir / "model.onnx").is_file():
        raise PullError(f"Optimum finished without writing {out_dir / 'model.onnx'}")
    if not (out_dir / "tokenizer.json").is_file():
        raise PullError("the model has no fast tokenizer (tokenizer.json); streamgen needs one")


def fix_gguf_tokenizer(model_dir: Path, gguf: Path | None = None) -> str | None:
    """Mend what transformers' GGUF conversion gets wrong in a tokenizer; returns a note, or None if nothing was.

    - A byte-level vocabulary gets a plain ByteLevel decoder: the converter builds a decoder chain (ByteFallback,
      Replace, ByteLevel with trimming) meant for sentencepiece vocabularies, which strips the leading space of a
      lone token; the plain ByteLevel decoder never does.
    - A SentencePiece vocabulary that the converter made a Unigram model (Gemma's) becomes the BPE model its
      scores describe: merges ranked by the merged piece's score, which is how llama.cpp tokenizes such a GGUF
      and how transformers converts Gemma's own tokenizer.model (GemmaConverter). As a Unigram the same
      vocabulary splits common words into pieces ("capital" as c/ap/it/al). Its user-defined pieces (Gemma's
      runs of spaces and tabs) and control pieces (<start_of_turn>, ...) become added tokens, matched whole
      before the model sees the text, as SentencePiece and llama.cpp match them (gguf: the file, for the types).
    """
    from tokenizers import Tokenizer, decoders

    path = model_dir / "tokenizer.json"
    spec = json.loads(path.read_text())
    if '"ByteLevel"' in json.dumps(spec.get("pre_tokenizer")):
        tok = Tokenizer.from_file(str(path))
        tok.decoder = decoders.ByteLevel()
        tok.save(str(path))
        return "tokenizer decoder replaced by plain ByteLevel (GGUF conversion adds a trimming chain)"
    if spec["model"]["type"] == "Unigram":
        if gguf is not None:
            spec["added_tokens"] = _gguf_added_tokens(gguf, spec["added_tokens"])
        # An added token's text is its piece in the vocabulary too, or tokenizers would give it a new id.
        pieces = spec["model"]["vocab"]
        for entry in spec["added_tokens"]:
            pieces[entry["id"]] = [entry["content"], pieces[entry["id"]][1]]
        spec["model"] = _sentencepiece_bpe(spec["model"])
        path.write_text(json.dumps(spec, ensure_ascii=False))
        Tokenizer.from_file(str(path))  # it loads
        return ("tokenizer: the GGUF's SentencePiece vocabulary as BPE merges ranked by score (the conversion made "
                "it a Unigram model, which splits words llama.cpp and transformers keep whole)")
    return None


def _gguf_added_tokens(gguf: Path, existing: list[dict]) -> list[dict]:
    """The GGUF's control tokens (type 3, special) and user-defined tokens (type 4, plain) as tokenizer.json's
    added tokens, each with its id and its text as the file has it (Gemma's "  " rather than the vocabulary's
    "▁▁"), beside those the conversion already added."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    by_id = {entry["id"]: entry for entry in existing}
    for token_id, (text_at, type_at) in enumerate(zip(tokens.data, types.data)):
        kind = int(types.parts[type_at][0])
        if kind in (3, 4) and token_id not in by_id:
            by_id[token_id] = {"id": token_id, "content": bytes(tokens.parts[text_at]).decode("utf-8"),
                               "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                               "special": kind == 3}
    return [by_id[i] for i in sorted(by_id)]


def _sentencepiece_bpe(unigram: dict) -> dict:
    """tokenizers' BPE model for a SentencePiece vocabulary given as a Unigram's [piece, score] list."""
    from transformers.convert_slow_tokenizer import generate_merges

    vocab_scores = [(piece, score) for piece, score in unigram["vocab"]]
    vocab = {piece: i for i, (piece, _) in enumerate(vocab_scores)}
    merges = generate_merges(vocab, vocab_scores)
    unk = unigram.get("unk_id")
    return {"type": "BPE", "dropout": None, "unk_token": None if unk is None else vocab_scores[unk][0],
            "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
            "byte_fallback": bool(unigram.get("byte_fallback", True)), "ignore_merges": False,
            "vocab": vocab, "merges": [[a, b] for a, b in merges]}


def gguf_add_bos(gguf: Path) -> bool | None:
    """The GGUF's own word on a BOS in front of a prompt (tokenizer.ggml.add_bos_token), None if it says nothing."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf)).fields.get("tokenizer.ggml.add_bos_token")
    return None if field is None else bool(field.parts[field.data[0]][0])


# What the serving tokenizer (engine/tokenizer.py) reads of tokenizer_config.json: the special tokens a chat
# template may name, and whether a plain prompt starts with BOS.
_TOKENIZER_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def write_tokenizer_config(model_dir: Path, gguf_add_bos: bool | None = None) -> str:
    """Keep the part of tokenizer_config.json that serving needs, with add_bos_token stated: what transformers'
    tokenizer does to a plain text (its post-processor puts a BOS in front, or not), except for a GGUF source,
    whose own tokenizer.ggml.add_bos_token is taken (the converter's post-processor adds a BOS whatever the file
    says: SmolLM2's would start every prompt with <|im_start|>). Returns a note for the manifest."""
    from transformers import AutoTokenizer

    path = model_dir / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    kept = {key: config[key] for key in _TOKENIZER_KEYS if config.get(key) is not None}
    if gguf_add_bos is not None:
        add_bos, why = gguf_add_bos, "the GGUF's tokenizer.ggml.add_bos_token"
    else:
        tok = AutoTokenizer.from_pretrained(model_dir)
        ids = tok("Hello")["input_ids"]
        add_bos, why = tok.bos_token_id is not None and ids[:1] == [tok.bos_token_id], "transformers' tokenizer"
        if add_bos:
            kept["bos_token"] = tok.bos_token
    kept["add_bos_token"] = bool(add_bos)
    path.write_text(json.dumps(kept, indent=2, sort_keys=True) + "\n")
    return f"plain prompts {'start with BOS' if add_bos else 'get no BOS'} ({why})"


def write_chat_template(model_dir: Path) -> None:
    """Keep the chat template in chat_template.jinja, whatever file it came in."""
    target = model_dir / "chat_template.jinja"
    if target.exists():
        return
    config = model_dir / "tokenizer_config.json"
    if config.exists():
        template = json.loads(config.read_text()).get("chat_template")
        if isinstance(template, str):
            target.write_text(template)


def prepare_graph(model_path: Path, gqa: bool = False) -> None:
    """Apply streamgen's graph edits (see models/graph.py) in place: logits for the last position (plain
    graph: rows are left-padded, so it is every row's last token) or for the positions the runner asks for
    (GQA graph)."""
    import onnx

    from streamgen.models.graph import keep_last_logits, logits_at_positions

    model = onnx.load(str(model_path))
    if (logits_at_positions if gqa else keep_last_logits)(model):
        save_model(model, model_path)


def save_model(model, model_path: Path) -> None:  # model: onnx.ModelProto
    """Save in one file when it fits protobuf's 2 GB limit, else with external data."""
    import onnx

    # protobuf cannot even measure a message past 2 GB (ByteSize raises), so the weights are counted instead.
    external = _weight_bytes(model) > 1_800_000_000
    for stale in model_path.parent.glob(model_path.name + "_data"):
        stale.unlink()
    onnx.save(
        model,
        str(model_path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=model_path.name + "_data",
    )


def _weight_bytes(model) -> int:
    """The bytes of the model's initializers as stored (raw data, or typed fields), external ones included."""
    import numpy as np
    from onnx import helper

    total = 0
    for init in model.graph.initializer:
        if init.raw_data:
            total += len(init.raw_data)
        elif init.data_location == 1:  # external: its length is recorded
            total += int(next((e.value for e in init.external_data if e.key == "length"), 0))
        else:
            count = int(np.prod(init.dims)) if init.dims else 1
            total += count * np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
    return total
