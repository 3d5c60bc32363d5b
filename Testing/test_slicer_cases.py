"""A folder of cases through the Lib (slicer-core): each case is segmented into a results folder next to
its file, its volume node and results are reused on the next visit, and other options run the engine again."""

from __future__ import annotations

import pytest

slicer = pytest.importorskip("slicer", reason="the slicer-core wheel (test extra) provides the MRML scene")

from slicer_scene import LABEL_VALUES, new_scene, oblique_lps_matrix, phantom, save_models, segmentation_from_labels, volume_node  # noqa: E402
from slicer_scene import converters as converters  # noqa: E402 (a fixture: the alias marks it as used)
from SlicerEntropyMergeLib import scene as lib_scene  # noqa: E402
from SlicerEntropyMergeLib.engine import RunRequest  # noqa: E402
from SlicerEntropyMergeLib.job import abandon_run, discard_model, finish_run, start_run  # noqa: E402


@pytest.fixture(scope="module")
def site_models(tmp_path_factory) -> list[str]:
    """The two site models of the Lib's run (same seeds), without running the engine."""
    return [str(path) for path in save_models(tmp_path_factory.mktemp("models"))]


def test_a_case_is_segmented_next_to_its_file_and_reused_the_second_time(site_models, tmp_path, converters):
    scene = new_scene()
    image, _ = phantom()
    source = volume_node(scene, image, oblique_lps_matrix(), "source")
    case = lib_scene.write_volume_node(source, tmp_path / "cases" / "patient7.nrrd")
    volume = lib_scene.read_volume_node(scene, case, "vtkMRMLScalarVolumeNode")
    request = RunRequest(models=site_models, method="mean", device="cpu")
    job = start_run(scene, volume, request, case=case, work_root=str(tmp_path))
    job.process.wait(600)
    assert job.succeeded, job.process.error
    first = finish_run(scene, job)
    assert (tmp_path / "cases" / "patient7.entropymerge" / "summary.json").is_file()
    assert sorted(p.suffix for p in job.model.iterdir()) == [".json", ".safetensors"]  # kept for "Save merged model..."
    discard_model(job.model)
    again = start_run(scene, volume, request, case=case, work_root=str(tmp_path))
    assert again.process is None and again.finished and again.succeeded
    assert finish_run(scene, again).segmentation is first.segmentation
    changed = start_run(scene, volume, RunRequest(models=site_models, method="mean", device="cpu", temperature=0.5),
                        case=case, work_root=str(tmp_path))
    assert changed.process is not None, "other options are not served from the cache"
    abandon_run(changed)
    assert not (tmp_path / "cases" / "patient7.entropymerge").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cases"]



def test_a_case_visited_again_reuses_its_volume_node(tmp_path):
    # Finding 7: Previous/Next must not load a case (and then its results) again on every visit.
    scene = new_scene()
    image, _ = phantom()
    source = volume_node(scene, image, oblique_lps_matrix(), "source")
    case = lib_scene.write_volume_node(source, tmp_path / "patient3.nrrd")
    loads = []

    def load(path):
        loads.append(path)
        return lib_scene.read_volume_node(scene, path, "vtkMRMLScalarVolumeNode")

    first = lib_scene.case_volume(scene, case, load)
    count = scene.GetNumberOfNodes()
    assert lib_scene.case_volume(scene, tmp_path / "." / "patient3.nrrd", load) is first
    assert scene.GetNumberOfNodes() == count and loads == [case]
    other = lib_scene.write_volume_node(source, tmp_path / "patient4.nrrd")
    assert lib_scene.case_volume(scene, other, load) is not first and len(loads) == 2



def test_a_case_run_with_a_reference_is_reused_the_second_time(site_models, tmp_path, converters):
    # Finding 6: the reference goes through a new temporary file each run; the case compares its content.
    scene = new_scene()
    image, reference_labels = phantom()
    volume = volume_node(scene, image, oblique_lps_matrix(), "source")
    case = lib_scene.write_volume_node(volume, tmp_path / "cases" / "patient8.nrrd")
    reference = segmentation_from_labels(scene, reference_labels, volume, {1: "structure 1", 2: "structure 2"})
    request = RunRequest(models=site_models, method="mean", device="cpu")
    job = start_run(scene, volume, request, labels=reference, label_values=LABEL_VALUES, case=case, work_root=str(tmp_path))
    job.process.wait(600)
    assert job.succeeded, job.process.error
    finish_run(scene, job)
    again = start_run(scene, volume, request, labels=reference, label_values=LABEL_VALUES, case=case, work_root=str(tmp_path))
    assert again.process is None, "the same reference is served from the case's results"
    finish_run(scene, again)
    edited = reference_labels.copy()
    edited[edited == 2] = 1
    other = segmentation_from_labels(scene, edited, volume, {1: "structure 1"}, "edited")
    changed = start_run(scene, volume, request, labels=other, label_values=LABEL_VALUES, case=case, work_root=str(tmp_path))
    assert changed.process is not None, "another reference runs the engine again"
    abandon_run(changed)
