"""``entropymerge run`` end to end: outputs on the input's exact grid, clear errors, nothing half-written."""

import json
import os
from dataclasses import replace

import nibabel
import numpy as np
import pytest
import torch

from conftest import run_cli, shared_file
from entropymerge.arguments import build_parser
from entropymerge.cli import COMMANDS, main
from entropymerge.summary import ClassScores, Coefficients, Evaluation, RunSummary
from entropymerge.volume import Geometry, write_volume
from test_models import FileCreatingPayload


def assert_on_input_grid(output, reference):
    out, ref = nibabel.load(str(output)), nibabel.load(str(reference))
    assert out.shape == ref.shape
    np.testing.assert_allclose(out.affine, ref.affine, atol=1e-5)


@pytest.mark.parametrize(
    "relative",
    ["abdomen_totalseg_ct_mr/example_mr_sm.nii.gz", "tiny_monai_testing_data/anatomical.nii"],
    ids=["LPS-MR", "LAS-big-endian"],
)
def test_outputs_lie_on_the_input_grid(tmp_path, model_factory, relative):
    volume = shared_file(relative)
    # the models work in RAS at 2 mm, so the run reorients, resamples and inverts both
    models = [model_factory("a", seed=1), model_factory("b", seed=2)]
    result = run_cli("run", "--volume", volume, "--model", models[0], "--model", models[1], "--method", "mean",
                     "--out", tmp_path / "out", "--probabilities")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    for name in ("segmentation.nii.gz", "entropy.nii.gz", "probability_background.nii.gz"):
        assert_on_input_grid(out / name, volume)
    entropy = np.asanyarray(nibabel.load(str(out / "entropy.nii.gz")).dataobj)
    assert entropy.min() >= 0 and entropy.max() <= 1
    labels = np.asanyarray(nibabel.load(str(out / "segmentation.nii.gz")).dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2}
    probabilities = np.stack([np.asanyarray(nibabel.load(str(out / f"probability_{n}.nii.gz")).dataobj)
                              for n in ("background", "structure_1", "structure_2")])
    np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=1e-4)
    np.testing.assert_array_equal(probabilities.argmax(0), labels)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["method"] == "mean"
    assert summary["coefficients"]["body"] == {"a": 0.5, "b": 0.5}
    assert summary["device"] == "cpu"
    assert set(summary["timings_s"]) == {"load", "preprocess", "features", "inference", "write"}
    assert summary["versions"]["torch"] == torch.__version__
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no staging folder may remain"


def test_json_progress_protocol(tmp_path, model_factory):
    volume = write_volume(np.random.default_rng(0).normal(size=(24, 20, 16)).astype(np.float32),
                          Geometry((24, 20, 16), (1.5, 1.5, 2.0), (0, 0, 0), ((1, 0, 0), (0, 1, 0), (0, 0, 1))),
                          tmp_path / "v.nrrd")
    result = run_cli("run", "--volume", volume, "--model", model_factory("a"), "--out", tmp_path / "out",
                     "--progress", "json", "--format", "nrrd")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    progress = [r for r in records if r["type"] == "progress"]
    assert [r["stage"] for r in progress][0] == "load"
    assert {"load", "preprocess", "merge", "inference", "write"} <= {r["stage"] for r in progress}
    fractions = [r["fraction"] for r in progress]
    assert fractions == sorted(fractions) and 0 <= fractions[0] and fractions[-1] <= 1
    assert records[-1]["type"] == "done" and records[-1]["fraction"] == 1.0
    assert records[-1]["outputs"]["segmentation"].endswith("segmentation.nrrd")
    assert os.path.isfile(records[-1]["outputs"]["segmentation"])
    assert "method: adaptive" in result.stderr, "the console table goes to stderr when stdout carries the protocol"


def bad_run(tmp_path, capsys, *args):
    out = tmp_path / "out"
    code = main(["run", *map(str, args), "--out", str(out), "--progress", "none"])
    error = capsys.readouterr().err
    assert code == 2, error
    assert "Traceback" not in error
    assert not out.exists() or not any(out.iterdir()), "a failed run must leave nothing behind"
    return error


@pytest.fixture
def small_volume(tmp_path):
    geometry = Geometry((20, 20, 20), (2.0, 2.0, 2.0), (0, 0, 0), ((1, 0, 0), (0, 1, 0), (0, 0, 1)))
    return write_volume(np.random.default_rng(1).normal(size=geometry.shape).astype(np.float32), geometry, tmp_path / "small.nii.gz")


def test_bad_volumes_exit_2(tmp_path, capsys, model_factory, small_volume):
    model = model_factory("a")
    assert "volume not found" in bad_run(tmp_path, capsys, "--volume", tmp_path / "none.nii.gz", "--model", model)
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(small_volume.read_bytes()[:300])
    assert "truncated" in bad_run(tmp_path, capsys, "--volume", truncated, "--model", model)
    flat = write_volume(np.zeros((8, 8, 8)), Geometry((8, 8, 8), (1, 1, 1), (0, 0, 0), ((1, 0, 0), (0, 1, 0), (0, 0, 1))), tmp_path / "x.nii.gz")
    nibabel.save(nibabel.Nifti1Image(np.zeros((8, 8, 8, 2), np.float32), np.eye(4)), str(tmp_path / "4d.nii.gz"))
    assert "is 4D" in bad_run(tmp_path, capsys, "--volume", tmp_path / "4d.nii.gz", "--model", model)
    assert flat.exists()


