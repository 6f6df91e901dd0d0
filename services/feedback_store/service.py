"""feedback-store: labeling tasks, labelers and their answers, over gRPC and the labeling page.

The gRPC FeedbackService (proto <-> rlhf.storage.feedback.FeedbackStore here and in
:mod:`services.feedback_store.messages`) and the labeling page (:mod:`services.feedback_store.page`,
on ``http_port`` in the same process and event loop) submit through the same methods of
:class:`FeedbackService` (``submit_ranking``, ``skip_task``, ...), so an answer from the page and
one from gRPC are stored and announced alike. Every stored submission gets an outbox row in the
same transaction; the relay publishes it on rlhf.feedback.v1 after commit, so an event never
describes something that is not stored and nothing stored goes unannounced.

Labelers registered here (CreateLabeler) sign in with the token it issues, on gRPC (bearer token)
and on the page (which keeps it in an HttpOnly session cookie). Their token digests are read from
the database every ``labeler_refresh_seconds`` (and at once after a change made through this
replica): the resolver runs on the event loop and never queries the database.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import grpc
from rlhf_client import TOPIC_FEEDBACK, feedback_grpc, feedback_pb2

from rlhf.metrics import ServiceMetrics, set_at_scrape
from rlhf.runtime.auth import (LABELER, OPERATOR, SERVICE, TRAINER, Principal, caller, labeler_of, make_authenticator,
                               token_sha256)
from rlhf.runtime.http import EmbeddedHttpServer
from rlhf.storage.feedback import CandidateLabel, FeedbackStore, LabelerRow, TaskRow
from services.common import DatabaseSettings, OutboxService, from_ts
from services.feedback_store import messages as m
from services.feedback_store.page import LabelingPage

NAME = "feedback-store"
_EXPORT_CHUNK = 256
log = logging.getLogger("rlhf.services.feedback")


@dataclass
class Settings(DatabaseSettings):
    http_port: int = 0  # the labeling page; 0 picks a free port (logged), -1 runs none
    overlap_share: float = 0.1  # share of new tasks assigned to two labelers (once labelers are registered), for agreement
    session_hours: float = 12.0  # how long the page's sign-in cookie lasts; the token itself lasts until reissued or revoked
    secure_cookies: bool = False  # mark the page's cookies Secure (set it when people reach the page over HTTPS)
    labeler_refresh_seconds: float = 5.0  # how often labeler tokens are re-read (one issued by another replica works after this)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not -1 <= self.http_port <= 65535:
            raise ValueError(f"http_port must be in -1..65535, got {self.http_port}")
        if not 0.0 <= self.overlap_share <= 1.0:
            raise ValueError(f"overlap_share must be in 0..1, got {self.overlap_share}")
        if not 0 < self.session_hours <= 24 * 30:
            raise ValueError(f"session_hours must be in (0, 720], got {self.session_hours}")
        if not self.labeler_refresh_seconds > 0:
            raise ValueError("labeler_refresh_seconds must be > 0")


class LabelerTokens:
    """The registered labelers' token digests, as a token resolver for the authenticator."""

    def __init__(self, store: FeedbackStore):
        self.store = store
        self._by_digest: dict[str, LabelerRow] = {}

    def resolve(self, token: str) -> Principal | None:
        row = self._by_digest.get(token_sha256(token))
        if row is None:
            return None
        if row.admin:
            return Principal(name=row.name, roles=frozenset({OPERATOR}))
        return Principal(name=row.name, roles=frozenset({LABELER}), labeler_id=row.name)

    async def refresh(self) -> None:
        self._by_digest = await asyncio.to_thread(self.store.active_token_digests)


