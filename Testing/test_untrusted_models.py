"""Untrusted site model files (README "What is guaranteed"): a model file never reaches the
network or reads files outside its folder, a config cannot expand or nest without bound, and every bad card, bundle or
weights file is refused with one line instead of a traceback."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from pathlib import Path

import pytest

from conftest import make_card, one_line_error, run_cli
from entropymerge.errors import UserInputError
from entropymerge.models import load_site_model
from entropymerge.validation import no_network

# -- 1. model files never reach the network or write outside --out ------------------------------

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


# -- 6. config bombs are refused before anything large is allocated -----------------------------

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


# -- 7, 8. every bad model file exits 2 with one line; nothing wrong is silently accepted ------------

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
    from entropymerge.compatibility import check_runs

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
