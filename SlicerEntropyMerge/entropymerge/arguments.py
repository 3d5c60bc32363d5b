"""The ``entropymerge`` argument parser: its sub-commands and the option groups they share.

Every default of a run option is read from ``settings`` (the one place defaults live); the
commands themselves are in ``cli``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import __version__
from .errors import UserInputError
from .methods import METHODS
from .outputs import VOLUME_FORMATS
from .settings import (
    ADAPT_METHODS,
    BATCHNORM_POLICIES,
    PROBE_MODES,
    AdaptationSettings,
    InferenceOverrides,
    MergeSettings,
    OutputSettings,
    ProbeSettings,
    RankingSettings,
)

PROGRESS_MODES = ("auto", "bar", "json", "none")


class ArgumentParser(argparse.ArgumentParser):
    """An argument parser whose errors are ``UserInputError``: one line with the usage, exit code 2."""

    def error(self, message):
        usage = " ".join(self.format_usage().split())  # "usage: entropymerge [-h] ... {run,...} ..."
        raise UserInputError(f"{self.prog}: {message} ({usage})")


def positive_int(text: str) -> int:
    """``argparse`` type: an integer > 0."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    """``argparse`` type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def build_parser() -> ArgumentParser:
    """The ``entropymerge`` command line: one sub-command per task; ``command`` names the one parsed.

    Returns:
        The parser. The run options' defaults are those of ``settings``.
    """
    parser = ArgumentParser(prog="entropymerge", description="Per-volume entropy-adaptive merging of site segmentation models.")
    parser.add_argument("--version", action="version", version=f"entropymerge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    run = commands.add_parser("run", help="segment one volume with merged site models")
    run.add_argument("--volume", required=True, type=Path, help="target volume: NIfTI, NRRD, MHA/MHD or a DICOM series folder")
    run.add_argument("--model", dest="models", action="append", required=True, type=Path,
                     help="site model: card (.json), weights with card beside, MONAI bundle, or a folder of them; repeat")
    run.add_argument("--out", required=True, type=Path, help="output folder")
    add_method_options(run)
    add_common_run_options(run)
    add_adaptation_options(run)
    add_report_option(run)
    run.add_argument("--save-model", type=Path, metavar="DIR",
                     help="also write the network that segmented the volume (merged, or merged and adapted) into DIR as a "
                          "site model: <name>.safetensors + <name>.json")
    add_path_command(commands)
    add_merge_command(commands)

    demo = commands.add_parser("demo", help="the whole story on the bundled sample: site models vs mean vs entropy-adaptive merge")
    demo.add_argument("--out", type=Path, help="output folder (default: ./entropymerge-demo, or -2, -3 ... if it exists)")
    demo.add_argument("--device", default=InferenceOverrides.device, help="auto (GPU when available) | cpu | cuda | cuda:N")
    demo.add_argument("--overwrite", action="store_true", help="replace earlier demo results in --out")
    demo.add_argument("--progress", default="auto", choices=PROGRESS_MODES)

    simulate = commands.add_parser("simulate", help="write synthetic scans (image + labels) from a simulated site")
    simulate.add_argument("--site", required=True, help="a source or unseen target site (list them: entropymerge sites)")
    simulate.add_argument("--seed", type=int, default=None, help="first case seed (default: the site's first test seed)")
    simulate.add_argument("--count", type=positive_int, default=1, help="how many cases (consecutive seeds)")
    simulate.add_argument("--out", required=True, type=Path, help="output folder")
    simulate.set_defaults(progress="none")
    sites = commands.add_parser("sites", help="list the simulated sites")
    sites.set_defaults(progress="none")

    add_train_command(commands)

    rank = commands.add_parser("rank", help="rank the site models for one volume, training-free (GRTD, LBTC, fusion, LogME)")
    rank.add_argument("--volume", required=True, type=Path, help="target volume")
    rank.add_argument("--model", dest="models", action="append", required=True, type=Path, help="site model; repeat (at least two)")
    rank.add_argument("--out", required=True, type=Path, help="output folder: ranking.json, ranking.csv, summary.json")
    labels = rank.add_argument_group("labels (in order of trust; without either, the merged model's prediction is used)")
    labels.add_argument("--reference", type=Path, help="reference segmentation on the volume's grid (also gives true Dice and Kendall tau)")
    add_ranking_options(rank, with_switch=False)
    rank.add_argument("--method", default=MergeSettings.method, help=argparse.SUPPRESS)
    rank.add_argument("--device", default=InferenceOverrides.device, help="auto | cpu | cuda | cuda:N")
    rank.add_argument("--trust-bundle-code", dest="trust_code", action="store_true", help="allow code in bundles and TorchScript models")
    rank.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --out")
    rank.add_argument("--progress", default="auto", choices=PROGRESS_MODES)
    rank.set_defaults(rank=True, segment=False)

    models = commands.add_parser("models", help="describe site models (name, site, labels) and whether they can be merged together")
    models.add_argument("paths", nargs="*", type=Path, help="site models, as for run --model (none: only report the device)")
    models.add_argument("--trust-bundle-code", dest="trust_code", action="store_true", help="allow code in bundles and TorchScript models")
    models.add_argument("--json", action="store_true", help="one JSON object on stdout (for the Slicer module)")
    models.set_defaults(progress="none")
    add_report_command(commands)
    add_batch_command(commands)

    fetch = commands.add_parser("fetch-weights", help="download a feature extractor's weights (explicit, checksum-verified)")
    fetch.add_argument("extractor", choices=("anatomix",))
    fetch.add_argument("--url", required=True, help="where the weights are published (e.g. the anatomix authors' release)")
    fetch.add_argument("--sha256", required=True, help="the expected SHA-256 of the file, from the publisher")
    fetch.add_argument("--cache-dir", type=Path, help="cache folder (default: $ENTROPYMERGE_CACHE or ~/.cache/entropymerge)")
    fetch.set_defaults(progress="none")
    return parser


def add_method_options(parser: argparse.ArgumentParser) -> None:
    """Options of the merge, the probe, the stable features and the extra outputs (``run``, ``batch``).

    Args:
        parser: the sub-command's parser.
    """
    from .merging import STATISTICS

    method = parser.add_argument_group("merging")
    method.add_argument("--method", default=MergeSettings.method, choices=tuple(METHODS),
                        help="; ".join(f"{m.name}: {m.description}" for m in METHODS.values()))
    method.add_argument("--single-model", help="with --method single: name or index of the model to use")
    method.add_argument("--temperature", type=float, default=MergeSettings.temperature, help="tau of alpha = softmax(-H / tau)")
    method.add_argument("--head-temperature", type=float, help="tau of the head coefficients beta (default: --temperature)")
    method.add_argument("--no-decouple-head", dest="decouple_head", action="store_false", help="merge the head with alpha too")
    method.add_argument("--statistic", default=MergeSettings.statistic, choices=STATISTICS, help="the per-model uncertainty behind alpha")
    method.add_argument("--refine", action="store_true", help="forward-only search over a few candidate coefficient vectors")
    method.add_argument("--batchnorm", default=MergeSettings.batchnorm, choices=BATCHNORM_POLICIES, help="batch-norm statistics of the merged model")
    method.add_argument("--probe", default=ProbeSettings.mode, choices=PROBE_MODES,
                        help="ROI patches over the body, or the whole volume at half resolution")
    method.add_argument("--probe-patches", type=positive_int, default=ProbeSettings.patches,
                        help=f"how many probe patches (default {ProbeSettings.patches})")
    method.add_argument("--probe-size", type=positive_int, nargs=3, metavar=("X", "Y", "Z"),
                        help="probe patch size in voxels (default: half the ROI, a multiple of 16); rounded up to the "
                             "network's stride multiple and shrunk to the volume")
    features = parser.add_argument_group("stable features")
    features.add_argument("--features", choices=("mind-ssc", "anatomix", "none"), help="must match the model card (default: what it says)")
    features.add_argument("--anatomix-weights", type=Path, help="path of anatomix.pth")
    features.add_argument("--feature-cache", type=Path, help="cache folder (default: $ENTROPYMERGE_CACHE or ~/.cache/entropymerge)")
    features.add_argument("--no-feature-cache", action="store_true", help="always recompute the features")
    outputs = parser.add_argument_group("evaluation and extra outputs")
    outputs.add_argument("--reference", type=Path, help="reference segmentation on the volume's grid: adds Dice and HD95")
    outputs.add_argument("--per-model", action="store_true", help="also write each site model's segmentation and entropy map")
    add_ranking_options(parser, with_switch=True)


def add_ranking_options(parser: argparse.ArgumentParser, with_switch: bool) -> None:
    """Options of the transferability ranking.

    Args:
        parser: the sub-command's parser.
        with_switch: add ``--rank`` (``run``); ``rank`` always ranks.
    """
    ranking = parser.add_argument_group("transferability ranking")
    if with_switch:
        ranking.add_argument("--rank", action="store_true", help="also rank the site models (reuses the run's probe passes)")
    ranking.add_argument("--scribbles", type=Path, help="sparse label map as the ranking's labels: painted voxels count")
    ranking.add_argument("--unlabelled-value", type=int, default=RankingSettings.unlabelled_value,
                         help=f"the scribble value of unpainted voxels (default {RankingSettings.unlabelled_value})")
    seeded = "the ranking's voxel sampling and the adaptation" if with_switch else "the ranking's voxel sampling"
    ranking.add_argument("--seed", type=int, default=RankingSettings.seed, help=f"seed of {seeded} (default {RankingSettings.seed})")


def add_common_run_options(parser: argparse.ArgumentParser) -> None:
    """Options of device, sliding windows, output format, trust, overwriting, memory and progress.

    Args:
        parser: the sub-command's parser.
    """
    parser.add_argument("--device", default=InferenceOverrides.device, help="auto (GPU when available) | cpu | cuda | cuda:N")
    parser.add_argument("--roi-size", type=positive_int, nargs=3, metavar=("X", "Y", "Z"),
                        help="run in sliding windows of this size (default: the model card's or bundle's inferer); "
                             "rounded up to the network's stride multiple, shrunk to the volume")
    parser.add_argument("--overlap", type=float, help="sliding-window overlap in [0, 1) (default: model card)")
    parser.add_argument("--sw-batch-size", type=positive_int, help="windows per forward pass (default: model card)")
    parser.add_argument("--probabilities", action="store_true", help="also write one probability map per class")
    parser.add_argument("--format", dest="volume_format", default=OutputSettings.volume_format, choices=VOLUME_FORMATS, help="output volume format")
    parser.add_argument("--trust-bundle-code", dest="trust_code", action="store_true",
                        help="allow Python expressions in bundle configs and TorchScript models (only for files you trust)")
    parser.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --out")
    parser.add_argument("--memory-limit", dest="memory_limit_gb", type=positive_float, metavar="GB",
                        help="refuse runs estimated to need more memory (default: this computer's memory)")
    parser.add_argument("--progress", default="auto", choices=PROGRESS_MODES,
                        help="progress display; json prints one JSON object per line (for the Slicer module)")


def add_adaptation_options(parser: argparse.ArgumentParser) -> None:
    """Options of the test-time adaptation of the merged model.

    Args:
        parser: the sub-command's parser.
    """
    adaptation = parser.add_argument_group("test-time adaptation of the merged model")
    adaptation.add_argument("--adapt", default=AdaptationSettings.method, choices=ADAPT_METHODS,
                            help="tune the normalisation layers on the probe: tent (entropy minimisation) or dsbr (class-balanced "
                                 "entropy); a guard restores the merged weights if a class vanishes or the foreground halves or grows 1.25x")
    adaptation.add_argument("--adapt-steps", type=positive_int, default=AdaptationSettings.steps,
                            help=f"adaptation steps (default {AdaptationSettings.steps})")
    adaptation.add_argument("--adapt-lr", type=float, default=AdaptationSettings.learning_rate,
                            help=f"Adam learning rate of the adaptation (default {AdaptationSettings.learning_rate:g})")
    adaptation.add_argument("--adapt-reliable", dest="adapt_reliable", type=float, metavar="FRACTION",
                            help="only voxels whose normalised entropy is below FRACTION (of log C) count in the loss "
                                 "(SAR/EATA use 0.4; default: every voxel)")
    adaptation.add_argument("--adapt-prior", dest="adapt_prior", type=float, default=AdaptationSettings.prior_weight, metavar="WEIGHT",
                            help="weight of a term that holds the predicted class proportions at their start "
                                 "(KL divergence; default 0: off)")


def add_path_command(commands) -> None:
    """``entropymerge path``: probe entropy (and Dice) along the interpolation between two site models.

    Args:
        commands: the sub-parsers of ``build_parser``.
    """
    path = commands.add_parser("path", help="probe entropy (and Dice) along the weight interpolation between two site models")
    path.add_argument("--volume", required=True, type=Path, help="target volume")
    path.add_argument("--model", dest="models", action="append", required=True, type=Path,
                      help="site model; give exactly two: A (lambda 0) then B (lambda 1)")
    path.add_argument("--reference", type=Path, help="reference segmentation on the volume's grid: adds Dice along the path")
    path.add_argument("--steps", type=positive_int, default=11, help="evenly spaced lambda values from 0 to 1, endpoints included (default 11)")
    path.add_argument("--out", required=True, type=Path, help="output folder: path.csv, path.png, summary.json")
    path.add_argument("--feature-cache", type=Path, help="cache folder (default: $ENTROPYMERGE_CACHE or ~/.cache/entropymerge)")
    path.add_argument("--device", default=InferenceOverrides.device, help="auto | cpu | cuda | cuda:N")
    path.add_argument("--trust-bundle-code", dest="trust_code", action="store_true", help="allow code in bundles and TorchScript models")
    path.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --out")
    path.add_argument("--progress", default="auto", choices=PROGRESS_MODES)
    path.add_argument("--save-model-at", type=float, metavar="LAMBDA",
                      help="also write theta(LAMBDA) into --out as a site model (interpolated.safetensors + interpolated.json)")


def add_merge_command(commands) -> None:
    """``entropymerge merge``: site models merged with given coefficients into one site model.

    Args:
        commands: the sub-parsers of ``build_parser``.
    """
    merge = commands.add_parser("merge", help="merge site models with given coefficients (no volume) into one site model")
    merge.add_argument("--model", dest="models", action="append", required=True, type=Path,
                       help="site model, as for run; repeat (the coefficients follow this order)")
    source = merge.add_mutually_exclusive_group()
    source.add_argument("--coefficients", metavar="A,B,...", help="body coefficients, one per model, >= 0, summing to 1 (default: the mean)")
    source.add_argument("--from-summary", type=Path, metavar="RUN/summary.json", help="the coefficients of a finished run")
    merge.add_argument("--head-coefficients", metavar="A,B,...", help="separate coefficients for the classification head (default: the body's)")
    merge.add_argument("--name", default="merged", help="model name and file stem (default: merged)")
    merge.add_argument("--out", required=True, type=Path, help="folder for <name>.safetensors and <name>.json")
    merge.add_argument("--overwrite", action="store_true", help="write into a folder that is not empty")
    merge.add_argument("--trust-bundle-code", dest="trust_code", action="store_true", help="allow code in bundles and TorchScript models")
    merge.add_argument("--progress", default="auto", choices=PROGRESS_MODES)


def add_report_option(parser: argparse.ArgumentParser) -> None:
    """``--report``: also write report.html.

    Args:
        parser: the sub-command's parser.
    """
    parser.add_argument("--report", action="store_true",
                        help="also write report.html: one self-contained page with views, entropy, site-model grid, coefficients, tables")


def add_report_command(commands) -> None:
    """``entropymerge report``: the HTML page of a finished run.

    Args:
        commands: the sub-parsers of ``build_parser``.
    """
    report = commands.add_parser("report", help="one self-contained HTML page of a finished run (opens offline in any browser)")
    report.add_argument("run_dir", type=Path, help="output folder of a finished run (holds summary.json)")
    report.add_argument("--out", type=Path, help="HTML file to write (default: RUN_DIR/report.html)")
    report.add_argument("--volume", type=Path, help="the target volume, if it moved since the run (default: the path in summary.json)")
    report.add_argument("--overwrite", action="store_true", help="replace an existing report file")
    report.set_defaults(progress="none")


def add_batch_command(commands) -> None:
    """``entropymerge batch``: one run per case of a folder or CSV.

    Args:
        commands: the sub-parsers of ``build_parser``.
    """
    batch = commands.add_parser("batch", help="one run per case of a folder or CSV; resumable; serial, local processes or Dask")
    batch.add_argument("--cases", required=True, type=Path,
                       help="folder of volumes (CASE.nii.gz or CASE_image.nii.gz; CASE_labels.nii.gz beside one is its reference) "
                            "or a CSV with the columns case,volume,reference")
    batch.add_argument("--model", dest="models", action="append", required=True, type=Path, help="site model, as for run; repeat")
    batch.add_argument("--out", required=True, type=Path, help="output folder: OUT/CASE/ per case and the table OUT/batch.csv")
    scale = batch.add_mutually_exclusive_group()
    scale.add_argument("--workers", type=positive_int, default=1, help="cases run at once in local processes (default 1: one by one)")
    scale.add_argument("--scheduler", help="address of a Dask distributed scheduler (tcp://HOST:8786); its workers must see the same files")
    batch.add_argument("--threads-per-case", type=positive_int, default=1,
                       help="torch threads of each case (default 1; results are identical for the same value however the cases run)")
    add_method_options(batch)
    add_adaptation_options(batch)
    add_common_run_options(batch)
    add_report_option(batch)


def add_train_command(commands) -> None:
    """``entropymerge train``: its defaults are those of ``training.TrainingConfig``."""
    from .training import TrainingConfig

    train = commands.add_parser("train", help="train the sample site models (base on pooled generic data, then one per site)")
    train.add_argument("--out", required=True, type=Path, help="folder for the site models (cards + safetensors); work files in OUT/work")
    train.add_argument("--features", default=TrainingConfig.features, choices=("mind-ssc", "anatomix", "none"),
                       help="stable features (none: image-only models)")
    train.add_argument("--channel-dropout", type=float, default=TrainingConfig.channel_dropout,
                       help="whole-channel dropout over all input channels (DropGen)")
    train.add_argument("--sites", nargs="+", help="source sites to fine-tune (default: all)")
    train.add_argument("--base-cases", type=positive_int, default=TrainingConfig.base_cases)
    train.add_argument("--site-cases", type=positive_int, default=TrainingConfig.site_cases)
    train.add_argument("--base-steps", type=int, default=TrainingConfig.base_steps)
    train.add_argument("--site-steps", type=int, default=TrainingConfig.site_steps)
    train.add_argument("--batch-size", type=positive_int, default=TrainingConfig.batch_size)
    train.add_argument("--patch-size", type=positive_int, default=TrainingConfig.patch_size)
    train.add_argument("--seed", type=int, default=TrainingConfig.seed)
    train.add_argument("--progress", default="auto", choices=PROGRESS_MODES)
