"""The contract around untrusted model files and user folders (README "What is guaranteed").

Each class of breach has a test here that failed before the fix: model files that reach the
network, inputs overwritten by outputs, two runs into one folder, killed runs, resource bombs,
bad inputs that ended in tracebacks, a C locale, and the report's data block.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import make_card, run_cli
from entropymerge.errors import UserInputError
from entropymerge.models import load_site_model
from entropymerge.outputs import LOCK_NAME, FolderLock
from entropymerge.validation import no_network
from entropymerge.volume import Geometry, write_volume

IDENTITY = ((1, 0, 0), (0, 1, 0), (0, 0, 1))


@contextlib.contextmanager
def loopback_listener():
    """A TCP listener on 127.0.0.1 (loopback only, bounded) that records whether anyone connected."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.2)
    contacts: list[bytes] = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except OSError:
                continue
            with connection:
                connection.settimeout(1.0)
                with contextlib.suppress(OSError):
                    contacts.append(connection.recv(1024) or b"(connected)")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}", contacts
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()


def card_with_network(folder: Path, network: dict, name: str = "fetcher") -> Path:
    """A model card whose network is ``network`` (weights file named but the network must never be built)."""
    folder.mkdir(parents=True, exist_ok=True)
    card = make_card(name, network=network, weights=f"{name}.safetensors")
    (folder / f"{name}.safetensors").write_bytes(b"")
    return card.save(folder / f"{name}.json")


# -- 1. model files never reach the network or write outside --out ------------------------------

def test_pretrained_url_in_a_card_reaches_no_listener_and_exits_2(tmp_path):
    with loopback_listener() as (url, contacts):
        card = card_with_network(tmp_path / "models", {"_target_": "HoVerNet", "pretrained_url": f"{url}/weights.pth"})
        with pytest.raises(UserInputError, match=r"HoVerNet with pretrained_url='http://127\.0\.0\.1:\d+/weights\.pth' "
                                                 r"would download or read weights by itself.*--trust-bundle-code"):
            load_site_model(card)
        listed = run_cli("models", "--json", card)
    assert contacts == [], "the model file made the tool contact the listener"
    assert listed.returncode == 2
    entry = json.loads(listed.stdout)["models"][0]  # stdout stays one JSON object
    assert not entry["compatible"] and "pretrained_url" in entry["problem"]


def test_file_url_copies_no_canary_into_the_torch_cache(tmp_path, monkeypatch):
    secret = tmp_path / "secret.pth"
    secret.write_bytes(b"canary")
    torch_home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    card = card_with_network(tmp_path / "models", {"_target_": "HoVerNet", "pretrained_url": secret.as_uri()})
    with pytest.raises(UserInputError, match="pretrained_url"):
        load_site_model(card)
    assert not torch_home.exists(), "a model file made the tool write into the torch cache"


@pytest.mark.parametrize("network, argument", [
    ({"_target_": "DenseNet121", "spatial_dims": 3, "in_channels": 1, "out_channels": 3, "pretrained": True}, "pretrained=True"),
    ({"_target_": "EfficientNetBN", "model_name": "efficientnet-b0", "spatial_dims": 3, "in_channels": 1}, "pretrained=True"),
])
def test_networks_that_download_by_argument_or_default_are_refused(tmp_path, network, argument):
    card = card_with_network(tmp_path / "models", network)
    with pytest.raises(UserInputError, match=f"with {argument} would download"):
        load_site_model(card)


def test_no_network_guard_stops_any_connection_while_loading():
    with loopback_listener() as (url, contacts):
        port = int(url.rsplit(":", 1)[1])
        with no_network("site model x"), pytest.raises(UserInputError, match="site model x tried to reach the network"):
            socket.create_connection(("127.0.0.1", port), timeout=2)
        with socket.create_connection(("127.0.0.1", port), timeout=2) as connection:  # outside the block: allowed
            connection.sendall(b"hello")
        for _ in range(50):
            if contacts:
                break
            threading.Event().wait(0.05)
    assert contacts == [b"hello"]


