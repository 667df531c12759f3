"""`python -m services.predictor` / `liveloop-predictor`: one predictor replica."""

from libs.common.server import run_service
from services.predictor.server import build_server
from services.predictor.settings import PredictorSettings


def main() -> None:
    run_service("predictor", PredictorSettings, build_server)


if __name__ == "__main__":
    main()
