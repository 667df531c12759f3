"""API keys with roles.

A key looks like `ll_<key_id>_<secret>`. Only its SHA-256 is stored (keys are 256-bit random, so a
slow hash adds nothing); the key id lets the server find the record without scanning.
Roles, each allowed only its own methods (`admin` is allowed everything):
- `invoke`, the key handed to applications: decisions (Invoke, Respond, Ping, Refresh) and inference;
- `service`, the key of liveloop's own services: reading config (Watch, Get, List) and reporting a
  replica's state, so an application's key can neither read every spec nor forge a replica's state;
- `admin`: everything, including state changes.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from libs.common.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated

logger = logging.getLogger(__name__)

KEY_PREFIX = "ll"

# Who is calling, for audit trails: set by the auth interceptor around each RPC.
CALLER: ContextVar[str] = ContextVar("liveloop_caller", default="anonymous")


class Role(enum.StrEnum):
    INVOKE = "invoke"
    SERVICE = "service"
    ADMIN = "admin"

    def allows(self, required: Role) -> bool:
        return self is Role.ADMIN or self is required


@dataclass(frozen=True)
class ApiKeyRecord:
    key_id: str
    role: Role
    sha256: str
    name: str
    created_at: str


def _digest(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def generate_api_key(role: Role, name: str) -> tuple[str, ApiKeyRecord]:
    """Return the plaintext key (shown once) and the record to store."""
    key_id = secrets.token_hex(6)
    api_key = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
    record = ApiKeyRecord(
        key_id=key_id,
        role=role,
        sha256=_digest(api_key),
        name=name,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    return api_key, record


class ApiKeyStore:
    """Hashed keys, looked up by key id."""

    def __init__(self, records: list[ApiKeyRecord]) -> None:
        self._by_id = {record.key_id: record for record in records}
        # Keys whose digest matched, so a key is hashed once, not on every call (a revoked or
        # replaced record no longer matches the one found by id).
        self._verified: dict[str, ApiKeyRecord] = {}

    @property
    def records(self) -> list[ApiKeyRecord]:
        return list(self._by_id.values())

    @classmethod
    def load(cls, path: Path) -> ApiKeyStore:
        try:
            document = json.loads(path.read_text())
            records = [
                ApiKeyRecord(
                    key_id=str(item["key_id"]),
                    role=Role(item["role"]),
                    sha256=str(item["sha256"]),
                    name=str(item.get("name", "")),
                    created_at=str(item.get("created_at", "")),
                )
                for item in document["keys"]
            ]
        except FileNotFoundError:
            raise InvalidArgument(f"API key file {path} does not exist", field="api_keys_file") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidArgument(f"API key file {path} is malformed: {exc}", field="api_keys_file") from None
        return cls(records)

    def save(self, path: Path) -> None:
        document = {
            "keys": [
                {
                    "key_id": r.key_id,
                    "role": r.role.value,
                    "sha256": r.sha256,
                    "name": r.name,
                    "created_at": r.created_at,
                }
                for r in self._by_id.values()
            ]
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(document, indent=2) + "\n")
        os.chmod(temporary, 0o600)
        temporary.replace(path)

    def add(self, record: ApiKeyRecord) -> None:
        self._by_id[record.key_id] = record

    def authenticate(self, api_key: str | None) -> ApiKeyRecord:
        """Return the key's record; raise Unauthenticated for a missing or wrong key."""
        if not api_key:
            raise Unauthenticated("missing API key: send metadata 'x-api-key' or 'authorization: Bearer ...'")
        parts = api_key.split("_", 2)
        if len(parts) != 3 or parts[0] != KEY_PREFIX:
            raise Unauthenticated("malformed API key")
        record = self._by_id.get(parts[1])
        if record is None:
            raise Unauthenticated("unknown API key")
        if self._verified.get(api_key) is record:
            return record
        if not hmac.compare_digest(record.sha256, _digest(api_key)):
            raise Unauthenticated("unknown API key")
        self._verified[api_key] = record  # at most one entry per key of the store
        return record

    def authorize(self, api_key: str | None, required: Role, method: str) -> ApiKeyRecord:
        record = self.authenticate(api_key)
        if not record.role.allows(required):
            raise PermissionDenied(
                f"{method} needs role '{required.value}' (or 'admin'), the key has '{record.role.value}'"
                if required is not Role.ADMIN
                else f"{method} needs role 'admin', the key has '{record.role.value}'"
            )
        return record

    def remove(self, key_id: str) -> ApiKeyRecord:
        """Revoke a key by id; NotFound when the store has none."""
        record = self._by_id.pop(key_id, None)
        if record is None:
            raise NotFound(f"no key '{key_id}' in this file", field="key_id")
        return record


class KeyFile:
    """The keys of a key file, read again when the file changes (its size and modification time,
    checked at most every `check_seconds`), so a key created or revoked with `liveloop keys` takes
    effect without a restart. A file that became unreadable keeps the last keys read (logged once)."""

    def __init__(
        self, path: Path, check_seconds: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.path = path
        self._check_seconds = check_seconds
        self._clock = clock
        self._signature = self._stat()
        self._store = ApiKeyStore.load(path)
        self._checked_at = clock()
        self._failed = False

    def _stat(self) -> tuple[int, int] | None:
        try:
            status = self.path.stat()
        except OSError:
            return None
        return status.st_mtime_ns, status.st_size

    @property
    def store(self) -> ApiKeyStore:
        now = self._clock()
        if now - self._checked_at >= self._check_seconds:
            self._checked_at = now
            signature = self._stat()
            if signature != self._signature:
                try:
                    self._store = ApiKeyStore.load(self.path)
                    self._signature, self._failed = signature, False
                    logger.info("API key file %s changed: %d keys", self.path, len(self._store.records))
                except InvalidArgument as exc:
                    if not self._failed:
                        logger.error("%s; the keys read before stay in force", exc.message)
                    self._failed = True
        return self._store

    def authorize(self, api_key: str | None, required: Role, method: str) -> ApiKeyRecord:
        return self.store.authorize(api_key, required, method)
