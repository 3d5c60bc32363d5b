"""Run options: one mapping from parsed arguments, defaults in one place, RunOptions only at the boundary."""

import argparse
import ast
import dataclasses
import re
from pathlib import Path

import pytest

from entropymerge import settings
from entropymerge.arguments import build_parser
from entropymerge.settings import (
    AdaptationSettings,
    InferenceOverrides,
    InputSettings,
    MergeSettings,
    OutputSettings,
    ProbeSettings,
    RankingSettings,
    RunOptions,
    options_from_arguments,
)
from entropymerge.training import TrainingConfig

ENGINE = Path(__file__).resolve().parents[1] / "SlicerEntropyMerge" / "entropymerge"
# the modules that turn the command line (or the Slicer module's request) into stage settings
BOUNDARY = {"settings", "pipeline", "cli", "arguments", "batch", "interpolation", "demo"}


def subparser(name: str) -> argparse.ArgumentParser:
    commands = build_parser()._subparsers._group_actions[0].choices
    return commands[name]


def test_an_unknown_or_misspelt_name_fails_loudly_and_names_it():
    with pytest.raises(TypeError, match="temprature"):
        options_from_arguments(argparse.Namespace(volume=Path("v"), models=[], temprature=0.1))
    with pytest.raises(TypeError, match="adapt_step, probe_patch"):
        options_from_arguments({"volume": Path("v"), "models": [], "probe_patch": 3, "adapt_step": 2})


def test_the_command_line_s_own_names_are_dropped_and_ignored_names_too():
    arguments = argparse.Namespace(command="path", progress="none", volume=Path("v"), models=[Path("m")], steps=5)
    with pytest.raises(TypeError, match="steps"):
        options_from_arguments(arguments)
    assert options_from_arguments(arguments, ignore=("steps",)) == RunOptions(volume=Path("v"), models=[Path("m")])


def test_a_parser_option_with_a_misspelt_destination_fails_the_command(tmp_path, capsys, monkeypatch):
    from entropymerge import arguments, cli

    original = arguments.add_report_option

    def misspelt(parser):
        original(parser)
        parser.add_argument("--reprot", dest="reprot", action="store_true")

    monkeypatch.setattr(arguments, "add_report_option", misspelt)
    code = cli.main(["run", "--volume", str(tmp_path / "v.nii.gz"), "--model", str(tmp_path), "--out", str(tmp_path / "o"),
                     "--progress", "none"])
    assert code == 1  # a programming error: internal error, never silently dropped
    assert "reprot" in capsys.readouterr().err


@pytest.mark.parametrize("method, stage", [
    ("merge_settings", MergeSettings), ("probe_settings", ProbeSettings), ("inference_overrides", InferenceOverrides),
    ("adaptation_settings", AdaptationSettings), ("ranking_settings", RankingSettings), ("output_settings", OutputSettings),
])
def test_every_run_option_default_is_its_stage_setting_default(method, stage):
    assert getattr(RunOptions(volume=Path("v"), models=[]), method)() == stage()


def test_the_input_settings_defaults_are_the_run_options_defaults():
    inputs = RunOptions(volume=Path("v"), models=[Path("m")]).input_settings()
    assert inputs == InputSettings(Path("v"), (Path("m"),))


def test_every_run_option_reaches_one_stage_setting():
    """No field of RunOptions is lost on the way to the stages (each one changes some stage setting)."""
    base = RunOptions(volume=Path("v"), models=[Path("m")])
    splits = ("merge_settings", "probe_settings", "inference_overrides", "adaptation_settings", "ranking_settings",
              "output_settings", "input_settings")
    changed = {"volume": Path("w"), "models": [Path("n")], "out": Path("o"), "method": "mean", "single_model": "a",
               "temperature": 0.5, "head_temperature": 0.2, "decouple_head": False, "statistic": "entropy", "refine": True,
               "batchnorm": "reestimate", "probe": "whole", "probe_patches": 3, "probe_size": (16, 16, 16),
               "features": "none", "anatomix_weights": Path("a.pth"), "feature_cache": Path("c"), "no_feature_cache": True,
               "reference": Path("r"), "per_model": True, "rank": True, "scribbles": Path("s"), "unlabelled_value": 0,
               "seed": 3, "segment": False, "device": "cpu", "roi_size": (32, 32, 32), "overlap": 0.5, "sw_batch_size": 2,
               "probabilities": True, "volume_format": "nrrd", "trust_code": True, "overwrite": True, "adapt": "tent",
               "adapt_steps": 2, "adapt_lr": 0.1, "adapt_reliable": 0.4, "adapt_prior": 1.0, "report": True,
               "memory_limit_gb": 2.0, "save_model": Path("m2")}
    assert set(changed) == settings.RUN_OPTION_NAMES
    for name, value in changed.items():
        other = dataclasses.replace(base, **{name: value})
        assert any(getattr(other, split)() != getattr(base, split)() for split in splits), name


