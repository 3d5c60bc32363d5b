"""Checks of untrusted inputs that several loaders share: file kinds, folders, network use, messages.

Site model files and user folders come from elsewhere. These checks run before any heavy work and
turn every problem into a ``UserInputError`` with one readable line.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import sys
import threading
from pathlib import Path

from .errors import UserInputError

# Network constructor arguments that make a MONAI network download or read weights by itself
# (pretrained=True, pretrained_url=..., path_or_repo_id=..., weights=...).
FETCHING_ARGUMENT = re.compile(r"pretrain|url|repo|filename|^weights$|(^|_)(file|path)$")
NETWORK_AUDIT_EVENTS = frozenset({"socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "urllib.Request"})
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")

_guard = threading.local()
_hook_installed = False


def regular_file(path: Path, what: str) -> Path:
    """``path`` if it is a regular file (a symlink to one is fine); FIFOs and devices would hang or never end.

    Args:
        path: the file to check.
        what: how messages name it (e.g. ``"weights file"``).

    Returns:
        ``path`` unchanged.

    Raises:
        UserInputError: it does not exist, cannot be read, or is not a regular file.
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise UserInputError(f"{what} not found: {path}") from None
    except OSError as error:
        raise UserInputError(f"cannot read {what} {path}: {error.strerror or error}") from None
    if not stat.S_ISREG(mode):
        raise UserInputError(f"{what} {path} is not a regular file")
    return path


def inside_folder(path: Path, folder: Path, what: str) -> Path:
    """``path`` if it resolves (symlinks followed) inside ``folder``; a model may not reach files elsewhere.

    Args:
        path: the file a model names.
        folder: the model's own folder.
        what: how messages name the file.

    Returns:
        ``path`` unchanged.

    Raises:
        UserInputError: it resolves outside ``folder``.
    """
    resolved, root = path.resolve(), folder.resolve()
    if resolved != root and root not in resolved.parents:
        raise UserInputError(f"{what} {path} lies outside {folder}; a model's files must be inside its own folder")
    return path


def check_writable_folder(folder: Path, what: str) -> None:
    """Check that ``folder``, or the nearest existing folder above it (where it would be made), can be written.

    Args:
        folder: the folder to write into (it need not exist yet).
        what: how the message names it (e.g. ``"output folder"``).

    Raises:
        UserInputError: that folder lacks write or search permission.
    """
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserInputError(f"cannot write to {what} {folder}: {existing} is not writable")


def fetching_arguments(network_class, arguments: dict) -> dict:
    """The constructor arguments with which a network would fetch or read weights by itself.

    Args:
        network_class: the network class to be built.
        arguments: the keyword arguments the config gives it.

    Returns:
        name -> value of each given or default argument whose name matches ``FETCHING_ARGUMENT`` and
        whose value is set (not None, False, "" or 0); empty when the network fetches nothing.
    """
    import inspect

    try:
        parameters = inspect.signature(network_class.__init__).parameters
    except (TypeError, ValueError):
        parameters = {}
    effective = {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}
    effective.update(arguments)
    return {name: value for name, value in effective.items() if FETCHING_ARGUMENT.search(name) and value not in (None, False, "", 0)}


@contextlib.contextmanager
def no_network(what: str):
    """Within this block any socket connection or URL request of this thread raises ``UserInputError``.

    A second line of defence behind the refusal of fetching arguments: loading a site model must
    never reach the network, whatever library code it ends up in. Blocks nest; other threads are
    not affected.

    Args:
        what: how the message names the culprit (e.g. ``"site model path/to/card.json"``).
    """
    global _hook_installed
    if not _hook_installed:
        sys.addaudithook(_refuse_network)
        _hook_installed = True
    previous = getattr(_guard, "what", None)
    _guard.what = what
    try:
        yield
    finally:
        _guard.what = previous


def _refuse_network(event: str, arguments) -> None:
    what = getattr(_guard, "what", None)
    if what is not None and event in NETWORK_AUDIT_EVENTS:
        raise UserInputError(f"{what} tried to reach the network ({event}); site models are loaded offline")


def physical_memory_bytes() -> float:
    """This computer's physical memory in bytes (64 GiB where the system does not say)."""
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return 64.0 * 2**30


def one_line(message: str, limit: int = 2000) -> str:
    """``message`` as one printable line: line breaks become spaces, other control characters are escaped.

    Args:
        message: any object; its ``str`` is used.
        limit: the most characters returned; longer text is cut and ends with ``...``.

    Returns:
        The line, stripped.
    """
    text = re.sub(r"\s*\n\s*", " ", str(message).strip())
    text = CONTROL_CHARACTERS.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


MAX_CONFIG_BYTES = 16 * 1024 * 1024
MAX_CONFIG_DEPTH = 100


def read_config(path: Path, what: str):
    """Parse a JSON (or, for ``.yaml``/``.yml``, YAML with the safe loader) file of a site model, UTF-8.

    Args:
        path: the config file.
        what: how messages name it (e.g. ``"model card"``).

    Returns:
        The parsed data (any JSON-like value).

    Raises:
        UserInputError: not a regular file, over ``MAX_CONFIG_BYTES`` bytes, nesting deeper than
            ``MAX_CONFIG_DEPTH`` levels, not UTF-8, or not valid JSON/YAML.
    """
    import json

    import yaml

    regular_file(path, what)
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise UserInputError(f"{what} {path} is {path.stat().st_size:,} bytes; a config over {MAX_CONFIG_BYTES:,} bytes is refused")
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text) if path.suffix.lower() in (".yaml", ".yml") else json.loads(text)
    except RecursionError:
        raise UserInputError(f"{what} {path} is nested too deeply (over {MAX_CONFIG_DEPTH} levels)") from None
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as error:
        raise UserInputError(f"{what} {path} is not valid {'YAML' if path.suffix.lower() != '.json' else 'JSON'}: {one_line(error)}") from None
    if nesting_depth(data) > MAX_CONFIG_DEPTH:
        raise UserInputError(f"{what} {path} is nested too deeply (over {MAX_CONFIG_DEPTH} levels)")
    return data


def nesting_depth(data) -> int:
    """How deeply lists and mappings nest in ``data`` (a scalar: 0), without recursion."""
    deepest, pending = 0, [(data, 1)]
    while pending:
        value, depth = pending.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            pending.extend((child, depth + 1) for child in children)
    return deepest
