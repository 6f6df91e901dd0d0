"""FeedbackStore on SQLite and (with RLHF_TEST_DATABASE_URL) PostgreSQL."""

from __future__ import annotations

import contextlib
import hashlib
import threading
from datetime import datetime, timedelta, timezone

import pytest
from rlhf_client import common_pb2, feedback_pb2
from sqlalchemy import select

from rlhf.errors import ConflictError, DataError, NotFoundError
from rlhf.storage import feedback as feedback_mod
from rlhf.storage.feedback import FeedbackStore, TaskIn, pair_agreement
from rlhf.storage.schema import outbox
from services.feedback_store.messages import EVENT_TYPE, announce, comparison_proto, demonstration_proto, task_proto

TOPIC = "rlhf.feedback.v1"

TRAIN, TEST = common_pb2.SPLIT_TRAIN, common_pb2.SPLIT_TEST
RANKING, BEST_OF_K = feedback_pb2.COMPARISON_KIND_RANKING, feedback_pb2.COMPARISON_KIND_BEST_OF_K


def task_in(k=4, prompt="Explain KL divergence.", split=TRAIN, prompt_id="p1", version="v1") -> TaskIn:
    return TaskIn(prompt=prompt, prompt_id=prompt_id, split=split, candidates=[f"answer {i}" for i in range(k)],
                  policy_version=version)


@pytest.fixture
def store(engine):
    return FeedbackStore(engine, announce)


@pytest.fixture
def task(store):
    return store.create_tasks([task_in()])[0]


def events(engine) -> list[feedback_pb2.FeedbackEvent]:
    with engine.connect() as conn:
        rows = conn.execute(select(outbox).order_by(outbox.c.id)).all()
    assert all(r.topic == TOPIC and r.message_type == EVENT_TYPE for r in rows)
    return [feedback_pb2.FeedbackEvent.FromString(r.payload) for r in rows]


# -- tasks ---------------------------------------------------------------------------------------

def test_create_get_task(store):
    rows = store.create_tasks([task_in(k=2), task_in(k=16, split=TEST, prompt_id="", version="")])
    assert [r.k for r in rows] == [2, 16]
    got = store.get_task(rows[1].task_id)
    assert got == rows[1]
    assert got.split == TEST and got.prompt_id == "" and got.candidates[15] == "answer 15"
    msg = task_proto(got)
    assert msg.task_id == got.task_id and list(msg.candidates) == got.candidates
    assert msg.create_time.ToDatetime(tzinfo=timezone.utc) == got.created_at
    with pytest.raises(NotFoundError, match="not found"):
        store.get_task("nope")


@pytest.mark.parametrize("items,match", [
    ([], r"^tasks: the batch is empty$"),
    ([task_in()] * 1001, r"^tasks: at most 1000 per batch, got 1001$"),
    ([task_in(), task_in(prompt="")], r"^tasks\[1\]\.prompt is empty$"),
    ([task_in(prompt="  ")], r"^tasks\[0\]\.prompt is empty$"),
    ([task_in(), task_in(), task_in(k=1)], r"^tasks\[2\]: needs at least 2 candidates, got K=1$"),
    ([task_in(k=17)], r"^tasks\[0\]: at most 16 candidates, got K=17$"),
    ([task_in(), TaskIn("secret prompt", "p", TRAIN, ["a", ""], "v")], r"^tasks\[1\]\.candidates\[1\] is empty$"),
    ([TaskIn("secret prompt", "p", 9, ["a", "b"], "v")], r"^tasks\[0\]\.split: must be"),
    ([TaskIn("x" * 100_001, "p", TRAIN, ["a", "b"], "v")], r"^tasks\[0\]\.prompt is 100001 characters long"),
])
def test_create_tasks_validation(store, count, items, match):
    with pytest.raises(DataError, match=match) as err:
        store.create_tasks(items)
    assert "secret" not in str(err.value)
    assert count("labeling_tasks") == 0


