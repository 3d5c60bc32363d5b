"""The panel's logic that lives in the Lib, outside Slicer: the site-model check (a real ``entropymerge models``
process) and what Apply waits for, and the panel's connection to its parameter node on Slicer 5.8 and 5.10+."""

from __future__ import annotations

import sys
import time

import pytest

from SlicerEntropyMergeLib.binding import GuiBinding
from SlicerEntropyMergeLib.engine import models_process
from SlicerEntropyMergeLib.modelcheck import ModelCheck, apply_blocker
from SlicerEntropyMergeLib.process import EngineProcess

YES, NO = (lambda: True), (lambda: False)


def wait_for_outcome(check: ModelCheck, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        outcome = check.poll()
        if outcome is not None:
            return outcome
        time.sleep(0.05)
    raise AssertionError("the model check did not end")


def blocker(check, paths, method="adaptive", single_model="", roi_size="", has_volume=True, rank=False):
    return apply_blocker(check, has_volume, paths, method, method, rank, single_model, roi_size)


def test_a_folder_is_checked_once_and_expanded_to_its_models(model_factory, tmp_path):
    folder = tmp_path / "models"
    paths = [str(model_factory("north", seed=1)), str(model_factory("south", seed=2))]
    started = []

    def start(listed):
        started.append(listed)
        return models_process(listed)

    check = ModelCheck(start)
    assert check.update([str(folder)], can_run=YES) and check.running
    assert blocker(check, [str(folder), "x"]) == "Checking the site models..."
    outcome = wait_for_outcome(check)
    assert outcome.error is None and not outcome.apply
    assert [entry["name"] for entry in outcome.report.models] == ["north", "south"]
    assert sorted(check.checked_paths) == sorted(paths)
    assert not check.update(check.checked_paths, can_run=YES), "the expanded list is what was checked"
    assert started == [[str(folder)]]
    assert blocker(check, check.checked_paths) is None
    assert blocker(check, check.checked_paths, method="single", single_model="east") == "Choose the site model that the single method runs."
    assert blocker(check, check.checked_paths, method="single", single_model="south") is None


def test_incompatible_models_block_apply_with_the_engine_reason(model_factory):
    check = ModelCheck()
    paths = [str(model_factory("a", seed=1)), str(model_factory("b", seed=2, classes=4))]
    check.update(paths, can_run=YES)
    outcome = wait_for_outcome(check)
    assert outcome.report is not None and not outcome.report.compatible
    assert blocker(check, paths).startswith("Site model b cannot be used: cannot be used with 'a'")


def test_apply_before_a_check_checks_then_says_apply(model_factory):
    paths = [str(model_factory("a", seed=1)), str(model_factory("b", seed=2))]
    check = ModelCheck()
    check.update(paths, can_run=NO)  # packages missing when the list was made: no check, no report
    assert not check.update(paths, can_run=lambda: pytest.fail("not asked again for the same list"))
    assert not check.running and check.report is None
    check.request_apply(paths, can_run=YES)
    assert check.running and check.apply_when_done
    outcome = wait_for_outcome(check)
    assert outcome.apply and outcome.report.compatible
    assert not check.apply_when_done


def test_a_missing_model_blocks_apply_with_the_engine_reason(tmp_path):
    check = ModelCheck()
    missing = str(tmp_path / "nowhere.json")
    check.request_apply([missing, missing], can_run=YES)
    outcome = wait_for_outcome(check)
    assert outcome.apply, "the Widget presses Apply only if nothing blocks it"
    assert blocker(check, [missing, missing]) == f"Site model nowhere cannot be used: model not found: {missing}"


def test_a_failing_check_reports_the_message_and_does_not_apply():
    # e.g. the engine's packages vanished: the check process dies before it prints a report
    check = ModelCheck(lambda paths: EngineProcess([sys.executable, "-c", "import sys; sys.exit('no module named torch')"]))
    check.request_apply(["a", "b"], can_run=YES)
    outcome = wait_for_outcome(check)
    assert (outcome.report, outcome.error, outcome.apply) == (None, "no module named torch", False)
    assert not check.update(["a", "b"], can_run=YES), "the same list is not checked again until it changes"
    assert blocker(check, ["a", "b"]) is None, "Apply stays possible: it checks again"


def test_a_changed_list_cancels_the_check_under_way(model_factory):
    first = [str(model_factory("a", seed=1))]
    check = ModelCheck()
    check.update(first, can_run=YES)
    running = check.process
    second = first + [str(model_factory("b", seed=2))]
    assert check.update(second, can_run=YES)
    assert running.state == "cancelled" and check.process is not running
    assert [entry["name"] for entry in wait_for_outcome(check).report.models] == ["a", "b"]
    check.reset()
    assert check.report is None and check.checked_paths is None and not check.running


def test_apply_blocker_reasons_before_the_check():
    check = ModelCheck()
    assert blocker(check, ["a", "b"], has_volume=False) == "Select a target volume."
    assert blocker(check, []) == "adaptive needs at least 1 site model(s); 0 listed."
    assert blocker(check, ["a"]) is None  # one model: every method is that model
    assert blocker(check, ["a"], rank=True) == "adaptive needs at least 2 site model(s); 1 listed."
    assert blocker(check, ["a"], method="single") is None
    assert blocker(check, ["a"], method="single", rank=True) == "single needs at least 2 site model(s); 1 listed."
    assert blocker(check, ["a", "b"], roi_size="96 96") == "The ROI size needs three positive whole numbers (X Y Z), not '96 96'."


class ParameterNodeStandIn:
    """A ``parameterNodeWrapper`` object: ``connectGui`` returns no tag on Slicer 5.8, a tag from 5.10 on."""

    def __init__(self, mrml_node, release="5.8"):
        self.parameterNode = mrml_node
        self.release = release
        self.connected: list = []
        self.disconnected: list = []

    def connectGui(self, gui):
        self.connected.append(gui)
        return None if self.release == "5.8" else len(self.connected)

    def disconnectGui(self, tag):
        self.disconnected.append(tag)


def test_reentering_the_module_connects_the_panel_once_on_58_and_510():
    for release in ("5.8", "5.10"):
        mrml_node = object()
        binding = GuiBinding("panel")
        first = ParameterNodeStandIn(mrml_node, release)
        assert binding.bind(first) is first
        for _ in range(3):  # enter(), exit(), enter() ...: getParameterNode() gives a new wrapper of the same node each time
            again = ParameterNodeStandIn(mrml_node, release)
            assert binding.bind(again) is first
            assert again.connected == []
        assert first.connected == ["panel"] and first.disconnected == []


def test_a_new_parameter_node_is_connected_and_the_old_one_let_go_where_the_release_allows():
    binding = GuiBinding("panel")
    old = ParameterNodeStandIn(object(), "5.10")
    binding.bind(old)
    new = ParameterNodeStandIn(object(), "5.10")
    assert binding.bind(new) is new
    assert old.disconnected == [1] and new.connected == ["panel"]
    binding.unbind()
    assert new.disconnected == [1] and binding.node is None
    on_58 = ParameterNodeStandIn(object(), "5.8")
    binding.bind(on_58)
    binding.unbind()
    assert on_58.disconnected == [], "5.8 gave no tag: disconnectGui(None) would do nothing"
