"""A simulated labeler working through the feedback-store's API, as a person's labeling page would.

It stands in for people where there are none (tests, `rlhf up --simulate-labelers`): it lists the
labeling tasks it has not answered, ranks each task's K candidates with
:class:`rlhf.labeler.SimulatedLabeler` (hidden gold score + Bradley–Terry noise), and submits the
ranking with an idempotency key derived from (labeler, task), so a retry never stores twice.

It rides out a feedback-store or database restart: its channel retries calls answered UNAVAILABLE
or RESOURCE_EXHAUSTED (the platform's retry policy), and a call that still fails with one of
:data:`RETRYABLE` is tried again at the next poll, under the same key.
"""

from __future__ import annotations

import itertools
import re
import threading
from typing import Iterator, Sequence

import grpc
import numpy as np
from rlhf_client.channel import Credentials
from rlhf_client.client import FeedbackClient

from rlhf.labeler import SimulatedLabeler

# a feedback-store restarting, shedding load, or waiting for its database: try again later
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED)


class WordListJudge:
    """A transparent gold score for tests and quick runs: the share of words from a liked list.

    (The demo's :class:`rlhf.judge.GoldJudge` judges sentiment and fluency; it needs the data sets.)
    """

    def __init__(self, liked: Sequence[str] = ("good", "great", "best", "love", "fun", "wonderful", "the", "a")):
        self.liked = {w.lower() for w in liked}

    def score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        out = []
        for r in responses:
            words = re.findall(r"[a-z']+", r.lower())
            out.append(sum(w in self.liked for w in words) / max(4, len(words)) + 0.01 * min(len(words), 10))
        return np.asarray(out, dtype=np.float64)


def submit_pending(client: FeedbackClient, labeler: SimulatedLabeler, labeler_id: str,
                   max_tasks: int = 1000) -> Iterator[str]:
    """Rank every task this labeler has not answered yet (up to ``max_tasks``); yields each task id
    once its ranking is acknowledged (so a caller counts what was stored before a failure too)."""
    done = 0
    while done < max_tasks:
        page = list(itertools.islice(client.pending_tasks(labeler_id, page_size=100), min(100, max_tasks - done)))
        if not page:
            return
        orders = labeler.rank_many([t.prompt for t in page], [list(t.candidates) for t in page])
        for task, order in zip(page, orders):
            client.submit_ranking(task.task_id, [[i] for i in order], labeler_id,
                                  idempotency_key=f"sim-{labeler_id}-{task.task_id}")
            done += 1
            yield task.task_id
        # answered tasks drop out of the listing: ask again from the start


def run_labeler(target: str, labeler: SimulatedLabeler, labeler_id: str, stop: threading.Event,
                poll_seconds: float = 0.5, token: str = "", timeout: float = 30.0) -> int:
    """Label until ``stop`` is set; returns the number of rankings submitted (acknowledged).
    ``token`` is the labeler's credential (the store takes the labeler id from it when
    authentication is on). Calls failing with one of :data:`RETRYABLE` are tried again later."""
    total = 0
    with FeedbackClient(target, Credentials(token=token), timeout) as client:
        while not stop.is_set():
            n = 0
            try:
                for _ in submit_pending(client, labeler, labeler_id):
                    n += 1
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE:
                    raise
            total += n
            if n == 0:
                stop.wait(poll_seconds)
    return total
