import subprocess
import sys

import pytest

from libs.common.settings import LogFormat
from services.config.settings import ConfigSettings
from services.predictor.settings import PredictorSettings


def test_settings_read_their_own_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVELOOP_PREDICTOR_PORT", "51234")
    monkeypatch.setenv("LIVELOOP_PREDICTOR_LOG_FORMAT", "json")
    monkeypatch.setenv("LIVELOOP_CONFIG_PORT", "1")
    settings = PredictorSettings()
    assert settings.port == 51234
    assert settings.log_format is LogFormat.JSON
    assert ConfigSettings().port == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("LIVELOOP_CONFIG_PORT", "eighty", "LIVELOOP_CONFIG_PORT"),
        ("LIVELOOP_CONFIG_LOG_FORMAT", "xml", "LIVELOOP_CONFIG_LOG_FORMAT"),
        ("LIVELOOP_CONFIG_PORT", "70000", "LIVELOOP_CONFIG_PORT"),
    ],
)
def test_malformed_setting_exits_at_start_naming_it(variable: str, value: str, named: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.config"],
        env={"PATH": "/usr/bin:/bin", variable: value},
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert result.returncode == 2
    assert named in result.stderr


def test_a_stack_setting_that_is_not_json_is_named_not_a_traceback() -> None:
    from typer.testing import CliRunner

    from libs.cli.main import app

    result = CliRunner().invoke(app, ["status"], env={"LIVELOOP_STACK_PREDICTOR_PORTS": "[50061, 50062"})
    assert result.exit_code == 2
    assert "LIVELOOP_STACK_PREDICTOR_PORTS: not valid JSON" in result.output
