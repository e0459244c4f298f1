"""Open a pulled model: runner + tokenizer + manifest, from one cache directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from streamgen.engine.core import KVRunner
from streamgen.engine.device import Device
from streamgen.engine.runner import OnnxRunner, PlainSlots
from streamgen.engine.slots import SlotConfig, SlotRunner
from streamgen.engine.tokenizer import TextTokenizer
from streamgen.model_files import GRAPH_GQA, Manifest


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
    def kv_bytes(self) -> int:
        return getattr(self.runner, "kv_bytes", 0)


def load_model(directory: Path, device: Device, threads: int = 0, slots: SlotConfig = SlotConfig()) -> LoadedModel:
    """The GQA graph gets static KV slots (many requests per step); the plain graph one slot."""
    manifest = Manifest.read(directory)
    if manifest.graph == GRAPH_GQA:
        runner: KVRunner = SlotRunner(directory, device, slots, threads)
    else:
        runner = PlainSlots(OnnxRunner(directory, device, threads))
    return LoadedModel(directory, manifest, runner, TextTokenizer.from_dir(directory))
