"""Static KV slots over the GroupQueryAttention graph.

Per layer, one K and one V buffer of shape [max_batch, kv_heads, max_context,
head_dim] is allocated once on the device and bound as both past and present:
GroupQueryAttention writes each new position in place, so nothing is copied
or reallocated per step. A request owns one row (a slot) from allocate() to
free(). Rows are right-padded: a row's length lives in the attention mask.

- prefill(slot, ids) runs one row through a pointer view of that row (GQA
  refuses a batched prompt on top of an existing past), in chunks so that a
  long prompt never needs a huge activation.
- decode(slots, ids) runs every row from 0 to the highest slot in use; the
  IOBinding for each such width is built once and reused, so a step only
  writes the fixed numpy input buffers in place and runs.
Slots are handed out lowest first, so the decoded prefix stays short.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from streamgen.engine.device import Device
from streamgen.engine.runner import ModelInfo

_PAST = "past_key_values."
_PRESENT = "present."


@dataclass(frozen=True, slots=True)
class SlotConfig:
    max_batch: int = 16
    max_context: int = 2048
    prefill_chunk: int = 256  # tokens per prefill forward pass


class ContextFull(Exception):
    """A slot has no room for more tokens."""


class SlotRunner:
    def __init__(self, model_dir: Path, device: Device, config: SlotConfig = SlotConfig(), threads: int = 0,
                 profile_prefix: str | None = None) -> None:
        """profile_prefix: record ONNX Runtime's per-node profile (`bench variants`); end_profiling() writes it."""
        info = ModelInfo.from_config(model_dir / "config.json")
        self.config = config
        self.max_context = min(config.max_context, info.context_length)
        self.info = replace(info, context_length=self.max_context)
        self.device = device
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        if profile_prefix:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        self.session = ort.InferenceSession(str(model_dir / "model.onnx"), options, providers=device.providers)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self._past_names = [n for n in inputs if n.startswith(_PAST)]
        self._ort_device = "cuda" if device.kind == "cuda" else "cpu"
        self._dtype = np.float16 if inputs[self._past_names[0]].type == "tensor(float16)" else np.float32
        self._has_positions = "position_ids" in inputs

        b, h, t, d = config.max_batch, info.num_kv_heads, self.max_context, info.head_dim
        self._row_shape = (h, t, d)
        self._row_bytes = h * t * d * np.dtype(self._dtype).itemsize
        # Allocated once, on the device, zeroed (free rows still run through
        # decode, and stray NaN or denormal bit patterns have no place there);
        # bound as past and present alike. On the CPU the OrtValue wraps the
        # zeroed numpy array without a copy (and keeps it alive).
        self._kv = [
            ort.OrtValue.ortvalue_from_numpy(np.zeros((b, h, t, d), dtype=self._dtype), self._ort_device, device.index)
            for _ in self._past_names
        ]
        # Fixed host buffers for decode, written in place every step.
        self._ids = np.zeros((b, 1), dtype=np.int64)
        self._positions = np.zeros((b, 1), dtype=np.int64)
        self._mask = np.zeros((b, t), dtype=np.int64)
        self._logits = np.zeros((b, 1, info.vocab_size), dtype=np.float32)
        self._decode_bindings: dict[int, ort.IOBinding] = {}
        self.lengths = np.zeros(b, dtype=np.int64)  # tokens in each slot's cache
        self._free = list(range(b))

    @property
    def max_slots(self) -> int:
        return self.config.max_batch

    @property
    def kv_bytes(self) -> int:
        """Device memory held by the KV buffers."""
        return self._row_bytes * self.config.max_batch * len(self._kv)

    # ---- slots -----------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int | None:
        """The lowest free slot, or None when all are taken."""
        if not self._free:
            return None
        self._free.sort()
        slot = self._free.pop(0)
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        if slot in self._free:
            raise ValueError(f"slot {slot} is already free")
        self.lengths[slot] = 0
        self._free.append(slot)

    def room(self, slot: int) -> int:
        return self.max_context - int(self.lengths[slot])

    # ---- forward passes -----------------------------------------------------------

    def prefill(self, slot: int, token_ids: Sequence[int]) -> np.ndarray:
        """Append token_ids to the slot's cache; returns the last position's logits [V]."""
        if len(token_ids) == 0:
            raise ValueError("prefill needs at least one token")
        if len(token_ids) > self.room(slot):
            raise ContextFull(f"slot {slot} has room for {self.room(slot)} tokens, got {len(token_ids)}")
        chunk = self.config.prefill_chunk
        logits = None
        for start in range(0, len(token_ids), chunk):
            logits = self._prefill_chunk(slot, np.asarray(token_ids[start : start + chunk], dtype=np.int64))
        return logits

    def _prefill_chunk(self, slot: int, ids: np.ndarray) -> np.ndarray:
        past = int(self.lengths[slot])
        total = past + len(ids)
        mask = np.zeros((1, self.max_context), dtype=np.int64)
        mask[0, :total] = 1
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", ids[None, :])
        io.bind_cpu_input("attention_mask", mask)
        if self._has_positions:
            io.bind_cpu_input("position_ids", np.arange(past, total, dtype=np.int64)[None, :])
        io.bind_output("logits", "cpu")  # first: get_outputs() follows binding order
        self._bind_kv(io, first_row=slot, rows=1)
        self.session.run_with_iobinding(io)
        self.lengths[slot] = total
        return np.array(io.get_outputs()[0].numpy()[0, -1], dtype=np.float32)

    def decode(self, slots: Sequence[int], token_ids: Sequence[int]) -> np.ndarray:
        """Feed one token to each slot; returns logits [len(slots), V] in the same order."""
        slots = list(slots)
        if any(self.lengths[s] >= self.max_context for s in slots):
            raise ContextFull("a slot is full; end its request before decoding it")
        width = max(slots) + 1
        # Rows below `width` that are not decoding (free or paused) still run:
        # give them one valid position so the kernel sees a sane length.
        self._ids[:width] = 0
        self._mask[:width] = 0
        self._mask[:width, 0] = 1
        self._positions[:width] = 0
        for slot, token in zip(slots, token_ids):
            n = int(self.lengths[slot])
            self._ids[slot, 0] = token
            self._mask[slot, : n + 1] = 1
            self._positions[slot, 0] = n
        self.session.run_with_iobinding(self._decode_binding(width))
        for slot in slots:
            self.lengths[slot] += 1
        return self._logits[slots, 0].copy()

    # ---- bindings -------------------------------------------------------------------

    def _decode_binding(self, width: int) -> ort.IOBinding:
        io = self._decode_bindings.get(width)
        if io is None:
            io = self.session.io_binding()
            _bind_host(io, "input_ids", self._ids[:width], is_output=False)
            _bind_host(io, "attention_mask", self._mask[:width], is_output=False)
            if self._has_positions:
                _bind_host(io, "position_ids", self._positions[:width], is_output=False)
            self._bind_kv(io, first_row=0, rows=width)
            _bind_host(io, "logits", self._logits[:width], is_output=True)
            self._decode_bindings[width] = io
        return io

    def _bind_kv(self, io: ort.IOBinding, first_row: int, rows: int) -> None:
        """Bind rows [first_row, first_row + rows) of every KV buffer as past and present."""
        shape = [rows, *self._row_shape]
        for name, buffer in zip(self._past_names, self._kv):
            ptr = buffer.data_ptr() + first_row * self._row_bytes
            io.bind_input(name, self._ort_device, self.device.index, self._dtype, shape, ptr)
            io.bind_output(_PRESENT + name[len(_PAST):], self._ort_device, self.device.index, self._dtype, shape, ptr)


def _bind_host(io: ort.IOBinding, name: str, array: np.ndarray, *, is_output: bool) -> None:
    """Bind a contiguous host numpy view by pointer, so in-place writes are what the next run sees."""
    assert array.flags["C_CONTIGUOUS"], f"{name} view must be contiguous"
    if is_output:
        io.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
    else:
        io.bind_input(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
