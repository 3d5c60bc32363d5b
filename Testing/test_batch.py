"""``entropymerge batch``: case discovery, one table whichever way the cases run (serial, processes, Dask), resuming, failures."""

import csv
import json
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import SAMPLE_LABELS_MODEL
from entropymerge import batch
from entropymerge.batch import BatchCase, discover_cases, run_batch
from entropymerge.cli import main
from entropymerge.errors import ExitCode, UserInputError
from entropymerge.sampledata import site, write_case
from entropymerge.settings import RunOptions
from entropymerge.summary import RunSummary, VolumeRecord

CASES = 6


@pytest.fixture(scope="module")
def case_folder(tmp_path_factory):
    """Six small cone-beam CT cases with references (``simulate --site cbct``, coarser voxels) and one corrupt volume."""
    folder = tmp_path_factory.mktemp("cases")
    scanner = replace(site("cbct"), spacing=(3.5, 3.5, 3.5))
    for seed in range(CASES):
        write_case(scanner, 990000 + seed, folder)
    (folder / "broken_image.nii.gz").write_bytes(b"not a volume at all")
    return folder


@pytest.fixture
def models(model_factory):
    return [model_factory(name, seed, **SAMPLE_LABELS_MODEL) for seed, name in enumerate(("north", "south"))]


def batch_args(case_folder, models, out, *extra) -> list[str]:
    model_args = [arg for model in models for arg in ("--model", str(model))]
    return ["batch", "--cases", str(case_folder), *model_args, "--out", str(out), "--device", "cpu", "--progress", "none", *extra]


def read_table(path: Path) -> list[dict]:
    with path.open(newline="") as stream:
        return list(csv.DictReader(stream))


def without_timings(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith("time_")} for row in rows]


def test_cases_in_a_folder(tmp_path):
    for name in ("b_image.nii.gz", "b_labels.nii.gz", "a.nrrd", "a_labels.nrrd", "c.mha", "notes.txt", "c_labels.nii.gz",
                 "d.nii", "d_seg.nii", "e_mask.mha"):
        (tmp_path / name).touch()
    (tmp_path / "results").mkdir()
    assert discover_cases(tmp_path) == [
        BatchCase("a", tmp_path / "a.nrrd", tmp_path / "a_labels.nrrd"),
        BatchCase("b", tmp_path / "b_image.nii.gz", tmp_path / "b_labels.nii.gz"),
        BatchCase("c", tmp_path / "c.mha", None),  # a reference has the volume's suffix
        BatchCase("d", tmp_path / "d.nii", tmp_path / "d_seg.nii"),  # label maps named as the Slicer module knows them
    ]


def test_cases_in_a_csv(tmp_path):
    table = tmp_path / "lists" / "cases.csv"
    table.parent.mkdir()
    rows = f"case,volume,reference\nliver-2,scans/two.nii.gz,\nliver-1,{tmp_path}/one.nrrd,labels/one.nrrd\n"
    table.write_text(rows, encoding="utf-8-sig")  # as Excel saves it, with a byte-order mark
    assert discover_cases(table) == [
        BatchCase("liver-1", tmp_path / "one.nrrd", table.parent / "labels" / "one.nrrd"),
        BatchCase("liver-2", table.parent / "scans" / "two.nii.gz", None),
    ]


@pytest.mark.parametrize("content, message", [
    ("name,volume\na,a.nii.gz\n", "needs the columns case,volume"),
    ("case,volume\na,a.nii.gz\na,b.nii.gz\n", "case names must be unique; .* repeats a"),
    ("case,volume\n../up,a.nii.gz\n", "case name '../up' .* cannot name a folder"),
    ("case,volume\na,\n", "line 2: every case needs a name and a volume"),
    ("case,volume\n", "no cases in"),
])
def test_bad_case_lists(tmp_path, content, message):
    (tmp_path / "cases.csv").write_text(content, encoding="utf-8")
    with pytest.raises(UserInputError, match=message):
        discover_cases(tmp_path / "cases.csv")


