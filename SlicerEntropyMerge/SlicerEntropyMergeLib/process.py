"""The engine as a background process: its JSON-lines progress, read without blocking, and a cancel
that kills the whole process tree.

The child starts in a process group (a session on POSIX) of its own, so cancelling kills it and
every process it started, grandchildren included. Two reader threads move stdout and stderr lines
into a queue; ``poll()`` (called from a GUI timer) only drains that queue, so it never blocks.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
from dataclasses import dataclass, field

from . import tr as _

RUNNING, SUCCEEDED, FAILED, CANCELLED = "running", "succeeded", "failed", "cancelled"


@dataclass
class EngineEvent:
    """One line from the engine.

    ``kind`` is a protocol type (``progress``, ``log``, ``done``, ``error``), ``text`` for any other
    stdout line, or ``stderr`` for a line on stderr (warnings, a traceback).
    """

    kind: str
    message: str = ""
    stage: str = ""
    fraction: float | None = None
    level: str = ""
    outputs: dict = field(default_factory=dict)
    exit_code: int | None = None


def parse_line(line: str, stream: str = "stdout") -> EngineEvent:
    """The event one output line stands for (see ``entropymerge.progress`` for the protocol)."""
    line = line.rstrip("\r\n")
    if stream == "stderr":
        return EngineEvent("stderr", message=line)
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    if not isinstance(record, dict) or record.get("type") not in ("progress", "log", "done", "error"):
        return EngineEvent("text", message=line)
    return EngineEvent(
        kind=record["type"],
        message=str(record.get("message", "")),
        stage=str(record.get("stage", "")),
        fraction=float(record["fraction"]) if record.get("fraction") is not None else None,
        level=str(record.get("level", "")),
        outputs=dict(record.get("outputs") or {}),
        exit_code=record.get("exit_code"),
    )


class EngineProcess:
    """One engine command running in the background.

    ``start()`` launches it; ``poll()`` returns the events that arrived since the last call and
    updates ``fraction``, ``message``, ``outputs`` and ``state`` (``running``, then ``succeeded``,
    ``failed`` with ``error`` set, or ``cancelled``); ``cancel()`` kills the process tree at once.
    """

    def __init__(self, arguments: list[str], environment: dict | None = None, cwd: str | None = None):
        self.arguments = [str(a) for a in arguments]
        self.environment = environment
        self.cwd = cwd
        self.state = RUNNING
        self.fraction = 0.0
        self.message = ""
        self.outputs: dict = {}
        self.error: str | None = None
        self.returncode: int | None = None
        self._error_event: str | None = None
        self._stderr_tail: list[str] = []
        self._process: subprocess.Popen | None = None
        self._lines: queue.Queue = queue.Queue()
        self._readers: list[threading.Thread] = []

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def finished(self) -> bool:
        return self.state != RUNNING

    def start(self) -> None:
        if os.name == "nt":
            isolation = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
        else:
            isolation = {"start_new_session": True}
        self._process = subprocess.Popen(
            self.arguments, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=self.environment, cwd=self.cwd, text=True, encoding="utf-8", errors="replace", bufsize=1, **isolation,
        )
        for stream, name in ((self._process.stdout, "stdout"), (self._process.stderr, "stderr")):
            reader = threading.Thread(target=self._read, args=(stream, name), daemon=True)
            reader.start()
            self._readers.append(reader)

    def _read(self, stream, name: str) -> None:
        for line in stream:
            self._lines.put((line, name))
        stream.close()

    def poll(self) -> list[EngineEvent]:
        """Events received since the last call; never waits for the process."""
        if self._process is None:
            return []
        # Whether the process is over is decided before draining, so no line can arrive unseen after it.
        done = self._process.poll() is not None and not any(reader.is_alive() for reader in self._readers)
        events = []
        while True:
            try:
                line, stream = self._lines.get_nowait()
            except queue.Empty:
                break
            event = parse_line(line, stream)
            self._record(event)
            events.append(event)
        if done and self.state == RUNNING:
            self._finish(self._process.returncode)
        return events

    def _record(self, event: EngineEvent) -> None:
        if event.fraction is not None:
            self.fraction = event.fraction
        if event.kind == "progress":
            self.message = event.message
        elif event.kind == "done":
            self.outputs = event.outputs
        elif event.kind == "error":
            self._error_event = event.message
        elif event.kind == "stderr" and event.message.strip():
            self._stderr_tail = (self._stderr_tail + [event.message.strip()])[-20:]

    def _finish(self, returncode: int) -> None:
        self.returncode = returncode
        if returncode == 0:
            self.state = SUCCEEDED
            return
        self.state = FAILED
        # The engine's own one-line message; else the last line it printed (e.g. a crash before the protocol started).
        last = self._stderr_tail[-1] if self._stderr_tail else None
        self.error = self._error_event or last or _("the engine stopped with exit code {code}").format(code=returncode)

    def cancel(self) -> None:
        """Kill the engine and every process it started, now; the state becomes ``cancelled``."""
        if self._process is None or self.finished:
            return
        self.state = CANCELLED
        # On POSIX the group goes even when its leader has exited already: what it started may live on.
        if os.name != "nt" or self._process.poll() is None:
            kill_process_tree(self._process.pid)
        self._process.wait()
        self.returncode = self._process.returncode

    def wait(self, timeout: float | None = None) -> list[EngineEvent]:
        """Block until the process ends (for scripts and tests; the GUI polls instead); returns its events."""
        self._process.wait(timeout)
        for reader in self._readers:
            reader.join(timeout)
        return self.poll()


def kill_process_tree(pid: int) -> None:
    """Kill the process group that ``pid`` leads (the child and its descendants)."""
    if os.name == "nt":
        # taskkill is a console program: without CREATE_NO_WINDOW it flashes a console window over Slicer.
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], capture_output=True, creationflags=subprocess.CREATE_NO_WINDOW)
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