def test_list_tasks_pages_and_leaves_out_answered(store):
    ids = [t.task_id for t in store.create_tasks([task_in(prompt=f"q{i}") for i in range(7)])]
    seen, token = [], ""
    while True:
        rows, token = store.list_tasks(page_size=3, page_token=token)
        seen += [r.task_id for r in rows]
        if not token:
            break
    assert seen == ids
    store.submit_ranking("k1", ids[0], "alice", [[0], [1], [2], [3]])
    store.submit_best_of_k("k2", ids[2], "alice", 1)
    store.submit_ranking("k3", ids[3], "bob", [[0, 1], [2, 3]])
    store.submit_demonstration("k4", "q", "", TRAIN, "alice", "a demonstration")  # not an answer to a task
    assert [r.task_id for r in store.list_tasks("alice")[0]] == [ids[i] for i in (1, 3, 4, 5, 6)]
    assert [r.task_id for r in store.list_tasks("bob")[0]] == [ids[i] for i in (0, 1, 2, 4, 5, 6)]
    assert [r.task_id for r in store.list_tasks("carol", page_size=2)[0]] == ids[:2]
    page, token = store.list_tasks("alice", page_size=2)
    assert [r.task_id for r in page] == [ids[1], ids[3]]
    assert [r.task_id for r in store.list_tasks("alice", page_size=2, page_token=token)[0]] == [ids[4], ids[5]]
    with pytest.raises(DataError, match="page_token"):
        store.list_tasks(page_token="%%%")
    with pytest.raises(DataError, match="page_size"):
        store.list_tasks(page_size=5000)


# -- submissions: validation ---------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,error,match", [
    (dict(key=""), DataError, r"^idempotency_key: must be 1\.\.200 characters, got 0$"),
    (dict(key="k" * 201), DataError, r"^idempotency_key: must be 1\.\.200 characters, got 201$"),
    (dict(labeler_id=""), DataError, r"^labeler_id is empty$"),
    (dict(task_id="missing"), NotFoundError, r"labeling task 'missing' not found"),
    (dict(ranking=[]), DataError, r"^ranking is empty$"),
    (dict(ranking=[[0, 1], [], [2, 3]]), DataError, r"^ranking\[1\]: the group is empty$"),
    (dict(ranking=[[0, 1.0], [2, 3]]), DataError, r"^ranking\[0\]: candidate indices must be integers"),
    (dict(ranking=[[0, True], [2, 3]]), DataError, r"^ranking\[0\]: candidate indices must be integers"),
    (dict(ranking=[[0], [2], [1, 2], [3]]), DataError, r"^ranking: index 2 appears twice$"),
    (dict(ranking=[[0], [1], [2], [7]]), DataError, r"^ranking: index 7 out of range for K=4$"),
    (dict(ranking=[[0], [1], [2], [-1]]), DataError, r"^ranking: index -1 out of range for K=4$"),
    (dict(ranking=[[0], [1], [2]]), DataError, r"^ranking covers 3 of K=4 candidates$"),
    (dict(ranking=[[0, 1, 2, 3]]), DataError, r"^ranking: one group ties all K=4 candidates"),
])
def test_submit_ranking_validation(store, task, count, kwargs, error, match):
    args = dict(key="key-1", task_id=task.task_id, labeler_id="alice", ranking=[[0], [1], [2], [3]]) | kwargs
    with pytest.raises(error, match=match):
        store.submit_ranking(args["key"], args["task_id"], args["labeler_id"], args["ranking"])
    assert count("submissions") == 0 and count("outbox") == 0


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(best_index=4), DataError, r"^best_index: 4 out of range for K=4$"),
    (dict(best_index=-1), DataError, r"^best_index: -1 out of range for K=4$"),
    (dict(best_index="1"), DataError, r"^best_index: expected an integer"),
    (dict(task_id="missing"), NotFoundError, "not found"),
    (dict(task_id=""), DataError, r"^task_id is empty$"),
    (dict(key=""), DataError, "idempotency_key"),
    (dict(labeler_id=" "), DataError, r"^labeler_id is empty$"),
])
def test_submit_best_of_k_validation(store, task, count, kwargs, error, match):
    args = dict(key="key-1", task_id=task.task_id, labeler_id="alice", best_index=1) | kwargs
    with pytest.raises(error, match=match):
        store.submit_best_of_k(args["key"], args["task_id"], args["labeler_id"], args["best_index"])
    assert count("submissions") == 0 and count("outbox") == 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompt=""), r"^prompt is empty$"),
    (dict(response="   "), r"^response is empty$"),
    (dict(response="secret " * 20_000), r"^response is 140000 characters long, the limit is 100000$"),
    (dict(prompt="secret\x00"), r"^prompt contains a NUL character$"),
    (dict(split=5), r"^split: must be"),
    (dict(labeler_id=""), r"^labeler_id is empty$"),
    (dict(prompt_id="p" * 201), r"^prompt_id is 201 characters long"),
    (dict(key="k" * 201), r"^idempotency_key"),
])
def test_submit_demonstration_validation(store, count, kwargs, match):
    args = dict(key="key-1", prompt="secret question", prompt_id="p1", split=TRAIN, labeler_id="alice",
                response="an answer") | kwargs
    with pytest.raises(DataError, match=match) as err:
        store.submit_demonstration(**args)
    assert "secret" not in str(err.value)
    assert count("submissions") == 0 and count("outbox") == 0


