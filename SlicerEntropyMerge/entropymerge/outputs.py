"""An output folder that receives a run's files all at once, or not at all.

Files are written into a hidden staging folder inside the output folder and moved into place
when the run completes; ``summary.json`` is moved last, so its presence marks a complete run. A
failed or cancelled run leaves no partial files behind and never touches existing inputs.

One run at a time: the folder is locked (``.entropymerge-lock``, an OS file lock that dies with
its process) from the start of a run to its commit. Whoever takes the lock removes the staging
folders of killed runs, which nobody else can be writing.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import socket
import tempfile
import uuid
from pathlib import Path

import numpy as np

from .errors import UserInputError
from .summary import SUMMARY_NAME
from .validation import check_writable_folder
from .volume import Geometry, write_volume

VOLUME_FORMATS = ("nii.gz", "nrrd", "mha")
LOCK_NAME = ".entropymerge-lock"
STAGING_PREFIX = ".entropymerge-partial-"


def safe_file_stem(name: str) -> str:
    """A file-name-safe version of a model or label name: runs of characters other than letters, digits,
    ``.``, ``_`` and ``-`` become ``_`` (trimmed at the ends); ``"unnamed"`` when nothing is left."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "unnamed"


class OutputFolder:
    """The output folder of one run: locked for the run, staged, and committed all at once.

    Args:
        folder: the output folder (made if needed, and removed again on abort if the run made it).
        overwrite: replace the results of an earlier run (``summary.json``) and files of the same names.
        protected: the run's input files and folders; no output may replace one or lie inside one.
        volume_format: the suffix of volume outputs, one of ``VOLUME_FORMATS``.

    Raises:
        UserInputError: an unknown format, a file where the folder should be, a folder that cannot
            be written, another run holding the folder, or earlier results without ``overwrite``.
    """

    def __init__(self, folder: str | os.PathLike, overwrite: bool = False, protected: tuple[Path, ...] = (), volume_format: str = "nii.gz"):
        self.folder = Path(folder)
        if volume_format not in VOLUME_FORMATS:
            raise UserInputError(f"unknown output format {volume_format!r}; choose one of {', '.join(VOLUME_FORMATS)}")
        self.volume_format = volume_format
        self.overwrite = overwrite
        self.protected = {p.resolve() for p in protected}
        if self.folder.exists() and not self.folder.is_dir():
            raise UserInputError(f"output path {self.folder} is a file, not a folder")
        check_writable_folder(self.folder, "output folder")
        self._staging: Path | None = None
        self.files: dict[str, str] = {}
        self._lock = FolderLock(self.folder)
        try:
            if (self.folder / SUMMARY_NAME).exists() and not overwrite:
                raise UserInputError(
                    f"output folder {self.folder} already holds the results of a run; choose another --out or add --overwrite"
                )
            self._check_final(SUMMARY_NAME)
        except BaseException:
            self._lock.release()
            raise

    @property
    def staging(self) -> Path:
        """The hidden folder that collects this run's files; made at the first write."""
        if self._staging is None:
            try:
                self._staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.folder))
            except OSError as error:
                raise UserInputError(f"cannot write to output folder {self.folder}: {error.strerror or error}") from None
        return self._staging

    def expect(self, *file_names: str) -> None:
        """Check up front, before any heavy work, that these outputs may be written.

        Raises:
            UserInputError: one would replace an input, or a file this run did not write (without ``overwrite``).
        """
        for file_name in file_names:
            self._check_final(file_name)

    def _check_final(self, file_name: str) -> None:
        final = self.folder / file_name
        resolved = final.resolve()
        if any(resolved == p or p in resolved.parents for p in self.protected):
            raise UserInputError(f"output {final} would overwrite an input file; choose another --out")
        if final.exists() and not self.overwrite and file_name not in self.files.values():
            raise UserInputError(f"output {final} exists and was not written by entropymerge; move it away or add --overwrite")

    def _target(self, file_name: str) -> Path:
        self._check_final(file_name)
        return self.staging / file_name

    def _unique(self, file_name: str) -> str:
        """``file_name``, or ``stem-2.suffix``, ... when an output of this run already has that name (in any letter case)."""
        taken = {name.lower() for name in self.files.values()}
        stem, dot, suffix = file_name.partition(".")
        candidate, number = file_name, 1
        while candidate.lower() in taken:
            number += 1
            candidate = f"{stem}-{number}{dot}{suffix}"
        return candidate

    def volume(self, key: str, stem: str, array: np.ndarray, geometry: Geometry) -> None:
        """Stage a volume as ``<stem>.<volume_format>`` (``<stem>-2...`` when the name is taken), verified by reading it back.

        Args:
            key: the output's key in ``files`` and the summary (e.g. ``"segmentation"``).
            stem: the file name without suffix.
            array: (I, J, K) voxels on ``geometry``.
            geometry: the input volume's grid.

        Raises:
            UserInputError: the file may not be written, or writing failed (e.g. a full disk).
        """
        file_name = self._unique(f"{stem}.{self.volume_format}")
        path = self._target(file_name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_volume(array, geometry, path, verify=True)
        except OSError as error:
            raise UserInputError(f"cannot write {self.folder / file_name}: {error.strerror or error}") from None
        self.files[key] = file_name

    def text(self, key: str, file_name: str, text: str) -> None:
        """Stage ``text`` as ``file_name`` (UTF-8) under ``key``; ``UserInputError`` when it may not or cannot be written."""
        path = self._target(file_name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        except OSError as error:
            raise UserInputError(f"cannot write {self.folder / file_name}: {error.strerror or error}") from None
        self.files[key] = file_name

    def json(self, key: str, file_name: str, data) -> None:
        """Stage ``data`` as indented JSON (numpy values and paths converted) under ``key``."""
        self.text(key, file_name, json.dumps(data, indent=2, default=_json_default) + "\n")

    def commit(self, summary: dict, release: bool = True) -> dict[str, str]:
        """Move every staged file into the output folder, then write the summary; returns key -> path.

        ``release=False`` keeps the folder locked (for files made from the committed ones); call ``release()``.

        Args:
            summary: the run summary; ``outputs`` (key -> file name) is added to it.
            release: release the folder's lock afterwards.

        Returns:
            Output key -> absolute path, ``summary`` included.

        Raises:
            UserInputError: the files cannot be moved into place.
        """
        summary = dict(summary, outputs=dict(self.files, summary=SUMMARY_NAME))
        self._check_final(SUMMARY_NAME)
        try:
            (self.staging / SUMMARY_NAME).write_text(json.dumps(summary, indent=2, default=_json_default) + "\n", encoding="utf-8")
            (self.folder / SUMMARY_NAME).unlink(missing_ok=True)  # the folder is incomplete until the new one lands
            for file_name in [*self.files.values(), SUMMARY_NAME]:
                final = self.folder / file_name
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.staging / file_name, final)
        except OSError as error:
            raise UserInputError(f"cannot write to output folder {self.folder}: {error.strerror or error}") from None
        shutil.rmtree(self.staging, ignore_errors=True)
        if release:
            self.release()
        return {key: str(self.folder / name) for key, name in summary["outputs"].items()}

    def abort(self) -> None:
        """Remove the staged files and release the folder: nothing of this run is left."""
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
        self.release()

    def release(self) -> None:
        """Release the folder's lock (idempotent)."""
        self._lock.release()


class FolderLock:
    """An exclusive lock on ``folder`` (made if needed) held by this process until ``release()``.

    The lock is the OS's (``flock``; ``msvcrt.locking`` on Windows) on ``folder/.entropymerge-lock``,
    so the lock of a killed process is free at once and the next run takes it over. Taking it
    removes staging folders of killed runs. A held lock raises ``UserInputError`` naming its process.
    Releasing it removes ``folder`` again when the lock made it and it is still empty.
    """

    def __init__(self, folder: Path):
        self.path = folder / LOCK_NAME
        self._descriptor: int | None = None
        self._made_folder = not folder.exists()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._acquire()
        except OSError as error:
            raise UserInputError(f"cannot write to output folder {folder}: {error.strerror or error}") from None
        remove_stale_staging(folder)

    def _acquire(self) -> None:
        while True:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(descriptor):
                try:
                    holder = os.read(descriptor, 200).decode("utf-8", "replace").strip() or "unknown process"
                except OSError:  # Windows: the holder's locked bytes cannot be read
                    holder = "another process"
                os.close(descriptor)
                raise UserInputError(f"another entropymerge run ({holder}) is writing to {self.path.parent}; "
                                     "wait for it to finish or choose another --out")
            try:
                same_file = os.path.samestat(os.fstat(descriptor), os.stat(self.path))
            except FileNotFoundError:
                same_file = False
            if same_file:  # else the holder removed the file as we opened it: lock the new one
                break
            os.close(descriptor)
        os.ftruncate(descriptor, 0)
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.write(descriptor, f"pid {os.getpid()} on {socket.gethostname()}, started {started}".encode())
        self._descriptor = descriptor

    def release(self) -> None:
        """Unlock and remove the lock file; idempotent, and safe when interrupted by a signal."""
        # Forget the descriptor first: a signal (Ctrl-C) raised in here leads to a second call.
        descriptor, self._descriptor = self._descriptor, None
        if descriptor is None:
            return
        try:
            with contextlib.suppress(OSError):  # Windows keeps an open file: it stays, unlocked
                self.path.unlink(missing_ok=True)  # removed while still locked, so nobody locks a file about to vanish
        finally:
            os.close(descriptor)  # closing frees the OS lock
        if self._made_folder:
            with contextlib.suppress(OSError):  # not empty: it holds results
                self.path.parent.rmdir()


def _try_lock(descriptor: int) -> bool:
    """Lock the open file without waiting; False when another process holds it."""
    try:
        if os.name == "nt":
            import msvcrt

            msvcrt.locking(descriptor, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def remove_stale_staging(folder: Path) -> None:
    """Remove the staging folders in ``folder`` that killed runs left (call with the folder's lock held)."""
    for leftover in folder.glob(f"{STAGING_PREFIX}*"):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)


def clean_after_killed_runs(folder: Path) -> None:
    """Remove what killed runs left in ``folder`` unless a live run holds it (a batch's resumed cases)."""
    if not folder.is_dir():
        return
    with contextlib.suppress(UserInputError):
        FolderLock(folder).release()


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_text_atomically(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` under a temporary name, then move it into place (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")  # plain open(): the user's umask applies
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path