# -- 2, 3. inputs are never overwritten; output names are unique -------------------------------

@pytest.fixture
def volume(tmp_path):
    geometry = Geometry((20, 20, 20), (2.0, 2.0, 2.0), (0, 0, 0), IDENTITY)
    return write_volume(np.random.default_rng(1).normal(size=geometry.shape).astype(np.float32), geometry, tmp_path / "small.nii.gz")


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


# -- 11, 12. a C locale, and hostile names in the report --------------------------------------------

HOSTILE_NAME = "<!--<script>α"


def report_data_block(html: str) -> str:
    start = html.index('<script type="application/json" id="report-data">') + len('<script type="application/json" id="report-data">')
    return html[start: html.index("</script>", start)]


def test_c_locale_run_with_report_and_hostile_names(tmp_path, volume, model_factory):
    from entropymerge.modelcard import default_labels

    labels = default_labels(["background", "βeta", "τau"])
    first = model_factory("hostile", seed=1, labels=labels)  # file names stay ASCII: a C locale cannot name others
    second = model_factory("other", seed=2, labels=labels, site="site τ")
    card = json.loads(first.read_text(encoding="utf-8"))
    first.write_text(json.dumps(dict(card, name=HOSTILE_NAME), ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "out"
    environment = dict(os.environ, LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONIOENCODING="")
    result = subprocess.run([sys.executable, "-m", "entropymerge", "run", "--volume", str(volume), "--model", str(first),
                             "--model", str(second), "--method", "mean", "--per-model", "--report", "--out", str(out),
                             "--progress", "none"], capture_output=True, env=environment, timeout=900)
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")
    html = (out / "report.html").read_bytes().decode("utf-8")
    block = report_data_block(html)
    assert not any(marker in block for marker in ("<", ">", "&")), "the data block cannot end early or start a comment"
    data = json.loads(block)
    assert [layer["title"] for layer in data["layers"]][1:] == [HOSTILE_NAME, "other"]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert [label["name"] for label in summary["labels"]] == ["background", "βeta", "τau"]


def test_a_colour_edited_into_the_summary_is_refused(tmp_path, volume, model_factory):
    out = tmp_path / "out"
    assert run_cli("run", "--volume", volume, "--model", model_factory("a"), "--out", out, "--progress", "none").returncode == 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    summary["labels"][1]["color"] = "red;}</style><script>alert(1)</script>"
    (out / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    result = run_cli("report", out)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: {out / 'summary.json'}: the label {summary['labels'][1]!r} needs a colour written '#rrggbb'"]
    assert not (out / "report.html").exists()


# -- 6. resource bombs are refused before anything large is allocated -------------------------------

def minimal_bundle(root: Path, network: dict | str = None, metadata: dict | None = None, extra: dict | None = None) -> Path:
    """A bundle folder with an inference.json (``network_def`` plus ``extra`` entries), metadata.json and an empty model.pt."""
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    config = {"network_def": network or {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 4,
                                         "channels": [4, 8], "strides": [2]}, **(extra or {})}
    (root / "configs" / "inference.json").write_text(json.dumps(config), encoding="utf-8")
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata or {}), encoding="utf-8")
    (root / "models" / "model.pt").write_bytes(b"")
    return root


def test_doubling_references_are_refused_quickly(tmp_path):
    levels = {f"level{i}": [f"@level{i + 1}", f"@level{i + 1}"] for i in range(40)}
    levels["level40"] = 1
    network = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 4, "channels": "@level0", "strides": [2]}
    root = minimal_bundle(tmp_path / "bomb", network, extra=levels)
    started = time.monotonic()
    with pytest.raises(UserInputError, match="references expand to over 200,000 values; refused as a resource bomb"):
        load_site_model(root)
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_deep_nesting_is_refused(tmp_path, suffix):
    root = minimal_bundle(tmp_path / "deep")
    config = root / "configs" / "inference.json"
    config.unlink()
    (root / "configs" / f"inference{suffix}").write_text('{"network_def": ' + "[" * 100_000 + "]" * 100_000 + "}", encoding="utf-8")
    with pytest.raises(UserInputError, match=r"is nested too deeply \(over 100 levels\)"):
        load_site_model(root)


