"""Training the sample site models: a base model on pooled generic data, then one fine-tuned model per site.

DropGen inputs: the normalised image plus stable-feature channels, with whole-channel dropout over
all channels (the image included) during training only. ``features="none"`` trains image-only
models for comparison. Everything is seeded: the cases, the patches and the dropout masks of step
``s`` depend only on (seed, stage, s), so an interrupted run resumes to the same weights.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from .errors import UserInputError
from .features import FeatureCache, get_extractor, model_inputs
from .fingerprint import FINGERPRINT_KEY, intensity_fingerprint, mean_fingerprint
from .inference import predict_logits
from .metrics import dice
from .modelcard import InferenceSettings, ModelCard, Preprocessing, default_labels
from .models import load_state_dict_file, save_site_model
from .preprocessing import labels_to_model_space, to_model_space
from .safeconfig import build_network
from .sampledata import GENERIC_SITE, LABEL_COLORS, LABEL_NAMES, SOURCE_SITES, TARGET_SITES, Scanner, simulate

SPLIT_OFFSETS = {"train": 0, "validation": 5_000, "test": 900_000}


def case_seed(site_name: str, index: int, split: str = "train") -> int:
    """The seed of case ``index`` of a site.

    Training and validation seeds stay below 100000; test seeds (benchmarks, bundled targets) start
    at 900000, so they are never trained on.

    Args:
        site_name: ``"generic"``, a source site or a target site of ``sampledata``.
        index: the case number within the site and split (below 5000).
        split: ``"train"``, ``"validation"`` or ``"test"``.

    Returns:
        The seed for ``sampledata.simulate``.
    """
    names = ["generic", *SOURCE_SITES, *TARGET_SITES]
    return SPLIT_OFFSETS[split] + 10_000 * (names.index(site_name) + 1) + index


@dataclass
class TrainingConfig:
    """The recipe of ``entropymerge train``: features and dropout, cases and steps per stage, patch size
    (voxels), learning rates, model spacing (mm), UNet channels, the seed and the checkpoint interval (steps)."""

    features: str = "mind-ssc"  # or "none" for image-only models
    channel_dropout: float = 0.75
    sites: tuple[str, ...] = tuple(SOURCE_SITES)
    base_cases: int = 16
    site_cases: int = 8
    validation_cases: int = 2
    base_steps: int = 800
    site_steps: int = 300
    batch_size: int = 2
    patch_size: int = 64
    base_learning_rate: float = 1e-3
    site_learning_rate: float = 5e-4
    spacing: float = 1.5
    channels: tuple[int, ...] = (8, 16, 32, 64)
    seed: int = 0
    checkpoint_every: int = 50

    def check(self) -> None:
        """Raise ``UserInputError`` for a value the recipe cannot use (named as its command-line option)."""
        if self.features not in ("mind-ssc", "anatomix", "none"):
            raise UserInputError(f"--features must be mind-ssc, anatomix or none, got {self.features!r}")
        if not 0 <= self.channel_dropout < 1:
            raise UserInputError(f"--channel-dropout must be in [0, 1), got {self.channel_dropout}")
        unknown = [s for s in self.sites if s not in SOURCE_SITES]
        if unknown:
            raise UserInputError(f"unknown source site(s) {', '.join(unknown)}; known: {', '.join(SOURCE_SITES)}")
        for name in ("base_cases", "site_cases", "batch_size", "patch_size"):
            if getattr(self, name) < 1:
                raise UserInputError(f"--{name.replace('_', '-')} must be at least 1")
        if self.patch_size % 8:
            raise UserInputError(f"--patch-size must be a multiple of 8 (the network downsamples 3 times), got {self.patch_size}")


def model_card(config: TrainingConfig, name: str, site: str) -> ModelCard:
    """The card of a sample site model: a MONAI UNet on the image (plus the feature channels), RAS at
    ``config.spacing`` mm, intensities scaled between the 0.5th and 99.5th percentiles to [0, 1].

    Args:
        config: the recipe (features, channels, spacing, patch size).
        name: the model's name.
        site: the site's description.

    Returns:
        The card, without weights.
    """
    extractor = None if config.features == "none" else get_extractor(config.features)
    in_channels = 1 + (extractor.channels if extractor else 0)
    network = {
        "_target_": "UNet", "spatial_dims": 3, "in_channels": in_channels, "out_channels": len(LABEL_NAMES),
        "channels": list(config.channels), "strides": [2] * (len(config.channels) - 1), "num_res_units": 2,
        "norm": ["instance", {"affine": True}],
    }
    labels = tuple(replace(label, color=color) for label, color in zip(default_labels(list(LABEL_NAMES)), LABEL_COLORS))
    return ModelCard(
        name=name, site=site, labels=labels, input_channels=in_channels,
        preprocessing=Preprocessing("RAS", (config.spacing,) * 3, ({
            "_target_": "ScaleIntensityRangePercentiles", "lower": 0.5, "upper": 99.5, "b_min": 0.0, "b_max": 1.0, "clip": True},)),
        inference=InferenceSettings((config.patch_size,) * 3, 0.25, 2),
        network=network, features=extractor.spec if extractor else None,
    )


@dataclass
class Case:
    """One simulated training case in model space."""

    inputs: torch.Tensor  # (C_in, X, Y, Z) float16
    labels: torch.Tensor  # (X, Y, Z) uint8
    seed: int


def prepare_cases(scanner: Scanner, seeds, card: ModelCard, cache: FeatureCache | None = None) -> list[Case]:
    """Simulate each case, move it into model space and add its feature channels (as inference does).

    Args:
        scanner: the site that images the cases.
        seeds: one ``simulate`` seed per case.
        card: the model card (preprocessing and feature spec).
        cache: feature cache; None to compute every time.

    Returns:
        One ``Case`` per seed: (C_in, X, Y, Z) float16 inputs and (X, Y, Z) uint8 labels (0 outside the scan).
    """
    extractor = get_extractor(card.features.extractor) if card.features else None
    cases = []
    for seed in seeds:
        image, labels = simulate(scanner, seed)
        space = to_model_space(image, card.preprocessing)
        inputs = model_inputs(space.tensor.as_tensor(), card.features, extractor, cache).inputs[0]
        cases.append(Case(inputs.half(), labels_to_model_space(labels, space, outside=0).to(torch.uint8), seed))
    return cases


def sample_batch(cases: list[Case], rng: np.random.Generator, batch_size: int, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random patches; two in three centred on a foreground voxel of a randomly chosen present class.

    Args:
        cases: the cases to draw from.
        rng: the generator (seeded per step, so a resumed run draws the same patches).
        batch_size: patches per batch.
        patch: patch size in voxels per axis; cases smaller than that are zero-padded.

    Returns:
        (inputs, targets): (B, C_in, patch, patch, patch) float32 and (B, 1, patch, patch, patch) int64.
    """
    inputs, targets = [], []
    for _ in range(batch_size):
        case = cases[rng.integers(len(cases))]
        shape = np.array(case.labels.shape)
        centre = rng.integers(0, shape)
        if rng.random() < 2 / 3:
            present = [c for c in range(1, len(LABEL_NAMES)) if (case.labels == c).any()]
            if present:
                where = torch.nonzero(case.labels == present[rng.integers(len(present))])
                centre = where[rng.integers(len(where))].numpy()
        start = np.clip(centre - patch // 2, 0, np.maximum(shape - patch, 0))
        region = tuple(slice(s, s + patch) for s in start)
        x = case.inputs[(slice(None), *region)].float()
        y = case.labels[region].long()
        pad = [p for size in reversed(x.shape[1:]) for p in (0, patch - size)]
        inputs.append(F.pad(x, pad))
        targets.append(F.pad(y, pad))
    return torch.stack(inputs), torch.stack(targets)[:, None]


@dataclass
class StageResult:
    """One training stage: its name, steps, last loss, wall time (seconds) and the step it resumed from."""

    name: str
    steps: int
    final_loss: float
    seconds: float
    resumed_from: int = 0


def train_stage(
    network: torch.nn.Module,
    cases: list[Case],
    steps: int,
    learning_rate: float,
    config: TrainingConfig,
    stage: str,
    checkpoint: Path,
    progress: Callable[[int, int, float], None] | None = None,
) -> StageResult:
    """Train ``network`` in place for ``steps`` steps, resuming from ``checkpoint`` when it exists.

    Adam with a cosine schedule on the DiceCE loss; whole-channel dropout of the inputs when the
    model has feature channels.

    Args:
        network: the network to train.
        cases: the training cases.
        steps: the total number of steps of the stage.
        learning_rate: the initial learning rate.
        config: the recipe (seed, batch and patch size, dropout, checkpoint interval).
        stage: the stage's name; it seeds the stage's draws.
        checkpoint: where the optimiser state is saved every ``config.checkpoint_every`` steps.
        progress: called with (step, steps, loss) after each step.

    Returns:
        The ``StageResult``; the network is left in eval mode.
    """
    optimizer = torch.optim.Adam(network.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    start_step, loss_value = 0, float("nan")
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        network.load_state_dict(state["network"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start_step = int(state["step"])
    stage_key = sum(ord(c) * (i + 1) for i, c in enumerate(stage))
    begin = time.perf_counter()
    network.train()
    for step in range(start_step, steps):
        rng = np.random.default_rng([config.seed, stage_key, step])
        x, y = sample_batch(cases, rng, config.batch_size, config.patch_size)
        torch.manual_seed(config.seed * 1_000_003 + stage_key * 10_007 + step)
        if config.channel_dropout > 0 and config.features != "none":
            x = F.dropout3d(x, p=config.channel_dropout, training=True)  # whole channels, image included
        optimizer.zero_grad(set_to_none=True)
        loss = loss_function(network(x), y)
        loss.backward()
        optimizer.step()
        schedule.step()
        loss_value = loss.item()
        if progress:
            progress(step + 1, steps, loss_value)
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == steps:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            partial = checkpoint.with_suffix(".partial")
            torch.save({"network": network.state_dict(), "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(), "step": step + 1}, partial)
            partial.replace(checkpoint)
    network.eval()
    return StageResult(stage, steps, loss_value, time.perf_counter() - begin, start_step)


def validation_dice(network: torch.nn.Module, cases: list[Case], card: ModelCard) -> float:
    """Mean foreground Dice of ``network`` on held-out model-space cases (CPU, the card's inference settings).

    Args:
        network: the trained network.
        cases: the held-out cases (``prepare_cases``).
        card: its card (inference settings, number of classes).

    Returns:
        The mean over cases of the mean Dice over the foreground classes present in each case.
    """
    scores = []
    for case in cases:
        logits = predict_logits(network, case.inputs.float()[None], card.inference, torch.device("cpu"))
        predicted = logits[0].max(dim=0).indices.numpy()
        truth = case.labels.numpy()
        values = [dice(predicted, truth, c) for c in range(1, card.num_classes) if (truth == c).any()]
        scores.append(float(np.mean([v or 0.0 for v in values])))
    return float(np.mean(scores))


@dataclass
class TrainingReport:
    """What ``train_site_models`` wrote: the card paths, the stages it ran, and each site's validation Dice."""

    models: list[Path] = field(default_factory=list)
    stages: list[StageResult] = field(default_factory=list)
    validation: dict[str, float] = field(default_factory=dict)


def train_site_models(
    out: Path,
    config: TrainingConfig,
    progress: Callable[[str, int, int, float], None] | None = None,
    log: Callable[[str], None] = print,
) -> TrainingReport:
    """Train the base model, then fine-tune one model per site; write ``<site>.safetensors`` + card per site.

    Work files (checkpoints, the base model, the feature cache) go to ``out/work``; rerunning the
    same command resumes where it stopped and skips finished stages.

    Args:
        out: the folder for the site models.
        config: the recipe (checked first).
        progress: called with (stage, step, steps, loss).
        log: receives one line per milestone.

    Returns:
        The ``TrainingReport``.

    Raises:
        UserInputError: a recipe value it cannot use.
    """
    config.check()
    torch.manual_seed(config.seed)
    out = Path(out)
    work = out / "work"
    cache = FeatureCache(work / "features") if config.features != "none" else None
    base_card = model_card(config, "base", GENERIC_SITE.name)
    report = TrainingReport()

    def stage_progress(stage: str):
        return (lambda step, total, loss: progress(stage, step, total, loss)) if progress else None

    log(f"simulating {config.base_cases} generic cases for the base model")
    generic = prepare_cases(GENERIC_SITE, [case_seed("generic", i) for i in range(config.base_cases)], base_card, cache)
    base = build_network(base_card.network, "training")
    base_weights = work / "base.safetensors"
    if base_weights.exists():
        base.load_state_dict(load_state_dict_file(base_weights))
        log("base model: already trained")
    else:
        torch.manual_seed(config.seed)
        base = build_network(base_card.network, "training")
        report.stages.append(train_stage(base, generic, config.base_steps, config.base_learning_rate, config, "base",
                                         work / "checkpoints" / "base.pt", stage_progress("base")))
        save_site_model(base, base_card, work, "base")
    del generic

    for site_name in config.sites:
        scanner = SOURCE_SITES[site_name]
        card = model_card(config, site_name, scanner.description)
        target = out / f"{site_name}.json"
        log(f"simulating {config.site_cases} + {config.validation_cases} cases of site {site_name}")
        train = prepare_cases(scanner, [case_seed(site_name, i) for i in range(config.site_cases)], card, cache)
        held_out = prepare_cases(scanner, [case_seed(site_name, i, "validation") for i in range(config.validation_cases)], card, cache)
        network = build_network(card.network, "training")
        if target.exists():
            network.load_state_dict(load_state_dict_file(target.with_suffix(".safetensors")))
            log(f"{site_name}: already trained")
        else:
            network.load_state_dict(base.state_dict())
            report.stages.append(train_stage(network, train, config.site_steps, config.site_learning_rate, config, site_name,
                                             work / "checkpoints" / f"{site_name}.pt", stage_progress(site_name)))
        score = validation_dice(network, held_out, card)
        report.validation[site_name] = score
        card = replace(card, training={
            "recipe": "entropymerge train", "seed": config.seed, "site": site_name, "base": "generic pooled data",
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
            "train_seeds": [c.seed for c in train], "validation_seeds": [c.seed for c in held_out],
            "validation_mean_dice_own_site": round(score, 4),
            FINGERPRINT_KEY: mean_fingerprint([intensity_fingerprint(c.inputs[0]) for c in train]),
        })
        report.models.append(save_site_model(network, card, out, site_name))
        log(f"{site_name}: validation mean Dice on its own site {score:.3f}")
    return report