def test_bad_case_sources(tmp_path):
    with pytest.raises(UserInputError, match="cases not found"):
        discover_cases(tmp_path / "nowhere")
    with pytest.raises(UserInputError, match="no cases in"):
        discover_cases(tmp_path)
    (tmp_path / "scan.nii.gz").touch()
    with pytest.raises(UserInputError, match="a folder of volumes or a .csv case list, not scan.nii.gz"):
        discover_cases(tmp_path / "scan.nii.gz")


def test_same_table_serially_in_processes_and_on_dask(case_folder, models, tmp_path):
    from distributed import LocalCluster

    seconds = {}
    start = time.perf_counter()
    assert main(batch_args(case_folder, models, tmp_path / "serial")) == ExitCode.CASES_FAILED
    seconds["serial"] = time.perf_counter() - start
    serial = read_table(tmp_path / "serial" / "batch.csv")

    assert [row["case"] for row in serial] == ["broken"] + [f"cbct_{990000 + seed:05d}" for seed in range(CASES)]
    broken = serial[0]
    assert broken["status"] == "failed" and "broken_image.nii.gz" in broken["error"] and broken["method"] == ""
    assert (tmp_path / "serial" / "broken" / "error.txt").read_text(encoding="utf-8").startswith(broken["error"])
    for row in serial[1:]:
        assert row["status"] == "completed" and row["error"] == "" and row["method"] == "adaptive"
        assert row["reference"] == str(case_folder / f"{row['case']}_labels.nii.gz")
        for prefix in ("alpha", "beta"):
            assert float(row[f"{prefix}_north"]) + float(row[f"{prefix}_south"]) == pytest.approx(1.0, abs=1e-5)
        assert 0.0 <= float(row["mean_dice"]) <= 1.0 and float(row["mean_hd95_mm"]) > 0
        assert {"dice_structure 1", "dice_structure 3", "hd95_mm_structure 2"} <= set(row)
        assert float(row["time_total_s"]) > 0
        summary = json.loads((tmp_path / "serial" / row["case"] / "summary.json").read_text(encoding="utf-8"))
        assert summary["volume"]["path"] == row["volume"] and summary["coefficients"]["body"]["north"] == float(row["alpha_north"])
    assert list(serial[0])[-1] == "time_total_s", "the timings come last"

    start = time.perf_counter()
    assert main(batch_args(case_folder, models, tmp_path / "processes", "--workers", "2")) == ExitCode.CASES_FAILED
    seconds["2 processes"] = time.perf_counter() - start
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        start = time.perf_counter()
        assert main(batch_args(case_folder, models, tmp_path / "dask", "--scheduler", cluster.scheduler_address)) == ExitCode.CASES_FAILED
        seconds["Dask LocalCluster, 2 workers"] = time.perf_counter() - start
    print(", ".join(f"{name} {value:.1f} s" for name, value in seconds.items()))
    for other in ("processes", "dask"):
        table = read_table(tmp_path / other / "batch.csv")
        assert without_timings(table) == without_timings(serial), f"the {other} table differs from the serial one"


@pytest.fixture(scope="module")
def slow_case_folder(tmp_path_factory):
    """A quick first case, then three larger ones (a second or more each), and a corrupt volume:
    an interruption made as soon as the first case is complete lands in the middle of the batch."""
    folder = tmp_path_factory.mktemp("slow-cases")
    write_case(replace(site("cbct"), spacing=(3.5, 3.5, 3.5)), 990000, folder)
    for seed in range(1, 4):
        write_case(replace(site("cbct"), spacing=(1.5, 1.5, 1.5)), 990000 + seed, folder)
    (folder / "broken_image.nii.gz").write_bytes(b"not a volume at all")
    return folder


