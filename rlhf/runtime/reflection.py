"""gRPC server reflection under ``grpc.reflection.v1`` as well as ``v1alpha``.

grpcio-reflection (1.85) serves only ``grpc.reflection.v1alpha.ServerReflection``; newer clients
(grpcurl, Postman, grpcui) ask ``grpc.reflection.v1`` first. The two protocols are the same
messages under another package name, so the v1 service here is the package's own v1alpha
servicer behind a translation of each message (byte-identical on the wire): its message types
are built at import from v1alpha's descriptor, renamed, in a descriptor pool of their own.
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as alpha

SERVICE_NAME = "grpc.reflection.v1.ServerReflection"


def _v1_types():
    fdp = descriptor_pb2.FileDescriptorProto()
    alpha.DESCRIPTOR.CopyToProto(fdp)
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    fdp.name, fdp.package = "grpc/reflection/v1/reflection.proto", "grpc.reflection.v1"
    for m in fdp.message_type:
        for f in m.field:
            if f.type_name:
                f.type_name = f.type_name.replace(old, new)
    for s in fdp.service:
        for method in s.method:
            method.input_type = method.input_type.replace(old, new)
            method.output_type = method.output_type.replace(old, new)
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(fdp.SerializeToString())
    get = message_factory.GetMessageClass
    return (get(pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionRequest")),
            get(pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionResponse")))


Request, Response = _v1_types()


def enable_reflection(service_names: list[str], server: grpc.aio.Server) -> None:
    """Reflection of ``service_names`` (and of both reflection services) under v1alpha and v1."""
    names = [*service_names, reflection.SERVICE_NAME, SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    servicer = reflection.aio.ReflectionServicer(names)

    async def info(requests, context):
        async def as_alpha():
            async for r in requests:
                yield alpha.ServerReflectionRequest.FromString(r.SerializeToString())

        async for resp in servicer.ServerReflectionInfo(as_alpha(), context):
            yield Response.FromString(resp.SerializeToString())

    handler = grpc.stream_stream_rpc_method_handler(info, request_deserializer=Request.FromString,
                                                    response_serializer=Response.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME,
                                                                          {"ServerReflectionInfo": handler}),))
