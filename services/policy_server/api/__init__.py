"""The policy-server's HTTP API: OpenAI- and TGI-compatible, on the same backend as its gRPC API.

Split as vLLM splits its entrypoints: :mod:`.routes` (the route table), :mod:`.base` (auth,
draining, deadlines, request metrics), :mod:`.errors` (each dialect's error shape),
:mod:`.streaming` (server-sent events), :mod:`.fields` (JSON field checks), the OpenAI dialect
(:mod:`.openai_common`, :mod:`.openai_completions`, :mod:`.openai_chat`) and the TGI dialect
(:mod:`.tgi`). The sampling fields of every dialect are checked by
:func:`rlhf.inference.requests.build_request`, as the gRPC API's are; batching, sampling and text
are in :mod:`rlhf.inference`. docs/inference-api.md has the fields, errors and a curl example for
each route.
"""
