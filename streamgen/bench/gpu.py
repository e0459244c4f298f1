"""`streamgen bench gpu`: decode on a GPU, CUDA graphs on and off, against Hugging Face transformers.

Contenders, measured in interleaved rounds on one GPU:
- streamgen, the fp16 build on ONNX Runtime's CUDA provider, kernels
  launched every step ("graphs off");
- the same with one CUDA graph per decode width, replayed ("graphs on");
- transformers, the same model in fp16 on the same GPU: eager `generate`;
- transformers with a static cache and `torch.compile` (mode
  reduce-overhead), compiled before the first timed round.

Per batch width B (--batches, default 1,16,64): B copies of one chat prompt,
then decode tok/s = B x T / the time of T decode steps. streamgen's runner
prefills each slot, then times T steps, each ending with the logits on the
host and an argmax (what the engine does). transformers has no separate
decode call, so its decode time is generate(T tokens) - generate(1 token),
over T - 1 tokens. Greedy, end of sequence ignored, on both.

The transformers model is converted from the same source as the ONNX build
(the default model's GGUF), so both run the same weights. This benchmark
needs torch with CUDA, transformers and a CUDA build of ONNX Runtime; its
measuring code also runs on the CPU, which is how the tests check it.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from streamgen.engine.device import Device
from streamgen.errors import ConfigError

PROMPT = "Write a detailed story about a lighthouse keeper who finds a message in a bottle on a stormy night."


@dataclass(frozen=True, slots=True)
class GpuRow:
    contender: str
    batch: int
    tok_s: list[float]  # one per round

    @property
    def median(self) -> float:
        return statistics.median(self.tok_s)


class StreamgenDecode:
    """The fp16 build's SlotRunner on a device: T timed decode steps on B slots."""

    def __init__(self, name: str, directory: Path, device: Device, max_batch: int, context: int) -> None:
        from streamgen.engine.slots import SlotConfig, SlotRunner

        self.name = name
        self.runner = SlotRunner(directory, device, SlotConfig(max_batch=max_batch, max_context=context))

    def decode_tok_s(self, prompt: list[int], batch: int, tokens: int) -> float:
        runner = self.runner
        slots = [runner.allocate() for _ in range(batch)]
        try:
            first = [int(runner.prefill(s, prompt).argmax()) for s in slots]
            step = first
            start = time.perf_counter()
            for _ in range(tokens):
                step = runner.decode(slots, step).argmax(axis=1).tolist()
            return batch * tokens / (time.perf_counter() - start)
        finally:
            for s in slots:
                runner.free(s)


class TransformersDecode:
    """transformers' generate on the same weights, eager or with a static cache under torch.compile."""

    def __init__(self, name: str, hf_dir: Path, device: str, dtype: str, compiled: bool) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.name, self.device, self.torch = name, device, torch
        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=getattr(torch, dtype)).to(device)
        self.model.eval()
        self.compiled = compiled
        if compiled:
            self.model.generation_config.cache_implementation = "static"
            self.model.forward = torch.compile(self.model.forward, mode="reduce-overhead", fullgraph=True)

    def _generate_s(self, ids, tokens: int) -> float:
        torch = self.torch
        self._sync()
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                      min_new_tokens=tokens, do_sample=False, pad_token_id=0)
        self._sync()
        assert out.shape[1] == ids.shape[1] + tokens, "end of sequence is ignored: every row runs to the end"
        return time.perf_counter() - start

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def warm_up(self, prompt: list[int], batch: int, tokens: int) -> None:
        """Compile (or load kernels) for this width before anything is timed."""
        ids = self.torch.tensor([prompt] * batch, device=self.device)
        for n in (1, tokens):
            self._generate_s(ids, n)

    def decode_tok_s(self, prompt: list[int], batch: int, tokens: int) -> float:
        ids = self.torch.tensor([prompt] * batch, device=self.device)
        whole, first = self._generate_s(ids, tokens), self._generate_s(ids, 1)
        return batch * (tokens - 1) / max(whole - first, 1e-9)


