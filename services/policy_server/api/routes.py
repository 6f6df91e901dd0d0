"""The route table of the HTTP API (docs/inference-api.md describes each route; /openapi.json
and the docs' field tables are generated from this table and the fields')."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from rlhf.runtime.apikeys import ApiKeys
from services.policy_server.api import fields as F
from services.policy_server.api.base import ApiServer, Ctx
from services.policy_server.api.errors import OPENAI, TGI, json_response
from services.policy_server.api.openai_chat import Chat
from services.policy_server.api.openai_common import OpenAIDialect
from services.policy_server.api.openai_completions import Completions
from services.policy_server.api.tgi import TGIDialect
from services.policy_server.api.tokenization import Tokenization


@dataclass(frozen=True)
class RouteSpec:
    method: str
    path: str
    handler: str  # "<part>.<method>" of HttpApi's parts below
    dialect: str  # whose error shape
    summary: str
    fields: list[F.Field] | None = None  # the request body's fields
    public: bool = False  # no key needed, and answered while draining (probes, metrics, the API's description)
    generates: bool = False  # admitted against the team's limits once valid (ApiServer.open), not on arrival


ROUTES = [
    RouteSpec("POST", "/v1/completions", "completions.create", OPENAI, "OpenAI completions", F.COMPLETIONS,
              generates=True),
    RouteSpec("POST", "/v1/chat/completions", "chat.create", OPENAI, "OpenAI chat completions", F.CHAT, generates=True),
    RouteSpec("GET", "/v1/models", "openai.models", OPENAI, "the model's names"),
    RouteSpec("GET", "/v1/models/{model_id}", "openai.model", OPENAI, "one of the model's names"),
    RouteSpec("POST", "/tokenize", "tokens.tokenize", OPENAI, "a text or chat as the model's token ids", F.TOKENIZE),
    RouteSpec("POST", "/detokenize", "tokens.detokenize", OPENAI, "token ids as text", F.DETOKENIZE),
    RouteSpec("POST", "/generate", "tgi.generate", TGI, "TGI generation", F.TGI, generates=True),
    RouteSpec("POST", "/generate_stream", "tgi.generate_stream", TGI, "TGI generation, streamed", F.TGI,
              generates=True),
    RouteSpec("POST", "/", "tgi.compat", TGI, "TGI's route of the text-generation client", F.TGI, generates=True),
    RouteSpec("GET", "/info", "tgi.info", TGI, "TGI's server information", public=True),
    RouteSpec("GET", "/health", "tgi.health", TGI, "200 while a version is served and not draining", public=True),
    RouteSpec("GET", "/metrics", "self.prometheus", TGI, "the server's Prometheus metrics", public=True),
    RouteSpec("GET", "/openapi.json", "self.openapi", OPENAI, "this API's OpenAPI document", public=True),
]


class HttpApi(ApiServer):
    """The ASGI app (``.app``) of both dialects over one backend; :meth:`drain` at shutdown."""

    def __init__(self, backend, settings, metrics, keys: ApiKeys, forwarder=None):
        super().__init__(backend, settings, metrics, keys, forwarder)
        parts = {"completions": Completions(self), "chat": Chat(self), "openai": OpenAIDialect(self),
                 "tgi": TGIDialect(self), "tokens": Tokenization(self), "self": self}
        routes = []
        for r in ROUTES:
            part, method = r.handler.split(".")
            handler = getattr(parts[part], method)
            routes.append(Route(r.path, self.endpoint(handler, r.path, r.dialect, auth=not r.public,
                                                      drains=not r.public, admit=not (r.public or r.generates)),
                                methods=[r.method]))
        self.app = Starlette(routes=routes, exception_handlers={HTTPException: self.not_found})

    async def prometheus(self, request: Request, ctx: Ctx) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def openapi(self, request: Request, ctx: Ctx) -> Response:
        from services.policy_server.api.reference import openapi

        return json_response(openapi(self.s))
