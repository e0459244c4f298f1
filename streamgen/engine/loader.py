"""Open a pulled model: runner + tokenizer + manifest, from one cache directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from streamgen.engine.device import Device
from streamgen.engine.runner import OnnxRunner
from streamgen.engine.tokenizer import TextTokenizer
from streamgen.models.cache import Manifest


@dataclass(frozen=True, slots=True)
class LoadedModel:
    directory: Path
    manifest: Manifest
    runner: OnnxRunner
    tokenizer: TextTokenizer

    @property
    def name(self) -> str:
        """Display name: the model id, or a local directory's own name."""
        model = self.manifest.model
        return Path(model).name if model.startswith("/") else model

    @property
    def context_length(self) -> int:
        return self.runner.info.context_length


def load_model(directory: Path, device: Device, threads: int = 0) -> LoadedModel:
    return LoadedModel(
        directory=directory,
        manifest=Manifest.read(directory),
        runner=OnnxRunner(directory, device, threads),
        tokenizer=TextTokenizer.from_dir(directory),
    )