# -- submissions: storage, events, idempotency ---------------------------------------------------

def test_ranking_event_carries_the_full_comparison(store, task, engine):
    sid, dup = store.submit_ranking("key-1", task.task_id, "alice", [[2], [0, 3], [1]])
    assert not dup
    [event] = events(engine)
    assert event.event_id == sid and event.WhichOneof("payload") == "comparison"
    c = event.comparison
    assert (c.submission_id, c.task_id, c.prompt, c.prompt_id, c.split, c.policy_version, c.labeler_id, c.kind) == \
        (sid, task.task_id, task.prompt, "p1", TRAIN, "v1", "alice", RANKING)
    assert list(c.candidates) == task.candidates
    assert [list(g.indices) for g in c.ranking] == [[2], [0, 3], [1]]
    assert c.create_time == event.event_time and c.create_time.seconds > 0
    assert [comparison_proto(r) for r in store.export_comparisons()] == [c]


def test_one_answer_per_labeler_per_task(store, task, count):
    store.submit_ranking("key-1", task.task_id, "alice", [[0], [1], [2], [3]])
    for again in (lambda: store.submit_ranking("key-2", task.task_id, "alice", [[3], [2], [1], [0]]),
                  lambda: store.submit_best_of_k("key-3", task.task_id, "alice", 1)):
        with pytest.raises(ConflictError, match="alice' already answered task .*one answer per labeler per task"):
            again()
    assert count("submissions") == 1 and count("outbox") == 1
    store.submit_ranking("key-4", task.task_id, "bob", [[3], [2], [1], [0]])  # another labeler may
    assert count("submissions") == 2


def test_best_of_k_and_demonstration_events(store, task, engine):
    sid1, _ = store.submit_best_of_k("b-1", task.task_id, "bob", 3)
    sid2, _ = store.submit_demonstration("d-1", "Write a haiku.", "p9", TEST, "carol", "Old pond...")
    e1, e2 = events(engine)
    assert e1.event_id == sid1 and e1.comparison.kind == BEST_OF_K and e1.comparison.best_index == 3
    assert list(e1.comparison.ranking) == [] and list(e1.comparison.candidates) == task.candidates
    assert e2.event_id == sid2 and e2.WhichOneof("payload") == "demonstration"
    d = e2.demonstration
    assert (d.submission_id, d.prompt, d.prompt_id, d.split, d.labeler_id, d.response) == \
        (sid2, "Write a haiku.", "p9", TEST, "carol", "Old pond...")
    assert [demonstration_proto(r) for r in store.export_demonstrations()] == [d]


def test_idempotent_replay_stores_and_announces_once(store, task, count):
    sid, dup = store.submit_ranking("key-1", task.task_id, "alice", [[1, 0], [2], [3]])
    assert not dup
    assert store.submit_ranking("key-1", task.task_id, "alice", [[1, 0], [2], [3]]) == (sid, True)
    assert store.submit_ranking("key-1", task.task_id, "alice", [[0, 1], [2], [3]]) == (sid, True)  # ties: no order
    assert count("submissions") == 1 and count("outbox") == 1
    bid, _ = store.submit_best_of_k("key-2", task.task_id, "bob", 2)  # one answer per labeler per task
    assert store.submit_best_of_k("key-2", task.task_id, "bob", 2) == (bid, True)
    did, _ = store.submit_demonstration("key-3", "q", "", 0, "alice", "r")
    assert store.submit_demonstration("key-3", "q", "", 0, "alice", "r") == (did, True)
    assert count("submissions") == 3 and count("outbox") == 3


@pytest.mark.parametrize("second", [
    lambda s, t: s.submit_ranking("key-1", t, "alice", [[1], [0], [2], [3]]),
    lambda s, t: s.submit_ranking("key-1", t, "bob", [[0], [1], [2], [3]]),
    lambda s, t: s.submit_best_of_k("key-1", t, "alice", 0),
    lambda s, t: s.submit_demonstration("key-1", "q", "", 0, "alice", "r"),
])
def test_reused_key_with_other_content_conflicts(store, task, count, second):
    store.submit_ranking("key-1", task.task_id, "alice", [[0], [1], [2], [3]])
    with pytest.raises(ConflictError, match="idempotency_key: already used for a different submission"):
        second(store, task.task_id)
    assert count("submissions") == 1 and count("outbox") == 1


