"""``entropymerge batch``: one run per case over a folder or a CSV of cases; resumable; serial or scaled out.

Each case runs ``pipeline.run`` into ``OUT/<case>/``. A case whose folder already holds a complete
run of the same volume is not run again; a failing case is recorded (``OUT/<case>/error.txt`` and
its row of the table) and the batch goes on. ``OUT/batch.csv`` has one row per case, in case order;
apart from its ``time_*`` columns it is the same whether the cases ran one after another, in local
worker processes or on a Dask cluster: every case runs with the same number of torch threads
(``threads_per_case``), since parallel reductions round differently with another thread count.
"""

from __future__ import annotations

import contextlib
import csv
import io
import multiprocessing
import os
import traceback
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path

from .compatibility import check_compatible
from .errors import UserInputError
from .models import load_site_models
from .outputs import clean_after_killed_runs, safe_file_stem, write_text_atomically
from .pipeline import run, validate_options
from .progress import Progress
from .report import REPORT_NAME, write_report
from .settings import RunOptions
from .summary import SUMMARY_NAME, RunSummary, read_summary_file
from .volume import LABEL_MAP_ENDINGS, is_label_map_name, split_volume_name

TABLE_NAME = "batch.csv"
ERROR_NAME = "error.txt"
LEADING_COLUMNS = ("case", "status", "error", "volume", "reference", "method")
DASK_CONNECT_TIMEOUT_S = 10


@dataclass(frozen=True)
class BatchCase:
    """One case of a batch: a volume and, optionally, its reference segmentation."""

    name: str  # also the name of the case's output folder
    volume: Path
    reference: Path | None = None


@dataclass
class BatchResult:
    """What a batch did: one table row per case (``case_row``), and the table file."""

    rows: list[dict]  # one per case, in case order
    table: Path

    @property
    def failed(self) -> list[str]:
        return [row["case"] for row in self.rows if row["status"] == "failed"]


def discover_cases(source: str | os.PathLike) -> list[BatchCase]:
    """The cases of a batch.

    Args:
        source: a folder of volumes (``CASE_labels.<suffix>`` beside a volume is its reference) or a CSV
            file with the columns ``case,volume[,reference]`` (paths relative to its folder).

    Returns:
        The cases, sorted by name.

    Raises:
        UserInputError: the source is missing or of another kind, holds no case, or repeats a case name.
    """
    source = Path(source)
    if not source.exists():
        raise UserInputError(f"cases not found: {source}")
    if source.is_file() and source.suffix.lower() != ".csv":
        raise UserInputError(f"--cases takes a folder of volumes or a .csv case list, not {source.name}")
    cases = _cases_in_csv(source) if source.is_file() else _cases_in_folder(source)
    if not cases:
        raise UserInputError(f"no cases in {source}")
    names = [case.name for case in cases]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise UserInputError(f"case names must be unique; {source} repeats {', '.join(duplicates)}")
    return sorted(cases, key=lambda case: case.name)


def _cases_in_folder(folder: Path) -> list[BatchCase]:
    """Every volume file but label maps; ``CASE_labels.<suffix>`` (or another label-map ending) is the
    reference of ``CASE.<suffix>`` or ``CASE_image.<suffix>``."""
    folder = folder.absolute()
    cases = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        parts = split_volume_name(path.name)
        if parts is None or is_label_map_name(path.name):
            continue
        stem, suffix = parts
        name = stem.removesuffix("_image")
        references = [folder / f"{name}{ending}{suffix}" for ending in LABEL_MAP_ENDINGS]
        cases.append(BatchCase(_checked_name(name, path), path, next((r for r in references if r.is_file()), None)))
    return cases