def test_bad_models_exit_2(tmp_path, capsys, model_factory, small_volume):
    a = model_factory("a")
    b = model_factory("b", classes=4, folder=tmp_path / "other")
    message = bad_run(tmp_path, capsys, "--volume", small_volume, "--model", a, "--model", b)
    assert "cannot be used together" in message and str(a) in message and str(b) in message
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"model.0.conv.weight": FileCreatingPayload(marker)}, evil)
    (tmp_path / "evil.json").write_text(a.read_text(encoding="utf-8"))
    assert "refused to load" in bad_run(tmp_path, capsys, "--volume", small_volume, "--model", evil)
    assert not marker.exists()
    assert "--single-model" in bad_run(tmp_path, capsys, "--volume", small_volume, "--model", a, "--model",
                                       model_factory("c", folder=tmp_path / "c"), "--method", "single")
    assert "--method: invalid choice: 'magic' (choose from 'adaptive'" in bad_run(
        tmp_path, capsys, "--volume", small_volume, "--model", a, "--method", "magic")


def test_bad_output_folders_exit_2(tmp_path, capsys, model_factory, small_volume):
    a = model_factory("a")
    a_file = tmp_path / "occupied"
    a_file.write_text("keep me", encoding="utf-8")
    code = main(["run", "--volume", str(small_volume), "--model", str(a), "--out", str(a_file), "--progress", "none"])
    assert code == 2 and "is a file, not a folder" in capsys.readouterr().err
    assert a_file.read_text(encoding="utf-8") == "keep me"
    code = main(["run", "--volume", str(small_volume), "--model", str(a), "--out", str(a_file / "sub"), "--progress", "none"])
    assert code == 2 and "cannot write to output folder" in capsys.readouterr().err
    # the input volume sits where an output would go
    folder = tmp_path / "case"
    folder.mkdir()
    victim = folder / "segmentation.nii.gz"
    victim.write_bytes(small_volume.read_bytes())
    code = main(["run", "--volume", str(victim), "--model", str(a), "--out", str(folder), "--progress", "none"])
    assert code == 2 and "would overwrite an input file" in capsys.readouterr().err
    assert victim.read_bytes() == small_volume.read_bytes()


def test_earlier_results_are_kept_unless_overwrite(tmp_path, capsys, model_factory, small_volume):
    a = model_factory("a")
    args = ["run", "--volume", str(small_volume), "--model", str(a), "--out", str(tmp_path / "out"), "--progress", "none"]
    assert main(args) == 0
    first = (tmp_path / "out" / "summary.json").read_text(encoding="utf-8")
    assert main(args) == 2
    assert "already holds the results of a run" in capsys.readouterr().err
    assert (tmp_path / "out" / "summary.json").read_text(encoding="utf-8") == first
    assert main(args + ["--overwrite"]) == 0


def test_failure_while_writing_leaves_no_partial_outputs(tmp_path, monkeypatch, capsys, model_factory, small_volume):
    import entropymerge.outputs as outputs

    real_write = outputs.write_volume
    calls = []

    def failing_write(array, geometry, path, verify=False):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_write(array, geometry, path, verify)

    monkeypatch.setattr(outputs, "write_volume", failing_write)
    code = main(["run", "--volume", str(small_volume), "--model", str(model_factory("a")), "--method", "single",
                 "--out", str(tmp_path / "out"), "--progress", "none"])
    assert code == 2 and capsys.readouterr().err.startswith(f"error: cannot write {tmp_path / 'out' / 'entropy.nii.gz'}: disk full")
    assert not (tmp_path / "out").exists(), "a failed run leaves no trace, not even the folder it made"


def test_subprocess_exit_code_and_single_line_error(tmp_path, model_factory):
    result = run_cli("run", "--volume", tmp_path / "missing.nii.gz", "--model", model_factory("a"), "--out", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: volume not found: {tmp_path / 'missing.nii.gz'}"]
    result = run_cli("run", "--volume", tmp_path / "missing.nii.gz")
    assert result.returncode == 2 and "the following arguments are required: --model, --out" in result.stderr


def test_console_table_shows_method_coefficients_and_dice_per_class():
    from entropymerge.console import run_table

    evaluation = Evaluation({"organ": ClassScores(0.8123, None, True), "lesion": ClassScores(0.0, None, False)}, 0.8123, None, ["organ"])
    summary = RunSummary(method="adaptive", decoupled_head=True, outputs={"segmentation": "s.nii.gz"}, evaluation=evaluation,
                         coefficients=Coefficients({"north": 0.75, "a-long-name": 0.25}, {"north": 0.4, "a-long-name": 0.6}))
    assert run_table(summary).splitlines() == [
        "method: adaptive (head merged with its own coefficients beta)",
        "  model         alpha    beta",
        "  north         0.750   0.400",
        "  a-long-name   0.250   0.600",
        "Dice vs reference: organ 0.812, lesion -; mean 0.812",
    ]
    single = replace(summary, method="single", decoupled_head=False, evaluation=None,
                     coefficients=Coefficients({"north": 0.0, "south": 1.0}, {"north": 0.0, "south": 1.0}))
    assert run_table(single).splitlines() == ["method: single", "  model: south"]
    assert run_table(replace(summary, outputs={}, evaluation=None)) == "", "a ranking-only run has no merge to show"


def test_every_command_of_the_parser_has_a_handler():
    """The parser's sub-commands and cli.COMMANDS are two lists: a command missing from either would be an internal error."""
    assert set(COMMANDS) == set(build_parser()._subparsers._group_actions[0].choices)