def _hammer(fn, n=8):
    results, errors = [], []
    barrier = threading.Barrier(n)

    def worker():
        try:
            barrier.wait()
            results.append(fn())
        except Exception as e:  # noqa: BLE001 - asserted on below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


def test_concurrent_identical_rankings_store_one_row(store, task, count):
    results, errors = _hammer(lambda: store.submit_ranking("same-key", task.task_id, "alice", [[3], [2], [1], [0]]))
    assert errors == []
    assert len({sid for sid, _ in results}) == 1 and sorted(dup for _, dup in results) == [False] + [True] * 7
    assert count("submissions") == 1 and count("outbox") == 1


def test_concurrent_identical_demonstrations_store_one_row(store, count):
    results, errors = _hammer(lambda: store.submit_demonstration("demo-key", "q", "p", TRAIN, "al", "resp"))
    assert errors == []
    assert len({sid for sid, _ in results}) == 1 and sum(not dup for _, dup in results) == 1
    assert count("submissions") == 1 and count("outbox") == 1


def test_concurrent_conflicting_submissions(store, task, count):
    """Same key, different content, at once: one stores, the others conflict or are duplicates of it."""
    i = iter(range(8))
    lock = threading.Lock()

    def submit():
        with lock:
            n = next(i)
        return store.submit_best_of_k("k", task.task_id, "alice", n % 2)

    results, errors = _hammer(submit)
    assert all(isinstance(e, ConflictError) for e in errors)
    assert count("submissions") == 1 and count("outbox") == 1
    assert sum(not dup for _, dup in results) == 1


# -- export, counts, agreement ---------------------------------------------------------------------

