"""`python -m services.monitor` / `liveloop-monitor`: the monitor service."""

from libs.common.server import run_service
from services.monitor.server import build_server
from services.monitor.settings import MonitorSettings


def main() -> None:
    run_service("monitor", MonitorSettings, build_server)


if __name__ == "__main__":
    main()