def _cases_in_csv(path: Path) -> list[BatchCase]:
    """Rows ``case,volume[,reference]``; relative paths are relative to the CSV's folder."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as stream:  # Excel writes a byte-order mark
            reader = csv.DictReader(stream)
            columns = set(reader.fieldnames or ())
            if not {"case", "volume"} <= columns:
                found = ", ".join(sorted(columns)) or "none"
                raise UserInputError(f"{path} needs the columns case,volume (and optionally reference); it has {found}")
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise UserInputError(f"could not read the case list {path}: {error}") from None
    base = path.absolute().parent
    cases = []
    for line, row in enumerate(rows, start=2):
        name, volume, reference = ((row.get(column) or "").strip() for column in ("case", "volume", "reference"))
        if not name or not volume:
            raise UserInputError(f"{path} line {line}: every case needs a name and a volume")
        cases.append(BatchCase(_checked_name(name, f"{path} line {line}"), base / volume, base / reference if reference else None))
    return cases


def _checked_name(name: str, where) -> str:
    if name != safe_file_stem(name) or name.startswith("."):
        raise UserInputError(f"case name {name!r} ({where}) cannot name a folder; use letters, digits, '.', '_' and '-'")
    return name


def run_batch(cases: list[BatchCase], options: RunOptions, out: str | os.PathLike, workers: int = 1,
              scheduler: str | None = None, threads_per_case: int = 1, progress: Progress | None = None) -> BatchResult:
    """Run every case and write the table ``OUT/batch.csv``.

    Args:
        cases: the cases, in table order.
        options: the run options of every case (its volume, reference and output folder are set per case).
        out: the batch's folder: ``OUT/<case>/`` per case and the table.
        workers: > 1 runs cases in that many local processes.
        scheduler: a Dask scheduler address: runs the cases on that cluster (its workers must see the same files).
        threads_per_case: torch threads of each case, wherever it runs.
        progress: receives the ``cases`` stage and a note per failed case (default: silent).

    Returns:
        The rows (in case order) and the table's path.
    """
    progress = progress or Progress()
    validate_options(options)
    check_compatible(load_site_models(options.models, options.trust_code))  # a bad model set fails once, not per case
    out = Path(out).absolute()
    options = replace(options, models=[Path(p).absolute() for p in options.models],
                      feature_cache=options.feature_cache and Path(options.feature_cache).absolute(),
                      anatomix_weights=options.anatomix_weights and Path(options.anatomix_weights).absolute())
    progress.plan([("cases", 1)])
    progress.stage("cases", f"{len(cases)} cases")
    rows: dict[str, dict] = {}
    for row in _rows_as_finished(cases, options, out, workers, scheduler, threads_per_case):
        rows[row["case"]] = row
        if row["status"] == "failed":
            progress.note(f"case {row['case']} failed: {row['error']}")
        failed = sum(r["status"] == "failed" for r in rows.values())
        progress.update(len(rows) / len(cases), f"{len(rows)}/{len(cases)} cases done, {failed} failed")
    ordered = [rows[case.name] for case in cases]
    table = write_text_atomically(out / TABLE_NAME, table_text(ordered))
    progress.done({"table": str(table)})
    return BatchResult(ordered, table)


def _rows_as_finished(cases, options: RunOptions, out: Path, workers: int, scheduler: str | None, threads: int) -> Iterator[dict]:
    if scheduler:
        yield from _on_dask(cases, options, out, scheduler, threads)
    elif workers > 1:
        yield from _in_processes(cases, options, out, workers, threads)
    else:
        for case in cases:
            yield run_case(case, options, out, threads)


def _in_processes(cases, options: RunOptions, out: Path, workers: int, threads: int) -> Iterator[dict]:
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))  # fresh interpreters, no forked torch state
    try:
        futures = {pool.submit(run_case, case, options, out, threads): case for case in cases}
        for future in as_completed(futures):
            yield _row_of(future, futures[future], out)
    finally:
        pool.shutdown(cancel_futures=True)


def _on_dask(cases, options: RunOptions, out: Path, address: str, threads: int) -> Iterator[dict]:
    try:
        from distributed import Client
        from distributed import as_completed as dask_completed
    except ImportError:
        raise UserInputError("--scheduler needs dask.distributed: pip install 'entropymerge[distributed]'") from None
    try:
        client = Client(address, timeout=DASK_CONNECT_TIMEOUT_S)
    except (OSError, ValueError) as error:
        raise UserInputError(f"cannot reach the Dask scheduler at {address}: {error}") from None
    with client:
        futures = {client.submit(run_case, case, options, out, threads, pure=False): case for case in cases}
        try:
            for future in dask_completed(list(futures)):
                yield _row_of(future, futures[future], out)
        except BaseException:
            client.cancel(list(futures))
            raise


@contextlib.contextmanager
def torch_threads(threads: int):
    """Run the block with ``threads`` torch threads, then restore the process's setting.

    Args:
        threads: torch's intra-op thread count inside the block.

    Returns:
        A context manager.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _row_of(future, case: BatchCase, out: Path) -> dict:
    """The row a worker returned, or a failure when the worker itself broke (died, could not import the engine)."""
    try:
        return future.result()
    except Exception as error:
        return record_failure(case, out, f"worker failed: {type(error).__name__}: {error}", traceback.format_exc())


