"""`liveloop keys` and `liveloop tls create` on files, as an operator preparing compose or a cluster."""

from __future__ import annotations

import json
from pathlib import Path

from cryptography import x509
from typer.testing import CliRunner

from libs.cli.main import app
from libs.common.auth import ApiKeyStore, Role
from libs.stack.certificates import CertificateFiles


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_a_deploy_key_file_is_created_listed_and_revoked_by_path(tmp_path: Path) -> None:
    keys = tmp_path / "secrets" / "api-keys.json"
    code, output = _run(
        "keys", "create", "--out", str(keys), "--role", "service", "--name", "replicas", "--json"
    )
    assert code == 0, output
    created = json.loads(output)
    assert ApiKeyStore.load(keys).authenticate(created["api_key"]).role is Role.SERVICE
    code, output = _run("keys", "list", "--file", str(keys), "--json")
    assert code == 0, output
    assert [row["name"] for row in json.loads(output)] == ["replicas"]
    code, _ = _run("keys", "revoke", created["key_id"], "--file", str(keys))
    assert code == 0
    assert ApiKeyStore.load(keys).records == []


def test_a_bad_output_path_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for args, message in (
        (("tls", "create", "--out", str(a_file)), "is a file, not a directory"),
        (("tls", "create", "--out", str(a_file / "sub")), "cannot write certificates"),
        (("keys", "create", "--out", str(a_file / "keys.json")), "cannot write the key file"),
    ):
        result = CliRunner().invoke(app, list(args))
        assert result.exit_code == 1, args
        assert message in result.output, (args, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit), args


def test_tls_create_writes_a_complete_private_set_once(tmp_path: Path) -> None:
    out = tmp_path / "tls"
    code, output = _run("tls", "create", "--out", str(out), "--host", "liveloop.example.com", "--json")
    assert code == 0, output
    files = CertificateFiles(out)
    assert files.complete()
    assert {path.stat().st_mode & 0o777 for path in out.iterdir()} == {0o600}
    certificate = x509.load_pem_x509_certificate(files.service_cert.read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "liveloop.example.com" in names.get_values_for_type(x509.DNSName)
    code, output = _run("tls", "create", "--out", str(out))
    assert code == 1
    assert "already holds certificates" in output
