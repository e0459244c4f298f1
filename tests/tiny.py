"""A tiny random-weight Llama with a real byte-level BPE tokenizer.

Built by the test suite itself in a few seconds: same architecture family,
export path and chat template style as the default model, so every unit test
runs the real pipeline, only smaller.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Streaming generation sends each token as soon as it is sampled.",
    "Hello world! How are you today? I am fine, thank you.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
    "Code: def f(x): return x * 2  # a comment",
] * 20


def build_tiny_tokenizer(vocab_target: int = 512):
    """The tiny model's byte-level BPE tokenizer, trained on CORPUS: `tokenizers` only, no torch."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_target,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _save_tiny_tokenizer(out: Path, vocab_target: int):
    """The tiny tokenizer with its special tokens and chat template, saved into out (created); returned."""
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(vocab_target)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return tok


def build_tiny_llama(out: Path, *, seed: int = 0, vocab_target: int = 512) -> Path:
    """Write a Hugging Face model directory (weights, config, tokenizer) to out."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _save_tiny_tokenizer(out, vocab_target)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped KV heads, like the default model
        max_position_embeddings=256,
        # Wide weights make logits far apart, so greedy picks are not near-ties
        # that float rounding could flip between equivalent computations.
        initializer_range=0.3,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out)
    (out / "streamgen-test.json").write_text(json.dumps({"seed": seed}))
    return out


# ---- one tiny checkpoint per supported family (tests/test_families.py) ----------------------------------------------

# Shared by every family: small enough that an export takes seconds. A sliding window of WINDOW positions is shorter
# than the families' test prompts, so windowed layers really drop positions.
WINDOW = 12
_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=256, initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_ALTERNATING = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def _family_config(family: str):
    """(transformers config, what it exercises) for one family's tiny checkpoint."""
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    c = dict(_COMMON)
    if family == "llama3":
        return LlamaConfig(**c, tie_word_embeddings=True, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32})
    if family == "qwen2":  # bias on q, k and v; the last layer windowed (max_window_layers)
        return Qwen2Config(**c, tie_word_embeddings=True, use_sliding_window=True, sliding_window=WINDOW,
                           max_window_layers=1)
    if family == "qwen3":  # RMSNorm on q and k per head
        return Qwen3Config(**c, head_dim=16, tie_word_embeddings=True, use_sliding_window=True, sliding_window=WINDOW,
                           max_window_layers=1)
    if family == "mistral":  # every layer windowed
        return MistralConfig(**c, sliding_window=WINDOW, tie_word_embeddings=False)
    # Gemma's lm_head is untied here: tied to an embedding scaled by sqrt(hidden), a random model only ever repeats
    # the last token.
    if family == "gemma2":  # soft-capped attention and logits, scaled queries, alternating local and global layers
        return Gemma2Config(**{**c, "num_hidden_layers": 4}, tie_word_embeddings=False, head_dim=16, query_pre_attn_scalar=24,
                            sliding_window=WINDOW, layer_types=_ALTERNATING, attn_logit_softcapping=20.0,
                            final_logit_softcapping=15.0, hidden_activation="gelu_pytorch_tanh")
    if family == "gemma3":  # q/k norms, local layers with their own rope base, a scaled global rope
        return Gemma3TextConfig(**{**c, "num_hidden_layers": 4}, tie_word_embeddings=False, head_dim=16, query_pre_attn_scalar=24,
                                sliding_window=WINDOW, layer_types=_ALTERNATING, rope_theta=1_000_000.0,
                                rope_local_base_freq=10_000.0, rope_scaling={"rope_type": "linear", "factor": 8.0})
    if family == "phi3":  # fused qkv and gate_up, longrope (short factors below position 96, long above), a window
        half = 64 // 4 // 2
        return Phi3Config(**c, sliding_window=WINDOW, original_max_position_embeddings=96, rope_scaling={
            "type": "longrope", "short_factor": [1.0 + i / 8 for i in range(half)],
            "long_factor": [2.0 + i for i in range(half)]})
    raise ValueError(f"no tiny checkpoint for {family!r}")


