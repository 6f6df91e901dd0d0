"""The route table of the HTTP API (docs/inference-api.md describes each route)."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import Route

from rlhf.runtime.apikeys import ApiKeys
from services.policy_server.api.base import ApiServer
from services.policy_server.api.errors import OPENAI, TGI
from services.policy_server.api.openai_chat import Chat
from services.policy_server.api.openai_common import OpenAIDialect
from services.policy_server.api.openai_completions import Completions
from services.policy_server.api.tgi import TGIDialect


class HttpApi(ApiServer):
    """The ASGI app (``.app``) of both dialects over one backend; :meth:`drain` at shutdown."""

    def __init__(self, backend, settings, metrics, keys: ApiKeys, forwarder=None):
        super().__init__(backend, settings, metrics, keys, forwarder)
        completions, chat, openai, tgi = Completions(self), Chat(self), OpenAIDialect(self), TGIDialect(self)
        public = {"auth": False, "drains": False}  # probes: no key, and answered while draining
        table = [  # method, path, handler, dialect, options
            ("POST", "/v1/completions", completions.create, OPENAI, {}),
            ("POST", "/v1/chat/completions", chat.create, OPENAI, {}),
            ("GET", "/v1/models", openai.models, OPENAI, {}),
            ("POST", "/generate", tgi.generate, TGI, {}),
            ("POST", "/generate_stream", tgi.generate_stream, TGI, {}),
            ("POST", "/", tgi.compat, TGI, {}),
            ("GET", "/info", tgi.info, TGI, public),
            ("GET", "/health", tgi.health, TGI, public),
        ]
        routes = [Route(path, self.endpoint(handler, path, dialect, **opts), methods=[method])
                  for method, path, handler, dialect, opts in table]
        self.app = Starlette(routes=routes, exception_handlers={HTTPException: self.not_found})
