"""Static KV slots over the GroupQueryAttention graph.

Per layer, one K and one V buffer of shape [max_batch, kv_heads, max_context,
head_dim] is allocated once on the device and bound as both past and present:
GroupQueryAttention writes each new position in place, so nothing is copied
or reallocated per step. Rows are right-padded: a row's length lives in the
attention mask. What every row holds is recorded in a SlotTable
(engine/slot_table.py), the single statement of the slot contract.

- prefill(slot, ids) runs one row through a pointer view of that row (GQA
  refuses a batched prompt on top of an existing past), in chunks so that a
  long prompt never needs a huge activation.
- prefill_fresh(slots, prompts) runs the prompts of several empty rows in
  one pass. GQA takes a batch of prompts only without a past (its "first
  prompt" mode, where the pass's length is the whole context), so the pass
  runs on a scratch buffer of exactly the padded prompt length, and each row's
  positions are then copied into its slot. Same K/V and logits, bit for bit,
  as prefilling each alone; one pass, so one read of the weights, instead of one
  per prompt.
- decode(slots, ids) runs every row from 0 to the highest slot decoding; the
  IOBinding for each such width is built once and reused, so a step only
  writes the fixed numpy input buffers in place and runs. GQA writes one
  K/V position in every row it runs, so a row that is not decoding is fed a
  filler token at its own next position: the one it will overwrite before it
  ever reads it. Its contents stay bit for bit what they were.
- verify(slot, ids) runs several tokens on top of one row's past and returns
  the logits after each: a speculative row's proposals checked in one pass
  (engine/speculation.py). The caller then gives the row back the positions
  of the proposals it rejected (SlotTable.truncate); their K/V is garbage that
  nothing reads, and the row's next tokens overwrite it.
- copy_prefix(src, dst, end) copies K/V positions from one row to another
  (prefix caching: a prompt that another row already holds is not prefilled
  again).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from streamgen.engine import cuda
from streamgen.engine.config import ENGINE_DEFAULTS, EngineConfig
from streamgen.engine.device import Device
from streamgen.engine.session import open_session
from streamgen.model_files import ModelInfo
from streamgen.engine.slot_table import MIN_PREFILL_PASS, ContextFull, SlotTable, chunk_size
from streamgen.model_files import LOGIT_POSITIONS

_PAST = "past_key_values."
# The KV cache's element type, as ONNX Runtime names it: fp32, fp16 (the CUDA builds), int8 (with scales).
KV_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}
_PRESENT = "present."

__all__ = ["ContextFull", "SlotConfig", "SlotRunner"]


@dataclass(frozen=True, slots=True)
class SlotConfig:
    max_batch: int = ENGINE_DEFAULTS.max_batch
    max_context: int = ENGINE_DEFAULTS.max_context
    forward_tokens: int = ENGINE_DEFAULTS.forward_tokens  # most prompt tokens in one forward pass

    @classmethod
    def from_config(cls, config: EngineConfig) -> SlotConfig:
        return cls(config.max_batch, config.max_context, config.forward_tokens)


class SlotRunner:
    supports_reuse = True  # rows can be kept, truncated and copied: prefix caching works
    supports_speculation = True  # verify(): several tokens on top of one row's past

    def __init__(self, model_dir: Path, device: Device, config: SlotConfig = SlotConfig(), threads: int = 0,
                 profile_prefix: str | None = None) -> None:
        """profile_prefix: record ONNX Runtime's per-node profile (`bench variants`); end_profiling() writes it."""
        info = ModelInfo.from_config(model_dir / "config.json")
        self.config = config
        self.max_context = min(config.max_context, info.context_length)
        self.info = replace(info, context_length=self.max_context)
        self.device = device
        self.session = open_session(model_dir / "model.onnx", device, threads, profile_prefix)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self._past_names = [n for n in inputs if n.startswith(_PAST)]
        self._ort_device = "cuda" if device.kind == "cuda" else "cpu"
        self._dtype = KV_DTYPES[inputs[self._past_names[0]].type]
        self._has_positions = "position_ids" in inputs
        if LOGIT_POSITIONS not in inputs:
            raise ValueError(f"{model_dir} is a build of an older revision (its graph has no {LOGIT_POSITIONS} "
                             "input); pull it again")

        b, h, t, d = config.max_batch, info.num_kv_heads, self.max_context, info.head_dim
        self._row_shape = (h, t, d)
        self._itemsize = np.dtype(self._dtype).itemsize
        self._row_bytes = h * t * d * self._itemsize
        # Allocated once, on the device, zeroed (stray NaN or denormal bit
        # patterns have no place in rows that run as fillers); bound as past and
        # present alike. On the CPU the OrtValue wraps the zeroed numpy array
        # without a copy (and keeps it alive), so numpy() is a view of it.
        self._kv = [self._zeroed((b, h, t, d)) for _ in self._past_names]
        self.table = SlotTable(b, t)
        # Fixed buffers for decode, written in place every step: on a GPU each
        # has a device twin at a fixed address (what CUDA graphs replay with).
        self._ids = _Staged(np.zeros((b, 1), dtype=np.int64), device)
        self._positions = _Staged(np.zeros((b, 1), dtype=np.int64), device)
        self._mask = _Staged(np.zeros((b, t), dtype=np.int64), device)
        self._logit_rows = _Staged(np.zeros((b, 1), dtype=np.int64), device)  # a decode's one new token: position 0
        self._logits = _Staged(np.zeros((b, 1, info.vocab_size), dtype=np.float32), device)
        self._columns = np.arange(t, dtype=np.int64)
        # prefill_fresh's K/V: as many positions as one pass may hold, viewed as [rows, H, S, D] for each pass.
        self._scratch = [self._zeroed((config.forward_tokens * h * d,)) for _ in self._past_names]
        self._decode_bindings: dict[int, tuple[ort.IOBinding, ort.RunOptions | None]] = {}
        # Prefill has a new shape every time: never captured into a CUDA graph.
        self._prefill_options = _graph_options(-1) if device.cuda_graphs else None

    def _zeroed(self, shape: tuple[int, ...]) -> ort.OrtValue:
        if self.device.kind == "cpu":
            return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=self._dtype), "cpu", 0)
        buffer = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), self._dtype, "cuda", self.device.index)
        cuda.zero(self.device.index, buffer.data_ptr(), int(np.prod(shape)) * self._itemsize)
        return buffer

    @property
    def max_slots(self) -> int:
        return self.config.max_batch

    @property
    def prompt_pass_tokens(self) -> int:
        """Most tokens, padding included, of one prefill_fresh pass: what its scratch buffer holds."""
        return self.config.forward_tokens

    @property
    def past_names(self) -> list[str]:
        """The KV inputs, in the order of the KV buffers."""
        return list(self._past_names)

    def kv_views(self) -> list[np.ndarray]:
        """numpy views of the KV buffers [B, H, T, D] (CPU only: on a GPU they are device memory)."""
        if self.device.kind != "cpu":
            raise ValueError("the KV buffers are device memory; there is no host view of them")
        return [kv.numpy() for kv in self._kv]

    @property
    def kv_bytes(self) -> int:
        """Device memory held by the KV buffers."""
        return self._row_bytes * self.config.max_batch * len(self._kv)

    # ---- slots: claimed and released through the table; these two are the plain case ----

    def allocate(self) -> int | None:
        """The lowest free slot, emptied; None when all are taken."""
        free = self.table.free_slots()
        if not free:
            return None
        self.table.claim(free[0])
        return free[0]

    def free(self, slot: int) -> None:
        self.table.release(slot, keep_contents=False)

    def room(self, slot: int) -> int:
        return self.table.room(slot)

    # ---- forward passes -----------------------------------------------------------

    def prefill(self, slot: int, token_ids: Sequence[int]) -> np.ndarray:
        """Append token_ids to the slot's cache; returns the last position's logits [V]."""
        if len(token_ids) == 0:
            raise ValueError("prefill needs at least one token")
        if len(token_ids) > self.room(slot):
            raise ContextFull(f"slot {slot} has room for {self.room(slot)} tokens, got {len(token_ids)}")
        ids = np.asarray(token_ids, dtype=np.int64)
        start = 0
        while start < len(ids):
            n = chunk_size(len(ids) - start, self.config.forward_tokens)
            logits = self._prefill_chunk(slot, ids[start : start + n])
            start += n
        return logits

    def _prefill_chunk(self, slot: int, ids: np.ndarray, logits_at: np.ndarray | None = None) -> np.ndarray:
        """ids on top of the slot's past; the logits at positions logits_at of them [len(logits_at), V] (by
        default the last)."""
        past = int(self.table.lengths[slot])
        total = past + len(ids)
        mask = np.zeros((1, self.max_context), dtype=np.int64)
        mask[0, :total] = 1
        wanted = np.array([len(ids) - 1], dtype=np.int64) if logits_at is None else logits_at
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", ids[None, :])
        io.bind_cpu_input("attention_mask", mask)
        io.bind_cpu_input(LOGIT_POSITIONS, wanted[None, :])
        if self._has_positions:
            io.bind_cpu_input("position_ids", np.arange(past, total, dtype=np.int64)[None, :])
        io.bind_output("logits", "cpu")  # first: get_outputs() follows binding order
        self._bind_kv(io, first_row=slot, rows=1)
        self.session.run_with_iobinding(io, self._prefill_options)
        self.table.append(slot, ids)
        logits = np.array(io.get_outputs()[0].numpy()[0], dtype=np.float32)  # [L, V]
        return logits[-1] if logits_at is None else logits

    def verify(self, slot: int, token_ids: Sequence[int]) -> np.ndarray:
        """Run token_ids (the last sampled token, then proposals) on top of the slot's past in one pass; the
        logits after each [len(token_ids), V]. At least MIN_PREFILL_PASS tokens: one token on top of a past
        takes GQA's decode path, which rounds differently."""
        if not MIN_PREFILL_PASS <= len(token_ids) <= self.config.forward_tokens:
            raise ValueError(f"verify takes {MIN_PREFILL_PASS} to {self.config.forward_tokens} tokens, "
                             f"got {len(token_ids)}")
        if len(token_ids) > self.room(slot):
            raise ContextFull(f"slot {slot} has room for {self.room(slot)} tokens, got {len(token_ids)}")
        ids = np.asarray(token_ids, dtype=np.int64)
        return self._prefill_chunk(slot, ids, np.arange(len(ids), dtype=np.int64))

    def prefill_fresh(self, slots: Sequence[int], prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Run the prompts of several empty slots in one forward pass; returns each row's last-token logits
        [len(slots), V]. Each prompt needs at least MIN_PREFILL_PASS tokens (one token would take GQA's decode
        path alone, and round differently), and rows x longest prompt at most forward_tokens."""
        rows, width = len(slots), max(len(p) for p in prompts)
        if any(self.table.lengths[s] for s in slots) or len(set(slots)) != rows:
            raise ValueError("prefill_fresh takes distinct empty slots")
        if min(len(p) for p in prompts) < MIN_PREFILL_PASS or rows * width > self.config.forward_tokens:
            raise ValueError(f"prefill_fresh takes prompts of {MIN_PREFILL_PASS} tokens or more, at most "
                             f"{self.config.forward_tokens} tokens with padding; got {rows} x {width}")
        ids = np.zeros((rows, width), dtype=np.int64)
        mask = np.zeros((rows, width), dtype=np.int64)  # right padding: its sum is the row's prompt length
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = prompt
            mask[row, : len(prompt)] = 1
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", mask)
        io.bind_cpu_input(LOGIT_POSITIONS, np.array([[len(p) - 1] for p in prompts], dtype=np.int64))  # each row's last
        if self._has_positions:
            io.bind_cpu_input("position_ids", np.maximum(np.cumsum(mask, axis=1) - 1, 0))
        io.bind_output("logits", "cpu")
        shape = [rows, self._row_shape[0], width, self._row_shape[2]]
        for name, buffer in zip(self._past_names, self._scratch):
            ptr = buffer.data_ptr()
            io.bind_input(name, self._ort_device, self.device.index, self._dtype, shape, ptr)
            io.bind_output(_PRESENT + name[len(_PAST):], self._ort_device, self.device.index, self._dtype, shape, ptr)
        self.session.run_with_iobinding(io, self._prefill_options)
        logits = np.array(io.get_outputs()[0].numpy()[:, 0], dtype=np.float32)
        self._copy_in(width, [(slot, len(prompt)) for slot, prompt in zip(slots, prompts)])
        for slot, prompt in zip(slots, prompts):
            self.table.append(slot, prompt)
        return logits

    def _copy_in(self, width: int, rows: list[tuple[int, int]]) -> None:
        """Copy each scratch row's first n positions (a pass `width` positions long) to its slot: rows are
        (slot, n) in the pass's row order."""
        h, t, d = self._row_shape
        for buffer, scratch in zip(self._kv, self._scratch):
            if self.device.kind == "cpu":
                slots = buffer.numpy()  # [B, H, T, D], a view
                passed = scratch.numpy()[: len(rows) * h * width * d].reshape(len(rows), h, width, d)
                for row, (slot, n) in enumerate(rows):
                    slots[slot, :, :n] = passed[row, :, :n]
                continue
            item = self._itemsize
            for row, (slot, n) in enumerate(rows):
                cuda.copy_rows(self.device.index, buffer.data_ptr() + slot * self._row_bytes,
                               scratch.data_ptr() + row * h * width * d * item, t * d * item, n * d * item, h,
                               src_pitch=width * d * item)

    def decode(self, slots: Sequence[int], token_ids: Sequence[int]) -> np.ndarray:
        """Feed one token to each slot; returns logits [len(slots), V] in the same order."""
        slots = list(slots)
        lengths = self.table.lengths
        if any(lengths[s] >= self.max_context for s in slots):
            raise ContextFull("a slot is full; end its request before decoding it")
        width = max(slots) + 1
        # Every row below `width` runs, and GQA writes one position in each:
        # at the row's length (its mask's sum minus one). For a decoding row that
        # is its new token; for any other row (free, mid-prefill, prefilled
        # earlier in this step) it is a filler at the row's own next position,
        # which the row overwrites before it ever reads it. A full row has no
        # such position: it is free (a request ends before its row fills), so it
        # gives up its last token instead.
        for row in range(width):
            if lengths[row] >= self.max_context:
                self.table.forget_last(row)
        ids, positions, mask = self._ids.host, self._positions.host, self._mask.host
        ids[:width] = 0
        ids[slots, 0] = token_ids
        positions[:width, 0] = lengths[:width]
        np.less_equal(self._columns[None, :], lengths[:width, None], out=mask[:width], casting="unsafe")
        for staged in (self._ids, self._positions, self._mask, self._logit_rows):
            staged.to_device()
        io, options = self._decode_binding(width)
        self.session.run_with_iobinding(io, options)
        self._logits.to_host()
        for slot, token in zip(slots, token_ids):
            self.table.append(slot, (token,))
        return self._logits.host[slots, 0].copy()

    # ---- copies between rows ----------------------------------------------------------

    def copy_prefix(self, src: int, dst: int, end: int) -> None:
        """Give dst the K/V of src's positions [dst's length, end): dst must already hold src's tokens before it."""
        start = int(self.table.lengths[dst])
        if not start <= end <= self.table.lengths[src]:
            raise ValueError(f"cannot copy positions [{start}, {end}) of slot {src}, which holds "
                             f"{self.table.lengths[src]}")
        if np.any(self.table.tokens[dst, :start] != self.table.tokens[src, :start]):
            raise ValueError(f"slots {src} and {dst} differ before position {start}; copying would mix caches")
        if end == start:
            return
        if self.device.kind == "cpu":
            for rows in self.kv_views():  # [B, H, T, D], views of the buffers
                rows[dst, :, start:end] = rows[src, :, start:end]
        else:
            # Per buffer, H runs of (end - start) positions, one per KV head, a row of T positions apart.
            t, d = self._row_shape[1], self._row_shape[2]
            pitch, offset = t * d * self._itemsize, start * d * self._itemsize
            for buffer in self._kv:
                base = buffer.data_ptr()
                cuda.copy_rows(self.device.index, base + dst * self._row_bytes + offset,
                               base + src * self._row_bytes + offset, pitch, (end - start) * d * self._itemsize,
                               self._row_shape[0])
        self.table.append(dst, self.table.tokens[src, start:end].copy())

    # ---- bindings -------------------------------------------------------------------

    def _decode_binding(self, width: int) -> tuple[ort.IOBinding, ort.RunOptions | None]:
        """One binding per width, built once: every buffer at a fixed address, so a step only writes the
        inputs and runs (and, with CUDA graphs, replays the graph captured for that width)."""
        bound = self._decode_bindings.get(width)
        if bound is None:
            io = self.session.io_binding()
            self._ids.bind(io, "input_ids", width, is_output=False)
            self._mask.bind(io, "attention_mask", width, is_output=False)
            self._logit_rows.bind(io, LOGIT_POSITIONS, width, is_output=False)
            if self._has_positions:
                self._positions.bind(io, "position_ids", width, is_output=False)
            self._bind_kv(io, first_row=0, rows=width)
            self._logits.bind(io, "logits", width, is_output=True)
            bound = (io, _graph_options(width) if self.device.cuda_graphs else None)
            self._decode_bindings[width] = bound
        return bound

    def _bind_kv(self, io: ort.IOBinding, first_row: int, rows: int) -> None:
        """Bind rows [first_row, first_row + rows) of every KV buffer as past and present."""
        shape = [rows, *self._row_shape]
        for name, buffer in zip(self._past_names, self._kv):
            ptr = buffer.data_ptr() + first_row * self._row_bytes
            io.bind_input(name, self._ort_device, self.device.index, self._dtype, shape, ptr)
            io.bind_output(_PRESENT + name[len(_PAST):], self._ort_device, self.device.index, self._dtype, shape, ptr)


class _Staged:
    """A fixed decode input or output: the host array the runner writes or reads, and on a GPU its device
    twin, copied across once per step. The first `rows` rows are bound by pointer, so in-place writes are
    what the next run sees and the address never moves."""

    def __init__(self, host: np.ndarray, device: Device) -> None:
        self.host = host
        self._device = device
        self._twin = None if device.kind == "cpu" else ort.OrtValue.ortvalue_from_numpy(host, "cuda", device.index)

    def bind(self, io: ort.IOBinding, name: str, rows: int, *, is_output: bool) -> None:
        shape = [rows, *self.host.shape[1:]]
        where, index = ("cpu", 0) if self._twin is None else ("cuda", self._device.index)
        pointer = self.host.ctypes.data if self._twin is None else self._twin.data_ptr()
        bind = io.bind_output if is_output else io.bind_input
        bind(name, where, index, self.host.dtype, shape, pointer)

    def to_device(self) -> None:
        if self._twin is not None:
            self._twin.update_inplace(self.host)

    def to_host(self) -> None:
        if self._twin is not None:
            self.host[...] = self._twin.numpy()


def _graph_options(graph_id: int) -> ort.RunOptions:
    """Run options that replay (or, the first time, capture) the CUDA graph with this id; -1 runs without one."""
    options = ort.RunOptions()
    options.add_run_config_entry("gpu_graph_id", str(graph_id))
    return options
