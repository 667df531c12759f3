import json
from pathlib import Path

import pytest

from libs.common.auth import ApiKeyStore, KeyFile, Role, generate_api_key
from libs.common.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from libs.stack.credentials import CREDENTIALS_FILE, ensure_credentials, load_credentials


def test_key_round_trip_through_file_keeps_only_hashes(tmp_path: Path) -> None:
    admin_key, admin = generate_api_key(Role.ADMIN, "ops")
    invoke_key, invoke = generate_api_key(Role.INVOKE, "app")
    path = tmp_path / "keys.json"
    ApiKeyStore([admin, invoke]).save(path)

    text = path.read_text()
    assert admin_key not in text
    assert invoke_key not in text
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    store = ApiKeyStore.load(path)
    assert store.authenticate(admin_key).role is Role.ADMIN
    assert store.authenticate(invoke_key).role is Role.INVOKE


def test_roles_admin_allows_everything_invoke_only_invoke() -> None:
    admin_key, admin = generate_api_key(Role.ADMIN, "ops")
    invoke_key, invoke = generate_api_key(Role.INVOKE, "app")
    store = ApiKeyStore([admin, invoke])
    assert store.authorize(admin_key, Role.INVOKE, "/x/Invoke").name == "ops"
    with pytest.raises(PermissionDenied, match="needs role 'admin'"):
        store.authorize(invoke_key, Role.ADMIN, "/x/Publish")


@pytest.mark.parametrize("bad", [None, "", "not-a-key", "ll_abc_def", "ll_x"])
def test_missing_or_wrong_keys_are_unauthenticated(bad: str | None) -> None:
    _key, record = generate_api_key(Role.ADMIN, "ops")
    with pytest.raises(Unauthenticated):
        ApiKeyStore([record]).authenticate(bad)


def test_tampered_key_with_valid_id_is_refused() -> None:
    key, record = generate_api_key(Role.ADMIN, "ops")
    tampered = key[:-1] + ("A" if key[-1] != "A" else "B")
    with pytest.raises(Unauthenticated, match="unknown"):
        ApiKeyStore([record]).authenticate(tampered)


def test_a_key_verified_once_stays_the_only_one_accepted_and_a_removed_key_is_refused() -> None:
    key, record = generate_api_key(Role.ADMIN, "ops")
    store = ApiKeyStore([record])
    assert store.authenticate(key) is record
    assert store.authenticate(key) is record  # from the verified keys, not hashed again
    tampered = key[:-1] + ("A" if key[-1] != "A" else "B")
    with pytest.raises(Unauthenticated, match="unknown"):
        store.authenticate(tampered)
    store.remove(record.key_id)
    with pytest.raises(Unauthenticated, match="unknown"):
        store.authenticate(key)


def test_malformed_key_file_names_the_setting(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text("{not json")
    with pytest.raises(InvalidArgument, match="api_keys_file"):
        ApiKeyStore.load(path)
    with pytest.raises(InvalidArgument, match="does not exist"):
        ApiKeyStore.load(tmp_path / "missing.json")


def test_a_key_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    """Keys created and revoked take effect without a restart; a broken file keeps the last keys."""
    path = tmp_path / "keys.json"
    first_key, first = generate_api_key(Role.INVOKE, "first")
    ApiKeyStore([first]).save(path)
    now = [0.0]
    keys = KeyFile(path, check_seconds=1.0, clock=lambda: now[0])
    assert keys.authorize(first_key, Role.INVOKE, "m").key_id == first.key_id

    second_key, second = generate_api_key(Role.ADMIN, "second")
    store = ApiKeyStore.load(path)
    store.add(second)
    store.save(path)
    with pytest.raises(Unauthenticated):  # not looked at again within the check interval
        keys.authorize(second_key, Role.ADMIN, "m")
    now[0] = 1.5
    assert keys.authorize(second_key, Role.ADMIN, "m").key_id == second.key_id

    store.remove(first.key_id)
    store.save(path)
    now[0] = 3.0
    with pytest.raises(Unauthenticated):
        keys.authorize(first_key, Role.INVOKE, "m")
    with pytest.raises(NotFound):
        store.remove(first.key_id)

    path.write_text("{not json")
    now[0] = 4.5
    assert keys.authorize(second_key, Role.ADMIN, "m").key_id == second.key_id  # the last good keys


def test_the_local_stack_has_one_key_per_role_and_an_older_state_dir_gains_the_service_key(
    tmp_path: Path,
) -> None:
    credentials = ensure_credentials(tmp_path)
    store = ApiKeyStore.load(credentials.key_file)
    roles = {
        store.authenticate(key).role
        for key in (credentials.admin_key, credentials.invoke_key, credentials.service_key)
    }
    assert roles == {Role.ADMIN, Role.INVOKE, Role.SERVICE}
    assert ensure_credentials(tmp_path) == credentials  # kept across starts
    # A state directory from before the service role: its admin and invoke keys stay valid.
    plaintext = json.loads((tmp_path / CREDENTIALS_FILE).read_text())
    del plaintext["service"]
    (tmp_path / CREDENTIALS_FILE).write_text(json.dumps(plaintext))
    older = load_credentials(tmp_path)
    assert older is not None
    assert (older.service_key, older.admin_key) == ("", credentials.admin_key)
    upgraded = ensure_credentials(tmp_path)
    assert (upgraded.admin_key, upgraded.invoke_key) == (credentials.admin_key, credentials.invoke_key)
    store = ApiKeyStore.load(upgraded.key_file)
    assert store.authenticate(upgraded.service_key).role is Role.SERVICE
    assert store.authenticate(credentials.admin_key).role is Role.ADMIN
    assert (tmp_path / CREDENTIALS_FILE).stat().st_mode & 0o777 == 0o600
