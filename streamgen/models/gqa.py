"""Optimum export with ONNX Runtime's GroupQueryAttention, for every supported family.

Optimum's plain export builds attention from Concat, Expand and MatMul: every
step copies the whole KV cache into a new, one-token-longer tensor. This module
keeps Optimum's own export entry point (`main_export`, the family's own ONNX
config: the same input and output names, axes and dummy inputs) and changes
only the model patcher: while the model is traced, each attention layer's
forward is replaced by one `com.microsoft::GroupQueryAttention` node with
rotary embedding inside it. At run time that node reads and writes a static
[batch, kv_heads, max_len, head_dim] buffer bound as both past and present
(see engine/slots.py).

What differs between families is stated once, in FAMILIES (a `Family` per
model type); the patcher reads nothing else about an architecture. Everything
outside attention (scaled embeddings, (1 + w) norms, pre- and post-norms,
fused gate/up projections, a soft-capped output) is the model's own forward,
traced as it is.

- q, k and v come from one packed projection (the family's own fused one, or
  q/k/v packed with their biases) and go to GQA packed; families that norm q
  and k per head (Qwen3, Gemma 3) split it, norm, and pass q, k, v apart
  (ONNX Runtime's CPU kernel refuses GQA's own q/k norm inputs).
- seqlens_k and total_sequence_length are derived in the graph from
  attention_mask, which therefore marks each row's valid length; GQA takes
  positions from seqlens_k, so position_ids is unused.
- cos/sin caches are the model's own rotary module evaluated at every
  position (default, linear, llama3, yarn and longrope RoPE; one cache per
  rotary, so Gemma 3's local layers get theirs); dynamic RoPE, whose
  frequencies depend on the sequence's length rather than the position, is
  refused.
- per layer: the sliding window (GQA's local_window_size) and the attention
  soft-cap (softcap) where the family has them; the query scale.
- logits come for the last position only (Optimum forces logits_to_keep=0;
  the patcher's model kwargs set it back to 1).

Written against transformers 4.57 and optimum-onnx 0.1.0: it replaces
transformers' attention forward and relies on its DynamicLayer cache, so other
versions are refused with a clear message (check_versions).
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from optimum.exporters.onnx import model_configs
from optimum.exporters.onnx.model_patcher import ModelPatcher
from torch import nn

from streamgen import DISTRIBUTION
from streamgen.errors import PullError

PINNED = {"transformers": "4.57.", "optimum-onnx": "0.1.0"}


@dataclass(frozen=True, slots=True)
class Family:
    """What one architecture's attention does differently. The patcher reads nothing else about a family."""

    label: str  # how the docs and error messages name it
    optimum_config: str  # Optimum's ONNX config class for it: its inputs, axes and dummy inputs
    projections: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")  # packed in this order, biases included
    qk_norm: bool = False  # the layer's q_norm and k_norm (RMSNorm per head) run on q and k before rotary
    query_scale: str | None = None  # config attribute c: scores scaled by c ** -0.5 instead of head_dim ** -0.5
    softcap: str | None = None  # config attribute c: attention scores capped to c * tanh(s / c) (GQA's softcap)
    windows: str = "none"  # sliding windows: "none", "all" (config.sliding_window on every layer), "layer_types"
    local_rotary: str | None = None  # the model's rotary module for sliding layers, when it has its own


FAMILIES: dict[str, Family] = {
    "llama": Family("Llama (Llama 2, Llama 3 with llama3 RoPE, SmolLM)", "LlamaOnnxConfig"),
    # Qwen2's q, k and v projections carry biases: the packed projection keeps them.
    "qwen2": Family("Qwen2 / Qwen2.5", "Qwen2OnnxConfig", windows="layer_types"),
    "qwen3": Family("Qwen3", "Qwen3OnnxConfig", qk_norm=True, windows="layer_types"),
    "mistral": Family("Mistral", "MistralOnnxConfig", windows="all"),
    # Gemma 2 also scales its embedding, norms with (1 + w), norms before and after each block and soft-caps the
    # logits after the lm_head: its own forward, traced as it is (models/graph.py finds the lm_head through the cap).
    "gemma2": Family("Gemma 2", "Gemma2OnnxConfig", query_scale="query_pre_attn_scalar",
                     softcap="attn_logit_softcapping", windows="layer_types"),
    "gemma3_text": Family("Gemma 3 (text)", "Gemma3TextOnnxConfig", qk_norm=True, query_scale="query_pre_attn_scalar",
                          softcap="attn_logit_softcapping", windows="layer_types", local_rotary="rotary_emb_local"),
    # Phi-3 ships q, k and v fused (and gate/up: traced as is); su/longrope scaling lives in its rotary.
    "phi3": Family("Phi-3", "Phi3OnnxConfig", projections=("qkv_proj",), windows="all"),
}
# RoPE whose frequencies are a function of the position alone, so one cos/sin cache holds them.
SUPPORTED_ROPE_TYPES = (None, "default", "linear", "llama3", "yarn", "longrope")


