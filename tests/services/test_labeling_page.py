"""The labeling page over HTTP (no browser): sign-in, CSRF, headers, errors, one code path with gRPC,
labeler accounts and metrics. The browser tests are in test_labeling_browser.py."""

from __future__ import annotations

import logging
import re
import uuid

import grpc
import httpx
import pytest
from rlhf_client import feedback_pb2

from rlhf.storage.feedback import FeedbackStore
from tests.services.helpers import metric_value, scrape
from tests.services.labeling import grpc_code, ranking_task, start_labeling

SECRET = "SECRET-PROMPT-TEXT-1234"


@pytest.fixture
def lab(tmp_path):
    """Two labelers, ann and ben, who get every task (overlap_share 1.0), and an admin."""
    lab = start_labeling(tmp_path, overlap_share=1.0)
    for name in ("ann", "ben"):
        lab.add_labeler(name)
    lab.add_labeler("boss", admin=True)
    yield lab
    lab.server.stop()


def _task_for(lab, *names: str, **kw) -> feedback_pb2.LabelingTask:
    """A new task assigned to ``names`` (tasks go to the two least-loaded labelers, so a labeler
    with fewer open tasks is chosen within a few)."""
    for _ in range(8):
        [t] = lab.create_tasks(ranking_task(**kw))
        if set(names) <= set(t.assigned_to):
            return t
    raise AssertionError(f"no task was assigned to {names}")


def _count(lab, table: str) -> int:
    return lab.sql(f"select count(*) from {table}")[0][0]


def test_headers_cookies_and_sign_in(lab):
    c = httpx.Client(base_url=lab.url)
    r = c.get("/login")
    assert r.status_code == 200
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "'unsafe-inline'" not in csp and "frame-ancestors 'none'" in csp
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
    login_cookie = r.headers["set-cookie"]
    assert "rlhf_login=" in login_cookie and "HttpOnly" in login_cookie and "SameSite=strict" in login_cookie
    csrf = re.search(r'name="csrf" value="([^"]+)"', r.text).group(1)
    # a wrong token, a missing form token, another site's form: refused, with words
    bad = c.post("/login", data={"csrf": csrf, "token": "rlhfl_not-a-token"})
    assert bad.status_code == 401 and "not valid" in bad.text and "rlhf_session" not in bad.headers.get("set-cookie", "")
    assert c.post("/login", data={"csrf": "forged", "token": lab.tokens["ann"]}).status_code == 403
    assert c.post("/login", data={"csrf": csrf, "token": lab.tokens["ann"]},
                  headers={"origin": "https://evil.example"}).status_code == 403
    ok = c.post("/login", data={"csrf": csrf, "token": lab.tokens["ann"]})
    assert ok.status_code == 303 and ok.headers["location"] == "/tasks"
    session = ok.headers["set-cookie"]
    assert "rlhf_session=" in session and "HttpOnly" in session and "SameSite=strict" in session
    assert "Max-Age=43200" in session and "Path=/" in session  # 12 hours
    assert c.get("/api/session").json()["labeler_id"] == "ann"
    # signed out: pages go to the sign-in form, JSON says 401
    anon = httpx.Client(base_url=lab.url)
    r = anon.get("/tasks")
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert anon.get("/api/tasks").status_code == 401
    # an admin lands on the admin view
    boss = lab.session("boss")
    assert boss.get("/").headers["location"] == "/admin" and boss.get("/admin").status_code == 200


def test_every_state_changing_request_needs_the_csrf_token(lab):
    t = _task_for(lab, "ann", "ben")
    c = lab.session("ann")
    body = {"idempotency_key": uuid.uuid4().hex, "ranking": [[0], [1], [2], [3]]}
    path = f"/api/tasks/{t.task_id}/ranking"
    before = _count(lab, "submissions")
    for headers in ({"X-CSRF-Token": ""}, {"X-CSRF-Token": "0" * 64},
                    {"origin": "https://evil.example"}, {"origin": "null"}):
        r = c.post(path, json=body, headers=headers)
        assert r.status_code == 403, (headers, r.text)
    r = c.post(path, content=b'{"ranking": [[0]]}', headers={"content-type": "text/plain"})
    assert r.status_code == 415
    assert c.post("/logout", json={}, headers={"X-CSRF-Token": ""}).status_code == 403
    assert _count(lab, "submissions") == before
    assert c.post(path, json=body).status_code == 201


