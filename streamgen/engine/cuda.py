"""The few CUDA runtime calls ONNX Runtime's Python API does not offer: zeroing a device buffer and copying a
region of one (a slot's prefix) to another. Through ctypes and the CUDA runtime library the CUDA provider
itself loads, so nothing else is installed.

ONNX Runtime runs its kernels on streams of its own that do not wait for the default stream, so every call
here synchronizes the device before and after: these run between forward passes (at start-up, and when a
request is admitted), never inside one.
"""

from __future__ import annotations

import ctypes
from functools import cache

_LIBRARIES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")
_DEVICE_TO_DEVICE = 3  # cudaMemcpyDeviceToDevice


class CudaError(RuntimeError):
    pass


@cache
def _runtime() -> ctypes.CDLL:
    errors = []
    for name in _LIBRARIES:
        try:
            lib = ctypes.CDLL(name)
        except OSError as exc:
            errors.append(str(exc))
            continue
        lib.cudaMemset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
        lib.cudaMemcpy2D.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                                     ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int]
        lib.cudaSetDevice.argtypes = [ctypes.c_int]
        return lib
    raise CudaError("the CUDA runtime library could not be loaded: " + "; ".join(errors))


def _check(status: int, what: str) -> None:
    if status != 0:
        raise CudaError(f"{what} failed with CUDA error {status}")


def _synchronize(device: int) -> None:
    lib = _runtime()
    _check(lib.cudaSetDevice(device), "cudaSetDevice")
    _check(lib.cudaDeviceSynchronize(), "cudaDeviceSynchronize")


def zero(device: int, pointer: int, size: int) -> None:
    """Set size bytes at pointer (device memory) to zero."""
    _synchronize(device)
    _check(_runtime().cudaMemset(pointer, 0, size), "cudaMemset")
    _synchronize(device)


def copy_rows(device: int, dst: int, src: int, pitch: int, width: int, height: int,
              src_pitch: int | None = None) -> None:
    """Copy `height` rows of `width` bytes each, `pitch` bytes apart at dst (src_pitch at src, if it differs),
    from src to dst (both device memory)."""
    _synchronize(device)
    _check(_runtime().cudaMemcpy2D(dst, pitch, src, src_pitch or pitch, width, height, _DEVICE_TO_DEVICE),
           "cudaMemcpy2D")
    _synchronize(device)
