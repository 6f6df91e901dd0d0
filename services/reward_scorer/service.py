"""reward-scorer: proto <-> rlhf.serving.RewardEngine, behind the shared bootstrap.

Score requests from concurrent callers are packed into shared model calls by a DynamicBatcher;
each answer names the reward-model version that scored it (a batch never mixes versions).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from rlhf_client import reward_grpc, reward_pb2

from rlhf.runtime.auth import ANYONE, OPERATOR, SERVICE, TRAINER
from rlhf.errors import DataError, UnavailableError
from rlhf.metrics import ServiceMetrics
from rlhf.runtime.batching import DynamicBatcher
from rlhf.serving import RewardEngine
from services.common import ModelService, ModelSettings

NAME = "reward-scorer"


@dataclass
class Settings(ModelSettings):
    reward_version: str = ""  # pin a version; empty: the latest, then follow rlhf.models.v1
    max_batch_items: int = 128  # pairs from concurrent callers packed into one model call
    forward_batch: int = 16  # pairs per forward pass within a call (CPU: small is faster per pair)
    max_wait_ms: float = 2.0  # how long a request may wait for others to share its batch
    max_items_per_request: int = 1024  # items in one Score call
    max_chars: int = 20000  # prompt + response characters per item

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_batch_items < 1:
            raise ValueError("max_batch_items must be >= 1")
        if self.forward_batch < 1:
            raise ValueError("forward_batch must be >= 1")


class RewardScorer(ModelService, reward_grpc.RewardServiceServicer):
    name = NAME
    kind = "reward"
    service_names = [reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name]
    rpc_roles = {"Score": frozenset({SERVICE, TRAINER, OPERATOR}), "GetRewardModelVersion": ANYONE}

    def __init__(self, settings: Settings, metrics: ServiceMetrics, bus=None):
        super().__init__(settings, metrics, bus, pinned_version=settings.reward_version)

    def register(self, server: grpc.aio.Server) -> None:
        reward_grpc.add_RewardServiceServicer_to_server(self, server)

    def _batcher(self) -> DynamicBatcher:
        return DynamicBatcher(self._run_batch, self.executor.run, max_batch_items=self.s.max_batch_items,
                              max_wait_seconds=self.s.max_wait_ms / 1000, on_batch=self.metrics.reward_batch_size.observe)

    def _make_engine(self, path, version) -> RewardEngine:
        return RewardEngine(path, version, device=self.s.device, forward_batch=self.s.forward_batch)

    def _run_batch(self, engine: RewardEngine, pairs: list[tuple[str, str]]) -> list[float]:
        scores = engine.score(pairs)
        self.metrics.reward_scored_total.inc(len(pairs))
        return scores

    async def Score(self, request: reward_pb2.ScoreRequest, context) -> reward_pb2.ScoreResponse:
        items = list(request.items)
        if not items:
            raise DataError("items is empty")
        if len(items) > self.s.max_items_per_request:
            raise DataError(f"at most {self.s.max_items_per_request} items per request, got {len(items)}")
        for i, it in enumerate(items):
            if len(it.prompt) + len(it.response) > self.s.max_chars:
                raise DataError(f"items[{i}] is longer than {self.s.max_chars} characters")
        engine = self.engine
        if engine is None:
            raise UnavailableError("no reward model version loaded yet; train one first")
        scores = await self.batcher.submit(engine, [(it.prompt, it.response) for it in items])
        return reward_pb2.ScoreResponse(scores=scores, reward_model_version=engine.version)

    async def GetRewardModelVersion(self, request, context) -> reward_pb2.GetRewardModelVersionResponse:
        if self.engine is None:
            raise UnavailableError("no reward model version loaded yet")
        return reward_pb2.GetRewardModelVersionResponse(reward_model_version=self.engine.version)


def build(settings: Settings, metrics: ServiceMetrics, bus=None) -> RewardScorer:
    return RewardScorer(settings, metrics, bus)
