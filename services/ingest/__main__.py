"""`python -m services.ingest` / `liveloop-ingest`: the ingest service."""

from libs.common.server import run_service
from services.ingest.server import build_server
from services.ingest.settings import IngestSettings


def main() -> None:
    run_service("ingest", IngestSettings, build_server)


if __name__ == "__main__":
    main()