def test_an_interrupted_batch_resumes(slow_case_folder, models, tmp_path, capsys):
    out = tmp_path / "out"
    volumes = {case.name for case in discover_cases(slow_case_folder)} - {"broken"}
    command = [sys.executable, "-m", "entropymerge", *batch_args(slow_case_folder, models, out)]
    # A shell that starts the tests in the background makes them ignore SIGINT, and a child would
    # inherit that; give the batch Ctrl-C's default behaviour, as on a terminal.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 600
    while not list(out.glob("*/summary.json")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)  # what Ctrl-C does
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == ExitCode.CANCELLED, stderr
    assert stderr.strip().splitlines()[-1] == "cancelled"
    finished = {p.parent.name: p.read_bytes() for p in out.glob("*/summary.json")}
    assert 1 <= len(finished) < len(volumes), "interrupted after the first case and before the last"
    assert not list(out.glob("*/.entropymerge-partial-*")), "the interrupted case left nothing half-written"
    assert not (out / "batch.csv").exists()

    assert main(batch_args(slow_case_folder, models, out, "--progress", "json")) == ExitCode.CASES_FAILED
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    fractions = [r["fraction"] for r in records if r["type"] == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) == len(volumes) + 2, "one step per case"
    assert records[-1] == {"type": "done", "fraction": 1.0, "outputs": {"table": str(out / "batch.csv")}}
    rows = {row["case"]: row for row in read_table(out / "batch.csv")}
    assert {name for name, row in rows.items() if row["status"] == "resumed"} == set(finished)
    assert {name for name, row in rows.items() if row["status"] == "completed"} == volumes - set(finished)
    assert rows["broken"]["status"] == "failed", "a failed case is tried again, and fails again"
    for name, content in finished.items():
        assert (out / name / "summary.json").read_bytes() == content, "a complete case is not run again"
        assert rows[name]["mean_dice"] != "", "a resumed case's row comes from its summary"


def test_case_folders_holding_other_results_are_left_alone(case_folder, models, tmp_path):
    case = discover_cases(case_folder)[1]
    other = discover_cases(case_folder)[2]
    options = RunOptions(volume=Path(), models=models, device="cpu")
    foreign = RunSummary(volume=VolumeRecord(str(other.volume)), outputs={"summary": "summary.json"}).to_json()
    (tmp_path / case.name).mkdir()
    (tmp_path / case.name / "summary.json").write_text(json.dumps(foreign), encoding="utf-8")
    result = run_batch([case], options, tmp_path)
    assert result.failed == [case.name]
    assert "holds the results of another volume" in result.rows[0]["error"]
    assert json.loads((tmp_path / case.name / "summary.json").read_text(encoding="utf-8")) == foreign, "never overwritten"

    (tmp_path / case.name / "summary.json").write_text("{ cut short", encoding="utf-8")
    assert "summary.json is not valid JSON" in run_batch([case], options, tmp_path).rows[0]["error"]
    (tmp_path / case.name / "summary.json").write_text(json.dumps({"volume": {"path": str(case.volume)}}), encoding="utf-8")
    assert "the key 'entropymerge_version' is missing; move" in run_batch([case], options, tmp_path).rows[0]["error"]
    mine = RunSummary(volume=VolumeRecord(str(case.volume)), outputs={"summary": "summary.json", "segmentation": "segmentation.nii.gz"}).to_json()
    (tmp_path / case.name / "summary.json").write_text(json.dumps(mine), encoding="utf-8")
    assert "is incomplete (missing segmentation.nii.gz)" in run_batch([case], options, tmp_path).rows[0]["error"]


def test_batch_user_errors(case_folder, models, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(batch, "DASK_CONNECT_TIMEOUT_S", 1)
    for extra, message in [
        (["--reference", str(case_folder / "cbct_990000_labels.nii.gz")], "batch takes references with the cases"),
        (["--workers", "2", "--scheduler", "tcp://127.0.0.1:1"], "not allowed with argument"),
        (["--scheduler", "tcp://127.0.0.1:1"], "cannot reach the Dask scheduler at tcp://127.0.0.1:1"),
        (["--temperature", "0"], "--temperature must be > 0"),
    ]:
        assert main(batch_args(case_folder, models, tmp_path / "out", *extra)) == ExitCode.BAD_INPUT
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and message in error, error
    assert not (tmp_path / "out").exists(), "nothing runs before the inputs are checked"
