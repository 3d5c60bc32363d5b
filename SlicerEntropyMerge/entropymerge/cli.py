"""The ``entropymerge`` command line.

Exit codes: 0 success, 2 bad input (one message, no traceback), 1 internal error, 130 cancelled,
3 a batch finished but some of its cases failed.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import traceback
from pathlib import Path

from .arguments import build_parser
from .errors import Cancelled, ExitCode, UserInputError
from .progress import Progress, make_progress
from .quiet import quiet_libraries
from .settings import options_from_arguments
from .summary import RunSummary, output_key
from .validation import one_line


def command_path(args, progress: Progress) -> None:
    """``entropymerge path``: the interpolation path between two site models (path.csv, path.png)."""
    from .interpolation import path_table, run_path

    options = options_from_arguments(args, ignore=("steps", "save_model_at"))
    summary = run_path(options, args.steps, progress, args.save_model_at)
    if args.progress != "json":
        print(path_table(summary["path"]))
        print(f"path:    {summary['outputs']['path_csv']}\n         {summary['outputs']['path_png']}")


def command_merge(args, progress: Progress) -> None:
    """``entropymerge merge``: write the merged site model (safetensors + card)."""
    from .artefact import merge_to_folder

    notes: list[str] = []
    written = merge_to_folder(args.models, args.out, coefficients=args.coefficients, head_coefficients=args.head_coefficients,
                              from_summary=args.from_summary, name=args.name, overwrite=args.overwrite,
                              trust_code=args.trust_code, notes=notes)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"model card: {written['model_card']}\nweights:    {written['model_weights']}")


def command_report(args, progress: Progress) -> None:
    """``entropymerge report``: write report.html of a finished run."""
    from .report import write_report

    print(f"report: {write_report(args.run_dir, args.out, args.volume, args.overwrite, progress)}")


def command_batch(args, progress: Progress) -> int:
    """``entropymerge batch``: run every case; returns ``ExitCode.CASES_FAILED`` when some failed."""
    from .batch import discover_cases, run_batch

    if args.reference or args.scribbles:
        raise UserInputError("batch takes references with the cases (CASE_labels.nii.gz beside the volume, or the CSV's "
                             "reference column), not --reference or --scribbles")
    cases = discover_cases(args.cases)
    # each case sets its own volume, reference and output folder
    options = options_from_arguments(dict(vars(args), volume=Path()), ignore=("cases", "workers", "scheduler", "threads_per_case"))
    result = run_batch(cases, options, args.out, args.workers, args.scheduler, args.threads_per_case, progress)
    if args.progress != "json":
        counts = {status: sum(r["status"] == status for r in result.rows) for status in ("completed", "resumed", "failed")}
        print(f"{len(result.rows)} cases: {counts['completed']} completed, {counts['resumed']} already complete, {counts['failed']} failed")
        for name in result.failed:
            print(f"failed: {name} (see {args.out / name / 'error.txt'})")
        print(f"table: {result.table}")
    return ExitCode.CASES_FAILED if result.failed else ExitCode.OK


def command_run(args, progress: Progress) -> None:
    """``entropymerge run``: segment one volume and print where the outputs are."""
    from .pipeline import run

    summary = run(options_from_arguments(args), progress)
    print_run_table(summary, args.progress)
    if args.progress != "json":
        outputs = summary.outputs
        print(f"segmentation: {outputs[output_key('segmentation')]}")
        print(f"entropy map:  {outputs[output_key('entropy')]}")
        if summary.ranking:
            print(f"ranking:      {outputs['ranking']}")
        if "report" in outputs:
            print(f"report:       {outputs['report']}")
        print(f"summary:      {outputs['summary']}")


def command_rank(args, progress: Progress) -> None:
    """``entropymerge rank``: rank the site models for one volume (no segmentation written)."""
    from .pipeline import run

    summary = run(options_from_arguments(args), progress)
    print_run_table(summary, args.progress)
    if args.progress != "json":
        print(f"ranking: {summary.outputs['ranking']}\n         {summary.outputs['ranking_csv']}")


def print_run_table(summary: RunSummary, progress_mode: str) -> None:
    """The run's compact table; on stderr when stdout carries the JSON progress protocol."""
    from .console import run_table

    print(run_table(summary), file=sys.stderr if progress_mode == "json" else sys.stdout)


def command_demo(args, progress: Progress) -> None:
    """``entropymerge demo``: the whole story on the bundled sample."""
    from .demo import run_demo

    run_demo(args.out, args.device, args.overwrite, progress)


def command_sites(args, progress: Progress) -> None:
    """``entropymerge sites``: list the simulated sites."""
    from .sampledata import describe_sites

    print(describe_sites())


def command_simulate(args, progress: Progress) -> None:
    """``entropymerge simulate``: write synthetic scans (image + labels) of one site."""
    from .sampledata import site, write_case
    from .training import case_seed

    scanner = site(args.site)
    first = args.seed if args.seed is not None else case_seed(args.site, 0, "test")
    for seed in range(first, first + args.count):
        image, labels = write_case(scanner, seed, args.out)
        print(f"{image}\n{labels}")


