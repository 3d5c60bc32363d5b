"""One case from files to files: the engine's flow as a short sequence of calls.

read volume -> load and check site models -> model space -> merge coefficients -> merged model
-> sliding-window inference -> labels and entropy on the input grid -> outputs + summary.json
"""

from __future__ import annotations

import contextlib
import datetime
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .errors import UserInputError
from .inference import InferenceReport, describe_device, predict_logits, resolve_device, segmentation_from_logits
from .merging import mean_coefficients, merged_network, one_hot
from .modelcard import InferenceSettings
from .models import SiteModel, check_compatible, expand_model_paths, load_site_models
from .outputs import OutputFolder, safe_file_stem
from .preprocessing import to_model_space
from .progress import Progress
from .volume import read_volume

METHODS = ("single", "mean")


@dataclass
class RunOptions:
    """Everything ``entropymerge run`` needs; defaults are the CLI's defaults."""

    volume: Path
    models: list[Path]
    out: Path
    method: str = "mean"
    single_model: str | None = None
    device: str = "auto"
    roi_size: tuple[int, int, int] | None = None
    overlap: float | None = None
    sw_batch_size: int | None = None
    probabilities: bool = False
    volume_format: str = "nii.gz"
    trust_code: bool = False
    overwrite: bool = False
    extra: dict = field(default_factory=dict)


class Timings(dict):
    """Wall time (s) of each stage, in the order they ran."""

    @contextlib.contextmanager
    def measure(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self[name] = round(self.get(name, 0.0) + time.perf_counter() - start, 4)


def inference_settings(model: SiteModel, options: RunOptions) -> InferenceSettings:
    """The model card's sliding-window settings with the user's overrides applied."""
    settings = model.card.inference
    if options.roi_size:
        settings = replace(settings, roi_size=tuple(options.roi_size))
    if options.overlap is not None:
        if not 0 <= options.overlap < 1:
            raise UserInputError(f"--overlap must be in [0, 1), got {options.overlap}")
        settings = replace(settings, overlap=options.overlap)
    if options.sw_batch_size:
        settings = replace(settings, sw_batch_size=options.sw_batch_size)
    return settings


def single_model_index(models: list[SiteModel], choice: str | None) -> int:
    if choice is None:
        if len(models) == 1:
            return 0
        raise UserInputError(
            f"--method single runs one model but {len(models)} were given; name it with --single-model "
            f"({', '.join(m.name for m in models)})"
        )
    for index, model in enumerate(models):
        if choice in (model.name, str(index)):
            return index
    raise UserInputError(f"--single-model {choice!r} is none of the loaded models ({', '.join(m.name for m in models)})")


def run(options: RunOptions, progress: Progress | None = None) -> dict:
    """Segment ``options.volume`` with the site models merged by ``options.method``; returns the summary."""
    progress = progress or Progress()
    if options.method not in METHODS:
        raise UserInputError(f"unknown method {options.method!r}; choose one of {', '.join(METHODS)}")
    timings = Timings()
    protected = (Path(options.volume), *expand_model_paths(options.models))
    output = OutputFolder(options.out, options.overwrite, protected, options.volume_format)
    progress.plan([("load", 1), ("preprocess", 1), ("merge", 1), ("inference", 6), ("write", 1)])
    try:
        progress.stage("load", "reading the volume and the site models")
        with timings.measure("load"):
            volume = read_volume(options.volume)
            models = load_site_models(options.models, options.trust_code)
            check_compatible(models)
        for model in models:
            for note in model.notes:
                progress.note(f"{model.name}: {note}")
        card = models[0].card
        settings = inference_settings(models[0], options)
        device = resolve_device(options.device)

        progress.stage("preprocess", f"resampling to the models' space ({card.preprocessing.orientation or 'as stored'})")
        with timings.measure("preprocess"):
            image = to_model_space(volume, card.preprocessing)
            inputs = image.tensor.as_tensor()[None]

        progress.stage("merge", f"merging {len(models)} model(s): {options.method}")
        with timings.measure("merge"):
            if options.method == "single":
                coefficients = one_hot(single_model_index(models, options.single_model), len(models))
            else:
                coefficients = mean_coefficients(models)
            network = merged_network(models, coefficients)

        progress.stage("inference", f"segmenting on {describe_device(device)}")
        report = InferenceReport(str(device), [])
        with timings.measure("inference"):
            logits = predict_logits(network, inputs, settings, device, lambda f: progress.update(f, "segmenting"), report)
            segmentation = segmentation_from_logits(logits, image, options.probabilities)
        for note in report.notes:
            progress.note(note)

        progress.stage("write", "writing the outputs")
        with timings.measure("write"):
            output.volume("segmentation", "segmentation", segmentation.labels, volume.geometry)
            output.volume("entropy", "entropy", segmentation.entropy, volume.geometry)
            if segmentation.probabilities is not None:
                for label, probability in zip(card.labels, segmentation.probabilities):
                    output.volume(f"probability_{label.name}", f"probability_{safe_file_stem(label.name)}", probability, volume.geometry)
        summary = {
            "entropymerge_version": __version__,
            "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "volume": {"path": str(options.volume), "geometry": volume.geometry.describe()},
            "models": [_model_summary(model) for model in models],
            "labels": [{"value": l.value, "name": l.name, "color": l.color} for l in card.labels],
            "method": options.method,
            "coefficients": {"body": dict(zip((m.name for m in models), coefficients.round(6).tolist()))},
            "device": report.device,
            "inference": {"roi_size": list(settings.roi_size), "overlap": settings.overlap, "sw_batch_size": settings.sw_batch_size},
            "timings_s": timings,
            "notes": progress.notes,
            "versions": _versions(),
        }
        outputs = output.commit(summary)
    except BaseException:
        output.abort()
        raise
    progress.done(outputs)
    return dict(summary, outputs=outputs)


def _model_summary(model: SiteModel) -> dict:
    return {
        "name": model.name,
        "site": model.card.site,
        "source": str(model.source),
        "kind": model.kind,
        "parameters": int(sum(p.numel() for p in model.network.parameters())),
    }


def _versions() -> dict:
    import monai
    import SimpleITK

    return {
        "entropymerge": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": np.__version__,
        "SimpleITK": SimpleITK.Version_VersionString(),
    }
