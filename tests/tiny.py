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


def build_tiny_llama(out: Path, *, seed: int = 0, vocab_target: int = 512) -> Path:
    """Write a Hugging Face model directory (weights, config, tokenizer) to out."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(vocab_target)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

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
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(vocab_target)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
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
