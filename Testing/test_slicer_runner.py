"""The Slicer module's background runner, with real child processes: progress read without blocking,
Cancel kills the whole process tree within 2 s, a failing engine reports its own message."""

from __future__ import annotations

import os
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest

from SlicerEntropyMergeLib import cases
from SlicerEntropyMergeLib import process as process_module
from SlicerEntropyMergeLib.engine import ModelReport, RunRequest, engine_environment, models_needed, models_process, parse_roi_size, run_process
from SlicerEntropyMergeLib.process import CANCELLED, FAILED, SUCCEEDED, EngineProcess, parse_line


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def poll_until(process: EngineProcess, condition, timeout: float = 60.0) -> list:
    events, deadline = [], time.monotonic() + timeout
    while not condition(events) and time.monotonic() < deadline:
        events += process.poll()
        time.sleep(0.02)
    return events


def test_progress_from_the_engine_protocol_is_parsed():
    # the engine's own JSON-lines reporter, in a child process, with pauses between the lines
    process = EngineProcess(python("""
        import time
        from entropymerge.progress import JsonLinesProgress
        progress = JsonLinesProgress()
        progress.plan([("load", 1), ("inference", 3)])
        progress.stage("load", "reading")
        time.sleep(0.2)
        progress.note("the model card has no colours", "warning")
        progress.stage("inference", "segmenting")
        progress.update(0.5, "segmenting")
        print("a line outside the protocol", flush=True)
        progress.done({"segmentation": "/out/segmentation.nii.gz"})
    """))
    process.start()
    events = poll_until(process, lambda _: process.finished)
    assert process.state == SUCCEEDED and process.returncode == 0
    kinds = [e.kind for e in events if e.kind != "stderr"]
    assert kinds == ["progress", "log", "progress", "progress", "text", "done"]
    progress = [e for e in events if e.kind == "progress"]
    assert [(e.stage, e.fraction) for e in progress] == [("load", 0.0), ("inference", 0.25), ("inference", 0.625)]
    log = next(e for e in events if e.kind == "log")
    assert (log.level, log.message) == ("warning", "the model card has no colours")
    assert process.outputs == {"segmentation": "/out/segmentation.nii.gz"}
    assert process.fraction == 1.0 and process.message == "segmenting"


def test_poll_never_waits_for_a_silent_child():
    process = EngineProcess(python("import time; time.sleep(30)"))
    process.start()
    try:
        started = time.monotonic()
        assert process.poll() == []
        assert time.monotonic() - started < 0.1
        assert not process.finished
    finally:
        process.cancel()


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, killed but not yet reaped by its new parent, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc (Linux)")
def test_cancel_kills_the_child_and_its_grandchild_within_two_seconds():
    process = EngineProcess(python("""
        import subprocess, sys, time
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        print(grandchild.pid, flush=True)
        time.sleep(120)
    """))
    process.start()
    events = poll_until(process, lambda events: any(e.kind == "text" for e in events))
    grandchild = int(next(e for e in events if e.kind == "text").message)
    child = process.pid
    assert alive(child) and alive(grandchild)
    started = time.monotonic()
    process.cancel()
    while (alive(child) or alive(grandchild)) and time.monotonic() - started < 2.0:
        time.sleep(0.02)
    assert not alive(child) and not alive(grandchild)
    assert time.monotonic() - started < 2.0
    assert process.state == CANCELLED
    assert process.error is None


def test_a_failing_engine_reports_its_own_message(tmp_path, model_factory):
    model = model_factory("site")
    process = run_process(RunRequest(models=[str(model)], method="single", device="cpu"), tmp_path / "missing.nii.gz", tmp_path / "out")
    process.start()
    events = poll_until(process, lambda _: process.finished, timeout=300)
    assert process.state == FAILED and process.returncode == 2
    assert process.error == f"error: volume not found: {tmp_path / 'missing.nii.gz'}"
    assert [e.exit_code for e in events if e.kind == "error"] == [2]
    assert not (tmp_path / "out").exists()


def test_a_crash_before_the_protocol_reports_the_last_stderr_line():
    process = EngineProcess(python("import sys; print('starting', file=sys.stderr); sys.exit('no module named torch')"))
    process.start()
    poll_until(process, lambda _: process.finished)
    assert process.state == FAILED and process.error == "no module named torch"


def test_lines_outside_the_protocol_are_text_and_stderr_stays_stderr():
    assert parse_line('{"type": "progress", "stage": "load", "fraction": 0.1, "message": "m"}\n').kind == "progress"
    assert parse_line("[1, 2]").kind == "text"
    assert parse_line('{"type": "unknown"}').kind == "text"
    assert parse_line('{"type": "error", "message": "x", "exit_code": 2}', "stderr").kind == "stderr"


