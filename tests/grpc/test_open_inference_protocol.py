"""The predictor's Open Inference Protocol, spoken by the standard client (tritonclient.grpc).

tritonclient is synchronous and the predictor runs on this test's event loop, so every client
call goes to a worker thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from importlib.metadata import version
from typing import Any, TypeVar

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from libs.common.server import RunningServer
from tests.conftest import ApiKeys
from tests.grpc.conftest import PREDICTOR_REPLICA_ID, target

pytestmark = pytest.mark.timeout(30)

CLIENT_TIMEOUT_S = 10
T = TypeVar("T")


@pytest.fixture
async def client(predictor_server: RunningServer) -> AsyncIterator[triton.InferenceServerClient]:
    inference = triton.InferenceServerClient(url=target(predictor_server))
    try:
        yield inference
    finally:
        inference.close()


async def _in_thread(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await asyncio.to_thread(call, *args, client_timeout=CLIENT_TIMEOUT_S, **kwargs)


async def _failure(call: Callable[..., Any], *args: Any, **kwargs: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as raised:
        await _in_thread(call, *args, **kwargs)
    return raised.value


def _invoke(api_keys: ApiKeys) -> dict[str, str]:
    return {"x-api-key": api_keys.invoke}


def _float_input(name: str = "INPUT0") -> triton.InferInput:
    tensor = triton.InferInput(name, [1, 3], "FP32")
    tensor.set_data_from_numpy(np.array([[0.1, 0.2, 0.3]], dtype=np.float32))
    return tensor


async def test_server_is_live_and_ready(client: triton.InferenceServerClient, api_keys: ApiKeys) -> None:
    assert await _in_thread(client.is_server_live, headers=_invoke(api_keys)) is True
    assert await _in_thread(client.is_server_ready, headers=_invoke(api_keys)) is True


async def test_server_metadata_names_liveloop_and_its_version(
    client: triton.InferenceServerClient, api_keys: ApiKeys
) -> None:
    metadata = await _in_thread(client.get_server_metadata, headers=_invoke(api_keys))
    assert metadata.name == "liveloop"
    assert metadata.version == version("liveloop")
    assert list(metadata.extensions) == []
    as_json = await _in_thread(client.get_server_metadata, headers=_invoke(api_keys), as_json=True)
    assert as_json["name"] == "liveloop"


async def test_an_unknown_model_is_not_found_when_asked_if_ready(
    client: triton.InferenceServerClient, api_keys: ApiKeys
) -> None:
    # tritonclient turns the NOT_FOUND status into an exception; it does not return False.
    error = await _failure(client.is_model_ready, "nope", headers=_invoke(api_keys))
    assert error.status() == "StatusCode.NOT_FOUND"
    assert error.message() == f"name: model 'nope' is not loaded on replica {PREDICTOR_REPLICA_ID}"


async def test_an_unknown_model_has_no_metadata(
    client: triton.InferenceServerClient, api_keys: ApiKeys
) -> None:
    error = await _failure(client.get_model_metadata, "nope", headers=_invoke(api_keys))
    assert error.status() == "StatusCode.NOT_FOUND"
    assert "'nope'" in (error.message() or "")


async def test_infer_on_an_unknown_model_is_not_found_naming_the_model(
    client: triton.InferenceServerClient, api_keys: ApiKeys
) -> None:
    error = await _failure(client.infer, "offer-ranker", [_float_input()], headers=_invoke(api_keys))
    assert error.status() == "StatusCode.NOT_FOUND"
    assert error.message() == (
        f"model_name: model 'offer-ranker' is not loaded on replica {PREDICTOR_REPLICA_ID}"
    )


async def test_a_bearer_header_is_accepted(client: triton.InferenceServerClient, api_keys: ApiKeys) -> None:
    headers = {"authorization": f"Bearer {api_keys.invoke}"}
    assert await _in_thread(client.is_server_live, headers=headers) is True


@pytest.mark.parametrize(
    "call",
    [
        lambda c, h: c.is_server_live(headers=h, client_timeout=CLIENT_TIMEOUT_S),
        lambda c, h: c.get_server_metadata(headers=h, client_timeout=CLIENT_TIMEOUT_S),
        lambda c, h: c.is_model_ready("nope", headers=h, client_timeout=CLIENT_TIMEOUT_S),
        lambda c, h: c.infer("nope", [_float_input()], headers=h, client_timeout=CLIENT_TIMEOUT_S),
    ],
    ids=["ServerLive", "ServerMetadata", "ModelReady", "ModelInfer"],
)
@pytest.mark.parametrize(
    "headers", [None, {"x-api-key": "ll_000000000000_wrong"}], ids=["no-key", "wrong-key"]
)
async def test_without_a_valid_key_every_call_is_unauthenticated(
    call: Callable[[triton.InferenceServerClient, dict[str, str] | None], Any],
    headers: dict[str, str] | None,
    client: triton.InferenceServerClient,
) -> None:
    with pytest.raises(InferenceServerException) as raised:
        await asyncio.to_thread(call, client, headers)
    assert raised.value.status() == "StatusCode.UNAUTHENTICATED"


async def test_triton_only_extensions_are_unimplemented(
    client: triton.InferenceServerClient, api_keys: ApiKeys
) -> None:
    # The model repository API is Triton's, not part of the Open Inference Protocol.
    error = await _failure(client.get_model_repository_index, headers=_invoke(api_keys))
    assert error.status() == "StatusCode.UNIMPLEMENTED"
    error = await _failure(client.get_inference_statistics, headers=_invoke(api_keys))
    assert error.status() == "StatusCode.UNIMPLEMENTED"