def test_bad_input_gets_a_message_and_stores_nothing(lab):
    t = _task_for(lab, "ann")
    c = lab.session("ann")
    path = f"/api/tasks/{t.task_id}/ranking"
    before = (_count(lab, "submissions"), _count(lab, "outbox"))
    cases = [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"idempotency_key": "k", "ranking": [[0], [1], [1], [3]]}', 400, "appears twice"),
        (b'{"idempotency_key": "k", "ranking": [[0], [1], [2]]}', 400, "covers 3 of K=4"),
        (b'{"idempotency_key": "k", "ranking": [[0], [1], [2], [3]], "labels": [{"index": 0, "flags": ["rude"]}]}',
         400, "unknown flag"),
        (b'{"idempotency_key": "k", "ranking": [[0], [1], [2], [3]], "labels": [{"index": 0, "quality": 9}]}',
         400, "quality"),
        (b'{"idempotency_key": "", "ranking": [[0], [1], [2], [3]]}', 400, "idempotency_key"),
        (b'{"idempotency_key": "k", "ranking": [[0], [1], [2], [3]], "seconds_spent": "long"}', 400, "seconds_spent"),
        (b"x" * (3 * 1024 * 1024), 413, "larger than"),
    ]
    for raw, status, needle in cases:
        r = c.post(path, content=raw, headers={"content-type": "application/json"})
        assert r.status_code == status and needle in r.json()["error"], (raw[:60], r.status_code, r.text[:200])
    r = c.post(f"/api/tasks/{t.task_id}/skip", json={"idempotency_key": "s", "reason": "bored"})
    assert r.status_code == 400 and "reason" in r.json()["error"]
    r = c.post(f"/api/tasks/{t.task_id}/best-of-k", json={"idempotency_key": "b", "best_index": "1"})
    assert r.status_code == 400 and "best_index" in r.json()["error"]
    r = c.post("/api/tasks/no-such-task/ranking", json={"idempotency_key": "k", "ranking": [[0], [1]]})
    assert r.status_code == 404 and "not found" in r.json()["error"]
    assert c.get("/tasks/no-such-task").status_code == 404
    assert (_count(lab, "submissions"), _count(lab, "outbox")) == before


def test_a_ranking_from_the_page_and_one_from_grpc_are_stored_and_announced_alike(lab):
    t = _task_for(lab, "ann", "ben")
    ranking, labels = [[2], [0, 3], [1]], [{"index": 3, "flags": ["hallucination", "harmful_advice"], "quality": 2}]
    r = lab.session("ann").post(f"/api/tasks/{t.task_id}/ranking",
                                json={"idempotency_key": uuid.uuid4().hex, "ranking": ranking, "labels": labels,
                                      "seconds_spent": 20})
    assert r.status_code == 201
    page_sid = r.json()["submission_id"]
    grpc_sid = lab.stub("ben").SubmitRanking(feedback_pb2.SubmitRankingRequest(
        idempotency_key=uuid.uuid4().hex, task_id=t.task_id,
        ranking=[feedback_pb2.RankGroup(indices=g) for g in ranking],
        labels=[feedback_pb2.CandidateLabel(index=3, flags=[feedback_pb2.RESPONSE_FLAG_HARMFUL_ADVICE,
                                                            feedback_pb2.RESPONSE_FLAG_HALLUCINATION], quality=2)],
        seconds_spent=20), timeout=30).submission_id
    cols = "kind, task_id, ranking, best_index, prompt, prompt_id, split, response, labels, seconds_spent, " \
           "skip_reason, comment"
    page_row, grpc_row = (lab.sql(f"select {cols} from submissions where id = :i", i=i)[0] for i in (page_sid, grpc_sid))
    assert page_row == grpc_row
    [page_ev], [grpc_ev] = lab.events_of(page_sid), lab.events_of(grpc_sid)
    for ev, sid, who in ((page_ev, page_sid, "ann"), (grpc_ev, grpc_sid, "ben")):
        assert ev.event_id == ev.comparison.submission_id == sid and ev.comparison.labeler_id == who
        ev.comparison.ClearField("submission_id"), ev.comparison.ClearField("labeler_id")
        ev.comparison.ClearField("create_time"), ev.ClearField("event_id"), ev.ClearField("event_time")
    assert page_ev == grpc_ev


