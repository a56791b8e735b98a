"""The one way an error reaches a client: raise :class:`ApiError`; the app answers ``{"detail": reason}``."""

from __future__ import annotations


class ApiError(Exception):
    """A client-facing error: an HTTP status and a short reason that names no server path."""

    def __init__(self, status_code: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.headers = headers
