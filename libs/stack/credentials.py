"""API keys of the local stack: created on first start, hashed for the servers, readable by the CLI.

`<state_dir>/api-keys.json` holds only hashes (what the services load); `<state_dir>/credentials.json`
(mode 0600) holds the plaintext keys for the CLI and the services on this machine, like a kubeconfig:
`admin`, `invoke` (what an application would get) and `service` (what liveloop's services present to
the config service), and `redis`, the password of the stack's own Redis.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from libs.common.auth import ApiKeyStore, Role, generate_api_key
from libs.stack.processes import write_private

KEY_FILE = "api-keys.json"
CREDENTIALS_FILE = "credentials.json"
LOCAL_KEYS = {Role.ADMIN: "local-admin", Role.INVOKE: "local-invoke", Role.SERVICE: "local-service"}
REDIS_PASSWORD = "redis"


@dataclass(frozen=True)
class Credentials:
    key_file: Path
    admin_key: str
    invoke_key: str
    service_key: str
    redis_password: str


def ensure_credentials(state_dir: Path) -> Credentials:
    """The local stack's keys; one missing from an older state directory is created and added."""
    key_file = state_dir / KEY_FILE
    plaintext = _read_plaintext(state_dir) if key_file.exists() else {}
    store = ApiKeyStore.load(key_file) if plaintext else ApiKeyStore([])
    found = dict(plaintext)
    for role in LOCAL_KEYS:
        if role.value not in plaintext:
            plaintext[role.value], record = generate_api_key(role, LOCAL_KEYS[role])
            store.add(record)
    # Hex: nothing to escape in a URL or a config file.
    plaintext.setdefault(REDIS_PASSWORD, secrets.token_hex(24))
    if plaintext != found:
        state_dir.mkdir(parents=True, exist_ok=True)
        store.save(key_file)
        write_private(state_dir / CREDENTIALS_FILE, json.dumps(plaintext, indent=2))
    return _credentials(state_dir, plaintext)


def load_credentials(state_dir: Path) -> Credentials | None:
    """The keys the CLI uses; a state directory from before the `service` role has none of its own
    until the stack starts again."""
    plaintext = _read_plaintext(state_dir)
    if Role.ADMIN.value not in plaintext or Role.INVOKE.value not in plaintext:
        return None
    return _credentials(state_dir, plaintext)


def _read_plaintext(state_dir: Path) -> dict[str, str]:
    credentials_file = state_dir / CREDENTIALS_FILE
    if not credentials_file.exists():
        return {}
    return {str(role): str(key) for role, key in json.loads(credentials_file.read_text()).items()}


def _credentials(state_dir: Path, plaintext: dict[str, str]) -> Credentials:
    return Credentials(
        state_dir / KEY_FILE,
        admin_key=plaintext[Role.ADMIN.value],
        invoke_key=plaintext[Role.INVOKE.value],
        service_key=plaintext.get(Role.SERVICE.value, ""),
        redis_password=plaintext.get(REDIS_PASSWORD, ""),
    )
