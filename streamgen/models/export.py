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


def fix_gguf_tokenizer(model_dir: Path) -> str:
    """Give a GGUF-converted tokenizer a plain ByteLevel decoder.

    The converter builds a decoder chain (ByteFallback, Replace, ByteLevel with
    trimming) meant for sentencepiece vocabularies; for a byte-level vocabulary
    the plain ByteLevel decoder is the correct one and never strips spaces.
    """
    from tokenizers import Tokenizer, decoders

    path = model_dir / "tokenizer.json"
    tok = Tokenizer.from_file(str(path))
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path))
    return "tokenizer decoder replaced by plain ByteLevel (GGUF conversion adds a trimming chain)"


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

    external = model.ByteSize() > 1_800_000_000
    for stale in model_path.parent.glob(model_path.name + "_data"):
        stale.unlink()
    onnx.save(
        model,
        str(model_path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=model_path.name + "_data",
    )