def command_train(args, progress: Progress) -> None:
    """``entropymerge train``: train the sample site models."""
    from .training import TrainingConfig, train_site_models

    config = TrainingConfig(
        features=args.features, channel_dropout=args.channel_dropout, base_cases=args.base_cases,
        site_cases=args.site_cases, base_steps=args.base_steps, site_steps=args.site_steps,
        batch_size=args.batch_size, patch_size=args.patch_size, seed=args.seed,
        **({"sites": tuple(args.sites)} if args.sites else {}),
    )
    config.check()
    progress.plan([("base", config.base_steps)] + [(site, config.site_steps) for site in config.sites])

    def on_step(stage: str, step: int, total: int, loss: float) -> None:
        if progress.stage_name != stage:
            progress.stage(stage, f"training {stage}")
        progress.update(step / max(total, 1), f"training {stage}: step {step}/{total}, loss {loss:.3f}")

    report = train_site_models(args.out, config, on_step, log=lambda message: progress.note(message, "info"))
    progress.done({f"model_{p.stem}": str(p) for p in report.models})
    if args.progress != "json":
        for site, score in report.validation.items():
            print(f"{site}: {args.out / (site + '.json')} (validation Dice on its own site {score:.3f})")


def command_models(args, progress: Progress) -> int:
    """``entropymerge models``: describe site models; returns ``ExitCode.BAD_INPUT`` when some cannot be used."""
    import json

    from .compatibility import describe_models
    from .inference import describe_device, resolve_device

    entries = describe_models(args.paths, args.trust_code)
    device = describe_device(resolve_device("auto"))
    unusable = ExitCode.BAD_INPUT if any(not entry["compatible"] for entry in entries) else ExitCode.OK
    if args.json:
        print(json.dumps({"models": entries, "auto_device": device}))
        return unusable
    for entry in entries:
        labels = ", ".join(label["name"] for label in entry.get("labels", []))
        state = "ok" if entry["compatible"] else f"NOT USABLE: {entry['problem']}"
        print(f"{entry['name']:<16} {entry.get('site') or '':<40} [{labels}] {state}")
    print(f"device (auto): {device}")
    return unusable


def command_fetch_weights(args, progress: Progress) -> None:
    """``entropymerge fetch-weights``: download and verify a feature extractor's weights."""
    from .features import ANATOMIX_WEIGHTS_NAME, Anatomix, default_cache_dir, fetch_weights

    destination = (args.cache_dir or default_cache_dir()) / "weights" / ANATOMIX_WEIGHTS_NAME
    path = fetch_weights(args.url, args.sha256, destination, lambda candidate: Anatomix(candidate))
    print(f"anatomix weights verified and stored: {path}")


def main(argv: list[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: the arguments without the program name; None: ``sys.argv[1:]``.

    Returns:
        The exit code (``ExitCode``; 128 + the signal when a signal ended it).
    """
    argv = sys.argv[1:] if argv is None else argv
    progress: Progress = Progress()
    for stream in (sys.stdout, sys.stderr):  # a C locale or a Windows console cannot encode every name
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        with signals_end_like_interrupt():
            args = build_parser().parse_args(argv)
            progress = make_progress(getattr(args, "progress", "auto"))
            quiet_libraries()
            return COMMANDS[args.command](args, progress) or ExitCode.OK  # a handler may return another code (batch: cases failed)
    except UserInputError as error:
        return fail(progress, f"error: {error}", ExitCode.BAD_INPUT)
    except Terminated as error:
        return fail(progress, f"cancelled ({signal.Signals(error.signal_number).name})", 128 + error.signal_number)
    except (Cancelled, KeyboardInterrupt):
        return fail(progress, "cancelled", ExitCode.CANCELLED)
    except Exception as error:  # a bug: show the traceback so it can be reported
        traceback.print_exc()
        return fail(progress, f"internal error: {type(error).__name__}: {error}", ExitCode.INTERNAL_ERROR)


def fail(progress: Progress, message: str, code: int) -> int:
    """Report a failure on the progress channel and stderr; returns ``code``."""
    message = one_line(message)
    progress.error(message, int(code))
    print(message, file=sys.stderr)
    return int(code)


class Terminated(Cancelled):
    """The process was asked to end by a signal other than SIGINT (SIGTERM, SIGHUP)."""

    def __init__(self, signal_number: int):
        super().__init__(f"signal {signal_number}")
        self.signal_number = signal_number


@contextlib.contextmanager
def signals_end_like_interrupt():
    """SIGTERM and SIGHUP end a command as Ctrl-C does: the run cleans up, and the exit code is 128 + the signal."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def terminate(signal_number, frame):
        raise Terminated(signal_number)

    numbers = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    previous = {number: signal.signal(number, terminate) for number in numbers}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


COMMANDS = {"run": command_run, "path": command_path, "merge": command_merge, "demo": command_demo, "simulate": command_simulate,
            "sites": command_sites, "train": command_train, "rank": command_rank, "models": command_models,
            "report": command_report, "batch": command_batch, "fetch-weights": command_fetch_weights}
