"""API-key authentication: keys are stored as sha256 hex digests, presented as Bearer tokens or X-API-Key."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from pathlib import Path

from service.config import Settings

_HEX = set("0123456789abcdef")


@dataclass(frozen=True)
class Client:
    """An authenticated caller."""

    id: str


def hash_token(token: str) -> str:
    """sha256 hex digest of a token (what the configuration stores)."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh random API token."""
    return "tts_" + secrets.token_urlsafe(32)


def _parse_pair(client_id: str, digest: str, origin: str) -> tuple[str, str]:
    client_id, digest = client_id.strip(), digest.strip().lower()
    if not client_id or len(digest) != 64 or not set(digest) <= _HEX:
        raise ValueError(f"{origin}: expected `client_id` and a 64-character sha256 hex digest")
    return digest, client_id


def load_keys(settings: Settings) -> dict[str, str]:
    """Map of sha256 digest -> client id from TTASEG_API_KEYS and TTASEG_API_KEYS_FILE."""
    keys: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in settings.api_keys.split(","))):
        client_id, _, digest = item.rpartition(":")
        key, value = _parse_pair(client_id, digest, "TTASEG_API_KEYS")
        keys[key] = value
    if settings.api_keys_file is not None:
        for n, line in enumerate(Path(settings.api_keys_file).read_text().splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.replace(":", " ").split()
            if len(parts) != 2:
                raise ValueError(f"{settings.api_keys_file}:{n}: expected `client_id sha256hex`")
            key, value = _parse_pair(parts[0], parts[1], f"{settings.api_keys_file}:{n}")
            keys[key] = value
    return keys


class KeyRing:
    """Looks presented tokens up among the configured digests in constant time per key."""

    def __init__(self, keys: dict[str, str]) -> None:
        self._keys = keys

    def __len__(self) -> int:
        return len(self._keys)

    def authenticate(self, token: str) -> Client | None:
        """The client owning ``token``, or None."""
        digest = hash_token(token)
        found = None
        for known, client_id in self._keys.items():
            if hmac.compare_digest(known, digest):
                found = Client(client_id)
        return found
