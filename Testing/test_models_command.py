"""``entropymerge models``: what the Slicer module's model list shows, including which model does not fit."""

import json

from conftest import run_cli


def test_models_json_lists_each_model_and_marks_the_incompatible_one(tmp_path, model_factory):
    first = model_factory("alpha", seed=1)
    second = model_factory("beta", seed=2)
    four_classes = model_factory("gamma", seed=3, classes=4)
    result = run_cli("models", "--json", first, second, four_classes, tmp_path / "missing.json")
    assert result.returncode == 2, "a model the list marks unusable makes the exit code non-zero"
    report = json.loads(result.stdout)
    assert report["auto_device"] == "cpu"
    entries = {entry["name"]: entry for entry in report["models"]}
    assert list(entries) == ["alpha", "beta", "gamma", "missing"]
    assert entries["alpha"]["compatible"] and entries["beta"]["compatible"]
    assert entries["alpha"]["site"] == "alpha hospital"
    assert [label["name"] for label in entries["beta"]["labels"]] == ["background", "structure 1", "structure 2"]
    assert entries["beta"]["source"] == str(second)
    assert not entries["gamma"]["compatible"]
    assert entries["gamma"]["problem"].startswith("cannot be used with 'alpha': ")
    assert "shape" in entries["gamma"]["problem"]
    assert entries["missing"]["problem"] == f"model not found: {tmp_path / 'missing.json'}"


def test_models_folder_expands_and_duplicate_names_become_unique(tmp_path, model_factory):
    pool = tmp_path / "pool"
    model_factory("same", seed=1, folder=pool / "a")
    model_factory("same", seed=2, folder=pool / "b")
    result = run_cli("models", "--json", pool / "a", pool / "b")
    assert result.returncode == 0, result.stderr
    assert [entry["name"] for entry in json.loads(result.stdout)["models"]] == ["same", "same-2"]


def test_models_without_paths_reports_the_device_only():
    result = run_cli("models", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"models": [], "auto_device": "cpu"}


def test_models_exit_code_is_2_for_an_unusable_model_and_0_when_all_fit(tmp_path, model_factory):
    good = model_factory("alpha", seed=1)
    assert run_cli("models", good).returncode == 0
    result = run_cli("models", good, tmp_path / "empty-folder-does-not-exist")
    assert result.returncode == 2
    assert "NOT USABLE: model not found" in result.stdout


def test_bare_command_prints_a_usage_line():
    result = run_cli()
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert "the following arguments are required: command (usage: entropymerge [-h] [--version] {run," in result.stderr
