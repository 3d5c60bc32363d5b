"""The run summary: written and read only through ``entropymerge.summary``; older formats read, newer ones refused."""

import json
from pathlib import Path

import pytest

from conftest import write_tiny_model
from entropymerge.errors import UserInputError
from entropymerge.pipeline import run
from entropymerge.settings import RunOptions
from entropymerge.summary import FORMAT_VERSION, SUMMARY_NAME, Evaluation, RunSummary, output_key, probability_key, read_summary, read_summary_file


@pytest.fixture(scope="module")
def full_run_folder(sphere_case, tmp_path_factory):
    """A run that fills every part of the summary: reference, per-model results, ranking, adaptation, saved model."""
    folder = tmp_path_factory.mktemp("summary")
    image, labels = sphere_case
    models = [write_tiny_model(folder / "models", name, seed) for seed, name in enumerate(("north", "south"))]
    run(RunOptions(volume=image, models=models, out=folder / "run", reference=labels, per_model=True, rank=True,
                   probabilities=True, adapt="tent", adapt_steps=2, save_model=folder / "model", device="cpu"))
    return folder / "run"


def file_json(folder: Path) -> dict:
    return json.loads((folder / SUMMARY_NAME).read_text(encoding="utf-8"))


def test_a_run_summary_reads_back_to_the_same_json(full_run_folder):
    written = file_json(full_run_folder)
    summary = read_summary(full_run_folder)
    assert summary.outputs[output_key("segmentation", "north")] == str(full_run_folder / written["outputs"]["segmentation_north"])
    label = summary.labels[1].name
    assert probability_key(label) in summary.outputs and probability_key(label, "south") not in summary.outputs
    assert summary.ranking is not None and summary.adaptation is not None and summary.saved_model is not None
    assert isinstance(summary.per_model["north"].evaluation, Evaluation)
    again = summary.to_json()
    assert list(again)[0] == "format_version" and again["format_version"] == FORMAT_VERSION
    assert again["outputs"] == {key: str(full_run_folder / name) for key, name in written["outputs"].items()}
    # the same keys in the same order, the same values (outputs: now paths in the run folder)
    del again["outputs"], written["outputs"]
    written.pop("format_version", None)
    del again["format_version"]
    assert list(again) == list(written)
    assert json.loads(json.dumps(again)) == written


def test_output_keys():
    assert output_key("segmentation") == "segmentation"
    assert output_key("entropy", "site 2") == "entropy_site 2"
    assert probability_key("liver") == "probability_liver"
    assert probability_key("liver", "north") == "probability_liver_north"


def test_a_summary_without_format_version_is_format_1_and_reads(full_run_folder, tmp_path):
    data = file_json(full_run_folder)
    data.pop("format_version", None)
    path = tmp_path / SUMMARY_NAME
    path.write_text(json.dumps(data), encoding="utf-8")
    summary = read_summary_file(path)
    assert summary.method == data["method"] and summary.coefficients.body == data["coefficients"]["body"]
    assert summary.to_json()["format_version"] == FORMAT_VERSION


def test_a_format_1_summary_from_before_ranking_and_adaptation_existed_reads(full_run_folder, tmp_path):
    data = file_json(full_run_folder)
    for key in ("format_version", "ranking", "adaptation", "per_model", "evaluation"):
        data.pop(key)
    path = tmp_path / SUMMARY_NAME
    path.write_text(json.dumps(data), encoding="utf-8")
    summary = read_summary_file(path)
    assert (summary.ranking, summary.adaptation, summary.per_model, summary.evaluation) == (None, None, None, None)
    assert summary.models[0].name == data["models"][0]["name"]


def test_a_newer_format_is_refused_with_a_request_to_update(full_run_folder, tmp_path):
    path = tmp_path / SUMMARY_NAME
    path.write_text(json.dumps(dict(file_json(full_run_folder), format_version=FORMAT_VERSION + 1)), encoding="utf-8")
    with pytest.raises(UserInputError, match=rf"format {FORMAT_VERSION + 1}, newer .*update entropymerge") as error:
        read_summary(tmp_path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("remove", [("method",), ("coefficients", "head"), ("models", 0, "name"), ("inference", "roi_size"),
                                    ("evaluation", "per_class", "*", "dice"), ("ranking", "rows"), ("adaptation", "loss_per_step")])
def test_a_missing_key_is_named_with_the_file(full_run_folder, tmp_path, remove):
    data = file_json(full_run_folder)
    parent, dotted = data, []
    for key in remove[:-1]:
        key = next(iter(parent)) if key == "*" else key
        parent, dotted = parent[key], dotted + [str(key)]
    del parent[remove[-1]]
    path = tmp_path / SUMMARY_NAME
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(UserInputError) as error:
        read_summary_file(path)
    assert str(error.value) == f"{path} is not a complete run summary: the key {'.'.join(dotted + [remove[-1]])!r} is missing"


def test_corrupt_or_missing_files_are_user_errors(tmp_path):
    with pytest.raises(UserInputError, match="holds no finished run"):
        read_summary(tmp_path)
    path = tmp_path / SUMMARY_NAME
    path.write_text("{ cut short", encoding="utf-8")
    with pytest.raises(UserInputError, match=r"summary.json is not valid JSON"):
        read_summary(tmp_path)
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(UserInputError, match="not a run summary"):
        read_summary_file(path)
    path.write_text(json.dumps({"format_version": 1, "models": 3}), encoding="utf-8")
    with pytest.raises(UserInputError, match="'entropymerge_version' is missing"):
        read_summary_file(path)
    with pytest.raises(UserInputError, match="no run summary at"):
        read_summary_file(tmp_path / "elsewhere.json")


def test_a_summary_made_in_code_has_the_file_layout():
    data = RunSummary(method="mean").to_json()
    assert list(data) == ["format_version", "entropymerge_version", "created", "volume", "models", "labels", "method", "coefficients",
                          "decoupled_head", "probe_statistics", "merge_details", "features", "device", "inference", "evaluation",
                          "per_model", "timings_s", "notes", "versions", "ranking", "adaptation", "outputs"]

