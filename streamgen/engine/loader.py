"""Open a pulled model: runner + tokenizer + manifest, from one cache directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from streamgen.engine.executor import KVRunner
from streamgen.engine.device import Device
from streamgen.engine.plain import PlainGraph, PlainSlots
from streamgen.engine.slots import SlotConfig, SlotRunner
from streamgen.engine.tokenizer import TextTokenizer
from streamgen.errors import DeviceError
from streamgen.model_files import GRAPH_GQA, Build, Manifest


@dataclass(frozen=True, slots=True)
class LoadedModel:
    directory: Path
    manifest: Manifest
    runner: KVRunner
    tokenizer: TextTokenizer

    @property
    def name(self) -> str:
        """Display name: the model id, or a local directory's own name."""
        model = self.manifest.model
        return Path(model).name if model.startswith("/") else model

    @property
    def created(self) -> int:
        """When the build was published (Unix seconds): its manifest is written last."""
        return int((self.directory / "manifest.json").stat().st_mtime)

    @property
    def context_length(self) -> int:
        return self.runner.info.context_length

    @property
    def provider(self) -> str:
        """The execution provider that runs the model (CUDAExecutionProvider or CPUExecutionProvider)."""
        session = getattr(self.runner, "session", None) or self.runner.runner.session
        return session.get_providers()[0]

    @property
    def kv_bytes(self) -> int:
        return getattr(self.runner, "kv_bytes", 0)

    @property
    def weights_bytes(self) -> int:
        """The graph and its weights as stored (model.onnx and its external data), what the session loads."""
        return sum(p.stat().st_size for p in self.directory.glob("model.onnx*"))


def check_fits(manifest: Manifest, device: Device) -> None:
    """Refuse a build the device cannot run well, saying what to pull, rather than let ONNX Runtime quietly
    run part of it on the CPU: its CUDA GroupQueryAttention exists only for fp16 and bf16."""
    if device.kind == "cuda" and manifest.graph == GRAPH_GQA and manifest.precision != "fp16":
        raise DeviceError(
            f"the {manifest.build} build of {manifest.model} cannot run its attention on CUDA: ONNX Runtime's CUDA "
            "GroupQueryAttention is fp16 only. Serve the half-precision build instead (pulled when missing): "
            f"--precision fp16, or pull it first: streamgen pull {manifest.model} "
            f"{Build(manifest.build.quantization, 'fp16', manifest.kv_cache).pull_flags().strip()}; "
            "or run on the CPU with --device cpu")


def load_model(directory: Path, device: Device, threads: int = 0, slots: SlotConfig = SlotConfig()) -> LoadedModel:
    """The GQA graph gets static KV slots (many requests per step); the plain graph one slot."""
    manifest = Manifest.read(directory)
    check_fits(manifest, device)
    if manifest.graph == GRAPH_GQA:
        runner: KVRunner = SlotRunner(directory, device, slots, threads)
    else:
        runner = PlainSlots(PlainGraph(directory, device, threads))
    return LoadedModel(directory, manifest, runner, TextTokenizer.from_dir(directory))
