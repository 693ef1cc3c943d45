"""Reading the small JSON files of checkpoints and adapter folders, with one-line errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["read_json_object"]


def read_json_object(path: str | Path, *, missing: str | None = None, what: str = "", hint: str = "") -> dict[str, Any]:
    """The JSON object in ``path``; ``ValueError`` (one line, naming the file) when it is absent, unreadable, not
    valid JSON or not an object.

    ``missing`` replaces the message for an absent file (default ``"<folder>: no <name>"``); ``what`` names the
    file's role in the other messages (``"<path>: <what> is not valid JSON (...)"``); ``hint`` (what to do) is
    appended to every message after ``"; "``.
    """
    path = Path(path)
    tail = f"; {hint}" if hint else ""
    if not path.is_file():
        raise ValueError((missing or f"{path.parent}: no {path.name}") + tail)
    role = f"{what} is " if what else ""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: {role}not valid JSON ({detail}){tail}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: {role}not a JSON object{tail}")
    return data
