"""Sliding-window inference: device choice, window counting, and the GPU out-of-memory fallbacks."""

import pytest
import torch

import entropymerge.inference as inference
from entropymerge.errors import UserInputError
from entropymerge.modelcard import InferenceSettings


def test_device_auto_and_forced():
    assert inference.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert inference.resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserInputError, match="no CUDA GPU is available"):
            inference.resolve_device("cuda")
        with pytest.raises(UserInputError, match="no CUDA GPU is available"):
            inference.resolve_device("gpu")
    with pytest.raises(UserInputError, match="unknown device 'tpu0'"):
        inference.resolve_device("tpu0")


@pytest.mark.parametrize("shape,roi,overlap,expected", [
    ((128, 128, 96), (64, 64, 64), 0.25, 3 * 3 * 2),
    ((64, 64, 64), (64, 64, 64), 0.25, 1),
    ((30, 200, 64), (64, 64, 64), 0.5, 1 * 6 * 1),
])
def test_window_count(shape, roi, overlap, expected):
    assert inference.window_count(shape, roi, overlap) == expected


def test_sliding_window_matches_a_direct_pass_for_one_window():
    torch.manual_seed(0)
    network = torch.nn.Conv3d(2, 3, 3, padding=1).eval()
    x = torch.rand(1, 2, 16, 16, 16)
    settings = InferenceSettings((16, 16, 16), 0.25, 1)
    fractions = []
    logits = inference.predict_logits(network, x, settings, torch.device("cpu"), fractions.append)
    with torch.no_grad():
        torch.testing.assert_close(logits, network(x), atol=1e-5, rtol=1e-5)
    assert fractions == [1.0]


def test_gpu_out_of_memory_falls_back_and_says_so(monkeypatch):
    # Stand-in for a GPU that runs out of memory (no GPU here): the first two attempts raise.
    attempts = []

    def sliding_window(network, inputs, settings, device, batch, stitch_device, progress):
        attempts.append((str(device), batch, str(stitch_device)))
        if len(attempts) < 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return torch.zeros(1, 2, 4, 4, 4)

    monkeypatch.setattr(inference, "_sliding_window", sliding_window)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    report = inference.InferenceReport("cuda", [])
    inference.predict_logits(torch.nn.Identity(), torch.zeros(1, 1, 4, 4, 4), InferenceSettings((4, 4, 4), 0.25, 4),
                             torch.device("cuda"), report=report)
    assert attempts == [("cuda", 4, "cuda"), ("cuda", 1, "cpu"), ("cpu", 4, "cpu")]
    assert report.device == "cpu"
    assert len(report.notes) == 2 and "GPU out of memory" in report.notes[0]