@pytest.mark.parametrize("case, arguments", [
    ("huge window", ["--roi-size", "1000000", "1000000", "1000000"]),
    ("low limit", ["--memory-limit", "0.001"]),
])
def test_runs_too_large_for_memory_exit_2_with_the_numbers(tmp_path, volume, model_factory, case, arguments):
    result = run_cli("run", "--volume", volume, "--model", model_factory("a"), "--out", tmp_path / "out", "--progress", "none",
                     *arguments)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert "error: this run would need about " in result.stderr and "raise it with --memory-limit GB" in result.stderr


def test_a_500_mm_voxel_or_a_0_01_mm_model_spacing_is_refused(tmp_path, model_factory):
    geometry = Geometry((20, 20, 20), (500.0, 500.0, 500.0), (0, 0, 0), IDENTITY)
    huge_voxels = write_volume(np.zeros(geometry.shape, np.float32), geometry, tmp_path / "huge-voxels.nii.gz")
    result = run_cli("run", "--volume", huge_voxels, "--model", model_factory("a"), "--out", tmp_path / "out", "--progress", "none")
    assert result.returncode == 2 and "this run would need about" in result.stderr and "(this computer)" in result.stderr
    fine = model_factory("fine", spacing=(0.01, 0.01, 0.01), folder=tmp_path / "fine")
    geometry = Geometry((20, 20, 20), (2.0, 2.0, 2.0), (0, 0, 0), IDENTITY)
    small = write_volume(np.zeros(geometry.shape, np.float32), geometry, tmp_path / "small.nii.gz")
    result = run_cli("run", "--volume", small, "--model", fine, "--out", tmp_path / "out", "--progress", "none")
    assert result.returncode == 2 and "model spacing 0.01x0.01x0.01 mm" in result.stderr


def test_a_small_file_declaring_a_huge_volume_is_refused_from_its_header(tmp_path):
    import nibabel

    from entropymerge.volume import read_volume

    header = nibabel.Nifti1Header()
    header.set_data_shape((20000, 20000, 20000))
    header.set_data_dtype(np.float32)
    path = tmp_path / "bomb.nii"
    with open(path, "wb") as stream:
        header.write_to(stream)
        stream.write(b"\0" * 64)
    with pytest.raises(UserInputError, match=r"has 8,000,000,000,000 voxels .* this computer has"):
        read_volume(path)


def test_a_fifo_as_the_volume_exits_2_without_hanging(tmp_path, model_factory):
    fifo = tmp_path / "volume.nii.gz"
    os.mkfifo(fifo)
    result = run_cli("run", "--volume", fifo, "--model", model_factory("a"), "--out", tmp_path / "out", "--progress", "none")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: volume {fifo} is not a regular file"]


# -- 7, 8. every bad input exits 2 with one line; nothing wrong is silently accepted -------------------

def one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


UNET_4 = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 4, "channels": [4, 8], "strides": [2]}


@pytest.mark.parametrize("metadata, extra, message", [
    ({"network_data_format": {"inputs": {"image": {"num_channels": "abc"}}}}, {}, "holds a value of the wrong type"),
    ({"network_data_format": ["not", "a", "mapping"]}, {}, "holds a value of the wrong type"),
    ({}, {"inferer": {"_target_": "SlidingWindowInferer", "roi_size": "abc"}}, "roi_size must be three positive integers, got 'abc'"),
    ({}, {"inferer": {"_target_": "SlidingWindowInferer", "roi_size": [0, -5, 8]}}, "roi_size must be three positive integers, got \\[0, -5, 8\\]"),
    ({"network_data_format": {"outputs": {"pred": {"format": "segmentation", "num_channels": 5}}}}, {},
     "'network.out_channels' must equal the number of labels \\(5\\)"),
    ({"network_data_format": {"inputs": {"image": {"num_channels": 2}}}}, {}, "'network.in_channels' must equal input_channels \\(2\\)"),
])
def test_bad_bundle_metadata_exits_2_in_one_line(tmp_path, metadata, extra, message):
    root = minimal_bundle(tmp_path / "bundle", UNET_4, metadata, extra)
    with pytest.raises(UserInputError, match=message):
        load_site_model(root)


