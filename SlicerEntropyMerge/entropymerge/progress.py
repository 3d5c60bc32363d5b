"""Progress of a run, reported as a terminal bar, as JSON lines (for the Slicer module), or not at all.

A run declares its stages with relative weights up front, so the overall fraction moves steadily
from 0 to 1 whatever the stages cost. JSON lines go to stdout, one object each:
``{"type": "progress", "stage", "fraction", "message"}``, ``{"type": "log", "level", "message"}``,
and at the end ``{"type": "done", "outputs": {...}}`` or ``{"type": "error", "message", "exit_code"}``.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Sequence, TextIO

from .validation import one_line


class Progress:
    """Reporter that prints only notes (to stderr); the base of the others. ``cancel()`` makes the next update raise ``Cancelled``."""

    def __init__(self):
        self.stages: dict[str, tuple[float, float]] = {}
        self.stage_name = ""
        self.fraction = 0.0
        self.notes: list[str] = []
        self._cancelled = threading.Event()

    def plan(self, stages: Sequence[tuple[str, float]]) -> None:
        """Declare the stages in order with their relative cost.

        Args:
            stages: (name, weight) pairs in running order; each stage gets weight / total of the bar
                (none of it when the weights sum to 0).
        """
        total = sum(weight for _, weight in stages) or 1.0
        start = 0.0
        self.stages = {}
        for name, weight in stages:
            self.stages[name] = (start, weight / total)
            start += weight / total

    def stage(self, name: str, message: str = "") -> None:
        """Enter stage ``name`` (declared with ``plan``) and report it at 0 % of the stage, with ``message`` or the name."""
        self.stage_name = name
        self.update(0.0, message or name)

    def update(self, stage_fraction: float, message: str = "") -> None:
        """Report progress within the current stage.

        Args:
            stage_fraction: fraction of the current stage done, clamped to [0, 1]; the overall
                fraction never moves backwards.
            message: what is being done now, one line.

        Raises:
            Cancelled: ``cancel()`` was called (from any thread).
        """
        self.check_cancelled()
        start, width = self.stages.get(self.stage_name, (self.fraction, 0.0))
        self.fraction = min(1.0, max(self.fraction, start + width * min(max(stage_fraction, 0.0), 1.0)))
        self._emit_progress(message)

    def note(self, message: str, level: str = "warning") -> None:
        """Something the user should know (a fallback taken, a value clamped), as one printable line."""
        message = one_line(message)
        self.notes.append(message)
        self._emit_log(level, message)

    def done(self, outputs: dict) -> None:
        """Report the end of the run with its output files (key -> path)."""
        self.fraction = 1.0
        self._emit_done(outputs)

    def error(self, message: str, exit_code: int) -> None:
        """Report that the run failed with ``message`` and will exit with ``exit_code`` (an ``ExitCode``)."""

    def cancel(self) -> None:
        """Ask the run to stop: the next ``update`` or ``check_cancelled`` raises ``Cancelled``. Thread-safe."""
        self._cancelled.set()

    def check_cancelled(self) -> None:
        """Raise ``Cancelled`` when ``cancel()`` was called."""
        if self._cancelled.is_set():
            from .errors import Cancelled

            raise Cancelled("cancelled by the user")

    def _emit_progress(self, message: str) -> None:
        pass

    def _emit_log(self, level: str, message: str) -> None:
        print(f"{level}: {message}", file=sys.stderr)

    def _emit_done(self, outputs: dict) -> None:
        pass


class JsonLinesProgress(Progress):
    """One JSON object per line on ``stream`` (stdout): the protocol the Slicer module reads."""

    def __init__(self, stream: TextIO | None = None):
        super().__init__()
        self.stream = stream or sys.stdout

    def _write(self, record: dict) -> None:
        self.stream.write(json.dumps(record) + "\n")
        self.stream.flush()

    def _emit_progress(self, message: str) -> None:
        self._write({"type": "progress", "stage": self.stage_name, "fraction": round(self.fraction, 4), "message": message})

    def _emit_log(self, level: str, message: str) -> None:
        self._write({"type": "log", "level": level, "message": message})

    def _emit_done(self, outputs: dict) -> None:
        self._write({"type": "done", "fraction": 1.0, "outputs": outputs})

    def error(self, message: str, exit_code: int) -> None:
        self._write({"type": "error", "message": message, "exit_code": exit_code})


class BarProgress(Progress):
    """A tqdm bar on stderr, with notes printed above it."""

    def __init__(self):
        super().__init__()
        from tqdm import tqdm

        self._bar = tqdm(total=1000, file=sys.stderr, bar_format="{desc:<40.40} {percentage:3.0f}%|{bar}| {elapsed}", leave=False)

    def _emit_progress(self, message: str) -> None:
        self._bar.set_description_str(message or self.stage_name, refresh=False)
        self._bar.n = int(self.fraction * 1000)
        self._bar.refresh()

    def _emit_log(self, level: str, message: str) -> None:
        self._bar.write(f"{level}: {message}", file=sys.stderr)

    def _emit_done(self, outputs: dict) -> None:
        self._bar.close()

    def error(self, message: str, exit_code: int) -> None:
        self._bar.close()


def make_progress(kind: str) -> Progress:
    """The reporter for a ``--progress`` choice.

    Args:
        kind: ``"auto"`` (a bar when stderr is a terminal, else notes only), ``"bar"``, ``"json"``
            (JSON lines on stdout) or ``"none"`` (notes only, on stderr).

    Returns:
        A ``BarProgress``, ``JsonLinesProgress`` or plain ``Progress``.
    """
    if kind == "json":
        return JsonLinesProgress()
    if kind == "bar" or (kind == "auto" and sys.stderr.isatty()):
        return BarProgress()
    return Progress()
