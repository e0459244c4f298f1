"""The tiny model's golden greedy tokens: `.venv/bin/python tests/golden.py` writes tests/golden_tiny.json.

The tiny model is built from a fixed seed by tests/tiny.py and exported by
streamgen's own pull, so its greedy continuation of a fixed prompt is a
fingerprint of the whole pipeline: tokenizer, export, graph edits, KV slots,
sampling. tests/test_golden.py checks that the loop reproduces these ids
exactly. Regenerate only when a change is meant to alter them (a different
tiny model, a different export), and say why in the commit.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden_tiny.json"
PROMPTS = ["The quick brown fox", "Paris is the capital of France. Berlin is", "Code: def f(x): return"]
TOKENS = 32


def greedy_ids(model_dir: Path) -> dict[str, list[int]]:
    """Greedy token ids for each prompt, all decoded together in one batch."""
    from streamgen.engine.device import Device
    from streamgen.engine.generate import generate
    from streamgen.engine.loader import load_model
    from streamgen.engine.params import SamplingParams
    from streamgen.engine.request import TokenEvent, prepare_request

    model = load_model(model_dir, Device("cpu"))
    params = SamplingParams(temperature=0.0, max_tokens=TOKENS, ignore_eos=True)
    requests = [prepare_request(model.tokenizer, model.context_length, params, prompt=p) for p in PROMPTS]
    out: dict[str, list[int]] = {p: [] for p in PROMPTS}
    for event in generate(model.runner, model.tokenizer, requests):
        if isinstance(event, TokenEvent):
            out[PROMPTS[event.key]].append(event.token_id)
    return out


def main() -> int:
    sys.path.insert(0, str(HERE))
    from tiny import build_tiny_llama

    from streamgen.model_files import CacheLayout
    from streamgen.models.progress import StageProgress
    from streamgen.models.pull import pull

    with tempfile.TemporaryDirectory() as tmp:
        hf = build_tiny_llama(Path(tmp) / "tiny-hf")
        with open("/dev/null", "w") as quiet:
            model_dir = pull(str(hf), "none", CacheLayout(Path(tmp) / "home"), StageProgress(0, quiet))
        ids = greedy_ids(model_dir)
    lines = [f"  {json.dumps(p)}: {json.dumps(t)}" for p, t in ids.items()]
    GOLDEN.write_text('{"prompts": {\n' + ",\n".join(lines) + "\n}}\n")
    print(f"wrote {GOLDEN}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