def test_labeler_accounts_over_grpc_and_their_sessions(lab):
    # only operators manage labelers
    assert grpc_code(lambda: lab.stub("ann").CreateLabeler(feedback_pb2.CreateLabelerRequest(name="eve"))) == \
        grpc.StatusCode.PERMISSION_DENIED
    assert grpc_code(lambda: lab.stub("operator").CreateLabeler(feedback_pb2.CreateLabelerRequest(name="no spaces"))) \
        == grpc.StatusCode.INVALID_ARGUMENT
    token = lab.add_labeler("dave")
    assert token.startswith("rlhfl_")
    t = _task_for(lab, "dave")
    # the new token works at once, on gRPC and on the page; listing and answering are the caller's own
    dave = lab.stub("dave")
    assert t.task_id in [x.task_id for x in dave.ListLabelingTasks(feedback_pb2.ListLabelingTasksRequest()).tasks]
    assert all(not x.assigned_to for x in dave.ListLabelingTasks(feedback_pb2.ListLabelingTasksRequest()).tasks)
    assert grpc_code(lambda: dave.ListLabelingTasks(feedback_pb2.ListLabelingTasksRequest(labeler_id="carol"))) == \
        grpc.StatusCode.PERMISSION_DENIED
    page = lab.session("dave")
    assert page.get(f"/api/tasks/{t.task_id}").status_code == 200
    listed = {x.name: x for x in lab.stub("operator").ListLabelers(feedback_pb2.ListLabelersRequest()).labelers}
    assert listed["dave"].open_tasks >= 1 and listed["boss"].admin and listed["ann"].registered
    # revoked: gRPC calls are UNAUTHENTICATED and the page session ends; the open task moves on
    moved = lab.stub("operator").RevokeLabeler(feedback_pb2.RevokeLabelerRequest(name="dave")).tasks_reassigned
    assert moved >= 1
    assert grpc_code(lambda: dave.ListLabelingTasks(feedback_pb2.ListLabelingTasksRequest())) == \
        grpc.StatusCode.UNAUTHENTICATED
    assert page.get(f"/api/tasks/{t.task_id}").status_code == 401
    assert "dave" not in lab.stub("operator").GetLabelingTask(
        feedback_pb2.GetLabelingTaskRequest(task_id=t.task_id)).task.assigned_to
    # a new token brings them back
    lab.tokens["dave"] = lab.stub("operator").IssueLabelerToken(
        feedback_pb2.IssueLabelerTokenRequest(name="dave")).token
    assert grpc_code(lambda: lab.stub("dave").ListLabelingTasks(feedback_pb2.ListLabelingTasksRequest())) == \
        grpc.StatusCode.OK