def measure(contenders: list, prompt: list[int], batches: list[int], tokens: int, rounds: int,
            log: Callable[[str], None]) -> list[GpuRow]:
    """Every contender at every width, interleaved: round r runs all of them before round r + 1, alternating
    their order, so drift in the machine lands on all alike."""
    for c in contenders:  # first runs (CUDA graph capture, torch.compile) are not timed
        for b in batches:
            if isinstance(c, TransformersDecode):
                c.warm_up(prompt, b, tokens)
            else:
                c.decode_tok_s(prompt, b, min(tokens, 4))
    results: dict[tuple[str, int], list[float]] = {(c.name, b): [] for c in contenders for b in batches}
    for r in range(rounds):
        order = contenders if r % 2 == 0 else contenders[::-1]
        for b in batches:
            for c in order:
                rate = c.decode_tok_s(prompt, b, tokens)
                results[(c.name, b)].append(rate)
                log(f"round {r + 1}/{rounds} batch {b}: {c.name} {rate:.1f} tok/s")
    return [GpuRow(name, b, rates) for (name, b), rates in results.items()]


def run_gpu_bench(args) -> int:
    from streamgen.engine.device import cuda_problem
    from streamgen.engine.tokenizer import ChatMessage, TextTokenizer
    from streamgen.model_files import Build
    from streamgen.models.pull import ensure_model

    problem = cuda_problem()
    if problem is not None:
        raise ConfigError(f"bench gpu needs a usable CUDA GPU: {problem}. `make gpu-check` on a GPU machine runs "
                          "it (docs/gpu.md)")
    batches = sorted({int(b) for b in args.batches.split(",")})
    directory = ensure_model(args.model, Build(args.quantize, "fp16"), args.home, graph="gqa")
    tokenizer = TextTokenizer.from_dir(directory)
    prompt = tokenizer.encode(tokenizer.render_chat([ChatMessage("user", PROMPT)]))
    context = len(prompt) + args.tokens + 8
    contenders: list[Any] = [
        StreamgenDecode("streamgen, graphs off", directory, Device("cuda"), max(batches), context),
        StreamgenDecode("streamgen, graphs on", directory, Device("cuda", cuda_graphs=True), max(batches), context),
    ]
    hf_dir = _hf_dir(args)
    if hf_dir is not None:
        contenders.append(TransformersDecode("transformers eager", hf_dir, "cuda", "float16", compiled=False))
        contenders.append(TransformersDecode("transformers static+compile", hf_dir, "cuda", "float16",
                                             compiled=True))
    rows = measure(contenders, prompt, batches, args.tokens, args.rounds, _log)
    _report(rows, batches, args, gpu_name=_gpu_name(), build=f"{args.quantize}-fp16")
    return 0


def _hf_dir(args) -> Path | None:
    """The transformers checkpoint: --hf-dir, else the default model converted from its GGUF (as pull does)."""
    if args.hf_dir:
        return Path(args.hf_dir)
    try:
        import transformers  # noqa: F401
    except ImportError:
        _log("transformers is not installed: its contenders are left out")
        return None
    import tempfile

    from streamgen.bench.llama_server import default_gguf
    from streamgen.models.export import convert_gguf

    tmp = Path(tempfile.mkdtemp(prefix="streamgen-gpu-hf-"))
    convert_gguf(default_gguf(args.home, tmp), tmp / "hf")
    return tmp / "hf"


def _gpu_name() -> str:
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        return out.splitlines()[0] if out else "unknown GPU"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown GPU"


def _report(rows: list[GpuRow], batches: list[int], args, gpu_name: str, build: str) -> None:
    print(f"\n{gpu_name}; streamgen build {build}; {args.tokens} decode tokens per run, median of {args.rounds} "
          "interleaved rounds\n")
    names = list(dict.fromkeys(r.contender for r in rows))
    base = "streamgen, graphs off"
    print("| contender | " + " | ".join(f"batch {b} tok/s | vs graphs off" for b in batches) + " |")
    print("|---|" + "---|---|" * len(batches))
    table = {(r.contender, r.batch): r for r in rows}
    for name in names:
        cells = []
        for b in batches:
            row, ref = table[(name, b)], table[(base, b)]
            cells += [f"{row.median:.0f}", f"{row.median / ref.median:.2f}x"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"gpu": gpu_name, "build": build, "tokens": args.tokens,
                                         "rounds": args.rounds, "rows": [asdict(r) | {"median": r.median}
                                                                         for r in rows]}, indent=1) + "\n")


def _log(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)

