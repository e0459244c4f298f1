"""`streamgen bench quality`: what quantization costs in accuracy, against fp32.

Each paragraph of bench/quality_texts.txt is fed token by token (teacher
forcing) through every variant of the same model and graph. Compared with the
fp32 variant, position by position:
- perplexity of the text under each variant;
- top-1 agreement: the variant's most likely next token equals fp32's;
- mean KL divergence KL(p_fp32 || p_variant) of the next-token distributions.
All paragraphs run together, one per KV slot, so a variant costs one pass
over the longest paragraph.

And what a user sees: each question of bench/questions.json is asked as a
chat, greedily; a build keeps an answer when the reply holds every key fact
of the fp32 build's answer. The table counts the answers each build keeps.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from streamgen.engine.device import Device
from streamgen.errors import ConfigError
from streamgen.model_files import Build
from streamgen.engine.loader import load_model
from streamgen.engine.slots import SlotConfig

TEXTS = Path(__file__).with_name("quality_texts.txt")
QUESTIONS = Path(__file__).with_name("questions.json")
ANSWER_TOKENS = 48


@dataclass(frozen=True, slots=True)
class QualityRow:
    quantization: str
    perplexity: float
    top1_agreement: float  # with fp32
    mean_kl: float  # KL(fp32 || variant), nats
    positions: int
    answers_kept: int = 0  # questions whose greedy answer holds every key fact
    answers_total: int = 0
    lost: tuple[str, ...] = ()  # the questions whose facts the answer misses


@dataclass(frozen=True, slots=True)
class Question:
    prompt: str
    facts: tuple[tuple[str, ...], ...]  # every group must appear; any string of a group will do

    def kept_by(self, answer: str) -> bool:
        return all(any(_mentions(answer, option) for option in group) for group in self.facts)


def _mentions(text: str, fact: str) -> bool:
    """fact appears in text, ignoring case, as a whole word: "7" is not in "1297", "cold" not in "scolded"."""
    before = r"(?<!\w)" if fact[:1].isalnum() else ""
    after = r"(?!\w)" if fact[-1:].isalnum() else ""
    return re.search(before + re.escape(fact) + after, text, flags=re.IGNORECASE) is not None


def load_questions(path: Path = QUESTIONS) -> list[Question]:
    data = json.loads(path.read_text())["questions"]
    return [Question(q["prompt"], tuple(tuple(g) for g in q["facts"])) for q in data]


def greedy_answers(directory: Path, prompts: list[str], threads: int = 0) -> list[str]:
    """Each prompt asked as a chat, greedily, all in one batch (a request gives the same tokens alone or in
    a crowd, so this is what a user asking alone would see)."""
    from streamgen.engine.generate import generate
    from streamgen.engine.params import SamplingParams
    from streamgen.engine.request import FinishEvent, prepare_request
    from streamgen.engine.tokenizer import ChatMessage

    model = load_model(directory, Device("cpu"), threads, SlotConfig(max_batch=16, max_context=256))
    params = SamplingParams(temperature=0.0, max_tokens=ANSWER_TOKENS)
    requests = [prepare_request(model.tokenizer, model.context_length, params, messages=[ChatMessage("user", p)])
                for p in prompts]
    texts = {e.key: e.text for e in generate(model.runner, model.tokenizer, requests) if isinstance(e, FinishEvent)}
    return [texts[i] for i in range(len(prompts))]

def load_texts(path: Path = TEXTS) -> list[str]:
    return [p.strip() for p in path.read_text().split("\n\n") if p.strip()]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def next_token_logprobs(directory: Path, texts: list[str], threads: int = 0) -> tuple[list[np.ndarray], list[list[int]]]:
    """Per text: log-probabilities [len - 1, V] of each next token, and the token ids."""
    model = load_model(directory, Device("cpu"), threads, SlotConfig(max_batch=len(texts), max_context=1024))
    runner = model.runner
    # A text longer than a slot is cut to fit it (only the tiny test model's context is that short).
    ids = [model.tokenizer.encode(t)[: runner.info.context_length] for t in texts]
    rows: list[list[np.ndarray]] = []
    for start in range(0, len(ids), runner.max_slots):  # the plain graph has one slot
        rows += _teacher_forced(runner, ids[start : start + runner.max_slots])
    return [_log_softmax(np.stack(r)) for r in rows], ids


def _teacher_forced(runner, group: list[list[int]]) -> list[list[np.ndarray]]:
    """Position 0 of every text through prefill, then the rest one step at a time, all rows together."""
    slots = [runner.allocate() for _ in group]
    rows = [[runner.prefill(s, seq[:1])] for s, seq in zip(slots, group)]
    for pos in range(1, max(len(seq) for seq in group) - 1):
        live = [i for i, seq in enumerate(group) if pos < len(seq) - 1]
        logits = runner.decode([slots[i] for i in live], [group[i][pos] for i in live])
        for i, row in zip(live, logits):
            rows[i].append(row)
    for s in slots:
        runner.free(s)
    return rows


def compare(reference: list[np.ndarray], variant: list[np.ndarray], ids: list[list[int]], name: str) -> QualityRow:
    nll, agree, kl, n = 0.0, 0, 0.0, 0
    for ref, var, seq in zip(reference, variant, ids):
        targets = np.asarray(seq[1 : 1 + len(var)])
        nll -= float(var[np.arange(len(var)), targets].sum())
        agree += int((ref.argmax(axis=1) == var.argmax(axis=1)).sum())
        kl += float((np.exp(ref) * (ref - var)).sum())
        n += len(var)
    return QualityRow(name, round(float(np.exp(nll / n)), 3), round(agree / n, 4), round(kl / n, 4), n)


def run_quality(directories: dict[str, Path], threads: int = 0, texts: list[str] | None = None,
                questions: list[Question] | None = None) -> list[QualityRow]:
    """directories: quantization -> model directory; must include 'none' (the fp32 reference)."""
    texts = texts or load_texts()
    questions = load_questions() if questions is None else questions
    reference, ids = next_token_logprobs(directories["none"], texts, threads)
    rows = []
    for name, directory in directories.items():
        logprobs = reference if name == "none" else next_token_logprobs(directory, texts, threads)[0]
        answers = greedy_answers(directory, [q.prompt for q in questions], threads) if questions else []
        lost = tuple(q.prompt for q, a in zip(questions, answers) if not q.kept_by(a))
        row = compare(reference, logprobs, ids, name)
        rows.append(replace(row, answers_kept=len(questions) - len(lost), answers_total=len(questions), lost=lost))
    return rows


def run_quality_bench(args) -> int:
    from streamgen.models.pull import ensure_model

    # Builds by label: a quantization, and -fp16 / -kvint8 for the other number formats (none-fp16, int8-kvint8).
    labels = [v.strip() for v in args.quantize.split(",") if v.strip()]
    if "none" not in labels:
        labels.insert(0, "none")
    try:
        builds = {label: Build.from_label(label) for label in labels}
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    directories = {label: ensure_model(args.model, b, args.home, graph=args.graph) for label, b in builds.items()}
    rows = run_quality(directories, args.threads)
    texts = load_texts()
    print(f"\nstreamgen bench quality: {args.model} ({args.graph} graph), {len(texts)} paragraphs, "
          f"{rows[0].positions} teacher-forced positions, fp32 is the reference\n")
    print("| quantization | perplexity | top-1 agreement with fp32 | mean KL(fp32 ‖ q) | answers kept |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.quantization} | {r.perplexity} | {r.top1_agreement:.1%} | {r.mean_kl} | "
              f"{r.answers_kept}/{r.answers_total} |")
    print(f"\nanswers kept: greedy replies to the {rows[0].answers_total} questions of bench/questions.json that "
          "hold every key fact")
    for r in rows:
        if r.lost:
            print(f"- {r.quantization} loses: " + "; ".join(r.lost))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0
