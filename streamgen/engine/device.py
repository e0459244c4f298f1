"""Choose the execution device without letting ONNX Runtime shout.

Asking ORT for the CUDA provider on a machine without a working CUDA stack
prints a long error and silently falls back to the CPU. So `auto` first checks,
quietly, that a GPU, the driver and the provider's shared libraries are all
there, and only then asks for CUDA.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnxruntime as ort

from streamgen.engine.config import DEVICE_CHOICES
from streamgen.errors import DeviceError

DeviceKind = Literal["cpu", "cuda"]


@dataclass(frozen=True, slots=True)
class Device:
    kind: DeviceKind
    index: int = 0
    cuda_graphs: bool = False  # capture each decode width once and replay it (CUDA only; engine/slots.py)

    @property
    def providers(self) -> list:
        if self.kind == "cuda":
            options = {"device_id": self.index}
            if self.cuda_graphs:
                options["enable_cuda_graph"] = "1"
            return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def __str__(self) -> str:
        return f"cuda:{self.index}" if self.kind == "cuda" else "cpu"


def resolve_device(requested: str, cuda_graphs: bool = False) -> Device:
    """Map auto|cpu|cuda to a usable Device, or raise DeviceError saying why not. CUDA graphs apply to CUDA."""
    if requested not in DEVICE_CHOICES:
        raise DeviceError(f"device must be one of {', '.join(DEVICE_CHOICES)}, got {requested!r}")
    if requested == "cpu":
        return Device("cpu")
    problem = cuda_problem()
    if problem is None:
        return Device("cuda", cuda_graphs=cuda_graphs)
    if requested == "cuda":
        raise DeviceError(f"CUDA was requested but is not usable: {problem}. Use --device cpu or auto.")
    return Device("cpu")


def cuda_problem() -> str | None:
    """None when CUDA is usable by ORT, else a short reason."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "this onnxruntime build has no CUDA provider (install onnxruntime-gpu)"
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no NVIDIA driver (libcuda.so.1 not found)"
    count = ctypes.c_int(0)
    if libcuda.cuInit(0) != 0 or libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return "the NVIDIA driver reports no usable GPU"
    # The provider library links against cuBLAS/cuDNN; loading it tells us if
    # they resolve, without ORT's noisy fallback. preload_dlls finds copies
    # installed from PyPI (nvidia-* wheels) when there are any.
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload(directory="")
        except Exception:  # noqa: BLE001 - best effort; the load below decides
            pass
    capi = Path(ort.__file__).parent / "capi"
    try:
        ctypes.CDLL(str(capi / "libonnxruntime_providers_shared.so"), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(capi / "libonnxruntime_providers_cuda.so"))
    except OSError as exc:
        return f"the CUDA provider cannot load its libraries ({str(exc).split(':')[-1].strip()})"
    return None