def test_export_filters(store, count, monkeypatch):
    monkeypatch.setattr(feedback_mod, "_EXPORT_CHUNK", 3)  # several chunks
    trains = store.create_tasks([task_in(split=TRAIN) for _ in range(4)])  # one answer per labeler per task
    tests = store.create_tasks([task_in(k=3, split=TEST) for _ in range(4)])
    order = []
    for i in range(4):
        order.append(store.submit_ranking(f"r{i}", trains[i].task_id, f"lab{i % 2}", [[0], [1], [2], [3]])[0])
        order.append(store.submit_best_of_k(f"b{i}", tests[i].task_id, f"lab{i % 2}", i % 3)[0])
    demos = [store.submit_demonstration(f"d{i}", f"q{i}", "", [TRAIN, TEST][i % 2], f"lab{i % 2}", "r")[0]
             for i in range(7)]
    everything = list(store.export_comparisons())
    assert [c.submission_id for c in everything] == order  # oldest first, across chunks
    assert store.count_comparisons() == 8 and count("submissions") == 15
    assert [c.submission_id for c in store.export_comparisons(split=TRAIN)] == order[0::2]
    assert all(c.kind == "ranking" and c.task.split == TRAIN for c in store.export_comparisons(split=TRAIN))
    assert [c.submission_id for c in store.export_comparisons(split=TEST)] == order[1::2]
    assert [c.submission_id for c in store.export_comparisons(labeler_id="lab1")] == \
        [s for j, s in enumerate(order) if (j // 2) % 2 == 1]
    assert [c.submission_id for c in store.export_comparisons(split=TEST, labeler_id="lab0")] == \
        [order[1], order[5]]
    assert list(store.export_comparisons(labeler_id="nobody")) == []
    # since: at or after a stored submission's time
    since = everything[5].created_at
    assert [c.submission_id for c in store.export_comparisons(since=since)] == order[5:]
    assert store.count_comparisons(since=since) == 3
    assert list(store.export_comparisons(since=datetime.now(timezone.utc) + timedelta(hours=1))) == []
    naive = since.replace(tzinfo=None)  # naive datetimes are taken as UTC
    assert [c.submission_id for c in store.export_comparisons(since=naive)] == order[5:]
    # demonstrations
    assert [d.submission_id for d in store.export_demonstrations()] == demos
    assert [d.submission_id for d in store.export_demonstrations(split=TEST)] == demos[1::2]
    assert [d.submission_id for d in store.export_demonstrations(labeler_id="lab0")] == demos[0::2]
    d_since = list(store.export_demonstrations())[4].created_at
    assert [d.submission_id for d in store.export_demonstrations(since=d_since, split=TRAIN)] == [demos[4], demos[6]]


def test_export_validates_eagerly(store):
    with pytest.raises(DataError, match="split"):
        store.export_comparisons(split=9)
    with pytest.raises(DataError, match="since"):
        store.export_demonstrations(since="yesterday")


def test_pair_agreement_by_hand():
    a, b, c = [[0], [1], [2]], [[1], [0], [2]], [[0, 1], [2]]
    # (0,1): a says 0>1, b says 1>0 -> disagree; (0,2) and (1,2): agree
    assert pair_agreement([a, b]) == (2, 3)
    # a vs tie: (0,1) disagree (above vs tied); b vs tie likewise; every other pair agrees
    assert pair_agreement([a, b, c]) == (6, 9)
    assert pair_agreement([c, c]) == (3, 3)  # both tie 0 and 1: agreement
    assert pair_agreement([[[0], [1]], [[1], [0]]]) == (0, 1)
    assert pair_agreement([a]) == (0, 0)
    k4 = [[[0], [1], [2], [3]], [[3], [2], [1], [0]]]
    assert pair_agreement(k4) == (0, 6)


def test_agreement_over_the_store(store):
    assert store.agreement() == (0.0, 0, 0)
    t1 = store.create_tasks([task_in(k=3)])[0].task_id
    t2 = store.create_tasks([task_in(k=3)])[0].task_id
    t3 = store.create_tasks([task_in(k=2)])[0].task_id
    store.submit_ranking("a-1", t1, "A", [[0], [1], [2]])
    store.submit_ranking("b-1", t1, "B", [[1], [0], [2]])  # vs A: 2 of 3 pairs agree
    store.submit_ranking("a-2", t2, "A", [[0], [1], [2]])  # one labeler only: not counted
    store.submit_best_of_k("b-2", t2, "B", 0)  # best-of-K is not a ranking
    store.submit_ranking("a-3", t3, "A", [[0], [1]])
    store.submit_ranking("b-3", t3, "B", [[0], [1]])
    store.submit_ranking("c-3", t3, "C", [[1], [0]])  # AB agree, AC and BC disagree: 1 of 3
    assert store.agreement() == (pytest.approx(3 / 6), 2, 6)
    assert store.agreement(since=datetime.now(timezone.utc) + timedelta(hours=1)) == (0.0, 0, 0)
    # since leaves out A's ranking of t1: t1 no longer has two labelers
    b1_time = next(c.created_at for c in store.export_comparisons() if c.labeler_id == "B" and c.task.task_id == t1)
    assert store.agreement(since=b1_time) == (pytest.approx(1 / 3), 1, 3)


def test_open_tasks_are_those_without_a_comparison(store):
    assert store.count_open_tasks() == 0
    t1, t2, t3 = (t.task_id for t in store.create_tasks([task_in(), task_in(), task_in()]))
    assert store.count_open_tasks() == 3
    store.submit_ranking("r-1", t1, "A", [[0], [1], [2], [3]])
    store.submit_best_of_k("b-2", t2, "A", 1)
    store.submit_ranking("r-1b", t1, "B", [[1], [0], [2], [3]])  # a second label changes nothing
    store.submit_demonstration("d-1", "Explain KL.", "p9", TRAIN, "A", "It measures ...")  # not a comparison
    assert store.count_open_tasks() == 1


def test_lost_race_on_the_idempotency_key(store, task, count, monkeypatch):
    """Another submission with our key commits between our lookup and our insert: the insert hits
    the unique constraint and we answer from the stored row (duplicate, or conflict)."""
    sid, _ = store.submit_ranking("key-1", task.task_id, "alice", [[0], [1], [2], [3]])
    real, calls = FeedbackStore._existing, []

    def blind_in_transaction(conn, key):  # odd calls: the lookup inside the writing transaction
        calls.append(key)
        return None if len(calls) % 2 else real(conn, key)

    monkeypatch.setattr(FeedbackStore, "_existing", staticmethod(blind_in_transaction))
    assert store.submit_ranking("key-1", task.task_id, "alice", [[0], [1], [2], [3]]) == (sid, True)
    with pytest.raises(ConflictError):
        store.submit_ranking("key-1", task.task_id, "alice", [[1], [0], [2], [3]])
    assert count("submissions") == 1 and count("outbox") == 1
    assert len(calls) == 4


# -- labelers, assignment and access --------------------------------------------------------------

from rlhf.errors import PermissionDeniedError  # noqa: E402
from rlhf.storage.feedback import CandidateLabel  # noqa: E402


def test_without_registered_labelers_every_labeler_sees_every_task(store):
    ids = [t.task_id for t in store.create_tasks([task_in(prompt=f"q{i}") for i in range(3)])]
    assert all(t.assigned_to == () for t in map(store.get_task, ids))
    for who in ("alice", "bob"):
        assert [r.task_id for r in store.list_tasks(who)[0]] == ids
        assert store.get_task(ids[0], who).task_id == ids[0]
    assert store.count_open_tasks() == 3


def test_each_new_task_goes_to_one_labeler_and_a_share_to_two(engine):
    store = FeedbackStore(engine, announce, overlap_share=0.25)
    for name in ("ann", "ben", "cat"):
        store.create_labeler(name)
    store.create_labeler("boss", admin=True)  # an admin labels nothing: never assigned
    rows = store.create_tasks([task_in(prompt=f"q{i}") for i in range(200)])
    sizes = [len(r.assigned_to) for r in rows]
    assert set(sizes) == {1, 2} and 0.15 < sizes.count(2) / 200 < 0.35
    assert all("boss" not in r.assigned_to for r in rows)
    loads = {n: sum(n in r.assigned_to for r in rows) for n in ("ann", "ben", "cat")}
    assert max(loads.values()) - min(loads.values()) <= 1  # least loaded first
    for name in loads:
        assert {r.task_id for r in store.list_tasks(name, page_size=1000)[0]} == \
            {r.task_id for r in rows if name in r.assigned_to}
        assert store.count_open_tasks(name) == loads[name]
    assert [len(r.assigned_to) for r in FeedbackStore(engine, announce, overlap_share=1.0)
            .create_tasks([task_in()] * 5)] == [2] * 5
    assert [len(r.assigned_to) for r in FeedbackStore(engine, announce, overlap_share=0.0)
            .create_tasks([task_in()] * 5)] == [1] * 5


def test_a_labeler_reads_and_answers_only_their_tasks(engine, count):
    store = FeedbackStore(engine, announce, overlap_share=0.0)
    store.create_labeler("ann")
    store.create_labeler("ben")
    rows = store.create_tasks([task_in(), task_in()])
    mine = next(r for r in rows if r.assigned_to == ("ann",))
    theirs = next(r for r in rows if r.assigned_to == ("ben",))
    assert store.get_task(mine.task_id, "ann").task_id == mine.task_id
    attempts = [lambda: store.get_task(theirs.task_id, "ann"),
                lambda: store.submit_ranking("k1", theirs.task_id, "ann", [[0], [1], [2], [3]]),
                lambda: store.submit_best_of_k("k2", theirs.task_id, "ann", 0),
                lambda: store.skip_task("k3", theirs.task_id, "ann", "other")]
    for attempt in attempts:
        with pytest.raises(PermissionDeniedError, match="is not assigned to labeler 'ann'"):
            attempt()
    assert count("submissions") == 0 and count("outbox") == 0
    store.submit_ranking("k4", mine.task_id, "ann", [[0], [1], [2], [3]])
    assert count("submissions") == 1


def test_reassign_and_revoke_move_open_tasks(engine, count):
    store = FeedbackStore(engine, announce, overlap_share=0.0)
    store.create_labeler("ann")
    rows = store.create_tasks([task_in(), task_in(), task_in()])
    assert {r.assigned_to for r in rows} == {("ann",)}
    store.submit_ranking("k1", rows[0].task_id, "ann", [[0], [1], [2], [3]])
    assert store.reassign_tasks("ann") == 0  # nobody to take them: they stay
    store.create_labeler("ben")
    assert store.reassign_tasks("ann") == 2  # the answered one stays answered
    assert [store.get_task(r.task_id).assigned_to for r in rows] == [("ann",), ("ben",), ("ben",)]
    with pytest.raises(ConflictError, match="was reassigned to another labeler"):
        store.submit_ranking("k2", rows[1].task_id, "ann", [[0], [1], [2], [3]])
    assert store.list_tasks("ann")[0] == []
    # revoking the last labeler who could take them leaves the tasks open to everyone
    assert store.revoke_labeler("ben") == 0
    assert store.get_task(rows[1].task_id).assigned_to == ()
    assert [r.task_id for r in store.list_tasks("carol")[0]] == [rows[1].task_id, rows[2].task_id]
    assert store.has_labelers()  # ann is still active
    with pytest.raises(NotFoundError):
        store.revoke_labeler("nobody")


def test_labeler_tokens(store):
    row, token = store.create_labeler("ann@example.org")
    assert token.startswith("rlhfl_") and len(token) > 40 and row.active and not row.admin
    digest = hashlib.sha256(token.encode()).hexdigest()
    assert store.active_token_digests()[digest].name == "ann@example.org"
    with pytest.raises(ConflictError, match="exists"):
        store.create_labeler("ann@example.org")
    new = store.issue_token("ann@example.org")
    assert digest not in store.active_token_digests()
    assert hashlib.sha256(new.encode()).hexdigest() in store.active_token_digests()
    store.revoke_labeler("ann@example.org")
    assert store.active_token_digests() == {}
    again = store.issue_token("ann@example.org")  # a new token makes them active again
    assert [r.active for r in store.list_labelers()] == [True] and store.active_token_digests()
    assert again != new
    for bad in ("", "a" * 65, "-x", "ann smith", "a/b", "<script>"):
        with pytest.raises(DataError, match="labeler name"):
            store.create_labeler(bad)
    with pytest.raises(NotFoundError):
        store.issue_token("nobody")
    with engine_rows(store) as rows:
        assert all(again not in str(r) and new not in str(r) for r in rows)  # only digests are stored


@contextlib.contextmanager
def engine_rows(store):
    with store.engine.connect() as conn:
        yield conn.exec_driver_sql("SELECT * FROM labelers").all()


# -- labels, skips, task modes -------------------------------------------------------------------

def test_labels_are_stored_normalised_and_announced(store, task, engine):
    labels = [CandidateLabel(2, ("harmful_advice", "hallucination"), 2), CandidateLabel(0, (), 7),
              CandidateLabel(1, (), 0)]  # an empty label is dropped
    sid, _ = store.submit_ranking("k", task.task_id, "ann", [[0], [1], [2], [3]], labels, seconds_spent=42.5)
    [event] = events(engine)
    c = event.comparison
    assert [(x.index, list(x.flags), x.quality) for x in c.labels] == \
        [(0, [], 7), (2, [feedback_pb2.RESPONSE_FLAG_HALLUCINATION, feedback_pb2.RESPONSE_FLAG_HARMFUL_ADVICE], 2)]
    assert c.seconds_spent == 42.5
    [row] = store.export_comparisons()
    assert row.labels == (CandidateLabel(0, (), 7), CandidateLabel(2, ("hallucination", "harmful_advice"), 2))
    # the same answer with the labels in another order is the same submission
    assert store.submit_ranking("k", task.task_id, "ann", [[0], [1], [2], [3]], list(reversed(labels)),
                                seconds_spent=50.0) == (sid, True)


@pytest.mark.parametrize("labels,match", [
    ([CandidateLabel(4, ("hallucination",))], r"candidate index 4 out of range for K=4"),
    ([CandidateLabel(0, ("rude",))], r"labels\[0\]\.flags: unknown flag 'rude'"),
    ([CandidateLabel(0, ("hallucination", "hallucination"))], r"a flag appears twice"),
    ([CandidateLabel(0, (), 8)], r"labels\[0\]\.quality: must be 1\.\.7"),
    ([CandidateLabel(0, (), -1)], r"quality"),
    ([CandidateLabel(1, (), 3), CandidateLabel(1, (), 4)], r"candidate 1 is labelled twice"),
    ([CandidateLabel(-1, (), 3)], r"labels\[0\]\.index"),
    (["hallucination"], r"labels\[0\]: expected a candidate label"),
])
def test_bad_labels_store_nothing(store, task, count, labels, match):
    with pytest.raises(DataError, match=match):
        store.submit_ranking("k", task.task_id, "ann", [[0], [1], [2], [3]], labels)
    assert count("submissions") == 0 and count("outbox") == 0


@pytest.mark.parametrize("seconds", [-1.0, float("nan"), float("inf"), 86_401.0, "3"])
def test_bad_seconds_store_nothing(store, task, count, seconds):
    with pytest.raises(DataError, match="seconds_spent"):
        store.submit_best_of_k("k", task.task_id, "ann", 0, seconds_spent=seconds)
    assert count("submissions") == 0


def test_skip_is_an_answer_with_a_reason(store, task, engine, count):
    sid, dup = store.skip_task("s", task.task_id, "ann", "unclear_prompt", "what is asked?", seconds_spent=3)
    assert not dup and store.list_tasks("ann")[0] == []
    assert store.skip_task("s", task.task_id, "ann", "unclear_prompt", "what is asked?") == (sid, True)
    with pytest.raises(ConflictError, match=r"already answered task .* \(skipped it\)"):
        store.submit_ranking("r", task.task_id, "ann", [[0], [1], [2], [3]])
    [event] = events(engine)
    assert event.WhichOneof("payload") == "skip"
    s = event.skip
    assert (s.submission_id, s.task_id, s.labeler_id, s.reason, s.comment, s.seconds_spent) == \
        (sid, task.task_id, "ann", feedback_pb2.SKIP_REASON_UNCLEAR_PROMPT, "what is asked?", 3.0)
    assert list(store.export_comparisons()) == [] and store.count_comparisons() == 0
    for reason, comment, match in (("bored", "", "reason: must be one of"), ("other", "x" * 1001, "comment is 1001")):
        with pytest.raises(DataError, match=match):
            store.skip_task("s2", task.task_id, "ben", reason, comment)
    assert count("submissions") == 1


def test_task_modes(store, engine, count):
    best, demo = store.create_tasks([TaskIn("Pick one", "p", TRAIN, ["a", "b", "c"], "v", "best_of_k"),
                                     TaskIn("Write a haiku about rain.", "p9", TEST, [], "", "demonstration")])
    assert (best.mode, demo.mode, demo.k) == ("best_of_k", "demonstration", 0)
    with pytest.raises(DataError, match="asks for the best of its candidates"):
        store.submit_ranking("r", best.task_id, "ann", [[0], [1], [2]])
    store.submit_best_of_k("b", best.task_id, "ann", 2)
    with pytest.raises(DataError, match=r"asks for a demonstration"):
        store.submit_best_of_k("b2", demo.task_id, "ann", 0)
    sid, _ = store.submit_demonstration("d", "", "", 0, "ann", "Grey sky, soft drumming", task_id=demo.task_id)
    [d] = store.export_demonstrations()
    assert (d.submission_id, d.prompt, d.prompt_id, d.split, d.task_id) == \
        (sid, "Write a haiku about rain.", "p9", TEST, demo.task_id)
    with pytest.raises(ConflictError, match="already answered"):
        store.submit_demonstration("d2", "", "", 0, "ann", "again", task_id=demo.task_id)
    with pytest.raises(DataError, match="prompt: differs from the task's"):
        store.submit_demonstration("d3", "another prompt", "", 0, "ben", "x", task_id=demo.task_id)
    with pytest.raises(DataError, match="asks for the best"):
        store.submit_demonstration("d4", "", "", 0, "ben", "x", task_id=best.task_id)
    bad = [(TaskIn("q", "p", TRAIN, ["a"], "v", "demonstration"), "a demonstration task has no candidates"),
           (TaskIn("q", "p", TRAIN, ["a", "b"], "v", "essay"), r"mode: must be one of")]
    for item, match in bad:
        with pytest.raises(DataError, match=match):
            store.create_tasks([item])
    assert count("labeling_tasks") == 2 and count("submissions") == 2


def test_labeler_stats_and_progress(engine):
    store = FeedbackStore(engine, announce, overlap_share=1.0)
    store.create_labeler("ann")
    store.create_labeler("ben")
    store.create_labeler("boss", admin=True)
    t1, t2, t3 = store.create_tasks([task_in(), task_in(), task_in()])
    start = datetime.now(timezone.utc) - timedelta(seconds=1)
    store.submit_ranking("a1", t1.task_id, "ann", [[0], [1], [2], [3]], seconds_spent=10)
    store.submit_ranking("b1", t1.task_id, "ben", [[1], [0], [2], [3]], seconds_spent=30)
    store.submit_best_of_k("a2", t2.task_id, "ann", 0, seconds_spent=20)
    store.skip_task("a3", t3.task_id, "ann", "needs_expertise", seconds_spent=40)
    store.submit_demonstration("free", "q", "", TRAIN, "sim-0", "r")  # a labeler of the credentials file
    stats = {s.name: s for s in store.labeler_stats()}
    assert list(stats) == ["ann", "ben", "boss", "sim-0"]
    ann = stats["ann"]
    assert ann.counts == {"ranking": 1, "best_of_k": 1, "skip": 1} and ann.skips_by_reason == {"needs_expertise": 1}
    assert ann.median_seconds == 20.0 and ann.open_tasks == 0 and ann.registered
    assert stats["ben"].open_tasks == 2 and stats["ben"].median_seconds == 30.0
    assert stats["boss"].admin and stats["boss"].counts == {}
    assert not stats["sim-0"].registered and stats["sim-0"].counts == {"demonstration": 1}
    assert store.progress("ann", start) == (3, 0) and store.progress("ben", start) == (1, 2)
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    assert store.progress("ann", later) == (0, 0)
    assert {s.name: s.counts for s in store.labeler_stats(since=later)}["ann"] == {}
    assert store.count_open_tasks() == 2  # t2 and t3 wait for ben; t1 is done
    # agreement per labeler pair, from the same pairs as the overall figure
    assert store.agreement() == (pytest.approx(5 / 6), 1, 6)
    assert store.agreement_by_labeler_pair() == {("ann", "ben"): (1, 5, 6)}
