"""The cheapest strong test of a generation loop (llama2.c's test_all.py): the tiny model, built from a fixed
seed, must continue three prompts greedily with exactly the token ids recorded in tests/golden_tiny.json
by `.venv/bin/python tests/golden.py`."""

from __future__ import annotations

import json

from golden import GOLDEN, greedy_ids


def test_the_tiny_model_reproduces_its_golden_greedy_tokens(tiny_model_dir) -> None:
    expected = json.loads(GOLDEN.read_text())["prompts"]
    assert greedy_ids(tiny_model_dir) == expected