def test_models_lists_a_bad_bundle_as_not_usable_and_exits_2(tmp_path):
    root = minimal_bundle(tmp_path / "bundle", UNET_4, {"network_data_format": ["not", "a", "mapping"]})
    result = run_cli("models", root)
    assert result.returncode == 2 and result.stderr == ""
    assert "NOT USABLE: bundle " in result.stdout and "holds a value of the wrong type" in result.stdout


@pytest.mark.parametrize("option", ["--roi-size", "--probe-size"])
def test_a_window_off_the_networks_multiple_is_rounded_with_a_note_not_a_traceback(tmp_path, volume, model_factory, option):
    # Issue 12 rounds a size the network's strides cannot take up to their multiple (issue 13 had refused it);
    # the load-time check runs at the rounded size, so the run goes through with a note.
    result = run_cli("run", "--volume", volume, "--model", model_factory("a"), "--model", model_factory("b", seed=2),
                     option, "33", "33", "33", "--method", "select", "--out", tmp_path / "out", "--progress", "json")
    assert result.returncode == 0, result.stderr
    notes = [json.loads(record)["message"] for record in result.stdout.splitlines() if '"log"' in record]
    assert any("(33, 33, 33) rounded up to" in note for note in notes), notes


def test_a_classification_network_is_refused(tmp_path):
    from entropymerge.models import save_site_model
    from entropymerge.safeconfig import build_network

    network = {"_target_": "Classifier", "in_shape": [1, 32, 32, 32], "classes": 3, "channels": [2], "strides": [2]}
    card = make_card("classifier", network=network)
    path = save_site_model(build_network(network, "test"), card, tmp_path)
    from entropymerge.models import check_runs

    with pytest.raises(UserInputError, match=r"gives \(1, 3\) for a sliding window of 32x32x32 voxels; a segmentation network"):
        check_runs(load_site_model(path), (32, 32, 32))


