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
of the fp32 build's answer (and none of the question's wrong strings; a table
request needs a Markdown table). The table counts the answers each build keeps.

With --sampling, the same questions on the fp32 build at each sampling setting
of a grid (temperatures x top-p x top-k), each sampled with seeds 0..N-1: per
setting, the share of the set answered right (the mean over seeds and the worst
seed), which questions were lost and how often, and how often the seeds gave
different replies. This is what the server's default sampling settings were
chosen by (docs/benchmarks.md, "Default sampling settings").
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
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
    wrong: tuple[str, ...] = ()  # none may appear (e.g. French words in a reply that should be English)
    table_rows: int = 0  # the reply must hold a Markdown table with at least this many rows under its header
    max_tokens: int = ANSWER_TOKENS

    def kept_by(self, answer: str) -> bool:
        return (all(any(_mentions(answer, option) for option in group) for group in self.facts)
                and not any(_mentions(answer, w) for w in self.wrong)
                and (self.table_rows == 0 or table_ok(answer, self.table_rows)))


# A Markdown table's delimiter row: | --- | :---: | (outer pipes optional, at least two columns).
_DELIMITER = re.compile(r"^\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)+\|?$")


def table_rows(text: str) -> int:
    """Rows under the header of the first Markdown table in text, counting those with some text in two or
    more cells (0 when there is no table: a header, then a delimiter row)."""
    lines = [line.strip() for line in text.splitlines()]
    for i in range(1, len(lines)):
        if _DELIMITER.match(lines[i]) and lines[i - 1].count("|") >= 2:
            rows = 0
            for line in lines[i + 1:]:
                if "|" not in line:
                    break
                rows += sum(1 for cell in line.strip("|").split("|") if re.search(r"\w", cell)) >= 2
            return rows
    return 0


def table_ok(text: str, min_rows: int) -> bool:
    """A Markdown table with at least min_rows rows, in a reply that is not mostly '|' (the degenerate
    reply is a run of pipes)."""
    visible = re.sub(r"\s", "", text)
    return table_rows(text) >= min_rows and visible.count("|") < len(visible) / 2


def _mentions(text: str, fact: str) -> bool:
    """fact appears in text, ignoring case, as a whole word: "7" is not in "1297", "cold" not in "scolded"."""
    before = r"(?<!\w)" if fact[:1].isalnum() else ""
    after = r"(?!\w)" if fact[-1:].isalnum() else ""
    return re.search(before + re.escape(fact) + after, text, flags=re.IGNORECASE) is not None


def load_questions(path: Path = QUESTIONS) -> list[Question]:
    data = json.loads(path.read_text())["questions"]
    return [Question(q["prompt"], tuple(tuple(g) for g in q["facts"]), tuple(q.get("wrong", ())),
                     q.get("table_rows", 0), q.get("max_tokens", ANSWER_TOKENS)) for q in data]


def answer_model(directory: Path, questions: list[Question], threads: int, max_batch: int = 16):
    context = 128 + max(q.max_tokens for q in questions)  # the prompts are short
    return load_model(directory, Device("cpu"), threads, SlotConfig(max_batch=max_batch, max_context=context))


def ask(model, questions: list[Question], settings: list[dict]) -> list[list[str]]:
    """Every question asked as a chat at each of settings (SamplingParams fields: temperature, seed...),
    all in one batch; answers[setting][question]. A request gives the same tokens alone or in a crowd, so
    this is what a user asking alone would see."""
    from streamgen.engine.generate import generate
    from streamgen.engine.params import SamplingParams
    from streamgen.engine.request import FinishEvent, prepare_request
    from streamgen.engine.tokenizer import ChatMessage

    requests = [prepare_request(model.tokenizer, model.context_length,
                                SamplingParams(**setting, max_tokens=q.max_tokens),
                                messages=[ChatMessage("user", q.prompt)])
                for setting in settings for q in questions]
    texts = {e.key: e.text for e in generate(model.runner, model.tokenizer, requests) if isinstance(e, FinishEvent)}
    n = len(questions)
    return [[texts[s * n + i] for i in range(n)] for s in range(len(settings))]


def greedy_answers(directory: Path, questions: list[Question], threads: int = 0) -> list[str]:
    """Each question asked as a chat, greedily, all in one batch."""
    return ask(answer_model(directory, questions, threads), questions, [{"temperature": 0.0}])[0]

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
        answers = greedy_answers(directory, questions, threads) if questions else []
        lost = tuple(q.prompt for q, a in zip(questions, answers) if not q.kept_by(a))
        row = compare(reference, logprobs, ids, name)
        rows.append(replace(row, answers_kept=len(questions) - len(lost), answers_total=len(questions), lost=lost))
    return rows


def run_quality_bench(args) -> int:
    from streamgen.models.pull import ensure_model

    if getattr(args, "sampling", False):
        return run_sampling_bench(args)
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