FAMILIES = ("llama3", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3")


def build_tiny_family(out: Path, family: str, *, seed: int = 0, vocab_target: int = 512) -> Path:
    """A tiny random checkpoint of one family with the tiny model's tokenizer: a Hugging Face directory."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = _save_tiny_tokenizer(out, vocab_target)
    config = _family_config(family)
    config.vocab_size = tok.get_vocab_size()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms start at 1 (Gemma's (1 + w) at 0): random ones make greedy picks less uniform
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.5)
    model.save_pretrained(out)
    (out / "streamgen-test.json").write_text(json.dumps({"seed": seed, "family": family}))
    return out


# ---- a tiny GGUF file (tests/test_pull.py): `streamgen pull file.gguf` and its `source` build ---------------------------

# Every type the `source` build repacks from a GGUF's own blocks, spread over the tensors so that one packed
# projection mixes types (q, k and v side by side) and both 16- and 32-long sub-blocks meet in one weight.
GGUF_TYPES = {"attn_q": "Q4_K", "attn_k": "Q5_0", "attn_v": "Q6_K", "attn_output": "Q4_0", "ffn_gate": "Q5_K",
              "ffn_up": "Q4_1", "ffn_down": "Q8_0", "output": "Q5_1"}


def _random_blocks(kind: str, rows: int, k: int, rng) -> "np.ndarray":
    """Random but valid blocks of a GGUF type: random levels and sub-block scales, small finite fp16 scales."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    per, size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    blocks = rng.integers(0, 256, size=(rows * k // per, size), dtype=np.uint8)
    scale = lambda n: rng.uniform(0.002, 0.02, (blocks.shape[0], n)).astype(np.float16).view(np.uint8)  # noqa: E731
    if kind in ("Q4_0", "Q5_0", "Q8_0"):
        blocks[:, :2] = scale(1)
    elif kind in ("Q4_1", "Q5_1"):
        blocks[:, :2] = scale(1)
        blocks[:, 2:4] = (-rng.uniform(0.0, 0.1, (blocks.shape[0], 1))).astype(np.float16).view(np.uint8)
    elif kind in ("Q4_K", "Q5_K"):
        blocks[:, :4] = scale(2)  # d and dmin; the 6-bit scales and mins that follow stay random
    elif kind == "Q6_K":
        blocks[:, -2:] = scale(1)
        blocks[:, -18:-2] = rng.integers(-40, 40, (blocks.shape[0], 16)).astype(np.int8).view(np.uint8)
    return blocks.reshape(rows, -1)


def build_tiny_gguf(path: Path, *, seed: int = 0) -> Path:
    """A tiny Llama as a GGUF file, its weights in every type the `source` build repacks (GGUF_TYPES), with the
    tiny model's tokenizer and chat template. Rows are 256 long: K-quants need super-blocks of 256."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter, TokenType

    rng = np.random.default_rng(seed)
    tok = build_tiny_tokenizer()
    vocab = tok.get_vocab_size()
    hidden, ffn, heads, kv_heads, layers = 256, 512, 4, 2, 2
    head_dim = hidden // heads
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("tiny-gguf")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(15)
    ordered = sorted(tok.get_vocab().items(), key=lambda item: item[1])
    merges = json.loads(tok.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([token for token, _ in ordered])
    writer.add_token_types([TokenType.CONTROL if token in SPECIAL else TokenType.NORMAL for token, _ in ordered])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(tok.token_to_id("<|im_start|>"))
    writer.add_eos_token_id(tok.token_to_id("<|im_end|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    def quantized(name: str, kind: str, rows: int, k: int) -> None:
        writer.add_tensor(name, _random_blocks(kind, rows, k, rng),
                          raw_dtype=GGMLQuantizationType[kind])

    def plain(name: str, shape: tuple[int, ...]) -> None:
        writer.add_tensor(name, (1 + 0.3 * rng.standard_normal(shape)).astype(np.float32))

    quantized("token_embd.weight", "Q8_0", vocab, hidden)
    plain("output_norm.weight", (hidden,))
    quantized("output.weight", GGUF_TYPES["output"], vocab, hidden)
    sizes = {"attn_q": (heads * head_dim, hidden), "attn_k": (kv_heads * head_dim, hidden),
             "attn_v": (kv_heads * head_dim, hidden), "attn_output": (hidden, heads * head_dim),
             "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden), "ffn_down": (hidden, ffn)}
    for layer in range(layers):
        plain(f"blk.{layer}.attn_norm.weight", (hidden,))
        plain(f"blk.{layer}.ffn_norm.weight", (hidden,))
        for part, (rows, k) in sizes.items():
            quantized(f"blk.{layer}.{part}.weight", GGUF_TYPES[part], rows, k)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
