"""One case from files to files: the engine's flow as a short sequence of stage calls.

read volume -> load and check site models -> model space -> stable features (cached)
-> probe passes of the K site models -> coefficients (alpha body, beta head) -> merged model
-> sliding-window inference -> labels and entropy on the input grid -> outputs + summary.json

``run`` is the boundary: it takes the flat ``RunOptions`` and hands each stage its own settings.
"""

from __future__ import annotations

from dataclasses import replace

from .artefact import check_model_folder
from .case import Timings, input_paths, load_case, validate_settings
from .errors import UserInputError
from .methods import get_method
from .outputs import OutputFolder
from .progress import Progress
from .settings import RunOptions
from .stages import adapt_merged, evaluate_segmentation, plan_merge, rank_case, run_every_model, save_run_model, segment_volume
from .summary import AdaptationRecord, RankingRecord, RunSummary
from .writing import build_summary, write_ranking, write_result


def validate_options(options: RunOptions) -> None:
    """Cheap checks of the options' values, before any file is read (``case.validate_settings``).

    Args:
        options: the run's options.

    Raises:
        UserInputError: naming the option and the value it cannot take.
    """
    validate_settings(options.merge_settings(), options.inference_overrides(), options.adaptation_settings(),
                      options.input_settings(), options.output_settings())


def checked_options(options: RunOptions) -> RunOptions:
    """The options after the cheap checks (``validate_options``, an output folder).

    Args:
        options: the run's options.

    Returns:
        The options, with ``rank`` switched on when scribbles are given.
    """
    validate_options(options)
    if options.scribbles and not options.rank:
        options = replace(options, rank=True)  # scribbles are only used to rank
    if options.out is None:
        raise UserInputError("an output folder (--out) is needed")
    return options


def open_output(options: RunOptions) -> OutputFolder:
    """The run's output folder, after checking --save-model's folder.

    Args:
        options: the run's options (inputs, ``out``, ``overwrite``, ``volume_format``, ``save_model``).

    Returns:
        The output folder, locked; none of the run's inputs may be replaced by an output.
    """
    read = input_paths(options.input_settings(), options.scribbles)
    if options.save_model is not None:  # before the output folder takes its lock: the two may be one folder
        check_model_folder(options.save_model, options.overwrite, read)
    return OutputFolder(options.out, options.overwrite, read, options.volume_format)


def stage_weights(options: RunOptions, runs_every_model: bool) -> list[tuple[str, float]]:
    """The stages of a run with their expected shares of its time.

    Args:
        options: the run's options.
        runs_every_model: every site model runs on the whole volume (the method, --per-model, or ranking with a reference).

    Returns:
        (stage name, weight) in run order; weight 0: the stage does not run.
    """
    return [("load", 1), ("preprocess", 1), ("features", 2), ("probe", 2), ("merge", 1),
            ("site models", 6 * len(options.models) if runs_every_model else 0),
            ("adapt", 3 if options.adapt != "none" else 0), ("inference", 6),
            ("evaluate", 1 if options.reference else 0), ("rank", 2 if options.rank else 0), ("write", 1)]


def run(options: RunOptions, progress: Progress | None = None) -> RunSummary:
    """Segment ``options.volume`` with the site models combined by ``options.method`` and write the outputs.

    Args:
        options: the run's options, as the command line or the Slicer module give them (``out``: the output folder).
        progress: receives stages, fractions and notes (default: silent).

    Returns:
        The run's summary, as written to ``summary.json``; its ``outputs`` are the written files' paths
        (with ``report`` and the saved model's files when asked for).
    """
    progress, options = progress or Progress(), checked_options(options)
    inputs, merge, probe, ranking, wanted = (options.input_settings(), options.merge_settings(), options.probe_settings(),
                                             options.ranking_settings(), options.output_settings())
    per_model_runs = wanted.per_model or (ranking.rank and inputs.reference)  # each site model's own result
    output, timings = open_output(options), Timings()
    progress.plan(stage_weights(options, get_method(merge.method).runs_every_model or per_model_runs))
    try:
        output.expect(*(f"{name}.{wanted.volume_format}" for name in ("segmentation", "entropy") if wanted.segment),
                      *(["report.html"] if wanted.report else []))
        case = load_case(inputs, options.inference_overrides(), probe, ranking, progress, timings)
        if ranking.rank and len(case.models) < 2:
            raise UserInputError(f"--rank needs at least two models; {len(case.models)} given")
        plan, probe_run = plan_merge(case, merge, probe, ranking.rank, progress, timings)
        per_model, ensemble_sum = {}, None  # per_model: each site model's own result, by name
        if plan.body is None or per_model_runs:  # plan.body None: the method combines full runs of every model
            plan, ensemble_sum = run_every_model(case, plan, per_model, progress, timings, output if wanted.per_model else None)
        adapted, adaptation = (adapt_merged(case, plan, options.adaptation_settings(), probe, probe_run, progress, timings)
                               if wanted.segment else (None, None))
        segmentation, pseudo_labels, network = None, None, None
        if wanted.segment or not (inputs.reference or ranking.scribbles):
            segmentation, pseudo_labels, network = segment_volume(case, plan, adapted, ensemble_sum, wanted.probabilities,
                                                                  ranking.rank, progress, timings)
        evaluation = evaluate_segmentation(case, segmentation, progress, timings)
        ranked = None
        if ranking.rank:
            ranked = rank_case(case, merge, ranking, inputs.reference, probe_run, plan, pseudo_labels, per_model, progress, timings)
            write_ranking(output, ranked)
        write_result(output, case, segmentation if wanted.segment else None, progress, timings)
        summary = build_summary(inputs.volume, case, plan, timings, progress, evaluation, per_model)
        summary.ranking = RankingRecord(**ranked.to_json()) if ranked else None
        summary.adaptation = AdaptationRecord(**adaptation) if adaptation else None
        if wanted.save_model is not None and network is not None:
            summary.saved_model = save_run_model(case, plan, network, adaptation, inputs.volume, options.inference_overrides(),
                                                 wanted.save_model)
        outputs = output.commit(summary.to_json(), release=not wanted.report)
        outputs.update(summary.saved_model or {})
    except BaseException:
        output.abort()
        raise
    if wanted.report:  # after the commit: a report that fails never costs the run's results
        from .report import write_report

        try:
            outputs["report"] = str(write_report(wanted.out, overwrite=True, progress=progress))
        finally:
            output.release()
    progress.done(outputs)
    return replace(summary, outputs=outputs)