def check_versions() -> None:
    for package, prefix in PINNED.items():
        found = importlib.metadata.version(package)
        if not found.startswith(prefix):
            raise PullError(
                f"the GroupQueryAttention export was written for {package} {prefix.rstrip('.')}* but {found} is "
                f"installed; install the pinned export tools (pip install '{DISTRIBUTION}[export]', in the "
                "checkout: pip install '.[export]') or pull with --graph plain"
            )


def supported_families() -> str:
    return ", ".join(f"{f.label} ({t})" for t, f in FAMILIES.items())


def supports_gqa(config: Any) -> str | None:
    """None when the model can take the GQA export, else why not."""
    family = FAMILIES.get(config.model_type)
    if family is None:
        return f"its architecture ({config.model_type!r}) is not one streamgen exports; supported: {supported_families()}"
    rope = getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        return (f"its RoPE type {rope_type!r} changes frequencies with the sequence's length, which one cos/sin "
                f"cache cannot hold (supported: {', '.join(str(t) for t in SUPPORTED_ROPE_TYPES[1:])})")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim % 16:
        return f"head_dim {head_dim} is not a multiple of 16 (a GroupQueryAttention rotary requirement)"
    if getattr(config, "use_bidirectional_attention", False):
        return "its attention is bidirectional"
    return None


def layer_window(family: Family, config: Any, layer: int) -> int:
    """GQA's local_window_size for one layer (-1: every position). Both count the token itself: a window of W
    lets a token see itself and the W - 1 positions before it (checked against transformers by tests/test_families.py)."""
    window = getattr(config, "sliding_window", None)
    if family.windows == "none" or not window:
        return -1
    if family.windows == "layer_types" and config.layer_types[layer] != "sliding_attention":
        return -1
    return int(window)


def family_note(model_dir: str | Path) -> str:
    """What the export did for this model's family, in one line for the manifest."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    family = FAMILIES[config.model_type]
    windows = [layer_window(family, config, i) for i in range(config.num_hidden_layers)]
    parts = [f"{family.label}"]
    if family.projections != ("q_proj", "k_proj", "v_proj"):
        parts.append("its fused qkv projection")
    if family.qk_norm:
        parts.append("q/k RMSNorm per head before the node")
    if family.query_scale:
        parts.append(f"queries scaled by {family.query_scale} {getattr(config, family.query_scale)} ** -0.5")
    if family.softcap and getattr(config, family.softcap, None):
        parts.append(f"attention soft-cap {getattr(config, family.softcap)}")
    if any(w > 0 for w in windows):
        parts.append(f"sliding window {max(windows)} on {sum(w > 0 for w in windows)} of {len(windows)} layers")
    if family.local_rotary:
        parts.append("the local layers' own rotary")
    rope = getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type")) not in (None, "default"):
        parts.append(f"{rope.get('rope_type', rope.get('type'))} RoPE")
    return "family: " + ", ".join(parts)


class _GroupQueryAttention(torch.autograd.Function):
    """Traced as one GroupQueryAttention node; the eager maths only give tracing the right shapes.

    packed: q is the packed [q | k | v] and k, v are unused; else q, k and v apart."""

    @staticmethod
    def forward(ctx, q, k, v, past_k, past_v, seqlens_k, total_len, cos, sin, num_heads, kv_heads, head_dim,
                scale, window, softcap, packed):
        batch, seq, _ = q.shape
        if packed:
            q_end, kv = num_heads * head_dim, kv_heads * head_dim
            q, k, v = q[..., :q_end], q[..., q_end : q_end + kv], q[..., q_end + kv :]
        k = k.reshape(batch, seq, kv_heads, head_dim).transpose(1, 2)
        v = v.reshape(batch, seq, kv_heads, head_dim).transpose(1, 2)
        return q.contiguous(), torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)

    @staticmethod
    def symbolic(g, q, k, v, past_k, past_v, seqlens_k, total_len, cos, sin, num_heads, kv_heads, head_dim,
                 scale, window, softcap, packed):
        none = g.op("prim::Constant").setType(torch._C.OptionalType.ofTensor())
        key, value = (none, none) if packed else (k, v)
        out, present_k, present_v = g.op(
            "com.microsoft::GroupQueryAttention",
            q, key, value, past_k, past_v, seqlens_k, total_len, cos, sin,
            num_heads_i=num_heads, kv_num_heads_i=kv_heads, scale_f=scale, softcap_f=softcap,
            do_rotary_i=1, rotary_interleaved_i=0, local_window_size_i=window,
            outputs=3,
        )
        # The exporter cannot infer a contrib op's outputs: without their types it warns once per output of
        # every layer ("The shape inference of com.microsoft::GroupQueryAttention type is missing") and leaves
        # their dimensions unnamed. The export traces in float32 (fp16 builds are converted afterwards).
        typed = torch._C.TensorType.get().with_dtype(torch.float32)
        out.setType(typed.with_sizes([None, None, num_heads * head_dim]))
        present_k.setType(typed.with_sizes([None, kv_heads, None, head_dim]))
        present_v.setType(typed.with_sizes([None, kv_heads, None, head_dim]))
        return out, present_k, present_v


class _Shared:
    """What every patched layer reads during one traced forward."""

    seqlens_k: torch.Tensor | None = None  # [B] int32: valid length - 1 per row
    total_len: torch.Tensor | None = None  # [] int32: attention_mask width


@dataclass(slots=True)
class _Layer:
    """One attention layer's part of the node: what the family table and the config say for it."""

    family: Family
    cos: torch.Tensor  # [max_positions, rotary_dim / 2], shared by the layers of one rotary
    sin: torch.Tensor
    scale: float
    window: int
    softcap: float
    shared: _Shared