@pytest.mark.parametrize("command, argv", [
    ("run", ["--out", "o"]),
    ("batch", ["--out", "o", "--cases", "c"]),
])
def test_the_command_line_defaults_are_the_settings_defaults(command, argv):
    arguments = subparser(command).parse_args(["--model", "m", *argv, *(["--volume", "v"] if command == "run" else [])])
    ignore = ("cases", "workers", "scheduler", "threads_per_case")
    values = dict(vars(arguments), **({"volume": Path("v")} if command == "batch" else {}))
    options = options_from_arguments(values, ignore=ignore if command == "batch" else ())
    assert options == RunOptions(volume=Path("v"), models=[Path("m")], out=Path("o"))


def test_the_rank_and_path_commands_use_the_settings_defaults():
    rank = options_from_arguments(subparser("rank").parse_args(["--volume", "v", "--model", "m", "--out", "o"]))
    assert rank == RunOptions(volume=Path("v"), models=[Path("m")], out=Path("o"), rank=True, segment=False)
    path = options_from_arguments(subparser("path").parse_args(["--volume", "v", "--model", "m", "--out", "o"]),
                                  ignore=("steps", "save_model_at"))
    assert path == RunOptions(volume=Path("v"), models=[Path("m")], out=Path("o"))
    assert subparser("demo").parse_args([]).device == InferenceOverrides().device


def test_the_train_command_defaults_are_the_training_config_defaults():
    arguments = vars(subparser("train").parse_args(["--out", "o"]))
    config = TrainingConfig()
    for name in ("features", "channel_dropout", "base_cases", "site_cases", "base_steps", "site_steps", "batch_size",
                 "patch_size", "seed"):
        assert arguments[name] == getattr(config, name), name


def test_no_run_option_default_is_written_out_in_an_argument_parser():
    """The parsers' defaults of run options are names (read from ``settings``), never literal values."""
    literal = []
    for path in ENGINE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"):
                continue
            keywords = {keyword.arg: keyword.value for keyword in node.keywords}
            flag = next((a.value for a in node.args if isinstance(a, ast.Constant) and a.value.startswith("--")), "")
            dest = keywords["dest"].value if "dest" in keywords else flag[2:].replace("-", "_")
            default = keywords.get("default")
            if dest in settings.RUN_OPTION_NAMES and isinstance(default, ast.Constant) and default.value is not None:
                literal.append(f"{path.name}:{node.lineno} {flag}")
    assert literal == [], "defaults written out instead of read from settings: " + ", ".join(literal)


def test_run_options_appear_only_at_the_boundary():
    users = {path.stem for path in ENGINE.glob("*.py") if re.search(r"\bRunOptions\b", path.read_text(encoding="utf-8"))}
    assert users <= BOUNDARY, f"RunOptions reaches {sorted(users - BOUNDARY)}; stages take their own settings"
    assert {"settings", "pipeline", "batch"} <= users


def engine_imports() -> dict[str, set[str]]:
    """Each engine module's imports of other engine modules, at module and at function level."""
    modules = {path.stem for path in ENGINE.glob("*.py")}
    graph = {}
    for path in ENGINE.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                imported.update([node.module.split(".")[0]] if node.module else [alias.name for alias in node.names])
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("entropymerge."):
                imported.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("entropymerge."))
        graph[path.stem] = (imported & modules) - {path.stem, "__init__"}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a list of modules (first == last), or None."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        for imported in sorted(graph[module]):
            cycle = visit(imported, path + [module])
            if cycle:
                return cycle
        done.add(module)
        return None

    return next((cycle for cycle in (visit(module, []) for module in sorted(graph)) if cycle), None)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_engine_imports_form_no_cycle():
    graph = engine_imports()
    assert "quiet" in graph["batch"] and "cli" not in graph["batch"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
