"""rlhf.runtime.reflection: server reflection under grpc.reflection.v1 as well as v1alpha."""

from __future__ import annotations

import asyncio

from google.protobuf import descriptor_pb2

from rlhf.runtime import grpc_client
from rlhf_client import channel as sdk_channel
from rlhf.runtime.reflection import SERVICE_NAME, Request, Response
from tests.runtime.echo_service import POLICY_SERVICE, REWARD_SERVICE
from tests.runtime.test_server import running


def test_reflection_v1_lists_the_services_and_gives_their_files():
    async def main():
        async with running() as srv:
            await grpc_client.wait_ready(srv.target, timeout=10)
            async with sdk_channel.channel(srv.target) as ch:
                call = ch.stream_stream(f"/{SERVICE_NAME}/ServerReflectionInfo",
                                        request_serializer=Request.SerializeToString,
                                        response_deserializer=Response.FromString)
                asks = [Request(list_services=""), Request(file_containing_symbol=POLICY_SERVICE)]
                return [r async for r in call(iter(asks))]

    listed, files = asyncio.run(main())
    names = {s.name for s in listed.list_services_response.service}
    assert {REWARD_SERVICE, POLICY_SERVICE, SERVICE_NAME, "grpc.reflection.v1alpha.ServerReflection"} <= names
    fd = descriptor_pb2.FileDescriptorProto.FromString(files.file_descriptor_response.file_descriptor_proto[0])
    assert fd.package == "rlhf.policy.v1" and "PolicyService" in {s.name for s in fd.service}
