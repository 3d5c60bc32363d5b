"""Output folders (README "What is guaranteed"): inputs are never overwritten, output names are
unique, one run at a time writes into a folder, killed runs leave nothing that the next run does not remove, and a full
disk is noticed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import IDENTITY, one_line_error, run_cli
from entropymerge.outputs import LOCK_NAME, FolderLock
from entropymerge.volume import Geometry, write_volume

# -- 2, 3. inputs are never overwritten; output names are unique -------------------------------

def test_scribbles_where_the_segmentation_goes_are_kept(tmp_path, volume, model_factory):
    out = tmp_path / "out"
    out.mkdir()
    painted = np.full((20, 20, 20), 255, np.uint8)
    painted[2:6, 2:6, 2:6], painted[10:14, 10:14, 10:14] = 0, 1  # valid scribbles: the run would go through to the end
    scribbles = write_volume(painted, Geometry((20, 20, 20), (2.0, 2.0, 2.0), (0, 0, 0), IDENTITY), out / "segmentation.nii.gz")
    before = scribbles.read_bytes()
    result = run_cli("run", "--volume", volume, "--model", model_factory("a", seed=1), "--model", model_factory("b", seed=2),
                     "--scribbles", scribbles, "--out", out, "--overwrite", "--progress", "none")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: output {scribbles} would overwrite an input file; choose another --out"]
    assert scribbles.read_bytes() == before


def test_a_model_card_named_summary_json_in_out_is_kept_even_with_overwrite(tmp_path, volume, model_factory):
    out = tmp_path / "out"
    card = model_factory("summary", folder=out)
    assert card.name == "summary.json"
    before = card.read_bytes()
    result = run_cli("run", "--volume", volume, "--model", card, "--out", out, "--overwrite", "--progress", "none")
    assert result.returncode == 2 and "would overwrite an input file" in result.stderr
    assert card.read_bytes() == before


def test_a_file_named_like_an_output_is_not_replaced_without_overwrite(tmp_path, volume, model_factory):
    out = tmp_path / "out"
    out.mkdir()
    (out / "entropy.nii.gz").write_bytes(b"someone else's file")
    started = time.monotonic()
    result = run_cli("run", "--volume", volume, "--model", model_factory("a"), "--out", out, "--progress", "none")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: output {out / 'entropy.nii.gz'} exists and was not written by entropymerge; "
                                          "move it away or add --overwrite"]
    assert (out / "entropy.nii.gz").read_bytes() == b"someone else's file"
    assert sorted(p.name for p in out.iterdir()) == ["entropy.nii.gz"], "nothing left: no lock, no staging"
    assert time.monotonic() - started < 60, "refused before any heavy work"


def test_models_whose_names_map_to_one_file_name_keep_both_outputs(tmp_path, volume, model_factory):
    out = tmp_path / "out"
    first, second = model_factory("a b", seed=1), model_factory("a_b", seed=2)
    result = run_cli("run", "--volume", volume, "--model", first, "--model", second, "--per-model", "--method", "mean",
                     "--out", out, "--progress", "none")
    assert result.returncode == 0, result.stderr
    outputs = json.loads((out / "summary.json").read_text(encoding="utf-8"))["outputs"]
    assert outputs["segmentation_a b"] == "segmentation_a_b.nii.gz"
    assert outputs["segmentation_a_b-2"] == "segmentation_a_b-2.nii.gz"  # the second model is named a_b-2
    assert len(set(outputs.values())) == len(outputs)
    assert all((out / name).is_file() for name in outputs.values())


# -- 4. one run per output folder ----------------------------------------------------------------

def test_a_second_run_into_a_locked_folder_exits_2_naming_the_first(tmp_path, volume, model_factory):
    out = tmp_path / "out"
    lock = FolderLock(out)  # as a run in progress holds it
    try:
        result = run_cli("run", "--volume", volume, "--model", model_factory("a"), "--out", out, "--overwrite", "--progress", "none")
    finally:
        lock.release()
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: another entropymerge run (pid {os.getpid()} on ")
    assert f"is writing to {out}; wait for it to finish or choose another --out" in result.stderr
    assert not out.exists(), "the lock removed the folder it made"


def test_two_concurrent_runs_into_one_folder_one_wins(tmp_path, model_factory):
    geometry = Geometry((24, 24, 24), (2.0, 2.0, 2.0), (0, 0, 0), IDENTITY)
    volumes = [write_volume(np.random.default_rng(seed).normal(size=geometry.shape).astype(np.float32), geometry,
                            tmp_path / f"volume{seed}.nii.gz") for seed in (1, 2)]
    model, out = model_factory("a"), tmp_path / "out"
    runs = [subprocess.Popen([sys.executable, "-m", "entropymerge", "run", "--volume", str(v), "--model", str(model),
                              "--out", str(out), "--progress", "none"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for v in volumes]
    results = [(run.wait(timeout=600), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    winner = volumes[[code for code, _ in results].index(0)]
    loser_message = next(message for code, message in results if code == 2)
    assert "another entropymerge run" in loser_message or "already holds the results of a run" in loser_message
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["volume"]["path"] == str(winner)
    assert not list(out.glob(".entropymerge-*"))


def test_a_release_interrupted_by_ctrl_c_can_run_again(tmp_path, monkeypatch):
    """Ctrl-C right after the lock file is closed makes the run abort, which releases again: no second close."""
    lock = FolderLock(tmp_path / "out")
    real_close = os.close

    def close_then_interrupt(descriptor):
        real_close(descriptor)
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "close", close_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        lock.release()
    monkeypatch.undo()
    lock.release()  # before the fix: OSError "Bad file descriptor" (or another file's descriptor closed)
    assert not (tmp_path / "out" / LOCK_NAME).exists()


# -- 5. killed runs --------------------------------------------------------------------------------

def start_slow_run(tmp_path, model_factory, out):
    """A run with per-model outputs of four models on a larger volume: staging exists for a while."""
    geometry = Geometry((96, 96, 80), (1.0, 1.0, 1.0), (0, 0, 0), IDENTITY)
    volume = write_volume(np.random.default_rng(3).normal(size=geometry.shape).astype(np.float32), geometry, tmp_path / "large.nii.gz")
    models = [model_factory(f"m{k}", seed=k, folder=tmp_path / "models") for k in range(4)]
    command = [sys.executable, "-m", "entropymerge", "run", "--volume", str(volume), "--model", str(tmp_path / "models"),
               "--per-model", "--method", "mean", "--out", str(out), "--progress", "none"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not list(out.glob(".entropymerge-partial-*/*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert process.poll() is None, "the run ended before it could be interrupted"
    return process, command, models


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_end_like_ctrl_c(tmp_path, model_factory, signal_number):
    out = tmp_path / "out"
    process, _, _ = start_slow_run(tmp_path, model_factory, out)
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal_number, stderr
    assert stderr.strip().splitlines()[-1] == f"cancelled ({signal.Signals(signal_number).name})"
    assert not out.exists(), "nothing left: no staging folder, no lock, not the folder the run made"


def test_a_killed_run_leaves_staging_that_the_next_run_removes(tmp_path, model_factory):
    out = tmp_path / "out"
    process, command, _ = start_slow_run(tmp_path, model_factory, out)
    process.kill()  # SIGKILL: what a Cancel that kills the process tree sends; no handler runs
    process.communicate(timeout=120)
    leftovers = list(out.glob(".entropymerge-partial-*"))
    assert len(leftovers) == 1 and (out / LOCK_NAME).exists()
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr  # the dead run's lock is taken over
    assert not list(out.glob(".entropymerge-*")), "the rerun removed the killed run's staging folder and its own lock"
    assert (out / "summary.json").is_file()


def test_a_resumed_batch_removes_a_killed_runs_staging_folder(tmp_path, volume, model_factory):
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "case1.nii.gz").write_bytes(volume.read_bytes())
    arguments = ["batch", "--cases", cases, "--model", model_factory("a"), "--out", tmp_path / "out", "--progress", "none"]
    assert run_cli(*arguments).returncode == 0
    leftover = tmp_path / "out" / "case1" / ".entropymerge-partial-killed"
    leftover.mkdir()
    (leftover / "entropy.nii.gz").write_bytes(b"half a file")
    rerun = run_cli(*arguments)
    assert rerun.returncode == 0 and "1 already complete" in rerun.stdout
    assert not leftover.exists()


# -- 10. a full disk ---------------------------------------------------------------------------------

def test_a_full_disk_is_noticed_when_the_volume_is_written(tmp_path, volume, model_factory):
    import resource

    def small_disk():  # files beyond 4 kB fail to grow, as on a full disk (EFBIG instead of a signal)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "entropymerge", "run", "--volume", str(volume), "--model", str(model_factory("a")),
                             "--method", "single", "--out", str(out), "--progress", "none"],
                            capture_output=True, text=True, timeout=900, preexec_fn=small_disk)
    line = one_line_error(result)
    assert line.startswith(f"error: cannot write {out / 'entropy.nii.gz'}: "), line
    assert not out.exists(), "nothing committed, nothing left"