def _gqa_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                           past_key_values=None, cache_position=None, **kwargs):
    spec: _Layer = self._streamgen
    heads, kv_heads = self.config.num_attention_heads, self.config.num_key_value_heads
    qkv = self._streamgen_qkv(hidden_states)  # [B, S, (heads + 2 kv_heads) * head_dim]
    if spec.family.qk_norm:
        batch, seq, _ = qkv.shape
        q, k, v = qkv.split([heads * self.head_dim, kv_heads * self.head_dim, kv_heads * self.head_dim], dim=-1)
        q = self.q_norm(q.reshape(batch, seq, heads, self.head_dim)).reshape(batch, seq, -1)
        k = self.k_norm(k.reshape(batch, seq, kv_heads, self.head_dim)).reshape(batch, seq, -1)
        packed = 0
    else:
        q, k, v, packed = qkv, qkv, qkv, 1
    layer = past_key_values.layers[self.layer_idx]
    past_k, past_v = layer.keys, layer.values  # [B, kv_heads, P, head_dim]
    out, present_k, present_v = _GroupQueryAttention.apply(
        q, k, v, past_k, past_v, spec.shared.seqlens_k, spec.shared.total_len, spec.cos, spec.sin,
        heads, kv_heads, self.head_dim, spec.scale, spec.window, spec.softcap, packed,
    )
    # The node's outputs are the layer's present: Optimum names them present.{i}.*
    layer.keys, layer.values = present_k, present_v
    return self.o_proj(out), None


