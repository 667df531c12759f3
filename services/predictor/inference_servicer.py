"""Open Inference Protocol (KServe v2 / Triton) on a predictor replica.

Every model version that an applied config revision binds is served here under its registry name
and its version number as a string; anything else is NOT_FOUND, which is what OIP clients expect
for a model the server does not hold. A model takes one FP32 input `features` of shape
[batch, inputs] (the encoded, unscaled vector its preprocessing.json describes) and returns one FP32
output `probability` of shape [batch, 1]; data comes as typed `contents` or `raw_input_contents`
(little-endian, row-major), and the answer is raw when the request was.
"""

from __future__ import annotations

import asyncio
import json
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np

from libs.common.errors import InvalidArgument, NotFound
from libs.policy.models import INPUT_NAME, OUTPUT_NAME, LoadedModel
from libs.protos.inference import grpc_predict_v2_pb2 as oip
from libs.protos.inference import grpc_predict_v2_pb2_grpc
from services.predictor.core.replica import ReplicaState

DATATYPE = "FP32"
PLATFORM = "pytorch_libtorch"  # Triton's name for TorchScript models
INLINE_INFERENCE_ROWS = 256  # larger batches run on a worker thread, off the event loop

try:
    SERVER_VERSION = version("liveloop")
except PackageNotFoundError:  # running from a source tree without install
    SERVER_VERSION = "0.0.0"


class InferenceServicer(grpc_predict_v2_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, replica: ReplicaState) -> None:
        self._replica = replica

    async def ServerLive(self, request: oip.ServerLiveRequest, context: Any) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(self, request: oip.ServerReadyRequest, context: Any) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=True)

    async def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: Any
    ) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(name="liveloop", version=SERVER_VERSION, extensions=[])

    def _loaded(self) -> dict[str, dict[int, LoadedModel]]:
        """Every model version the applied config binds, by name and version."""
        loaded: dict[str, dict[int, LoadedModel]] = {}
        config = self._replica.config
        if config is None:
            return loaded
        for deployment in config.deployments.values():
            for (name, number), model in deployment.prepared.models.items():
                loaded.setdefault(name, {})[number] = model
        return loaded

    def _model(self, name: str, requested_version: str, field: str) -> LoadedModel:
        versions = self._loaded().get(name)
        if not versions:
            raise NotFound(f"model '{name}' is not loaded on replica {self._replica.replica_id}", field=field)
        if not requested_version:
            return versions[max(versions)]
        model = versions.get(int(requested_version)) if requested_version.isdigit() else None
        if model is None:
            raise NotFound(
                f"model '{name}' version '{requested_version}' is not loaded on replica "
                f"{self._replica.replica_id} (loaded: {', '.join(map(str, sorted(versions)))})",
                field=field,
            )
        return model

    async def ModelReady(self, request: oip.ModelReadyRequest, context: Any) -> oip.ModelReadyResponse:
        self._model(request.name, request.version, "name")
        return oip.ModelReadyResponse(ready=True)

    async def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: Any
    ) -> oip.ModelMetadataResponse:
        model = self._model(request.name, request.version, "name")
        return oip.ModelMetadataResponse(
            name=model.name,
            versions=[str(number) for number in sorted(self._loaded()[model.name])],
            platform=PLATFORM,
            inputs=[
                oip.ModelMetadataResponse.TensorMetadata(
                    name=INPUT_NAME,
                    datatype=DATATYPE,
                    shape=[-1, model.width],
                    parameters=_input_description(model),
                )
            ],
            outputs=[
                oip.ModelMetadataResponse.TensorMetadata(name=OUTPUT_NAME, datatype=DATATYPE, shape=[-1, 1])
            ],
        )

    async def ModelInfer(self, request: oip.ModelInferRequest, context: Any) -> oip.ModelInferResponse:
        model = self._model(request.model_name, request.model_version, "model_name")
        matrix = _input_matrix(request, model.width)
        for index, output in enumerate(request.outputs):
            if output.name != OUTPUT_NAME:
                raise InvalidArgument(
                    f"'{output.name}' is not an output of '{model.name}' (it has '{OUTPUT_NAME}')",
                    field=f"outputs[{index}].name",
                )
        if matrix.shape[0] > INLINE_INFERENCE_ROWS:
            probabilities = await asyncio.to_thread(model.predict, matrix)
        else:
            probabilities = model.predict(matrix)
        probabilities = probabilities.astype("<f4", copy=False)
        tensor = oip.ModelInferResponse.InferOutputTensor(
            name=OUTPUT_NAME, datatype=DATATYPE, shape=[matrix.shape[0], 1]
        )
        response = oip.ModelInferResponse(
            model_name=model.name, model_version=str(model.version), id=request.id, outputs=[tensor]
        )
        if request.raw_input_contents:
            response.raw_output_contents.append(probabilities.tobytes())
        else:
            tensor = response.outputs[0]
            tensor.contents.fp32_contents.extend(probabilities.tolist())
        return response


def _input_matrix(request: oip.ModelInferRequest, width: int) -> np.ndarray:
    """The request's one FP32 input as a (batch, width) float32 matrix; INVALID_ARGUMENT otherwise."""
    if len(request.inputs) != 1:
        raise InvalidArgument(
            f"the model takes exactly one input ('{INPUT_NAME}'), got {len(request.inputs)}", field="inputs"
        )
    tensor = request.inputs[0]
    if tensor.datatype != DATATYPE:
        raise InvalidArgument(f"must be {DATATYPE}, got '{tensor.datatype}'", field="inputs[0].datatype")
    shape = list(tensor.shape)
    if len(shape) != 2 or shape[0] < 1 or shape[1] != width:
        raise InvalidArgument(
            f"must be [batch, {width}] with batch >= 1, got {shape}", field="inputs[0].shape"
        )
    count = shape[0] * shape[1]
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise InvalidArgument(
                f"holds {len(request.raw_input_contents)} tensors for 1 input", field="raw_input_contents"
            )
        raw = request.raw_input_contents[0]
        if len(raw) != count * 4:
            raise InvalidArgument(
                f"holds {len(raw)} bytes; shape {shape} of {DATATYPE} needs {count * 4}",
                field="raw_input_contents",
            )
        values = np.frombuffer(raw, dtype="<f4")
    else:
        typed = tensor.contents.fp32_contents
        if len(typed) != count:
            raise InvalidArgument(
                f"holds {len(typed)} values; shape {shape} needs {count}",
                field="inputs[0].contents.fp32_contents",
            )
        values = np.asarray(typed, dtype=np.float32)
    matrix = values.astype(np.float32).reshape(shape[0], shape[1])
    if not np.isfinite(matrix).all():
        raise InvalidArgument("holds NaN or infinite values", field="inputs[0]")
    return matrix


def _input_description(model: LoadedModel) -> dict[str, oip.InferParameter]:
    """What each column of the input tensor is: the artifact's encoding, so a client can build rows."""
    encoder = model.encoder
    encodings = [
        {"name": f.name, "encoding": f.encoding, "mean": f.mean, "categories": list(f.categories)}
        for f in encoder.features
    ]
    return {
        "columns": oip.InferParameter(string_param=json.dumps(encoder.inputs)),
        "encodings": oip.InferParameter(string_param=json.dumps(encodings)),
        "offer_feature": oip.InferParameter(string_param=encoder.offer_feature),
    }