def test_models_process_reports_models_and_device(model_factory):
    process = models_process([str(model_factory("a", seed=1)), str(model_factory("b", seed=2, classes=4))])
    process.start()
    events = poll_until(process, lambda _: process.finished, timeout=300)
    assert process.returncode == 2, "a model is unusable: exit code 2, and the report on stdout says which"
    report = ModelReport.from_text([e.message for e in events if e.kind == "text"])
    assert [entry["name"] for entry in report.models] == ["a", "b"]
    assert not report.compatible and report.models[1]["problem"].startswith("cannot be used with 'a'")
    assert [label["name"] for label in report.labels] == ["background", "structure 1", "structure 2"]
    assert report.auto_device == "cpu"


def test_run_request_becomes_the_engine_options():
    request = RunRequest(models=["a.json", "b.json"], method="single", single_model="b", temperature=0.1, decouple_head=False,
                         device="cuda", roi_size=(64, 64, 32), overlap=0.5, probe_patches=4, adapt="dsbr", adapt_steps=5,
                         rank=True, scribbles="s.nrrd")
    assert request.option_arguments() == [
        "--model", "a.json", "--model", "b.json", "--method", "single", "--temperature", "0.1", "--probe-patches", "4",
        "--device", "cuda", "--single-model", "b", "--no-decouple-head", "--roi-size", "64", "64", "32",
        "--overlap", "0.5", "--adapt", "dsbr", "--adapt-steps", "5", "--rank", "--scribbles", "s.nrrd"]
    plain = RunRequest(models=["a.json"]).option_arguments()
    assert plain == ["--model", "a.json", "--method", "adaptive", "--temperature", "0.05", "--probe-patches", "8", "--device", "auto"]


def test_models_needed_and_roi_parsing():
    assert models_needed(rank=False) == 1  # with one model, every method is that model
    assert models_needed(rank=True) == 2
    assert parse_roi_size("") is None and parse_roi_size("96, 96 x 64") == (96, 96, 64)
    with pytest.raises(ValueError, match="The ROI size needs three positive whole numbers"):
        parse_roi_size("96 96")


def test_case_folder_lists_volumes_and_reuses_matching_results(tmp_path):
    from entropymerge.outputs import OutputFolder

    for name in ("b.nii.gz", "a.nrrd", "a_labels.nii.gz", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "c.mha").mkdir()
    found = cases.find_cases(tmp_path)
    assert [p.name for p in found] == ["a.nrrd", "b.nii.gz"]
    case = found[1]
    assert cases.results_folder(case) == tmp_path / "b.entropymerge"
    options = RunRequest(models=["m.json"]).option_arguments()
    assert not cases.has_reusable_results(case, options)
    OutputFolder(cases.results_folder(case)).commit({"method": "adaptive"})  # a complete run, as the engine leaves it
    assert not cases.has_reusable_results(case, options), "a run whose options are unknown is not reused"
    cases.remember_options(case, options)
    assert cases.has_reusable_results(case, options)
    assert not cases.has_reusable_results(case, RunRequest(models=["m.json"], method="mean").option_arguments())
    cases.discard_results(case)
    assert not cases.results_folder(case).exists()


def test_the_engine_child_writes_utf8_whatever_the_platform_default(tmp_path):
    # Finding 10: on Windows the console code page would garble non-ASCII lines; the engine child is told UTF-8.
    environment = engine_environment({"PATH": os.environ.get("PATH", ""), "PYTHONIOENCODING": "latin-1"})
    assert environment["PYTHONUTF8"] == "1" and environment["PYTHONIOENCODING"] == "utf-8"
    process = EngineProcess(python("import sys; print(sys.stdout.encoding, sys.flags.utf8_mode); print('Zürich – São Paulo')"),
                            environment)
    process.start()
    events = poll_until(process, lambda _: process.finished)
    assert [e.message for e in events if e.kind == "text"] == ["utf-8 1", "Zürich – São Paulo"]


def test_cancel_on_windows_runs_taskkill_without_a_console_window(monkeypatch):
    # A stand-in for Windows (os.name "nt" and its subprocess flag), recording the taskkill call instead of running it.
    calls = []
    monkeypatch.setattr(process_module, "os", types.SimpleNamespace(name="nt"))
    monkeypatch.setattr(process_module.subprocess, "CREATE_NO_WINDOW", 0x08000000, raising=False)
    monkeypatch.setattr(process_module.subprocess, "run", lambda arguments, **options: calls.append((arguments, options)))
    process_module.kill_process_tree(4242)
    assert calls == [(["taskkill", "/F", "/T", "/PID", "4242"], {"capture_output": True, "creationflags": 0x08000000})]
