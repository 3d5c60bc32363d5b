"""Merge methods come from one registry; names stay unique; one site model is every method."""

import json

import nibabel
import numpy as np
import pytest

from entropymerge.arguments import build_parser
from entropymerge.case import load_case
from entropymerge.cli import main
from entropymerge.evaluation import compare_methods
from entropymerge.merging import MergePlan, one_hot
from entropymerge.methods import METHODS, MergeMethod, one_model_used, register, unregister
from entropymerge.models import unique_names
from entropymerge.progress import Progress
from entropymerge.settings import RunOptions


def run(out, *args) -> dict:
    assert main(["run", *map(str, args), "--out", str(out), "--progress", "none"]) == 0
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))


@pytest.fixture
def last_model_method():
    """A plug-in registered in one place: always the last site model."""
    method = register(MergeMethod("last-model", "last site model", "always the last site model",
                                  plan=lambda context: MergePlan("last-model", one_hot(len(context.models) - 1, len(context.models)))))
    yield method
    unregister(method.name)


def method_choices(command: str = "run") -> tuple:
    """The ``--method`` choices of a freshly built parser's ``command``."""
    command_parser = build_parser()._subparsers._group_actions[0].choices[command]
    return next(a for a in command_parser._actions if a.dest == "method").choices


def test_a_registered_method_appears_in_the_cli_the_pipeline_and_the_evaluation(tmp_path, mind_models, sphere_case,
                                                                                 last_model_method):
    assert method_choices() == method_choices("batch") == (*METHODS,)
    assert "last-model" in method_choices()
    image, labels = sphere_case
    summary = run(tmp_path / "out", "--volume", image, "--model", mind_models, "--method", "last-model")
    assert summary["coefficients"]["body"] == {"site0": 0.0, "site1": 0.0, "site2": 1.0}

    options = RunOptions(volume=image, models=[mind_models], reference=labels, feature_cache=tmp_path / "cache")
    comparison = compare_methods(load_case(options.input_settings(), options.inference_overrides(), progress=Progress()), probe_patches=2)
    keys = [result.key for result in comparison.results]
    assert keys == ["site:site0", "site:site1", "site:site2", "adaptive", "adaptive-coupled", "mean", "ensemble", "select",
                    "oracle", "last-model"]
    last = comparison.get("last-model")
    assert last.label == "last site model (site2)"
    assert last.evaluation == comparison.get("site:site2").evaluation  # a one-hot plan reuses that model's result


def test_an_unregistered_method_leaves_the_cli():
    method = register(MergeMethod("first-model", "first site model", "always the first site model",
                                  plan=lambda context: MergePlan("first-model", one_hot(0, len(context.models)))))
    try:
        assert "first-model" in method_choices("batch")
    finally:  # a failure must not leave the method registered for the tests after this one
        unregister(method.name)
    assert "first-model" not in method_choices() and "first-model" not in method_choices("batch")


def test_unknown_method_is_a_one_line_user_error(tmp_path, capsys, mind_models, sphere_case):
    image, _ = sphere_case
    code = main(["run", "--volume", str(image), "--model", str(mind_models), "--method", "median", "--out",
                 str(tmp_path / "out"), "--progress", "none"])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "median" in error and "adaptive" in error and "oracle" in error


@pytest.mark.parametrize("names, expected", [
    (["x", "x", "x-2"], ["x", "x-3", "x-2"]),
    (["x", "x", "x"], ["x", "x-2", "x-3"]),
    (["a b", "a_b", "A_B", "c"], ["a b", "a_b-2", "A_B-3", "c"]),  # the same per-model file name
])
def test_unique_names_never_collide(names, expected):
    assert unique_names(names) == expected


def test_models_with_colliding_names_all_keep_their_coefficients_and_files(tmp_path, model_factory, sphere_case):
    image, _ = sphere_case
    paths = [model_factory("x", seed=1, folder=tmp_path / "one"), model_factory("x", seed=2, folder=tmp_path / "two"),
             model_factory("x-2", seed=3, folder=tmp_path / "three")]
    out = tmp_path / "out"
    summary = run(out, "--volume", image, *[a for p in paths for a in ("--model", p)], "--method", "mean", "--per-model")
    assert [m["name"] for m in summary["models"]] == ["x", "x-3", "x-2"]
    assert summary["coefficients"]["body"] == {name: pytest.approx(1 / 3) for name in ("x", "x-3", "x-2")}
    assert set(summary["per_model"]) == {"x", "x-3", "x-2"}
    for name in ("x", "x-3", "x-2"):
        assert (out / f"segmentation_{name}.nii.gz").is_file()


@pytest.mark.parametrize("method", ["adaptive", "mean", "ensemble", "select"])
def test_with_one_model_every_method_is_that_model_without_a_probe(tmp_path, model_factory, sphere_case, method):
    image, _ = sphere_case
    model = model_factory("only", seed=4)
    single = run(tmp_path / "single", "--volume", image, "--model", model, "--method", "single")
    summary = run(tmp_path / method, "--volume", image, "--model", model, "--method", method)
    assert summary["method"] == method
    assert summary["coefficients"]["body"] == {"only": 1.0}
    assert "probe" not in summary["timings_s"] and "site models" not in summary["timings_s"]
    assert any(note.startswith("one site model:") and "no probe" in note for note in summary["notes"])
    read = lambda folder: np.asanyarray(nibabel.load(str(folder / "segmentation.nii.gz")).dataobj)
    np.testing.assert_array_equal(read(tmp_path / method), read(tmp_path / "single"))
    assert not any(note.startswith("one site model:") for note in single["notes"])


def test_one_model_used_names_the_site_model_only_for_one_model_methods():
    one_hot = {"north": 0.0, "south": 1.0, "east": 0.0}
    assert one_model_used("select", one_hot) == one_model_used("oracle", one_hot) == one_model_used("single", one_hot) == "south"
    assert one_model_used("adaptive", one_hot) is None  # a one-hot alpha is still a merge
    assert one_model_used("unknown-plug-in", one_hot) is None
    assert one_model_used("select", {}) is None
