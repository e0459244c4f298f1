"""The plain-graph fallback: Optimum's text-generation-with-past graph, one request at a time.

Models whose attention the GroupQueryAttention export cannot take (and
`--graph plain` builds) are served from this graph, whose cache grows by
concatenation: a request cannot join or leave a running batch, so the engine
gets a single slot (PlainSlots) and no prefix cache. engine/slots.py is the
runner every GQA build uses.

PlainGraph keeps the KV cache on the device: each step binds the previous
step's `present.*` OrtValues as this step's `past_key_values.*` through
IOBinding, so the cache never passes through numpy or the host. Only the
logits come back, for the last position only (the export is edited at pull
time). It takes a batch of prompts (benchmarks and tests use that): rows are
left-padded to a common length and the attention mask marks the padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from streamgen.engine.device import Device
from streamgen.engine.session import open_session
from streamgen.model_files import ModelInfo
from streamgen.engine.slot_table import SlotTable

_PAST_PREFIX = "past_key_values."
_PRESENT_PREFIX = "present."
_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(slots=True)
class KVState:
    """The KV cache of one batch between steps. Owned by the runner."""

    past: list[ort.OrtValue]  # one per past input, in session input order; on the device
    attention_mask: np.ndarray  # [B, L] int64, 0 = left padding
    next_positions: np.ndarray  # [B] int64, position id of each row's next token

    @property
    def batch_size(self) -> int:
        return self.attention_mask.shape[0]


class PlainGraph:
    def __init__(self, model_dir: Path, device: Device, threads: int = 0) -> None:
        self.device = device
        self.info = ModelInfo.from_config(model_dir / "config.json")
        self.session = open_session(model_dir / "model.onnx", device, threads)
        inputs = self.session.get_inputs()
        self._past_names = [i.name for i in inputs if i.name.startswith(_PAST_PREFIX)]
        self._present_names = [_PRESENT_PREFIX + n[len(_PAST_PREFIX) :] for n in self._past_names]
        self.kv_dtype = _ORT_TO_NUMPY[next(i.type for i in inputs if i.name.startswith(_PAST_PREFIX))]
        self._ort_device = "cuda" if device.kind == "cuda" else "cpu"

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[KVState, np.ndarray]:
        """Run the prompts from an empty cache. Returns the state and last logits [B, V]."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prefill needs at least one non-empty prompt")
        width = max(len(p) for p in prompts)
        ids = np.zeros((len(prompts), width), dtype=np.int64)  # [B, S]
        mask = np.zeros((len(prompts), width), dtype=np.int64)  # [B, S]
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = prompt
            mask[row, width - len(prompt) :] = 1
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # [B, S]
        empty = np.zeros((len(prompts), self.info.num_kv_heads, 0, self.info.head_dim), dtype=self.kv_dtype)
        past = [ort.OrtValue.ortvalue_from_numpy(empty, self._ort_device, self.device.index) for _ in self._past_names]
        state = KVState(past, np.zeros((len(prompts), 0), dtype=np.int64), positions[:, -1] + 1)
        return state, self._run(state, ids, mask, positions)

    def decode(self, state: KVState, token_ids: np.ndarray) -> np.ndarray:
        """Feed one token per row ([B]); returns logits [B, V] and advances the state."""
        return self.extend(state, np.asarray(token_ids, dtype=np.int64).reshape(state.batch_size, 1))

    def extend(self, state: KVState, ids: np.ndarray) -> np.ndarray:
        """Feed S more tokens per row ([B, S]) on top of the cache; returns last logits [B, V]."""
        ids = np.asarray(ids, dtype=np.int64)
        positions = state.next_positions[:, None] + np.arange(ids.shape[1])  # [B, S]
        state.next_positions = state.next_positions + ids.shape[1]
        return self._run(state, ids, np.ones_like(ids), positions)

    def _run(self, state: KVState, ids: np.ndarray, new_mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        mask = np.concatenate([state.attention_mask, new_mask], axis=1)  # [B, L + S]
        # A fresh binding per step is cheap (~0.1 ms) and avoids stale shapes.
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", mask)
        io.bind_cpu_input("position_ids", positions)
        for name, value in zip(self._past_names, state.past, strict=True):
            io.bind_ortvalue_input(name, value)
        # Logits come to the host (last position only, see models/graph.py);
        # the presents stay where the model runs and become the next past.
        io.bind_output("logits", "cpu")
        for name in self._present_names:
            io.bind_output(name, self._ort_device, self.device.index)
        self.session.run_with_iobinding(io)
        outputs = io.get_outputs()  # in binding order: logits first
        state.past = list(outputs[1:])
        state.attention_mask = mask
        return np.array(outputs[0].numpy()[:, -1, :], dtype=np.float32)  # [B, V], owned copy


class PlainSlots:
    """The KV-slot interface over the plain graph, with a single slot.

    The plain graph's cache grows by concatenation and rows of one batch share
    its length, so requests cannot join and leave a running batch: models
    without the GroupQueryAttention graph run one request at a time, and keep
    nothing between requests (no prefix reuse).
    """

    max_slots = 1
    supports_reuse = False
    supports_speculation = False  # the plain graph's logits are the last position's only
    prompt_pass_tokens = 0  # one slot: prompts never share a pass

    def __init__(self, runner: PlainGraph) -> None:
        self.runner = runner
        self.info = runner.info
        self.device = runner.device
        self.table = SlotTable(1, runner.info.context_length)
        self._state: KVState | None = None

    def allocate(self) -> int | None:
        if not self.table.free_count:
            return None
        self.table.claim(0)
        self._state = None
        return 0

    def free(self, slot: int) -> None:
        self.table.release(slot, keep_contents=False)
        self._state = None

    def prefill(self, slot: int, token_ids: Sequence[int]) -> np.ndarray:
        if self.table.lengths[slot] == 0:
            self._state, logits = self.runner.prefill([token_ids])
        else:
            logits = self.runner.extend(self._state, np.asarray([token_ids], dtype=np.int64))
        self.table.append(slot, token_ids)
        return logits[0]

    def prefill_fresh(self, slots: Sequence[int], prompts: Sequence[Sequence[int]]) -> np.ndarray:
        raise ValueError("the plain graph has one slot; its prompts never share a pass")

    def decode(self, slots: Sequence[int], token_ids: Sequence[int]) -> np.ndarray:
        logits = self.runner.decode(self._state, np.asarray(token_ids, dtype=np.int64))
        self.table.append(slots[0], token_ids)
        return logits

    def copy_prefix(self, src: int, dst: int, end: int) -> None:
        raise ValueError("the plain graph has one slot and keeps no prefix")