def test_skip_demonstration_and_best_of_k_through_the_page(lab):
    c = lab.session("ann")
    skip = _task_for(lab, "ann", "ben")
    r = c.post(f"/api/tasks/{skip.task_id}/skip", json={"idempotency_key": "skip-1", "reason": "unclear_prompt",
                                                         "comment": "not a question"})
    assert r.status_code == 201 and lab.events_of(r.json()["submission_id"])[0].skip.reason == \
        feedback_pb2.SKIP_REASON_UNCLEAR_PROMPT
    again = c.post(f"/api/tasks/{skip.task_id}/ranking", json={"idempotency_key": "r-after", "ranking": [[0], [1], [2], [3]]})
    assert again.status_code == 409 and "already answered" in again.json()["error"]
    best = _task_for(lab, "ann", "ben", mode=feedback_pb2.TASK_MODE_BEST_OF_K)
    r = c.post(f"/api/tasks/{best.task_id}/best-of-k", json={"idempotency_key": "b-1", "best_index": 3})
    assert r.status_code == 201 and lab.events_of(r.json()["submission_id"])[0].comparison.best_index == 3
    demo = _task_for(lab, "ann", "ben", candidates=(), mode=feedback_pb2.TASK_MODE_DEMONSTRATION)
    r = c.post(f"/api/tasks/{demo.task_id}/demonstration", json={"idempotency_key": "d-1", "response": "A written answer."})
    assert r.status_code == 201
    [d] = [m.demonstration for m in lab.stub("trainer").ExportDemonstrations(feedback_pb2.ExportDemonstrationsRequest())
           if m.demonstration.task_id == demo.task_id]
    assert d.response == "A written answer." and d.labeler_id == "ann" and d.prompt == demo.prompt


def test_admin_view_and_metrics(lab):
    assert lab.session("ann").get("/api/admin/stats").status_code == 403
    assert lab.session("ann").get("/admin").status_code == 403
    t = _task_for(lab, "ann", "ben")
    lab.stub("ann").SkipLabelingTask(feedback_pb2.SkipLabelingTaskRequest(
        idempotency_key=uuid.uuid4().hex, task_id=_task_for(lab, "ann").task_id, reason=feedback_pb2.SKIP_REASON_OTHER))
    lab.stub("ben").SubmitRanking(feedback_pb2.SubmitRankingRequest(
        idempotency_key=uuid.uuid4().hex, task_id=t.task_id, ranking=[feedback_pb2.RankGroup(indices=[i]) for i in range(4)]))
    lab.stub("ann").SubmitRanking(feedback_pb2.SubmitRankingRequest(
        idempotency_key=uuid.uuid4().hex, task_id=t.task_id,
        ranking=[feedback_pb2.RankGroup(indices=[i]) for i in (1, 0, 2, 3)]))
    s = lab.session("boss").get("/api/admin/stats").json()
    names = {x["name"]: x for x in s["labelers"]}
    assert {"ann", "ben", "boss"} <= set(names) and names["boss"]["admin"]
    assert names["ann"]["total"] == {"ranking": 1, "skip": 1} and names["ben"]["open_tasks"] == 1
    [pair] = s["agreement"]["labeler_pairs"]
    assert (pair["a"], pair["b"], pair["tasks"], pair["pairs"]) == ("ann", "ben", 1, 6)
    assert pair["ratio"] == pytest.approx(5 / 6) and s["agreement"]["ratio"] == pytest.approx(5 / 6)
    assert {r["reason"]: r["count"] for r in s["skip_reasons"]}["other"] == 1
    a = lab.stub("trainer").GetAgreement(feedback_pb2.GetAgreementRequest())
    assert a.pairwise_agreement == pytest.approx(s["agreement"]["ratio"])
    assert sum(p.pairs for p in a.labeler_pairs) == a.pairs
    m = scrape(lab.server.metrics_port)
    assert metric_value(m, "rlhf_feedback_submissions_total", 'kind="ranking"') == 2
    assert metric_value(m, "rlhf_feedback_submissions_total", 'kind="skip"') == 1
    assert metric_value(m, "rlhf_feedback_skips_total", 'reason="other"') == 1
    assert metric_value(m, "rlhf_feedback_open_tasks") == lab.store.count_open_tasks() == s["tasks_open"] >= 1
    assert metric_value(m, "rlhf_feedback_labeler_agreement_ratio") == pytest.approx(a.pairwise_agreement)
    assert metric_value(m, "rlhf_http_requests_total",
                        'code="200",route="/api/admin/stats",service="feedback-store",team="labelers"') == 1
    assert metric_value(m, "rlhf_http_requests_total",
                        'code="403",route="/api/admin/stats",service="feedback-store",team="labelers"') == 1


