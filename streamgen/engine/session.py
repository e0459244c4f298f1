"""The one place an ONNX Runtime session is opened, for every runner."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from streamgen.engine.device import Device


def open_session(model_path: Path, device: Device, threads: int = 0,
                 profile_prefix: str | None = None) -> ort.InferenceSession:
    """All graph optimisations on; threads 0 = one per physical core. profile_prefix records ONNX Runtime's
    per-node profile (`bench variants`); session.end_profiling() writes it."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # warnings about unused initializers and the like are noise here
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(model_path), options, providers=device.providers)
