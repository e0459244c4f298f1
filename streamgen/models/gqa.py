"""Optimum export of Llama-family models with ONNX Runtime's GroupQueryAttention.

Optimum's plain export builds attention from Concat, Expand and MatMul: every
step copies the whole KV cache into a new, one-token-longer tensor. This module
keeps Optimum's own export entry point (`main_export`, the same input and output
names, axes and dummy inputs) and changes only the model patcher: while the
model is traced, each attention layer's forward is replaced by one
`com.microsoft::GroupQueryAttention` node with rotary embedding inside it.
At run time that node reads and writes a static [batch, kv_heads, max_len,
head_dim] buffer bound as both past and present (see engine/slots.py).

- q, k and v come from one packed projection and go to GQA packed.
- seqlens_k and total_sequence_length are derived in the graph from
  attention_mask, which therefore marks each row's valid length; GQA takes
  positions from seqlens_k, so position_ids is unused.
- cos/sin caches are built once from the model's own inv_freq (default,
  linear and llama3 RoPE; others keep the plain export).
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
from pathlib import Path
from typing import Any

import torch
from optimum.exporters.onnx.model_configs import LlamaOnnxConfig
from optimum.exporters.onnx.model_patcher import ModelPatcher
from torch import nn

from streamgen import DISTRIBUTION
from streamgen.errors import PullError

SUPPORTED_MODEL_TYPES = ("llama",)
SUPPORTED_ROPE_TYPES = (None, "default", "linear", "llama3")
PINNED = {"transformers": "4.57.", "optimum-onnx": "0.1.0"}


def check_versions() -> None:
    for package, prefix in PINNED.items():
        found = importlib.metadata.version(package)
        if not found.startswith(prefix):
            raise PullError(
                f"the GroupQueryAttention export was written for {package} {prefix.rstrip('.')}* but {found} is "
                f"installed; install the pinned export tools (pip install '{DISTRIBUTION}[export]', in the "
                "checkout: pip install '.[export]') or pull with --graph plain"
            )


def supports_gqa(config: Any) -> str | None:
    """None when the model can take the GQA export, else why not."""
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {config.model_type!r} is not Llama-family"
    rope = getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        return f"RoPE type {rope_type!r} needs position-dependent frequencies"
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim % 16:
        return f"head_dim {head_dim} is not a multiple of 16 (a GroupQueryAttention rotary requirement)"
    return None


class _GroupQueryAttention(torch.autograd.Function):
    """Traced as one GroupQueryAttention node; the eager maths only give tracing the right shapes."""

    @staticmethod
    def forward(ctx, qkv, past_k, past_v, seqlens_k, total_len, cos, sin, num_heads, kv_heads, head_dim, scale):
        batch, seq, _ = qkv.shape
        q_end = num_heads * head_dim
        kv = kv_heads * head_dim
        k = qkv[..., q_end : q_end + kv].reshape(batch, seq, kv_heads, head_dim).transpose(1, 2)
        v = qkv[..., q_end + kv :].reshape(batch, seq, kv_heads, head_dim).transpose(1, 2)
        return qkv[..., :q_end].contiguous(), torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)

    @staticmethod
    def symbolic(g, qkv, past_k, past_v, seqlens_k, total_len, cos, sin, num_heads, kv_heads, head_dim, scale):
        none = g.op("prim::Constant").setType(torch._C.OptionalType.ofTensor())
        out, present_k, present_v = g.op(
            "com.microsoft::GroupQueryAttention",
            qkv, none, none, past_k, past_v, seqlens_k, total_len, cos, sin,
            num_heads_i=num_heads, kv_num_heads_i=kv_heads, scale_f=scale,
            do_rotary_i=1, rotary_interleaved_i=0, local_window_size_i=-1,
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


def _gqa_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                           past_key_values=None, cache_position=None, **kwargs):
    shared: _Shared = self._streamgen_shared
    qkv = self._streamgen_qkv(hidden_states)  # [B, S, (heads + 2 kv_heads) * head_dim]
    layer = past_key_values.layers[self.layer_idx]
    past_k, past_v = layer.keys, layer.values  # [B, kv_heads, P, head_dim]
    out, present_k, present_v = _GroupQueryAttention.apply(
        qkv, past_k, past_v, shared.seqlens_k, shared.total_len,
        self._streamgen_cos, self._streamgen_sin,
        self.config.num_attention_heads, self.config.num_key_value_heads, self.head_dim, float(self.scaling),
    )
    # The node's outputs are the layer's present: Optimum names them present.{i}.*
    layer.keys, layer.values = present_k, present_v
    return self.o_proj(out), None


def _rotary_caches(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    rotary = model.model.rotary_emb
    positions = torch.arange(model.config.max_position_embeddings, dtype=torch.float32)
    freqs = torch.outer(positions, rotary.inv_freq.float())  # [max_pos, head_dim / 2]
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    return (freqs.cos() * scaling).contiguous(), (freqs.sin() * scaling).contiguous()


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
        cos, sin = _rotary_caches(self._model)
        for layer in self._model.model.layers:
            attn = layer.self_attn
            qkv = nn.Linear(attn.q_proj.in_features,
                            attn.q_proj.out_features + attn.k_proj.out_features + attn.v_proj.out_features,
                            bias=attn.q_proj.bias is not None)
            with torch.no_grad():
                qkv.weight.copy_(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
                if qkv.bias is not None:
                    qkv.bias.copy_(torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
            attn._streamgen_qkv = qkv
            # One tensor shared by every layer: traced as one initializer.
            attn._streamgen_cos, attn._streamgen_sin = cos, sin
            attn._streamgen_shared = self._shared
            attn.forward = types.MethodType(_gqa_attention_forward, attn)
        return self

    def __exit__(self, exc_type, exc_value, traceback):
        for layer in self._model.model.layers:
            attn = layer.self_attn
            for name in ("forward", "_streamgen_qkv", "_streamgen_cos", "_streamgen_sin", "_streamgen_shared"):
                if name in attn.__dict__ or name in getattr(attn, "_modules", {}):
                    delattr(attn, name)
        super().__exit__(exc_type, exc_value, traceback)


class GQALlamaOnnxConfig(LlamaOnnxConfig):
    """Optimum's Llama config with the GQA patcher; names, axes and dummy inputs unchanged."""

    _MODEL_PATCHER = GQAModelPatcher


def export_gqa(model_dir: str | Path, out_dir: Path) -> None:
    """Optimum's main_export with the GQA config. Optimum's validation cannot run on this
    graph (it feeds batched prompts on top of a past); streamgen validates it instead."""
    import warnings

    from optimum.exporters.onnx import main_export
    from transformers import AutoConfig

    check_versions()
    config = AutoConfig.from_pretrained(model_dir)
    onnx_config = GQALlamaOnnxConfig(config, task="text-generation", use_past=True, use_past_in_inputs=True)
    # Tracing warns about every data-dependent branch in transformers' code; they are expected for this
    # export, and validate_export checks the graph against the source model.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main_export(
            str(model_dir), output=out_dir, task="text-generation-with-past", device="cpu",
            do_validation=False, custom_onnx_configs={"model": onnx_config},
        )
