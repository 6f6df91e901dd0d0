"""A test double for the server plumbing: a reward and a policy servicer with no model behind them.

``Score`` answers ``len(items)`` after an optional sleep; an empty batch raises DataError, and a
first prompt of the form ``raise:<Name>:<message>`` raises that exception (``sleep:<seconds>``
sleeps that long). ``GenerateStream`` yields ``n`` pieces of the prompt, and fails after the first
with ``fail``. ``GetRewardModelVersion`` is left unimplemented.

Run as a process (``python -m tests.runtime.echo_service``) it serves with settings from the
``RLHF_ECHO_*`` environment and prints ``{"grpc_port": ..., "metrics_port": ...}`` on stdout once
it is SERVING.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass

import grpc
from rlhf_client import policy_grpc, policy_pb2, reward_grpc, reward_pb2

from rlhf import errors
from rlhf.runtime.auth import ANYONE
from rlhf.metrics import ServiceMetrics
from rlhf.runtime.logs import configure_logging
from rlhf.runtime.server import BaseServiceSettings, serve
from rlhf.runtime.settings import load_settings

REWARD_SERVICE = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name
POLICY_SERVICE = policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name


class EchoReward(reward_grpc.RewardServiceServicer):
    def __init__(self, sleep: float = 0.0):
        self.sleep = sleep

    async def Score(self, request, context):
        if not request.items:
            raise errors.DataError("empty batch: at least one item is required")
        first = request.items[0].prompt
        if first.startswith("raise:"):
            _, name, message = first.split(":", 2)
            exc = getattr(errors, name, None) or {"ValueError": ValueError, "RuntimeError": RuntimeError}[name]
            raise exc(message)
        delay = float(first.split(":", 1)[1]) if first.startswith("sleep:") else self.sleep
        if delay:
            await asyncio.sleep(delay)
        return reward_pb2.ScoreResponse(scores=[float(len(request.items))], reward_model_version="echo")


class EchoPolicy(policy_grpc.PolicyServiceServicer):
    n = 3

    async def GenerateStream(self, request, context):
        for i in range(self.n):
            if i == 1 and request.prompt == "fail":
                raise errors.DataError("generation failed on purpose")
            await asyncio.sleep(0)
            last = i == self.n - 1
            yield policy_pb2.GenerateStreamResponse(
                text_delta=f"{request.prompt}-{i}", token_id=i, policy_version="echo",
                finish_reason=policy_pb2.FINISH_REASON_LENGTH if last else policy_pb2.FINISH_REASON_UNSPECIFIED)


class EchoService:
    """What :func:`rlhf.runtime.server.serve` runs: both servicers, plus start/stop bookkeeping."""

    name = "echo"
    service_names = [REWARD_SERVICE, POLICY_SERVICE]
    rpc_roles = {m: ANYONE for m in ("Score", "GetRewardModelVersion", "Generate", "GenerateStream", "GetPolicyVersion")}

    def __init__(self, sleep: float = 0.0, start_delay: float = 0.0):
        self.reward = EchoReward(sleep)
        self.policy = EchoPolicy()
        self.start_delay = start_delay
        self.events: list[str] = []

    def register(self, server: grpc.aio.Server) -> None:
        reward_grpc.add_RewardServiceServicer_to_server(self.reward, server)
        policy_grpc.add_PolicyServiceServicer_to_server(self.policy, server)

    async def start(self) -> None:
        await asyncio.sleep(self.start_delay)
        self.events.append("start")

    async def stop(self) -> None:
        self.events.append("stop")
        print("service stopped", file=sys.stderr, flush=True)


@dataclass
class EchoSettings(BaseServiceSettings):
    sleep: float = 0.0  # seconds each Score call sleeps


def main() -> None:
    settings = load_settings(EchoSettings, "echo")
    configure_logging("echo", settings.log_level)
    metrics = ServiceMetrics("echo")

    def ready(grpc_port: int, metrics_port: int) -> None:
        print(json.dumps({"grpc_port": grpc_port, "metrics_port": metrics_port}), flush=True)

    asyncio.run(serve(EchoService(settings.sleep), settings, metrics, ready=ready))


if __name__ == "__main__":
    main()
