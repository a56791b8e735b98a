"""The one way an error reaches a client: raise :class:`ApiError`; the app answers ``{"detail": reason}``.

Reasons are short and name no server path: :func:`sanitise` turns absolute paths into their base names and
caps the length, :func:`short` bounds any echoed client input, and :func:`validation_text` summarises pydantic
errors in one line.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

MAX_DETAIL = 300
MAX_ECHO = 64
MAX_PROBLEMS = 5
_ABS_PATH = re.compile(r"(?<![\w.~:/-])/(?:[^\s/'\"`,;()\[\]{}<>]+/)+([^\s/'\"`,;()\[\]{}<>]*)")
_SPACE = re.compile(r"\s+")


class ApiError(Exception):
    """A client-facing error: an HTTP status and a short reason that names no server path."""

    def __init__(self, status_code: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.headers = headers


def short(value: str, limit: int = MAX_ECHO) -> str:
    """``value`` cut to ``limit`` characters (with an ellipsis), non-printable characters replaced by '?'."""
    cut = value[:limit]
    printable = "".join(c if c.isprintable() else "?" for c in cut)
    return printable + ("…" if len(value) > limit else "")


def sanitise(text: str, limit: int = MAX_DETAIL) -> str:
    """One line of at most ``limit`` characters in which every absolute path is reduced to its base name."""
    flat = _SPACE.sub(" ", _ABS_PATH.sub(lambda m: m.group(1) or "…", text)).strip()
    return short(flat, limit)


def validation_text(errors: Iterable[Mapping[str, Any]], hints: Mapping[str, str] | None = None) -> str:
    """One short line from pydantic errors: a few problems, unknown fields grouped, the rest counted."""
    hints = hints or {}
    unknown: list[str] = []
    problems: list[str] = []
    for err in errors:
        loc = ".".join(short(str(p), 40) for p in err.get("loc", ()) if p not in ("body", "query", "path"))
        if err.get("type") == "extra_forbidden":
            unknown.append(loc)
            continue
        msg = err.get("msg", "invalid")
        if err.get("type") == "string_pattern_mismatch":
            msg = hints.get(loc, msg)
        problems.append(f"{loc}: {msg}" if loc else str(msg))
    if unknown:
        more = f" and {len(unknown) - MAX_PROBLEMS} more" if len(unknown) > MAX_PROBLEMS else ""
        label = "unknown field" if len(unknown) == 1 else "unknown fields"
        problems.insert(0, f"{label}: {', '.join(unknown[:MAX_PROBLEMS])}{more}")
    shown = problems[:MAX_PROBLEMS]
    if len(problems) > MAX_PROBLEMS:
        shown.append(f"and {len(problems) - MAX_PROBLEMS} more problems")
    return "; ".join(shown) or "invalid request"
