import json
import logging

from libs.common.structured_logging import JsonLineFormatter


def test_json_lines_carry_service_extra_fields_and_exceptions() -> None:
    formatter = JsonLineFormatter("predictor")
    record = logging.makeLogRecord(
        {"name": "x", "levelname": "INFO", "msg": "served %s", "args": ("a",), "deployment": "offers"}
    )
    line = json.loads(formatter.format(record))
    assert line["message"] == "served a"
    assert line["service"] == "predictor"
    assert line["deployment"] == "offers"
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.makeLogRecord({"msg": "failed", "exc_info": sys.exc_info()})
    assert "ValueError: boom" in json.loads(formatter.format(record))["exception"]
