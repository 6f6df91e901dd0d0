"""A feedback-store with its labeling page, in a thread of the test process: SQLite, an in-process
bus whose rlhf.feedback.v1 events the tests collect, and authentication on (a credentials file
with an operator and the trainer's service token; labelers registered through the store)."""

from __future__ import annotations

import asyncio
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import yaml
from rlhf_client import TOPIC_FEEDBACK, feedback_grpc, feedback_pb2
from sqlalchemy import text

from rlhf.metrics import ServiceMetrics
from rlhf.runtime.auth import token_sha256
from services.feedback_store.service import FeedbackService, Settings
from tests.services.http_helpers import RunningServer, start_in_thread
from tests.services.scenario import channel

CALLERS = {"operator": ["operator"], "trainer": ["service"]}


@dataclass
class Labeling:
    server: RunningServer
    tokens: dict[str, str]  # operator, trainer, and each registered labeler
    events: list = field(default_factory=list)  # FeedbackEvents delivered on rlhf.feedback.v1

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.service.http_port}"

    @property
    def target(self) -> str:
        return self.server.grpc_target

    @property
    def store(self):
        return self.server.service.store

    def stub(self, who: str) -> feedback_grpc.FeedbackServiceStub:
        ch = channel(self.target, self.tokens[who])
        return feedback_grpc.FeedbackServiceStub(ch)

    def add_labeler(self, name: str, admin: bool = False) -> str:
        r = self.stub("operator").CreateLabeler(feedback_pb2.CreateLabelerRequest(name=name, admin=admin), timeout=30)
        self.tokens[name] = r.token
        return r.token

    def create_tasks(self, *tasks: feedback_pb2.LabelingTaskInput) -> list[feedback_pb2.LabelingTask]:
        return list(self.stub("trainer").CreateLabelingTasks(
            feedback_pb2.CreateLabelingTasksRequest(tasks=list(tasks)), timeout=30).tasks)

    def sql(self, query: str, **params):
        with self.store.engine.connect() as c:
            return c.execute(text(query), params).all()

    def events_of(self, submission_id: str, timeout: float = 10.0) -> list:
        """The events delivered for this submission, once the relay had time to publish it."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = [e for e in self.events if e.event_id == submission_id]
            if got:
                time.sleep(0.5)  # a duplicate would arrive right behind
                return [e for e in self.events if e.event_id == submission_id]
            time.sleep(0.1)
        return []

    def session(self, who: str) -> httpx.Client:
        """An HTTP client signed in as ``who`` through the sign-in form."""
        c = httpx.Client(base_url=self.url, timeout=30)
        form = c.get("/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
        r = c.post("/login", data={"csrf": csrf, "token": self.tokens[who]})
        assert r.status_code == 303, r.text
        c.headers["X-CSRF-Token"] = c.get("/api/session").json()["csrf_token"]
        return c


def start_labeling(tmp: Path, **settings) -> Labeling:
    tokens = {name: f"tok-{name}-{uuid.uuid4().hex}" for name in CALLERS}
    creds = tmp / "credentials.yaml"
    creds.write_text(yaml.safe_dump({"callers": [
        {"name": n, "roles": r, "token_sha256": token_sha256(tokens[n])} for n, r in CALLERS.items()]}))
    s = Settings(**{"port": 0, "metrics_port": 0, "http_port": 0, "grace_seconds": 2.0, "credentials_file": str(creds),
                    "database_url": f"sqlite:///{tmp / 'feedback.db'}", "labeler_refresh_seconds": 0.5,
                    **settings})
    events: list = []

    def collect(bus):
        async def on_event(ev):
            events.append(ev)
        bus.subscribe(TOPIC_FEEDBACK, feedback_pb2.FeedbackEvent, "test-collector", on_event)

    server = start_in_thread(FeedbackService, s, ServiceMetrics("feedback-store"), on_bus=collect)
    return Labeling(server, tokens, events)


def ranking_task(prompt: str = "Explain KL divergence in one sentence.",
                 candidates=("It measures how one distribution differs from another.",
                             "KL is a kind of distance.", "No idea.", "It is the log-ratio averaged over P."),
                 mode: int = feedback_pb2.TASK_MODE_RANKING) -> feedback_pb2.LabelingTaskInput:
    return feedback_pb2.LabelingTaskInput(prompt=prompt, prompt_id=f"p-{uuid.uuid4().hex[:8]}", split=1,
                                          candidates=list(candidates), policy_version="v-test", mode=mode)


def grpc_code(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


_ = asyncio  # (the collector's handler is a coroutine)
