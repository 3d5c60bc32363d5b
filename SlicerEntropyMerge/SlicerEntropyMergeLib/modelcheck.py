"""The check of the listed site models (``entropymerge models --json`` in the background) and what Apply waits for.

The Widget owns one ``ModelCheck``: it calls ``update`` when the list changes, ``poll`` from its
timer, ``request_apply`` when Apply is pressed before a check, and maps the state to widgets.
``apply_blocker`` says why Apply cannot run now. Nothing here needs Qt, so it is tested outside Slicer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import tr as _
from .engine import ModelReport, models_needed, models_process, parse_roi_size
from .process import SUCCEEDED, EngineProcess


@dataclass
class CheckOutcome:
    """A check that has just ended: its report, or the error that stopped it; ``apply`` when Apply waited for it."""

    report: ModelReport | None
    error: str | None
    apply: bool


class ModelCheck:
    """The state of the site-model check: which paths were checked, the report, a check under way.

    ``start_process(paths)`` makes the (not yet started) check process; the default runs the engine.
    """

    def __init__(self, start_process: Callable[[list[str]], EngineProcess] = models_process):
        self.start_process = start_process
        self.process: EngineProcess | None = None
        self.lines: list[str] = []
        self.report: ModelReport | None = None
        self.checked_paths: list[str] | None = None
        self.apply_when_done = False

    @property
    def running(self) -> bool:
        return self.process is not None

    def update(self, paths: list[str], can_run: Callable[[], bool]) -> bool:
        """Check ``paths`` when they differ from the last ones checked; when ``can_run()`` says no (packages
        missing), only forget the old report. Returns True when the state changed."""
        paths = list(paths)
        if paths == self.checked_paths:
            return False  # asked on every parameter change: can_run (a package look-up) is not called then
        self.cancel()
        self.checked_paths = paths
        if can_run():  # with no models listed, the check only detects the device
            self.lines = []
            self.process = self.start_process(paths)
            self.process.start()
        return True

    def request_apply(self, paths: list[str], can_run: Callable[[], bool]) -> None:
        """Apply was pressed before a report exists: check again now, and say ``apply`` when it ends."""
        self.checked_paths = None
        self.update(paths, can_run)
        self.apply_when_done = self.running

    def poll(self) -> CheckOutcome | None:
        """Read what the check printed; returns the outcome once, when it ends (else ``None``)."""
        if self.process is None:
            return None
        self.lines += [event.message for event in self.process.poll() if event.kind == "text"]
        if not self.process.finished:
            return None
        process, self.process = self.process, None
        apply, self.apply_when_done = self.apply_when_done, False
        # exit code 2 with a report on stdout: some models are unusable, and the report says which
        if process.state != SUCCEEDED and not (process.returncode == 2 and self.lines):
            return CheckOutcome(None, process.error, False)
        try:
            self.report = ModelReport.from_text(self.lines)
        except (ValueError, KeyError) as error:
            return CheckOutcome(None, _("the engine's model report could not be read: {error}").format(error=error), False)
        self.checked_paths = [entry["source"] for entry in self.report.models]  # folders expanded to their models
        return CheckOutcome(self.report, None, apply)

    def cancel(self) -> None:
        """Stop a check under way and forget the report (the list changed, the scene or the module closes)."""
        if self.process is not None:
            self.process.cancel()
        self.process, self.report, self.apply_when_done = None, None, False

    def reset(self) -> None:
        """Forget everything, so the next ``update`` checks whatever is listed."""
        self.cancel()
        self.checked_paths = None


def apply_blocker(check: ModelCheck, has_volume: bool, paths: list[str], method: str, method_label: str, rank: bool,
                  single_model: str, roi_size: str) -> str | None:
    """Why Apply cannot run now (one sentence for the button's tooltip), or ``None``."""
    if not has_volume:
        return _("Select a target volume.")
    needed = models_needed(rank)
    if len(paths) < needed:
        return _("{method} needs at least {needed} site model(s); {given} listed.").format(method=method_label, needed=needed, given=len(paths))
    if check.running:
        return _("Checking the site models...")
    if check.report is not None:
        offender = next((entry for entry in check.report.models if not entry["compatible"]), None)
        if offender:
            return _("Site model {name} cannot be used: {problem}").format(name=offender["name"], problem=offender["problem"])
        if method == "single" and single_model not in [entry["name"] for entry in check.report.models]:
            return _("Choose the site model that the single method runs.")
    try:
        parse_roi_size(roi_size)
    except ValueError as error:
        return str(error)
    return None
