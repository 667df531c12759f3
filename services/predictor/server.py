"""Builds a predictor replica's server: PredictorService and the Open Inference Protocol.

The replica reports NOT_SERVING until it has a config, from the config service's Watch stream or
from its persisted last-known-good copy.
"""

from __future__ import annotations

import asyncio
import contextlib

from grpc import aio

from libs.common.auth import Role
from libs.common.config_follower import AppliedConfig, ConfigFollower
from libs.common.deployment_spec import DeploymentSpec
from libs.common.errors import FailedPrecondition
from libs.common.redis_connection import open_redis
from libs.common.server import RunningServer, ServiceDefinition, start_server
from libs.policy.deployment import PreparedDeployment
from libs.policy.model_repository import ModelRepository
from libs.policy.models import unsupplied_inputs
from libs.policy.plugins import plugin_versions
from libs.protos.inference import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc
from libs.protos.liveloop.predictor.v1 import predictor_pb2, predictor_pb2_grpc
from libs.stack.topology import PREDICTOR
from services.predictor.core.decision import DecisionEngine
from services.predictor.core.options_store import OptionsStore
from services.predictor.core.replica import ReplicaState
from services.predictor.inference_servicer import SERVER_VERSION, InferenceServicer
from services.predictor.servicer import PredictorServicer
from services.predictor.settings import PredictorSettings

PREDICTOR_SERVICE = "/liveloop.predictor.v1.PredictorService/"
REDIS_MAX_CONNECTIONS = 100
REDIS_CONNECTION_WAIT_SECONDS = 5.0
UPDATE_FEED_STOP_SECONDS = 2.0  # a stopping replica waits this long for its update feed to end
INFERENCE_SERVICE = "/inference.GRPCInferenceService/"

# Everything an application calls needs only the `invoke` role; nothing here changes config.
METHOD_ROLES = {
    **{
        PREDICTOR_SERVICE + method: Role.INVOKE
        for method in (
            "Ping",
            "Invoke",
            "Respond",
            "Refresh",
            "EcosystemInvoke",
            "EcosystemRespond",
            "Health",
        )
    },
    **{
        INFERENCE_SERVICE + method: Role.INVOKE
        for method in (
            "ServerLive",
            "ServerReady",
            "ModelReady",
            "ServerMetadata",
            "ModelMetadata",
            "ModelInfer",
        )
    },
}


async def build_server(settings: PredictorSettings) -> RunningServer:
    replica = ReplicaState(replica_id=settings.replica_id)
    models = ModelRepository(settings.model_dir)
    serving = asyncio.Event()
    running: RunningServer | None = None

    async def prepare(spec: DeploymentSpec) -> PreparedDeployment:
        # Verify, load and warm up every bound model version off the event loop; a failure here
        # NACKs the revision and the models of the current one keep serving. So does a model whose
        # inputs the deployment cannot supply (it would be scored with training means).
        loaded = await asyncio.to_thread(models.load_bindings, spec)
        if loaded:
            view = spec.feature_lookup.feature_view if spec.feature_lookup is not None else None
            columns = await options.feature_view_columns(view) if view is not None else None
            for model in loaded.values():
                missing = unsupplied_inputs(model, spec, columns)
                if missing:
                    where = (
                        f"; feature view '{view}' holds {', '.join(columns) or 'nothing'}"
                        if columns is not None
                        else f"; feature view '{view}' was never materialized"
                        if view is not None
                        else ""
                    )
                    raise FailedPrecondition(
                        f"model {model.name}:{model.version} reads {', '.join(missing)}, which this "
                        f"deployment cannot supply (declare a context variable, a feature_lookup default, "
                        f"or materialize a view that holds it{where})",
                        field="model",
                    )
        # Off the event loop too: binding a user plugin looks through the installed packages.
        return await asyncio.to_thread(PreparedDeployment.prepare, spec, loaded)

    async def on_change(applied: AppliedConfig[PreparedDeployment]) -> None:
        replica.config = applied
        if running is not None and not serving.is_set():
            serving.set()
            await running.set_serving(True)

    follower = ConfigFollower[PreparedDeployment](
        target=settings.config_target,
        api_key=settings.config_api_key,
        tls=settings.outgoing_tls(),
        replica_id=settings.replica_id,
        state_dir=settings.state_dir,
        service=PREDICTOR.name,
        version=SERVER_VERSION,
        deployments=tuple(settings.deployments),
        prepare=prepare,
        still_current=lambda prepared: prepared.plugins.is_current(),
        plugins=plugin_versions,
        on_change=on_change,
    )
    # When every connection is busy (a Redis stall with many requests in flight), a request waits
    # for one instead of failing at once with MaxConnectionsError.
    redis = open_redis(
        settings.redis_url,
        socket_timeout=5,
        max_connections=REDIS_MAX_CONNECTIONS,
        wait_for_connection_seconds=REDIS_CONNECTION_WAIT_SECONDS,
    )
    options = OptionsStore(redis, statistics_max_age=settings.statistics_max_age_ms / 1000)
    engine = DecisionEngine(options, settings.replica_id, answers_in_redis=not settings.deployments)
    update_feed: asyncio.Task[None] | None = None

    async def stop_update_feed() -> None:
        if update_feed is not None:
            update_feed.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(update_feed, UPDATE_FEED_STOP_SECONDS)

    predictor = PredictorServicer(replica, follower, engine)
    inference = InferenceServicer(replica)

    def register(server: aio.Server) -> None:
        predictor_pb2_grpc.add_PredictorServiceServicer_to_server(predictor, server)
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(inference, server)

    definition = ServiceDefinition(
        name=PREDICTOR.name,
        service_names=PREDICTOR.grpc_services,
        register=register,
        method_roles=METHOD_ROLES,
        descriptors=(predictor_pb2.DESCRIPTOR, grpc_predict_v2_pb2.DESCRIPTOR),
        serving_at_start=False,
        on_stop=[follower.stop, stop_update_feed, redis.aclose, engine.drain_shadows],  # drained first
    )
    running = await start_server(definition, settings)
    update_feed = asyncio.create_task(options.follow_updates(), name="arm-update-feed")
    await follower.start()
    if replica.config is not None:  # the last-known-good copy was applied before the server existed
        serving.set()
        await running.set_serving(True)
    return running