async def every(interval: float, stop: asyncio.Event, fn, what: str) -> None:
    """``await fn()`` every ``interval`` seconds until ``stop``; a failure is logged (by its type:
    a database error's text could quote a statement) and the last values stay."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval)
            return
        except asyncio.TimeoutError:
            pass
        try:
            await fn()
        except Exception as e:  # noqa: BLE001 - a database hiccup must not end the loop
            log.warning(f"could not {what}", extra={"fields": {"error": type(e).__name__}})


def reads_everything(p: Principal) -> bool:
    """Whether ``p`` reads any task (operators, the services, ML engineers, or anyone when
    authentication is off) rather than only those open to them as a labeler."""
    return p.anonymous or p.has(OPERATOR, SERVICE, TRAINER) or not p.labeler_id


class FeedbackService(OutboxService, feedback_grpc.FeedbackServiceServicer):
    name = NAME
    topic = TOPIC_FEEDBACK
    service_names = [feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"].full_name]
    # labelers rank, choose, write and skip under their own id; the trainer (service) and ML engineers
    # read the data out; operators run the store and its labelers (they do not label under anyone's name)
    rpc_roles = {
        "CreateLabelingTasks": frozenset({SERVICE, OPERATOR}),
        "GetLabelingTask": frozenset({LABELER, SERVICE, OPERATOR}),
        "ListLabelingTasks": frozenset({LABELER}),
        "SubmitRanking": frozenset({LABELER}),
        "SubmitBestOfK": frozenset({LABELER}),
        "SubmitDemonstration": frozenset({LABELER}),
        "SkipLabelingTask": frozenset({LABELER}),
        "ExportComparisons": frozenset({SERVICE, TRAINER, OPERATOR}),
        "ExportDemonstrations": frozenset({SERVICE, TRAINER, OPERATOR}),
        "GetAgreement": frozenset({SERVICE, TRAINER, OPERATOR}),
        "CreateLabeler": frozenset({OPERATOR}),
        "IssueLabelerToken": frozenset({OPERATOR}),
        "RevokeLabeler": frozenset({OPERATOR}),
        "ReassignLabelerTasks": frozenset({OPERATOR}),
        "ListLabelers": frozenset({OPERATOR}),
    }

    def __init__(self, settings: Settings, metrics: ServiceMetrics, bus=None):
        super().__init__(settings, metrics, bus)
        self.store = FeedbackStore(self.engine, m.announce, overlap_share=settings.overlap_share)
        self.tokens = LabelerTokens(self.store)
        # the credentials file, and the labelers' tokens (which identify labelers without turning
        # authentication on in a development setup that allows anonymous callers)
        self.auth = make_authenticator(settings)
        self.auth.add_resolver(self.tokens.resolve, required=False)
        self.page = LabelingPage(self, settings, metrics)
        self.http_server: EmbeddedHttpServer | None = None
        self.http_port: int | None = None
        self._refresher: asyncio.Task | None = None
        set_at_scrape(metrics.feedback_open_tasks, self.store.count_open_tasks)
        set_at_scrape(metrics.feedback_labeler_agreement_ratio, self._agreement_last_day, max_age_s=60.0)

    def _agreement_last_day(self) -> float:
        agreement, _, pairs = self.store.agreement(datetime.now(timezone.utc) - timedelta(days=1))
        return agreement if pairs else math.nan

    def register(self, server: grpc.aio.Server) -> None:
        feedback_grpc.add_FeedbackServiceServicer_to_server(self, server)

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        await super().start()
        await self.tokens.refresh()
        self._refresher = asyncio.create_task(every(self.s.labeler_refresh_seconds, self._stop, self.tokens.refresh,
                                                    "re-read the labelers' tokens"))
        if self.s.http_port >= 0:
            self.http_server = EmbeddedHttpServer(self.page.app, self.s.host, self.s.http_port,
                                                  graceful_seconds=min(5.0, self.s.grace_seconds))
            self.http_port = await self.http_server.start()
            log.info("labeling page serving", extra={"fields": {"host": self.s.host, "http_port": self.http_port}})

    async def drain(self, grace: float) -> None:
        """The bootstrap's shutdown hook: the page refuses new requests (503) from now on."""
        self.page.draining = True

    async def stop(self) -> None:
        self.page.draining = True
        if self.http_server is not None:
            await self.http_server.stop()
        self._stop.set()
        if self._refresher is not None:
            await self._refresher
        await super().stop()

    # -- what the page and the RPCs share: one path per operation ---------------------------------
    def _stored(self, kind: str, duplicate: bool, reason: str = "") -> None:
        if duplicate:
            return
        self.metrics.feedback_submissions_total.labels(kind=kind).inc()
        if kind in ("ranking", "best_of_k"):
            self.metrics.feedback_comparisons_total.labels(kind=kind).inc()
        if reason:
            self.metrics.feedback_skips_total.labels(reason=reason).inc()

    async def get_task(self, who: Principal, task_id: str) -> TaskRow:
        """A task as ``who`` may see it: labelers only the tasks open to them, without assignees."""
        if reads_everything(who):
            return await asyncio.to_thread(self.store.get_task, task_id)
        row = await asyncio.to_thread(self.store.get_task, task_id, who.labeler_id)
        return dataclasses.replace(row, assigned_to=())

    async def list_tasks(self, who: Principal, labeler_id: str, page_size: int, page_token: str):
        return await asyncio.to_thread(self.store.list_tasks, labeler_of(who, labeler_id), page_size, page_token)

    async def submit_ranking(self, who: Principal, key: str, task_id: str, labeler_id: str, ranking,
                             labels: list[CandidateLabel], seconds: float) -> tuple[str, bool]:
        sid, dup = await asyncio.to_thread(self.store.submit_ranking, key, task_id, labeler_of(who, labeler_id),
                                           ranking, labels, seconds)
        self._stored("ranking", dup)
        return sid, dup

    async def submit_best_of_k(self, who: Principal, key: str, task_id: str, labeler_id: str, best_index: int,
                               labels: list[CandidateLabel], seconds: float) -> tuple[str, bool]:
        sid, dup = await asyncio.to_thread(self.store.submit_best_of_k, key, task_id, labeler_of(who, labeler_id),
                                           best_index, labels, seconds)
        self._stored("best_of_k", dup)
        return sid, dup

    async def submit_demonstration(self, who: Principal, key: str, labeler_id: str, response: str, *, task_id: str = "",
                                   prompt: str = "", prompt_id: str = "", split: int = 0,
                                   seconds: float = 0.0) -> tuple[str, bool]:
        sid, dup = await asyncio.to_thread(self.store.submit_demonstration, key, prompt, prompt_id, split,
                                           labeler_of(who, labeler_id), response, task_id, seconds)
        self._stored("demonstration", dup)
        return sid, dup

    async def skip_task(self, who: Principal, key: str, task_id: str, labeler_id: str, reason: str, comment: str,
                        seconds: float) -> tuple[str, bool]:
        sid, dup = await asyncio.to_thread(self.store.skip_task, key, task_id, labeler_of(who, labeler_id), reason,
                                           comment, seconds)
        self._stored("skip", dup, reason)
        return sid, dup

    # -- tasks ----------------------------------------------------------------------------------
    async def CreateLabelingTasks(self, request, context):
        items = [m.task_in(t, f"tasks[{i}]") for i, t in enumerate(request.tasks)]
        rows = await asyncio.to_thread(self.store.create_tasks, items)
        return feedback_pb2.CreateLabelingTasksResponse(tasks=[m.task_proto(r) for r in rows])

    async def GetLabelingTask(self, request, context):
        row = await self.get_task(caller(), request.task_id)
        return feedback_pb2.GetLabelingTaskResponse(task=m.task_proto(row))

    async def ListLabelingTasks(self, request, context):
        rows, token = await self.list_tasks(caller(), request.labeler_id, request.page_size, request.page_token)
        return feedback_pb2.ListLabelingTasksResponse(tasks=[m.task_proto(r, show_assignees=False) for r in rows],
                                                      next_page_token=token)

    # -- submissions ----------------------------------------------------------------------------
    async def SubmitRanking(self, request, context):
        sid, dup = await self.submit_ranking(caller(), request.idempotency_key, request.task_id, request.labeler_id,
                                             [list(g.indices) for g in request.ranking], m.labels_in(request.labels),
                                             request.seconds_spent)
        return feedback_pb2.SubmitRankingResponse(submission_id=sid, duplicate=dup)

    async def SubmitBestOfK(self, request, context):
        sid, dup = await self.submit_best_of_k(caller(), request.idempotency_key, request.task_id, request.labeler_id,
                                               request.best_index, m.labels_in(request.labels), request.seconds_spent)
        return feedback_pb2.SubmitBestOfKResponse(submission_id=sid, duplicate=dup)

    async def SubmitDemonstration(self, request, context):
        sid, dup = await self.submit_demonstration(
            caller(), request.idempotency_key, request.labeler_id, request.response, task_id=request.task_id,
            prompt=request.prompt, prompt_id=request.prompt_id, split=request.split, seconds=request.seconds_spent)
        return feedback_pb2.SubmitDemonstrationResponse(submission_id=sid, duplicate=dup)

    async def SkipLabelingTask(self, request, context):
        sid, dup = await self.skip_task(caller(), request.idempotency_key, request.task_id, request.labeler_id,
                                        m.skip_reason(request.reason), request.comment, request.seconds_spent)
        return feedback_pb2.SkipLabelingTaskResponse(submission_id=sid, duplicate=dup)

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
        async for msg in self._stream(lambda: iter(self.store.export_comparisons(since, request.split, request.labeler_id,
                                                                                    list(request.task_ids))),
                                      lambda c: feedback_pb2.ExportComparisonsResponse(comparison=m.comparison_proto(c))):
            yield msg

    async def ExportDemonstrations(self, request, context):
        since = from_ts(request.since) if request.HasField("since") else None
        async for msg in self._stream(
                lambda: iter(self.store.export_demonstrations(since, request.split, request.labeler_id)),
                lambda d: feedback_pb2.ExportDemonstrationsResponse(demonstration=m.demonstration_proto(d))):
            yield msg

    async def GetAgreement(self, request, context):
        since = from_ts(request.since) if request.HasField("since") else None
        agreement, tasks, pairs = await asyncio.to_thread(self.store.agreement, since)
        by_pair = await asyncio.to_thread(self.store.agreement_by_labeler_pair, since)
        return feedback_pb2.GetAgreementResponse(
            pairwise_agreement=agreement, tasks=tasks, pairs=pairs,
            labeler_pairs=[feedback_pb2.LabelerPairAgreement(labeler_a=a, labeler_b=b, tasks=t, pairs=p,
                                                             pairwise_agreement=agree / p if p else 0.0)
                           for (a, b), (t, agree, p) in sorted(by_pair.items())])

    # -- labelers -------------------------------------------------------------------------------
    async def CreateLabeler(self, request, context):
        row, token = await asyncio.to_thread(self.store.create_labeler, request.name, request.admin)
        await self.tokens.refresh()
        log.info("labeler created", extra={"fields": {"labeler": row.name, "admin": row.admin, "by": caller().name}})
        stats = next(s for s in await asyncio.to_thread(self.store.labeler_stats) if s.name == row.name)
        return feedback_pb2.CreateLabelerResponse(labeler=m.labeler_proto(stats), token=token)

    async def IssueLabelerToken(self, request, context):
        token = await asyncio.to_thread(self.store.issue_token, request.name)
        await self.tokens.refresh()
        log.info("labeler token issued", extra={"fields": {"labeler": request.name, "by": caller().name}})
        return feedback_pb2.IssueLabelerTokenResponse(token=token)

    async def RevokeLabeler(self, request, context):
        moved = await asyncio.to_thread(self.store.revoke_labeler, request.name)
        await self.tokens.refresh()
        log.info("labeler revoked", extra={"fields": {"labeler": request.name, "tasks_reassigned": moved,
                                                      "by": caller().name}})
        return feedback_pb2.RevokeLabelerResponse(tasks_reassigned=moved)

    async def ReassignLabelerTasks(self, request, context):
        moved = await asyncio.to_thread(self.store.reassign_tasks, request.name)
        return feedback_pb2.ReassignLabelerTasksResponse(tasks_reassigned=moved)

    async def ListLabelers(self, request, context):
        since: datetime | None = from_ts(request.since) if request.HasField("since") else None
        stats = await asyncio.to_thread(self.store.labeler_stats, since)
        return feedback_pb2.ListLabelersResponse(labelers=[m.labeler_proto(s) for s in stats])


def build(settings: Settings, metrics: ServiceMetrics, bus=None) -> FeedbackService:
    return FeedbackService(settings, metrics, bus)