def test_intensity_arguments_of_the_wrong_type_exit_2(tmp_path, volume, model_factory):
    step = {"_target_": "ScaleIntensityRange", "a_min": "abc", "a_max": 1, "b_min": 0, "b_max": 1}
    card = model_factory("a")
    data = json.loads(card.read_text(encoding="utf-8"))
    data["preprocessing"]["intensity"] = [step]
    card.write_text(json.dumps(data), encoding="utf-8")
    line = one_line_error(run_cli("run", "--volume", volume, "--model", card, "--out", tmp_path / "out", "--progress", "none"))
    assert "preprocessing.intensity[0] (ScaleIntensityRange) cannot be applied" in line


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "complex64"])
def test_weights_of_unsupported_types_are_refused(tmp_path, model_factory, dtype):
    import torch

    model = load_site_model(model_factory("a"))
    state = {key: value.to(getattr(torch, dtype)) if value.is_floating_point() else value for key, value in model.state_dict().items()}
    if dtype == "complex64":
        first = next(iter(state))
        state[first] = state[first] * float("nan")
    torch.save(state, tmp_path / "odd.pt")
    (tmp_path / "odd.json").write_text(model.source.read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(UserInputError, match=f"has the unsupported type {dtype}"):
        load_site_model(tmp_path / "odd.pt")


def test_a_one_byte_weights_file_is_refused(tmp_path, model_factory):
    card = model_factory("a")
    (tmp_path / "tiny.pt").write_bytes(b"\x80")
    (tmp_path / "tiny.json").write_text(card.read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(UserInputError, match="could not read weights .*tiny.pt: not a PyTorch weights file"):
        load_site_model(tmp_path / "tiny.pt")


def test_scl_slope_beyond_float32_and_rgb_volumes_exit_2(tmp_path):
    import nibabel
    import SimpleITK as sitk

    from entropymerge.volume import read_volume

    image = nibabel.Nifti1Image(np.full((4, 4, 4), 10, np.int16), np.eye(4))
    image.header.set_slope_inter(1e38, 0)
    nibabel.save(image, tmp_path / "scaled.nii.gz")
    with pytest.raises(UserInputError, match="beyond the float32 range"):
        read_volume(tmp_path / "scaled.nii.gz")
    rgb = sitk.Image([4, 4, 4], sitk.sitkVectorUInt8, 3)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.nrrd"))
    with pytest.raises(UserInputError, match="has 3 components per voxel; a scalar volume is needed"):
        read_volume(tmp_path / "rgb.nrrd")


def test_models_with_a_site_that_is_not_text(tmp_path, model_factory):
    card = model_factory("a")
    data = json.loads(card.read_text(encoding="utf-8"))
    card.write_text(json.dumps(dict(data, site={"city": "x"})), encoding="utf-8")
    result = run_cli("models", card)
    assert result.returncode == 2 and "field 'site' must be text, got {'city': 'x'}" in result.stdout


@pytest.mark.parametrize("weights", ["link", "../outside.safetensors", "absolute"])
def test_weights_outside_the_models_folder_are_refused(tmp_path, model_factory, weights):
    card = model_factory("a", folder=tmp_path / "models")
    outside = tmp_path / "outside.safetensors"
    (tmp_path / "models" / "a.safetensors").rename(outside)
    data = json.loads(card.read_text(encoding="utf-8"))
    if weights == "link":
        (tmp_path / "models" / "a.safetensors").symlink_to(outside)
        data["weights"] = "a.safetensors"
    else:
        data["weights"] = str(outside) if weights == "absolute" else weights
    card.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(UserInputError, match="weights .* lies outside .*models; a model's files must be inside its own folder"):
        load_site_model(card)


def test_a_detached_header_may_not_read_a_file_elsewhere(tmp_path):
    from entropymerge.volume import read_volume

    secret = tmp_path / "secret.raw"
    secret.write_bytes(bytes(range(256)) * 4)
    folder = tmp_path / "volumes"
    folder.mkdir()
    header = "NRRD0004\ntype: uint8\ndimension: 3\nsizes: 8 8 16\nencoding: raw\ndata file: ../secret.raw\n\n"
    (folder / "scan.nhdr").write_text(header, encoding="utf-8")
    with pytest.raises(UserInputError, match="data file .*secret.raw lies outside"):
        read_volume(folder / "scan.nhdr")


# -- 9. early and quiet failures ---------------------------------------------------------------------

def test_bad_scribbles_are_refused_before_the_probe(tmp_path, volume, model_factory):
    geometry = Geometry((10, 10, 10), (4.0, 4.0, 4.0), (0, 0, 0), IDENTITY)
    scribbles = write_volume(np.zeros(geometry.shape, np.uint8), geometry, tmp_path / "scribbles.nii.gz")
    result = run_cli("rank", "--volume", volume, "--model", model_factory("a", seed=1), "--model", model_factory("b", seed=2),
                     "--scribbles", scribbles, "--out", tmp_path / "out", "--progress", "json")
    assert "is not on the target volume's grid" in one_line_error(result)
    stages = [json.loads(record)["stage"] for record in result.stdout.splitlines() if '"progress"' in record]
    assert stages and set(stages) == {"load"}


def test_names_with_line_breaks_and_control_characters_print_on_one_line(tmp_path, volume):
    odd = tmp_path / "line\nbreak\x1b[31m.nii.gz"
    line = one_line_error(run_cli("run", "--volume", odd, "--model", tmp_path / "m.json", "--out", tmp_path / "out"))
    assert line == f"error: volume not found: {tmp_path}/line break\\x1b[31m.nii.gz"


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
