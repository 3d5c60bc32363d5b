"""The contract around untrusted model files and user folders (README "What is guaranteed").

Each class of breach has a test here that failed before the fix: model files that reach the
network, inputs overwritten by outputs, two runs into one folder, killed runs, resource bombs,
bad inputs that ended in tracebacks, a C locale, and the report's data block.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from pathlib import Path

import pytest

from conftest import make_card, run_cli
from entropymerge.errors import UserInputError
from entropymerge.models import load_site_model
from entropymerge.validation import no_network


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