def run_case(case: BatchCase, options: RunOptions, out: Path, threads: int = 1) -> dict:
    """Run one case into ``out/<case>`` unless it is already complete (a worker's task).

    Args:
        case: the case.
        options: the batch's run options.
        out: the batch's folder.
        threads: torch threads for the run.

    Returns:
        The case's table row; a failure is recorded (row and ``error.txt``), never raised.
    """
    from .quiet import quiet_libraries

    quiet_libraries()  # workers are fresh processes: keep library chatter out of the batch's output, as the CLI does
    folder = out / case.name
    clean_after_killed_runs(folder)
    try:
        summary = None if options.overwrite else completed_summary(folder, case)
        status = "resumed" if summary else "completed"
        if summary is None:
            with torch_threads(threads):
                summary = run(replace(options, volume=case.volume, reference=case.reference, out=folder), Progress())
        elif options.report and not (folder / REPORT_NAME).exists():
            write_report(folder)  # the run finished but its report was not written
    except UserInputError as error:
        return record_failure(case, out, str(error), str(error))
    except Exception as error:  # a bug: keep the traceback beside the case for the report
        return record_failure(case, out, f"internal error: {type(error).__name__}: {error}", traceback.format_exc())
    (folder / ERROR_NAME).unlink(missing_ok=True)  # an earlier attempt's failure no longer applies
    return case_row(case, status, summary)


def completed_summary(folder: Path, case: BatchCase) -> RunSummary | None:
    """The summary of a complete earlier run of this case in ``folder``, or None when there is none.

    Args:
        folder: the case's output folder.
        case: the case (its volume must be the one the run segmented).

    Returns:
        The summary (``outputs``: paths in ``folder``), or None when the folder holds no summary.

    Raises:
        UserInputError: the folder holds something else: an unreadable summary, a run of another
            volume, or a run with missing files (they are never overwritten).
    """
    path = folder / SUMMARY_NAME
    if not path.exists():
        return None
    try:
        summary = read_summary_file(path)
    except UserInputError as error:
        raise UserInputError(f"{error}; move {folder} away to run the case again") from None
    recorded = Path(summary.volume.path)
    if recorded.resolve() != case.volume.resolve():
        raise UserInputError(f"{folder} holds the results of another volume ({recorded}); move it away or choose another --out")
    missing = sorted(str(Path(file).relative_to(folder)) for file in summary.outputs.values() if not Path(file).exists())
    if missing:
        raise UserInputError(f"{folder} is incomplete (missing {', '.join(missing)}); move it away to run the case again")
    return summary


def record_failure(case: BatchCase, out: Path, message: str, details: str) -> dict:
    """Record a failed case.

    Args:
        case: the case.
        out: the batch's folder (``out/<case>/error.txt`` is written).
        message: one line for the table.
        details: the text for ``error.txt`` (a traceback for a bug).

    Returns:
        The case's failed row.
    """
    try:
        write_text_atomically(out / case.name / ERROR_NAME, f"{message}\n\n{details}\n" if details != message else f"{message}\n")
    except OSError:
        pass  # the message still reaches the table
    return case_row(case, "failed", error=message)


def case_row(case: BatchCase, status: str, summary: RunSummary | None = None, error: str = "") -> dict:
    """One row of the table.

    Args:
        case: the case.
        status: ``completed``, ``resumed`` or ``failed``.
        summary: the case's run summary (none for a failed case).
        error: the failure's message.

    Returns:
        Column -> value: the case and its status, and from the summary the method, the coefficients
        (``alpha_<model>``, ``beta_<model>``), Dice and HD95 (mm) per class and their means, and the
        stage times (s).
    """
    row = {"case": case.name, "status": status, "error": error, "volume": str(case.volume), "reference": str(case.reference or "")}
    if summary is None:
        return row
    row["method"] = summary.method
    for coefficients, prefix in ((summary.coefficients.body, "alpha"), (summary.coefficients.head, "beta")):
        for model, value in (coefficients or {}).items():
            row[f"{prefix}_{model}"] = value
    evaluation = summary.evaluation
    if evaluation:
        row["mean_dice"] = _rounded(evaluation.mean_dice)
        row["mean_hd95_mm"] = _rounded(evaluation.mean_hd95_mm)
        for name, scores in evaluation.per_class.items():
            row[f"dice_{name}"] = _rounded(scores.dice)
            row[f"hd95_mm_{name}"] = _rounded(scores.hd95_mm)
    for stage, seconds in summary.timings_s.items():
        row[f"time_{stage}_s"] = seconds
    row["time_total_s"] = round(sum(summary.timings_s.values()), 4)
    return row


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def table_text(rows: list[dict]) -> str:
    """The batch table as CSV text.

    Args:
        rows: the table rows (``case_row``), in case order.

    Returns:
        CSV with the leading columns, then every other column in order of first appearance, the timings last.
    """
    columns = list(LEADING_COLUMNS)
    for row in rows:
        columns += [key for key in row if key not in columns]
    columns.sort(key=lambda column: column.startswith("time_"))  # stable: only moves the timings to the end
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if value is None else value for key, value in row.items()})
    return buffer.getvalue()
