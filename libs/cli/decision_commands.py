"""`liveloop invoke` and `liveloop respond`: the ecosystem.Ai /invocations and /response from the
command line, through the front door with the invoke key."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import grpc
import typer
from google.protobuf.json_format import MessageToDict
from rich.markup import escape
from rich.table import Table

from libs.cli.output import JsonFlag, StateDir, TargetOption, console, fail, front_door, front_door_tls
from libs.common.client import open_blocking_channel
from libs.protos.liveloop.predictor.v1 import predictor_pb2, predictor_pb2_grpc


def _stub(
    state_dir: Path | None, target: str | None
) -> tuple[str, predictor_pb2_grpc.PredictorServiceStub, grpc.Channel]:
    resolved, api_key = front_door(state_dir, target)
    channel = open_blocking_channel(
        resolved, api_key=api_key, deadline_seconds=10, tls=front_door_tls(state_dir)
    )
    return resolved, predictor_pb2_grpc.PredictorServiceStub(channel), channel


def invoke(
    campaign: Annotated[str, typer.Argument(help="Campaign (selects the deployment)")],
    customer: Annotated[str, typer.Argument(help="Customer id")],
    number_of_offers: Annotated[
        int, typer.Option("--offers", "-n", min=0, help="How many offers (0: default)")
    ] = 0,
    channel_name: Annotated[str, typer.Option("--channel", help="Channel, e.g. app")] = "",
    params: Annotated[
        str, typer.Option("--params", help='Extra context as JSON, e.g. \'{"gender": "f"}\'')
    ] = "",
    state_dir: StateDir = None,
    target: TargetOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Rank offers for a customer (PredictorService.Invoke, the ecosystem.Ai /invocations)."""
    request = predictor_pb2.InvokeRequest(campaign=campaign, customer=customer, channel=channel_name)
    if number_of_offers:
        request.numberoffers.number_value = number_of_offers
    if params:
        request.params.string_value = params
    resolved, stub, channel = _stub(state_dir, target)
    with channel:
        try:
            reply = stub.Invoke(request)
        except grpc.RpcError as exc:
            fail(f"Invoke via {resolved} failed: {exc.code().name}: {exc.details()}")
    if as_json:
        sys.stdout.write(json.dumps(MessageToDict(reply, preserving_proto_field_name=True), indent=2) + "\n")
        return
    table = Table(
        title=f"{reply.deployment} r{reply.config_revision} for {customer} (segment {reply.segment}, "
        f"{'explore' if reply.explore else 'exploit'}, replica {reply.replica_id})"
    )
    for column in ("rank", "offer", "name", "score", "arm reward", "evidence", "propensity"):
        table.add_column(column)
    for row in reply.final_result:
        result = row.result
        table.add_row(
            str(result.rank),
            result.offer,
            result.offer_name,
            f"{result.score:.4f}",
            f"{result.arm_reward:.4f}",
            f"{result.arm_count:.1f}",
            f"{result.propensity:.3f}",
        )
    console.print(table)
    console.print(f"uuid {reply.uuid}")
    for warning in reply.warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")


def respond(
    uuid: Annotated[str, typer.Argument(help="uuid of the Invoke being answered")],
    accepted: Annotated[
        list[str] | None, typer.Argument(help="Offers taken (ids or names); none = no uptake")
    ] = None,
    reward: Annotated[
        float | None, typer.Option("--reward", help="Reward of the response (default 1 per offer)")
    ] = None,
    state_dir: StateDir = None,
    target: TargetOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Record what the customer took (PredictorService.Respond, the ecosystem.Ai /response)."""
    request = predictor_pb2.RespondRequest(uuid=uuid, accepted_offers=accepted or [])
    if reward is not None:
        request.reward = reward
    resolved, stub, channel = _stub(state_dir, target)
    with channel:
        try:
            reply = stub.Respond(request)
        except grpc.RpcError as exc:
            fail(f"Respond via {resolved} failed: {exc.code().name}: {exc.details()}")
    if as_json:
        sys.stdout.write(json.dumps(MessageToDict(reply, preserving_proto_field_name=True), indent=2) + "\n")
        return
    console.print(f"{reply.deployment}: {escape(reply.message)}")
