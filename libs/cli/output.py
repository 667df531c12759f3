"""What every `liveloop` command shares: the consoles, the common options, errors and JSON output.

Tables and progress go to `console` (stdout) or `errors` (stderr); `--json` output is plain JSON on
stdout with nothing else there, so scripts can parse it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError
from pydantic_settings import SettingsError
from rich.console import Console
from rich.markup import escape

from libs.common.settings import ClientSettings
from libs.common.tls import ChannelTls
from libs.stack import launcher
from libs.stack.credentials import load_credentials

console = Console()
if not console.is_terminal:
    console = Console(width=160)  # piped into a log or a script: do not squeeze tables into 80 columns
errors = Console(stderr=True)

StateDir = Annotated[Path | None, typer.Option("--state-dir", help="Local stack state (default .liveloop)")]
TargetOption = Annotated[str | None, typer.Option("--target", help="host:port of the front door")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output")]
TimeoutOption = Annotated[
    float, typer.Option("--timeout", min=1, help="Seconds the whole operation may take (its deadline)")
]


def fail(message: str, code: int = 1) -> NoReturn:
    """Print `error: <message>` on stderr (as text, never markup) and exit with `code`."""
    errors.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


def emit_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2) + "\n")


def plain(message: Any) -> dict[str, Any]:
    """A message as JSON-ready Python: numbers stay numbers (protobuf's JSON writes int64 as text),
    optional fields appear only when set."""
    document: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.label == field.LABEL_REPEATED:
            document[field.name] = [plain(v) if hasattr(v, "DESCRIPTOR") else v for v in value]
        elif field.has_presence and not message.HasField(field.name):
            continue
        elif field.type == field.TYPE_MESSAGE:
            document[field.name] = plain(value)
        else:
            document[field.name] = value
    return document


def stack_settings(state_dir: Path | None) -> launcher.StackSettings:
    """The local stack's settings (LIVELOOP_STACK_*), with --state-dir applied; exit 2 on a bad one."""
    try:
        settings = launcher.StackSettings()
    except ValidationError as exc:
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            errors.print(f"[red]invalid setting LIVELOOP_STACK_{field.upper()}: {error['msg']}[/red]")
        raise typer.Exit(2) from None
    except SettingsError as exc:  # a list or other JSON setting that is not JSON
        field = str(exc).split('"')[1] if '"' in str(exc) else ""
        errors.print(
            f"[red]invalid setting LIVELOOP_STACK_{field.upper()}: not valid JSON "
            "(a list is written [50061, 50062])[/red]"
        )
        raise typer.Exit(2) from None
    if state_dir is not None:
        settings = settings.model_copy(update={"state_dir": state_dir})
    return settings


def front_door_tls(state_dir: Path | None) -> ChannelTls | None:
    """TLS to the front door: LIVELOOP_TLS_CA_FILE (and _CERT_FILE, _KEY_FILE), else the local
    stack's own certificates when it runs TLS, else none."""
    configured = ClientSettings().front_door_tls()
    if configured is not None:
        return configured
    record = launcher.StackRecord.load(stack_settings(state_dir).state_dir)
    return record.client_tls() if record is not None else None


def front_door(state_dir: Path | None, target: str | None, role: str = "invoke") -> tuple[str, str | None]:
    """Where to call and with which key: flags, then LIVELOOP_TARGET / LIVELOOP_API_KEY, then the
    local stack's own record and credentials."""
    client = ClientSettings()
    stack = stack_settings(state_dir)
    record = launcher.StackRecord.load(stack.state_dir)
    resolved_target = target or client.target
    if resolved_target is None:
        port = record.envoy_port if record is not None else stack.envoy_port
        resolved_target = f"{stack.host}:{port}"
    api_key = client.api_key
    if api_key is None:
        credentials = load_credentials(stack.state_dir)
        if credentials is not None:
            api_key = credentials.admin_key if role == "admin" else credentials.invoke_key
    return resolved_target, api_key
