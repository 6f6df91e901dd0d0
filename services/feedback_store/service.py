"""feedback-store: proto <-> rlhf.storage.feedback.FeedbackStore, behind the shared bootstrap.

Every stored submission gets an outbox row in the same transaction; the relay publishes it on
rlhf.feedback.v1 after commit, so an event never describes something that is not stored and
nothing stored goes unannounced.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import grpc
from rlhf_client import TOPIC_FEEDBACK, feedback_grpc, feedback_pb2

from rlhf.metrics import ServiceMetrics, set_at_scrape
from rlhf.runtime.auth import LABELER, OPERATOR, SERVICE, TRAINER, caller, labeler_of
from rlhf.storage.feedback import FeedbackStore, TaskIn
from services.common import DatabaseSettings, OutboxService, from_ts

NAME = "feedback-store"
_EXPORT_CHUNK = 256


@dataclass
class Settings(DatabaseSettings):
    pass


class FeedbackService(OutboxService, feedback_grpc.FeedbackServiceServicer):
    name = NAME
    topic = TOPIC_FEEDBACK
    service_names = [feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"].full_name]
    # labelers rank, choose and write under their own id; the trainer (service) and ML engineers
    # read the data out; operators run the store (they do not label under anyone's name)
    rpc_roles = {
        "CreateLabelingTasks": frozenset({SERVICE, OPERATOR}),
        "GetLabelingTask": frozenset({LABELER, SERVICE, OPERATOR}),
        "ListLabelingTasks": frozenset({LABELER}),
        "SubmitRanking": frozenset({LABELER}),
        "SubmitBestOfK": frozenset({LABELER}),
        "SubmitDemonstration": frozenset({LABELER}),
        "ExportComparisons": frozenset({SERVICE, TRAINER, OPERATOR}),
        "ExportDemonstrations": frozenset({SERVICE, TRAINER, OPERATOR}),
        "GetAgreement": frozenset({SERVICE, TRAINER, OPERATOR}),
    }

    def __init__(self, settings: Settings, metrics: ServiceMetrics, bus=None):
        super().__init__(settings, metrics, bus)
        self.store = FeedbackStore(self.engine)
        set_at_scrape(metrics.feedback_open_tasks, self.store.count_open_tasks)
        set_at_scrape(metrics.feedback_labeler_agreement_ratio, self._agreement_last_day, max_age_s=60.0)

    def _agreement_last_day(self) -> float:
        agreement, _, pairs = self.store.agreement(datetime.now(timezone.utc) - timedelta(days=1))
        return agreement if pairs else math.nan

    def register(self, server: grpc.aio.Server) -> None:
        feedback_grpc.add_FeedbackServiceServicer_to_server(self, server)

    # -- tasks ----------------------------------------------------------------------------------
    async def CreateLabelingTasks(self, request, context):
        items = [TaskIn(prompt=t.prompt, prompt_id=t.prompt_id, split=t.split, candidates=list(t.candidates),
                        policy_version=t.policy_version) for t in request.tasks]
        rows = await asyncio.to_thread(self.store.create_tasks, items)
        return feedback_pb2.CreateLabelingTasksResponse(tasks=[r.to_proto() for r in rows])

    async def GetLabelingTask(self, request, context):
        row = await asyncio.to_thread(self.store.get_task, request.task_id)
        return feedback_pb2.GetLabelingTaskResponse(task=row.to_proto())

    async def ListLabelingTasks(self, request, context):
        rows, token = await asyncio.to_thread(self.store.list_tasks, labeler_of(caller(), request.labeler_id),
                                              request.page_size, request.page_token)
        return feedback_pb2.ListLabelingTasksResponse(tasks=[r.to_proto() for r in rows], next_page_token=token)

    # -- submissions ----------------------------------------------------------------------------
    async def SubmitRanking(self, request, context):
        ranking = [list(g.indices) for g in request.ranking]
        sid, dup = await asyncio.to_thread(self.store.submit_ranking, request.idempotency_key, request.task_id,
                                           labeler_of(caller(), request.labeler_id), ranking)
        if not dup:
            self.metrics.feedback_comparisons_total.labels(kind="ranking").inc()
        return feedback_pb2.SubmitRankingResponse(submission_id=sid, duplicate=dup)

    async def SubmitBestOfK(self, request, context):
        sid, dup = await asyncio.to_thread(self.store.submit_best_of_k, request.idempotency_key, request.task_id,
                                           labeler_of(caller(), request.labeler_id), request.best_index)
        if not dup:
            self.metrics.feedback_comparisons_total.labels(kind="best_of_k").inc()
        return feedback_pb2.SubmitBestOfKResponse(submission_id=sid, duplicate=dup)

    async def SubmitDemonstration(self, request, context):
        sid, dup = await asyncio.to_thread(self.store.submit_demonstration, request.idempotency_key, request.prompt,
                                           request.prompt_id, request.split, labeler_of(caller(), request.labeler_id),
                                           request.response)
        return feedback_pb2.SubmitDemonstrationResponse(submission_id=sid, duplicate=dup)

    # -- export ---------------------------------------------------------------------------------
    async def _stream(self, make_iter, wrap):
        """Drain a blocking iterator in a worker thread, chunk by chunk."""
        it = await asyncio.to_thread(make_iter)
        sentinel = object()

        def chunk():
            out = []
            for _ in range(_EXPORT_CHUNK):
                x = next(it, sentinel)
                if x is sentinel:
                    break
                out.append(x)
            return out

        while True:
            items = await asyncio.to_thread(chunk)
            for x in items:
                yield wrap(x)
            if len(items) < _EXPORT_CHUNK:
                return

    async def ExportComparisons(self, request, context):
        since = from_ts(request.since) if request.HasField("since") else None
        async for m in self._stream(lambda: iter(self.store.export_comparisons(since, request.split, request.labeler_id,
                                                                                  list(request.task_ids))),
                                    lambda c: feedback_pb2.ExportComparisonsResponse(comparison=c)):
            yield m

    async def ExportDemonstrations(self, request, context):
        since = from_ts(request.since) if request.HasField("since") else None
        async for m in self._stream(lambda: iter(self.store.export_demonstrations(since, request.split, request.labeler_id)),
                                    lambda d: feedback_pb2.ExportDemonstrationsResponse(demonstration=d)):
            yield m

    async def GetAgreement(self, request, context):
        since = from_ts(request.since) if request.HasField("since") else None
        agreement, tasks, pairs = await asyncio.to_thread(self.store.agreement, since)
        return feedback_pb2.GetAgreementResponse(pairwise_agreement=agreement, tasks=tasks, pairs=pairs)


def build(settings: Settings, metrics: ServiceMetrics, bus=None) -> FeedbackService:
    return FeedbackService(settings, metrics, bus)