# ---- sampled answers: the default sampling settings ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SamplingRow:
    temperature: float
    top_p: float
    top_k: int
    seeds: int  # runs: seeds 0..seeds-1 (greedy runs once: every seed gives the same replies)
    kept: float  # share of the questions answered right, mean over the seeds
    worst: float  # the worst seed's share
    varied: float  # share of the questions whose replies differ between seeds
    lost: dict[str, int] = field(default_factory=dict)  # question -> seeds whose reply lost it
    examples: dict[str, str] = field(default_factory=dict)  # question -> the first reply that lost it

    @property
    def label(self) -> str:
        if self.temperature == 0:
            return "temperature 0 (greedy)"
        return f"temperature {self.temperature:g}, top-p {self.top_p:g}" + (f", top-k {self.top_k}" if self.top_k else "")


def sampling_grid(temperatures: list[float], top_ps: list[float], top_ks: list[int]) -> list[tuple[float, float, int]]:
    """(temperature, top_p, top_k) settings; temperature 0 once (greedy ignores the filters)."""
    grid = []
    for t in temperatures:
        for p, k in ([(1.0, 0)] if t == 0 else [(p, k) for p in top_ps for k in top_ks]):
            if (t, p, k) not in grid:
                grid.append((t, p, k))
    return grid


def run_sampling(directory: Path, grid: list[tuple[float, float, int]], seeds: int, threads: int = 0,
                 questions: list[Question] | None = None, log=print) -> list[SamplingRow]:
    """Every question at every setting of grid, with seeds 0..seeds-1 (all seeds of a setting in one batch)."""
    import time

    questions = load_questions() if questions is None else questions
    model = answer_model(directory, questions, threads, max_batch=32)
    rows = []
    for t, p, k in grid:
        started = time.perf_counter()
        runs = 1 if t == 0 else seeds
        answers = ask(model, questions, [{"temperature": t, "top_p": p, "top_k": k, "seed": s} for s in range(runs)])
        lost: Counter[str] = Counter()
        examples: dict[str, str] = {}
        kept = []
        for replies in answers:
            kept.append(sum(q.kept_by(a) for q, a in zip(questions, replies)) / len(questions))
            for q, a in zip(questions, replies):
                if not q.kept_by(a):
                    lost[q.prompt] += runs if t == 0 else 1
                    examples.setdefault(q.prompt, a[:200])
        varied = sum(len({replies[i] for replies in answers}) > 1 for i in range(len(questions))) / len(questions)
        row = SamplingRow(t, p, k, runs, round(sum(kept) / runs, 4), round(min(kept), 4), round(varied, 4),
                          dict(lost.most_common()), examples)
        rows.append(row)
        log(f"  {row.label}: {row.kept:.1%} kept (worst seed {row.worst:.1%}), "
            f"{time.perf_counter() - started:.0f} s")
    return rows


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def run_sampling_bench(args) -> int:
    import datetime
    import platform

    from streamgen.models.pull import ensure_model
    from streamgen.model_files import DEFAULT_QUANTIZATION

    grid = sampling_grid(_floats(args.temperatures), _floats(args.top_ps), [int(v) for v in _floats(args.top_ks)])
    if args.seeds < 1 or not grid:
        raise ConfigError("--seeds must be at least 1, and the grid needs a temperature")
    directory = ensure_model(args.model, DEFAULT_QUANTIZATION, args.home, graph=args.graph)
    questions = load_questions()
    print(f"streamgen bench quality --sampling: {args.model} ({DEFAULT_QUANTIZATION} build), {len(questions)} "
          f"questions, seeds 0-{args.seeds - 1}, {len(grid)} settings")
    rows = run_sampling(directory, grid, args.seeds, args.threads, questions)
    print(f"\n| setting | answers kept (mean of {args.seeds} seeds) | worst seed | replies differ between seeds "
          f"| questions lost (seeds) |")
    print("|---|---|---|---|---|")
    for r in rows:
        lost = "; ".join(f"{q} ({n})" for q, n in r.lost.items()) or "none"
        print(f"| {r.label} | {r.kept:.1%} | {r.worst:.1%} | {r.varied:.0%} | {lost} |")
    best = max(rows, key=lambda r: (r.kept, r.worst))
    print(f"\nmost kept: {best.label}")
    if sampled := [r for r in rows if r.temperature > 0]:
        best = max(sampled, key=lambda r: (r.kept, r.worst))
        print(f"most kept with sampling: {best.label}")
    if args.json:
        cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")),
                   platform.processor())
        args.json.write_text(json.dumps({
            "model": args.model, "build": DEFAULT_QUANTIZATION, "questions": len(questions), "seeds": args.seeds,
            "max_tokens": ANSWER_TOKENS, "date": datetime.date.today().isoformat(), "cpu": cpu,
            "rows": [asdict(r) for r in rows],
        }, indent=2, ensure_ascii=False) + "\n")
    return 0


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []
