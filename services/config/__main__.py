"""`python -m services.config` / `liveloop-config`: the config service."""

from libs.common.server import run_service
from services.config.server import build_server
from services.config.settings import ConfigSettings


def main() -> None:
    run_service("config", ConfigSettings, build_server)


if __name__ == "__main__":
    main()