def test_no_prompt_text_in_logs_even_when_the_store_fails(lab, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    t = _task_for(lab, "ann", "ben", prompt=SECRET, candidates=(SECRET + " a", SECRET + " b"))
    c = lab.session("ann")
    assert SECRET in c.get(f"/api/tasks/{t.task_id}").text

    def broken(self, *a, **kw):
        raise RuntimeError(f"disk full while writing {SECRET}")

    monkeypatch.setattr(FeedbackStore, "submit_ranking", broken)
    r = c.post(f"/api/tasks/{t.task_id}/ranking", json={"idempotency_key": "x", "ranking": [[0], [1]]})
    assert r.status_code == 500 and SECRET not in r.text and "nothing was stored" in r.json()["error"]
    monkeypatch.undo()
    assert c.post(f"/api/tasks/{t.task_id}/ranking", json={"idempotency_key": "x", "ranking": [[0], [1]]}).status_code == 201
    assert caplog.records and SECRET not in caplog.text


def test_the_labelers_command(lab, tmp_path, capsys):
    from rlhf.cli import main

    ops = tmp_path / "operator.token"
    ops.write_text(lab.tokens["operator"] + "\n")
    base = ["--addr", lab.target, "--token-file", str(ops)]
    assert main(["labelers", "create", "zed", *base]) == 0
    out = capsys.readouterr()
    lab.tokens["zed"] = out.out.strip()
    assert "labeler zed created" in out.err and lab.tokens["zed"].startswith("rlhfl_")
    assert lab.session("zed").get("/api/session").json()["labeler_id"] == "zed"
    assert main(["labelers", "list", *base]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["zed"][1:3] == ["labeler", "active"] and rows["boss"][1] == "admin"
    assert main(["labelers", "revoke", "zed", *base]) == 0 and "zed revoked" in capsys.readouterr().out
    assert lab.session("operator").get("/admin").status_code == 200  # a credentials-file operator too
    # errors are one line, with the server's words
    assert main(["labelers", "create", "zed", "--addr", lab.target]) == 2  # no operator token
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert main(["labelers", "token", *base]) == 2 and "needs the labeler's name" in capsys.readouterr().err


def test_the_sdk_client_speaks_the_labeling_rpcs(lab):
    from rlhf_client.channel import Credentials
    from rlhf_client.client import FeedbackClient

    with FeedbackClient(lab.target, Credentials(token=lab.tokens["operator"])) as ops:
        token = ops.issue_labeler_token("ann")  # ann's old token stops working
    assert grpc_code(lambda: lab.stub("ann").ListLabelingTasks(feedback_pb2.ListLabelingTasksRequest())) == \
        grpc.StatusCode.UNAUTHENTICATED
    rank, skip = _task_for(lab, "ann"), _task_for(lab, "ann")
    demo = _task_for(lab, "ann", candidates=(), mode=feedback_pb2.TASK_MODE_DEMONSTRATION)
    with FeedbackClient(lab.target, Credentials(token=token)) as ann:
        assert {t.task_id for t in ann.pending_tasks()} >= {rank.task_id, skip.task_id, demo.task_id}
        r = ann.submit_ranking(rank.task_id, [[1], [0, 2], [3]], seconds_spent=9.5,
                               labels=[{"index": 3, "flags": [feedback_pb2.RESPONSE_FLAG_HARMFUL_ADVICE], "quality": 1}])
        ann.skip_task(skip.task_id, feedback_pb2.SKIP_REASON_BROKEN_CANDIDATES, comment="all four identical")
        ann.submit_demonstration("", "Written by ann.", task_id=demo.task_id)
    [c] = [c for c in lab.stub("trainer").ExportComparisons(feedback_pb2.ExportComparisonsRequest(
        task_ids=[rank.task_id])) if c.comparison.labeler_id == "ann"]
    assert c.comparison.submission_id == r.submission_id and c.comparison.seconds_spent == 9.5
    assert [(x.index, x.quality) for x in c.comparison.labels] == [(3, 1)]
    row = lab.sql("select skip_reason, comment from submissions where task_id = :t", t=skip.task_id)
    assert row == [("broken_candidates", "all four identical")]
