"""API keys of the local stack: created on first start, hashed for the servers, readable by the CLI.

`<state_dir>/api-keys.json` holds only hashes (what the services load); `<state_dir>/credentials.json`
(mode 0600) holds the plaintext admin and invoke keys for the CLI on this machine, like a kubeconfig.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from libs.common.auth import ApiKeyStore, Role, generate_api_key

KEY_FILE = "api-keys.json"
CREDENTIALS_FILE = "credentials.json"


@dataclass(frozen=True)
class Credentials:
    key_file: Path
    admin_key: str
    invoke_key: str


def ensure_credentials(state_dir: Path) -> Credentials:
    key_file = state_dir / KEY_FILE
    credentials_file = state_dir / CREDENTIALS_FILE
    existing = load_credentials(state_dir)
    if existing is not None and key_file.exists():
        return existing
    admin_key, admin_record = generate_api_key(Role.ADMIN, "local-admin")
    invoke_key, invoke_record = generate_api_key(Role.INVOKE, "local-invoke")
    ApiKeyStore([admin_record, invoke_record]).save(key_file)
    state_dir.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(credentials_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump({"admin": admin_key, "invoke": invoke_key}, handle, indent=2)
    return Credentials(key_file, admin_key, invoke_key)


def load_credentials(state_dir: Path) -> Credentials | None:
    credentials_file = state_dir / CREDENTIALS_FILE
    if not credentials_file.exists():
        return None
    document = json.loads(credentials_file.read_text())
    return Credentials(state_dir / KEY_FILE, str(document["admin"]), str(document["invoke"]))
