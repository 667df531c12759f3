"""`python -m services.trainer` / `liveloop-trainer`: the trainer service."""

from libs.common.server import run_service
from services.trainer.server import build_server
from services.trainer.settings import TrainerSettings


def main() -> None:
    run_service("trainer", TrainerSettings, build_server)


if __name__ == "__main__":
    main()
