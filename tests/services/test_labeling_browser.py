"""The labeling page in a real browser (headless Chromium from Debian, driven by Selenium).

Labelers sign in and work with the keyboard only; the test then looks in the database, on the
rlhf.feedback.v1 events and through gRPC. tests/services/browser.py says how the browser runs.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid

import grpc
import pytest
from rlhf_client import feedback_pb2
from sqlalchemy import event

from tests.services.browser import Browser, axe_source, require_browser
from tests.services.labeling import grpc_code, ranking_task, start_labeling

pytestmark = pytest.mark.slow
ENTER, SPACE = "\ue007", " "
ALT, UP, DOWN = "\ue00a", "\ue013", "\ue015"


@pytest.fixture(scope="module")
def browser():
    require_browser()
    b = Browser()
    yield b
    b.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """ann and ben share the tasks (each new task goes to one of them), boss is an admin."""
    lab = start_labeling(tmp_path_factory.mktemp("labeling-browser"), overlap_share=0.0)
    for name in ("ann", "ben"):
        lab.add_labeler(name)
    lab.add_labeler("boss", admin=True)
    yield lab
    lab.server.stop()


def new_task(lab, **kw) -> tuple[feedback_pb2.LabelingTask, str, str]:
    """A task, its labeler and the other labeler."""
    [t] = lab.create_tasks(ranking_task(**kw))
    [owner] = t.assigned_to
    return t, owner, ("ben" if owner == "ann" else "ann")


def open_task(browser, lab, who: str, task_id: str) -> None:
    browser.sign_in(lab.url, lab.tokens[who])
    browser.driver.get(f"{lab.url}/tasks/{task_id}")
    browser.wait("document.getElementById('submit') !== null")


def card_order(browser) -> list[int]:
    return browser.driver.execute_script(
        "return Array.from(document.querySelectorAll('#ranking > li')).map((c) => Number(c.dataset.index));")


def rank_with_keyboard(browser, order: list[int], ties: set[int] = frozenset(), flags: dict | None = None) -> None:
    """Put the cards in ``order`` (best first), tie each candidate of ``ties`` with the one above and
    tick ``flags`` ({candidate: [flag names]}), with nothing but Tab, arrows, Alt+arrows, T, Enter
    and Space."""
    b = browser
    b.tab_to("e.classList.contains('card')")
    for pos, want in enumerate(order):
        # focus the wanted card with the arrow keys, then lift it to its place with Alt+Up
        for _ in range(20):
            now = card_order(b)
            focused = b.driver.execute_script("return Number(document.activeElement.dataset.index);")
            if focused == want:
                break
            b.press(DOWN if now.index(focused) < now.index(want) else UP)
        while card_order(b).index(want) > pos:
            b.chord(ALT, UP)
        assert b.active(f"e.dataset.index === '{want}'"), "the moved card keeps the focus"
    for i in sorted(ties):
        b.tab_to(f"e.classList.contains('card') && e.dataset.index === '{i}'")
        b.press("t")
    for i, names in (flags or {}).items():
        b.tab_to(f"e.tagName === 'SUMMARY' && e.closest('li').dataset.index === '{i}'")
        b.press(ENTER)  # open "Flags and quality"
        for name in names:
            b.tab_to(f"e.dataset.flag === '{name}' && e.closest('li').dataset.index === '{i}'")
            b.press(SPACE)
    assert card_order(b) == order


def submit_with_keyboard(browser, twice: bool = False) -> None:
    browser.tab_to("e.id === 'submit'")
    browser.press(ENTER, ENTER) if twice else browser.press(ENTER)


def test_keyboard_ranking_with_a_tie_and_a_flag_is_stored_and_announced_once(browser, lab):
    task, owner, _ = new_task(lab)
    open_task(browser, lab, owner, task.task_id)
    # every control of the ranking shows where the focus is
    browser.tab_to("e.classList.contains('card')")
    outline = browser.driver.execute_script(
        "const s = getComputedStyle(document.activeElement); return [s.outlineStyle, parseFloat(s.outlineWidth)];")
    assert outline[0] != "none" and outline[1] >= 2
    rank_with_keyboard(browser, [2, 0, 3, 1], ties={3}, flags={1: ["hallucination"]})
    assert browser.driver.execute_script("return document.querySelector('li[data-index=\"3\"] .tie').checked;")
    browser.screenshot("ranking-page.png")
    key = browser.driver.execute_script("return document.getElementById('answer').dataset.idempotencyKey;")
    submit_with_keyboard(browser, twice=True)  # a double submit
    browser.wait("document.getElementById('submit-status').textContent.startsWith('Stored')")
    # the same request again, as a retry after a lost answer would send it: answered from the first
    again = browser.fetch("POST", f"/api/tasks/{task.task_id}/ranking",
                          {"idempotency_key": key, "ranking": [[2], [0, 3], [1]],
                           "labels": [{"index": 1, "flags": ["hallucination"], "quality": 0}], "seconds_spent": 1})
    assert again["status"] == 200 and again["body"]["duplicate"] is True
    rows = lab.sql("select id, labeler_id, ranking, labels from submissions where task_id = :t", t=task.task_id)
    assert len(rows) == 1
    sid, labeler, ranking, labels = rows[0]
    assert sid == again["body"]["submission_id"] and labeler == owner
    assert json.loads(ranking) == [[2], [0, 3], [1]]
    assert json.loads(labels) == [{"index": 1, "flags": ["hallucination"], "quality": 0}]
    [ev] = lab.events_of(sid)
    c = ev.comparison
    assert [list(g.indices) for g in c.ranking] == [[2], [0, 3], [1]] and c.labeler_id == owner
    assert [(x.index, list(x.flags)) for x in c.labels] == [(1, [feedback_pb2.RESPONSE_FLAG_HALLUCINATION])]
    assert c.seconds_spent > 0


def test_another_labeler_can_open_neither_the_page_nor_the_json_nor_call_grpc(browser, lab):
    task, owner, other = new_task(lab)
    browser.sign_in(lab.url, lab.tokens[other])
    browser.driver.get(f"{lab.url}/tasks/{task.task_id}")
    browser.wait("document.querySelector('h1') !== null")
    assert browser.driver.find_element("css selector", "h1").text == "Not yours to open"
    assert "is not assigned to labeler" in browser.driver.find_element("id", "message").text
    assert task.prompt not in browser.driver.page_source
    got = browser.fetch("GET", f"/api/tasks/{task.task_id}")
    assert got["status"] == 403 and "not assigned" in got["body"]["error"]
    posted = browser.fetch("POST", f"/api/tasks/{task.task_id}/ranking",
                           {"idempotency_key": uuid.uuid4().hex, "ranking": [[0], [1], [2], [3]]})
    assert posted["status"] == 403
    stub = lab.stub(other)
    assert grpc_code(lambda: stub.GetLabelingTask(feedback_pb2.GetLabelingTaskRequest(task_id=task.task_id))) == \
        grpc.StatusCode.PERMISSION_DENIED
    assert grpc_code(lambda: stub.SubmitRanking(feedback_pb2.SubmitRankingRequest(
        idempotency_key=uuid.uuid4().hex, task_id=task.task_id,
        ranking=[feedback_pb2.RankGroup(indices=[i]) for i in range(4)]))) == grpc.StatusCode.PERMISSION_DENIED
    assert task.task_id not in [t.task_id for t in stub.ListLabelingTasks(feedback_pb2.ListLabelingTasksRequest()).tasks]
    assert lab.sql("select count(*) from submissions where task_id = :t", t=task.task_id)[0][0] == 0


def test_a_demonstration_is_written_and_stored(browser, lab):
    task, owner, _ = new_task(lab, prompt="Explain what a reward model is, to a new colleague.", candidates=(),
                              mode=feedback_pb2.TASK_MODE_DEMONSTRATION)
    open_task(browser, lab, owner, task.task_id)
    assert browser.driver.find_element("css selector", "h1").text == "Write a demonstration"
    text = "A reward model scores a response to a prompt;\nit is trained on people's rankings."
    browser.tab_to("e.id === 'response'")
    browser.press(text)
    submit_with_keyboard(browser)
    browser.wait("document.getElementById('submit-status').textContent.startsWith('Stored')")
    demos = [m.demonstration for m in lab.stub("trainer").ExportDemonstrations(feedback_pb2.ExportDemonstrationsRequest())]
    [d] = [d for d in demos if d.task_id == task.task_id]
    assert (d.response, d.labeler_id, d.prompt, d.prompt_id) == (text, owner, task.prompt, task.prompt_id)


def test_a_failed_submission_keeps_the_form_and_says_why_and_the_retry_stores_once(browser, lab):
    task, owner, _ = new_task(lab)
    open_task(browser, lab, owner, task.task_id)
    rank_with_keyboard(browser, [1, 3, 0, 2], ties={0}, flags={2: ["harmful_advice"]})
    key = browser.driver.execute_script("return document.getElementById('answer').dataset.idempotencyKey;")
    failures = []

    def fail_once(conn, cursor, statement, params, context, executemany):  # the database refuses one write
        if statement.lstrip().upper().startswith("INSERT INTO SUBMISSIONS") and not failures:
            failures.append(statement)
            raise sqlite3.OperationalError("disk I/O error")

    event.listen(lab.store.engine, "before_cursor_execute", fail_once)
    try:
        submit_with_keyboard(browser)
        browser.wait("document.getElementById('submit-error').textContent.length > 0")
    finally:
        event.remove(lab.store.engine, "before_cursor_execute", fail_once)
    assert failures
    error = browser.driver.find_element("id", "submit-error").text
    assert error.startswith("Not stored: internal error") and "Everything you entered is kept" in error
    # the form is as the labeler left it, with the same idempotency key
    assert card_order(browser) == [1, 3, 0, 2]
    assert browser.driver.execute_script(
        "return [document.querySelector('li[data-index=\"0\"] .tie').checked,"
        " document.querySelector('li[data-index=\"2\"] [data-flag=\"harmful_advice\"]').checked,"
        " document.getElementById('answer').dataset.idempotencyKey];") == [True, True, key]
    assert lab.sql("select count(*) from submissions where task_id = :t", t=task.task_id)[0][0] == 0
    browser.press(ENTER)  # the focus is still on the submit button: retry
    browser.wait("document.getElementById('submit-status').textContent.startsWith('Stored')")
    rows = lab.sql("select id, idempotency_key, ranking from submissions where task_id = :t", t=task.task_id)
    assert [(k, json.loads(r)) for _, k, r in rows] == [(key, [[1], [0, 3], [2]])]
    assert len(lab.events_of(rows[0][0])) == 1


def test_html_in_a_response_is_shown_as_text_and_runs_nothing(browser, lab):
    script = "<script>window.__pwned = 1</script>"
    img = '<img src=x onerror="window.__pwned = 2">'
    task, owner, _ = new_task(lab, prompt="<b>Say hi</b> <a href='javascript:alert(1)'>x</a>",
                              candidates=(script, img, "plain & simple", "</div><h1>fake</h1>"))
    open_task(browser, lab, owner, task.task_id)
    d = browser.driver
    shown = d.execute_script("return Array.from(document.querySelectorAll('.candidate')).map((e) => e.textContent);")
    assert sorted(shown) == sorted(task.candidates)
    assert d.execute_script("return document.getElementById('prompt').textContent;") == task.prompt
    assert d.execute_script("return window.__pwned;") is None
    assert d.execute_script("return document.querySelectorAll('main img, main script, #prompt b, #prompt a').length;") == 0
    assert [e.text for e in d.find_elements("css selector", "h1")] == ["Rank the responses"]


def test_no_serious_accessibility_violation_on_the_ranking_page_and_the_admin_view(browser, lab):
    source = axe_source()
    task, owner, _ = new_task(lab)
    open_task(browser, lab, owner, task.task_id)
    bad = [v for v in browser.axe(source) if v["impact"] in ("serious", "critical")]
    assert bad == [], bad
    browser.sign_in(lab.url, lab.tokens["boss"])
    browser.driver.get(lab.url + "/admin")
    browser.wait("document.getElementById('agreement') !== null")
    bad = [v for v in browser.axe(source) if v["impact"] in ("serious", "critical")]
    assert bad == [], bad


def test_the_admin_view_shows_counts_skips_and_agreement(browser, lab):
    # a doubly-assigned task ranked by both, and a skip, so that every part of the view has data
    lab.server.service.store.overlap_share = 1.0
    try:
        [t] = lab.create_tasks(ranking_task())
    finally:
        lab.server.service.store.overlap_share = 0.0
    for who, order in (("ann", (0, 1, 2, 3)), ("ben", (1, 0, 2, 3))):
        lab.stub(who).SubmitRanking(feedback_pb2.SubmitRankingRequest(
            idempotency_key=uuid.uuid4().hex, task_id=t.task_id, seconds_spent=30 + order[0],
            ranking=[feedback_pb2.RankGroup(indices=[i]) for i in order]))
    skip, owner, _ = new_task(lab)
    lab.stub(owner).SkipLabelingTask(feedback_pb2.SkipLabelingTaskRequest(
        idempotency_key=uuid.uuid4().hex, task_id=skip.task_id, reason=feedback_pb2.SKIP_REASON_NEEDS_EXPERTISE))
    browser.sign_in(lab.url, lab.tokens["boss"])
    assert browser.driver.current_url.endswith("/admin")
    browser.wait("document.getElementById('agreement') !== null")
    text = browser.driver.find_element("id", "main").text
    assert "ann" in text and "ben" in text and "It needs expertise I do not have" in text
    assert "Pairwise agreement:" in browser.driver.find_element("id", "agreement").text
    browser.screenshot("admin-view.png")


# -- the online loop with the page in it -------------------------------------------------------------


def test_online_loop_with_two_browser_labelers(browser, tmp_path, monkeypatch):
    """The trainer's online-loop job writes K candidates per prompt with the policy; two labelers
    rank them in the browser (the simulated labelers' choices, typed through the page); the RM
    version the job then trains is trained on exactly those comparisons and is served."""
    from rlhf_client import feedback_grpc, reward_grpc, reward_pb2, trainer_grpc, trainer_pb2

    from rlhf.label_client import WordListJudge
    from rlhf.labeler import SimulatedLabeler
    from rlhf.registry import ModelRegistry
    from rlhf.storage.db import make_engine
    from tests.services import scenario
    from tests.services.helpers import free_ports, tiny_policy_registry, up_on_free_ports

    # every task to both labelers, so 4 prompts give the job's 8 comparisons (and an agreement)
    monkeypatch.setenv("RLHF_FEEDBACK_STORE_OVERLAP_SHARE", "1.0")
    tiny_policy_registry(tmp_path / "registry")
    port = free_ports(1)[0]
    close, addrs, _, _ = up_on_free_ports(tmp_path, labeling_port=port)
    url = f"http://127.0.0.1:{port}"
    typed: dict[str, list] = {}
    try:
        with scenario.channel(addrs["feedback-store"]) as ch:  # rlhf up on loopback: the operator needs no token
            stub = feedback_grpc.FeedbackServiceStub(ch)
            tokens = {n: stub.CreateLabeler(feedback_pb2.CreateLabelerRequest(name=n), timeout=30).token
                      for n in ("lab-a", "lab-b")}
        scenario.submit_prompts(addrs["prompt-collector"])
        with scenario.channel(addrs["trainer"]) as ch:
            job = trainer_grpc.TrainerServiceStub(ch).StartJob(trainer_pb2.StartJobRequest(
                kind=trainer_pb2.JOB_KIND_ONLINE_LOOP,
                overrides={**scenario.LOOP_OVERRIDES, "wait_timeout_seconds": "600"}), timeout=30).job
        for seed, name in enumerate(("lab-a", "lab-b")):
            labeler = SimulatedLabeler(WordListJudge(), 0.05, seed=seed)
            browser.sign_in(url, tokens[name])
            # the job's tasks appear once the policy has written the candidates
            deadline = time.monotonic() + 300
            while len(browser.fetch("GET", "/api/tasks")["body"]["tasks"]) < 4:
                assert time.monotonic() < deadline, "the online loop's labeling tasks did not appear"
                time.sleep(1)
            while True:
                listed = browser.fetch("GET", "/api/tasks")["body"]["tasks"]
                if not listed:
                    break
                browser.driver.get(f"{url}/tasks/{listed[0]['task_id']}")
                browser.wait("document.getElementById('submit') !== null")
                task = browser.fetch("GET", f"/api/tasks/{listed[0]['task_id']}")["body"]
                order = labeler.rank(task["prompt"], task["candidates"])
                rank_with_keyboard(browser, list(order))
                submit_with_keyboard(browser)
                browser.wait("document.getElementById('submit-status').textContent.startsWith('Stored')")
                typed[f"{name}/{task['task_id']}"] = [[i] for i in order]
        with scenario.channel(addrs["trainer"]) as ch:
            t = trainer_grpc.TrainerServiceStub(ch)
            for _ in t.WatchJob(trainer_pb2.WatchJobRequest(job_id=job.job_id), timeout=900):
                pass
            job = t.GetJob(trainer_pb2.GetJobRequest(job_id=job.job_id), timeout=30).job
        assert job.status == trainer_pb2.JOB_STATUS_SUCCEEDED, job.message

        # every comparison in the store is one the browser labelers typed, exactly once
        eng = make_engine(f"sqlite:///{tmp_path / 'rlhf.db'}")
        with eng.connect() as c:
            rows = c.exec_driver_sql("select labeler_id, task_id, ranking from submissions").all()
            assert c.exec_driver_sql("select count(*) from outbox where published_at is null").scalar() == 0
        eng.dispose()
        assert len(typed) == 8 and {f"{l}/{t}": json.loads(r) for l, t, r in rows} == typed
        # the RM version of this job was trained on exactly those comparisons, and it is served
        reg = ModelRegistry(tmp_path / "registry")
        [rm] = reg.versions("reward")
        data = reg.manifest("reward", rm).data
        assert rm in job.published_versions and data["comparisons"] + data["heldout_comparisons"] == 8
        with scenario.channel(addrs["reward-scorer"]) as ch:
            served = reward_grpc.RewardServiceStub(ch).GetRewardModelVersion(
                reward_pb2.GetRewardModelVersionRequest(), timeout=30).reward_model_version
        assert served == rm
        v, gen_v = scenario.served_version(addrs["policy-server"])
        assert v == gen_v == job.published_versions[-1]
    finally:
        close()