def rotary_caches(rotary: nn.Module, config: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [max_positions, rotary_dim / 2] from the model's own rotary module, position by position as
    transformers computes them (attention scaling included). longrope switches to its long factors once the
    sequence outgrows original_max_position_embeddings: positions below it get the short factors, the rest the
    long ones, which is what transformers gives a sequence decoded token by token (a prompt longer than that is
    rotated with the long factors throughout in transformers)."""
    total = config.max_position_embeddings
    rope = getattr(config, "rope_scaling", None) or {}
    cuts = [0, total]
    if rope.get("rope_type", rope.get("type")) == "longrope":
        original = getattr(config, "original_max_position_embeddings", None) or total
        cuts = sorted({0, min(original, total), total})
    probe = torch.zeros(1, dtype=torch.float32)
    cos, sin = [], []
    with torch.no_grad():
        for start, end in zip(cuts, cuts[1:]):
            c, s = rotary(probe, torch.arange(start, end, dtype=torch.long)[None])  # [1, S, rotary_dim]
            cos.append(c[0].float())
            sin.append(s[0].float())
        rotary(probe, torch.zeros(1, 1, dtype=torch.long))  # longrope: back to the short factors
    half = cos[0].shape[-1] // 2  # transformers' cos/sin repeat the half: cat(freqs, freqs)
    return torch.cat(cos)[:, :half].contiguous(), torch.cat(sin)[:, :half].contiguous()


def _packed_projection(attn: nn.Module, family: Family) -> nn.Linear:
    parts = [getattr(attn, name) for name in family.projections]
    if len(parts) == 1:
        return parts[0]
    packed = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts), bias=parts[0].bias is not None)
    with torch.no_grad():
        packed.weight.copy_(torch.cat([p.weight for p in parts]))
        if packed.bias is not None:
            packed.bias.copy_(torch.cat([p.bias for p in parts]))
    return packed


def _query_scale(family: Family, config: Any, attn: nn.Module) -> float:
    scale = (getattr(config, family.query_scale) if family.query_scale else attn.head_dim) ** -0.5
    if abs(scale - float(attn.scaling)) > 1e-6 * scale:  # transformers changed how this family scales
        raise PullError(f"{family.label}: the attention scales queries by {float(attn.scaling)}, the export by "
                        f"{scale}; this transformers version is not the one the export was written for")
    return float(scale)


class GQAModelPatcher(ModelPatcher):
    def __init__(self, config, model, model_kwargs=None):
        model_kwargs = dict(model_kwargs or {})
        model_kwargs["logits_to_keep"] = 1  # prefill computes the last position's logits only
        super().__init__(config, model, model_kwargs=model_kwargs)
        self._shared = _Shared()
        inner = self.patched_forward
        signature = inspect.signature(self.orig_forward)

        @functools.wraps(inner)
        def forward_with_lengths(*args, **kwargs):
            mask = signature.bind_partial(*args, **kwargs).arguments.get("attention_mask")
            self._shared.seqlens_k = (mask.sum(dim=-1) - 1).to(torch.int32)
            self._shared.total_len = torch.onnx.operators.shape_as_tensor(mask)[1].to(torch.int32)
            return inner(*args, **kwargs)

        self.patched_forward = forward_with_lengths

    def __enter__(self):
        super().__enter__()
        config = self._model.config
        family = FAMILIES[config.model_type]
        inner = self._model.model
        # One tensor per rotary module, shared by the layers that use it: traced as one initializer each.
        caches = {"global": rotary_caches(inner.rotary_emb, config)}
        if family.local_rotary:
            caches["local"] = rotary_caches(getattr(inner, family.local_rotary), config)
        softcap = float(getattr(config, family.softcap, None) or 0.0) if family.softcap else 0.0
        for index, layer in enumerate(inner.layers):
            attn = layer.self_attn
            window = layer_window(family, config, index)
            cos, sin = caches["local" if family.local_rotary and window >= 0 else "global"]
            # A submodule, so that its weights are traced as the model's initializers.
            attn._streamgen_qkv = _packed_projection(attn, family)
            attn._streamgen = _Layer(family, cos, sin,
                                     _query_scale(family, config, attn), window, softcap, self._shared)
            attn.forward = types.MethodType(_gqa_attention_forward, attn)
        return self

    def __exit__(self, exc_type, exc_value, traceback):
        for layer in self._model.model.layers:
            attn = layer.self_attn
            for name in ("forward", "_streamgen", "_streamgen_qkv"):
                if name in attn.__dict__ or name in attn._modules:
                    delattr(attn, name)
        super().__exit__(exc_type, exc_value, traceback)


def gqa_onnx_config(config: Any):
    """The family's own Optimum ONNX config with the GQA patcher: names, axes and dummy inputs unchanged."""
    base = getattr(model_configs, FAMILIES[config.model_type].optimum_config)
    cls = type(f"GQA{base.__name__}", (base,), {"_MODEL_PATCHER": GQAModelPatcher})
    return cls(config, task="text-generation", use_past=True, use_past_in_inputs=True)


def export_gqa(model_dir: str | Path, out_dir: Path) -> None:
    """Optimum's main_export with the GQA config. Optimum's validation cannot run on this
    graph (it feeds batched prompts on top of a past); streamgen validates it instead."""
    import warnings

    from optimum.exporters.onnx import main_export
    from transformers import AutoConfig

    check_versions()
    config = AutoConfig.from_pretrained(model_dir)
    if (reason := supports_gqa(config)) is not None:
        raise PullError(f"this model cannot take the GroupQueryAttention graph: {reason}")
    # Tracing warns about every data-dependent branch in transformers' code; they are expected for this
    # export, and validate_export checks the graph against the source model.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main_export(
            str(model_dir), output=out_dir, task="text-generation-with-past", device="cpu",
            do_validation=False, custom_onnx_configs={"model": gqa_onnx_config(config)},
        )
