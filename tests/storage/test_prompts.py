"""PromptStore on SQLite and (with RLHF_TEST_DATABASE_URL) PostgreSQL."""

from __future__ import annotations

import threading
from datetime import timezone

import pytest
from rlhf_client import common_pb2, prompts_pb2
from sqlalchemy import func, select

from rlhf.errors import ConfigError, DataError, NotFoundError
from rlhf.storage.prompts import PromptIn, PromptStore, split_for_user
from rlhf.storage.schema import outbox, prompts
from services.prompt_collector.service import EVENT_TYPE, announce, to_proto

TOPIC = "rlhf.prompts.v1"

TRAIN, VALID, TEST = common_pb2.SPLIT_TRAIN, common_pb2.SPLIT_VALID, common_pb2.SPLIT_TEST


def p(text, user="u1", source="api", consent=True) -> PromptIn:
    return PromptIn(text=text.encode() if isinstance(text, str) else text, user_id=user, source=source,
                    consent=consent)


@pytest.fixture
def store(engine):
    return PromptStore(engine, announce)


def outbox_events(engine) -> list[prompts_pb2.PromptCollectedEvent]:
    with engine.connect() as conn:
        rows = conn.execute(select(outbox).order_by(outbox.c.id)).all()
    out = []
    for r in rows:
        assert r.topic == TOPIC and r.message_type == EVENT_TYPE and r.published_at is None
        out.append(prompts_pb2.PromptCollectedEvent.FromString(r.payload))
    return out


def test_submit_stores_scrubs_and_announces(store, engine, count):
    out = store.submit([p("  Mail me at ann@example.com or +1 555 123 4567  ", user="ann"),
                        p("What is RLHF?", user="bob", source="playground")])
    assert [o.duplicate for o in out] == [False, False]
    assert [o.split for o in out] == [split_for_user("ann"), split_for_user("bob")]
    first = store.get(out[0].prompt_id)
    assert first.text == "Mail me at [EMAIL] or [PHONE]"
    assert first.source == "api" and first.split == out[0].split
    assert first.created_at.tzinfo is not None and first.created_at.utcoffset().total_seconds() == 0
    assert count("prompts") == 2 and count("outbox") == 2
    events = outbox_events(engine)
    assert [e.event_id for e in events] == [o.prompt_id for o in out]
    assert events[0].prompt == to_proto(first)
    assert events[0].prompt.text == "Mail me at [EMAIL] or [PHONE]"
    assert events[1].prompt.source == "playground"
    assert events[0].event_time == events[0].prompt.create_time
    with engine.connect() as conn:
        user_hashes = conn.execute(select(prompts.c.user_hash)).scalars().all()
    assert "ann" not in user_hashes and all(len(h) == 64 for h in user_hashes)


def test_to_proto(store):
    out = store.submit([p("hello")])
    row = store.get(out[0].prompt_id)
    msg = to_proto(row)
    assert msg.prompt_id == row.prompt_id and msg.text == "hello" and msg.split == row.split
    assert msg.create_time.ToDatetime(tzinfo=timezone.utc) == row.created_at


GOOD = p("fine")


@pytest.mark.parametrize("items,match", [
    ([], r"^prompts: the batch is empty$"),
    ([p(f"t{i}") for i in range(1001)], r"^prompts: at most 1000 per batch, got 1001$"),
    ([GOOD, p(b"\xff\xfeabc")], r"^prompts\[1\]: text is not valid UTF-8$"),
    ([GOOD, GOOD, p(b"")], r"^prompts\[2\]: text is empty$"),
    ([p(" \n\t ")], r"^prompts\[0\]: text is empty$"),
    ([GOOD, p("secret " * 10)], r"^prompts\[1\]: text is 70 characters long, the limit is 64$"),
    ([GOOD, p("x", consent=False)], r"^prompts\[1\]: consent is required$"),
    ([GOOD, GOOD, GOOD, p("x", user="")], r"^prompts\[3\]: user_id is empty$"),
    ([p("a\x00b")], r"^prompts\[0\]: text contains a NUL character$"),
    ([p("x", source="s" * 201)], r"^prompts\[0\]: source must be at most 200"),
])
def test_validation_rejects_whole_batch(engine, count, items, match):
    store = PromptStore(engine, announce, max_prompt_chars=64)
    with pytest.raises(DataError, match=match) as err:
        store.submit(items)
    assert "secret" not in str(err.value)
    assert count("prompts") == 0 and count("outbox") == 0


def test_length_counts_characters_not_bytes(engine):
    store = PromptStore(engine, announce, max_prompt_chars=10)
    assert not store.submit([p("é" * 10)])[0].duplicate  # 20 bytes, 10 characters
    with pytest.raises(DataError, match=r"prompts\[0\]: text is 11 characters long"):
        store.submit([p("é" * 11)])


def test_dedupe_within_batch_and_against_db(store, engine, count):
    out = store.submit([p("same"), p("other"), p("  same  ")])
    assert [o.duplicate for o in out] == [False, False, True]
    assert out[2].prompt_id == out[0].prompt_id
    assert count("prompts") == 2 and count("outbox") == 2
    again = store.submit([p("other"), p("new")])
    assert again[0].duplicate and again[0].prompt_id == out[1].prompt_id
    assert not again[1].duplicate
    assert count("prompts") == 3 and count("outbox") == 3
    assert len({e.event_id for e in outbox_events(engine)}) == 3


def test_dedupe_after_scrubbing_and_normalisation(store, count):
    a, b = store.submit([p("write to a@example.com"), p("write to b@example.org")])
    assert b.duplicate and b.prompt_id == a.prompt_id
    c, d = store.submit([p("caf\u00e9"), p("cafe\u0301")])  # NFC and NFD spellings
    assert d.duplicate and d.prompt_id == c.prompt_id
    assert store.get(c.prompt_id).text == "caf\u00e9"
    assert count("prompts") == 2


def test_duplicate_answers_with_the_stored_split(engine):
    store = PromptStore(engine, announce, split_fractions=(1, 0, 0))
    first = store.submit([p("shared text", user="x")])[0]
    assert first.split == TRAIN
    later = PromptStore(engine, announce, split_fractions=(0, 0, 1)).submit([p("shared text", user="y")])[0]
    assert later.duplicate and later.prompt_id == first.prompt_id and later.split == TRAIN


def test_one_user_never_spans_two_splits(store, engine):
    users = [f"user-{i}" for i in range(30)]
    for rnd in range(3):
        store.submit([p(f"prompt {rnd} of {u}", user=u) for u in users])
    with engine.connect() as conn:
        per_user = conn.execute(select(prompts.c.user_hash, func.count(func.distinct(prompts.c.split)))
                                .group_by(prompts.c.user_hash)).all()
    assert len(per_user) == 30 and all(n == 1 for _, n in per_user)
    splits = {r.split for r in store.list(0, page_size=1000)[0]}
    assert len(splits) >= 2  # 30 users do not all land in one split


def test_list_pages_oldest_first(engine):
    store = PromptStore(engine, announce, split_fractions=(1, 0, 0))
    ids = [o.prompt_id for o in store.submit([p(f"prompt {i}") for i in range(13)])]
    ids += [o.prompt_id for o in store.submit([p(f"later {i}") for i in range(12)])]
    seen, token, pages = [], "", 0
    while True:
        rows, token = store.list(TRAIN, page_size=10, page_token=token)
        seen += [r.prompt_id for r in rows]
        pages += 1
        if not token:
            break
    assert pages == 3 and seen == ids
    assert store.list(VALID) == ([], "")
    rows, token = store.list(TRAIN, page_size=0)
    assert len(rows) == 25 and token == ""
    assert [r.prompt_id for r in store.list(0, page_size=1000)[0]] == ids  # 0: every split


def test_list_filters_by_split(engine):
    PromptStore(engine, announce, split_fractions=(1, 0, 0)).submit([p("t1"), p("t2")])
    PromptStore(engine, announce, split_fractions=(0, 0, 1)).submit([p("x1")])
    assert [r.text for r in PromptStore(engine, announce).list(TRAIN)[0]] == ["t1", "t2"]
    assert [r.text for r in PromptStore(engine, announce).list(TEST)[0]] == ["x1"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(page_size=1001), "page_size: must be 1..1000"),
    (dict(page_size=-1), "page_size: must be 1..1000"),
    (dict(page_token="not a token"), "page_token: malformed"),
    (dict(page_token="bm9wZQ"), "page_token: malformed"),  # base64 of "nope"
    (dict(split=7), "split: must be one of"),
])
def test_list_rejects_bad_arguments(store, kwargs, match):
    args = dict(split=TRAIN) | kwargs
    with pytest.raises(DataError, match=match):
        store.list(**args)


def test_sample_is_deterministic_and_without_replacement(engine):
    store = PromptStore(engine, announce, split_fractions=(1, 0, 0))
    store.submit([p(f"prompt {i}") for i in range(60)])
    a = [r.prompt_id for r in store.sample(TRAIN, 10, seed=7)]
    assert a == [r.prompt_id for r in store.sample(TRAIN, 10, seed=7)]
    assert len(set(a)) == 10
    assert a != [r.prompt_id for r in store.sample(TRAIN, 10, seed=8)]
    assert [r.prompt_id for r in store.sample(TRAIN, 5, seed=7)] == a[:5]  # a prefix of the larger sample
    everything = store.sample(TRAIN, 1000, seed=1)
    assert len(everything) == 60 and len({r.prompt_id for r in everything}) == 60
    assert store.sample(TEST, 5, seed=1) == []
    # a new prompt changes the sample at most by displacing members, never reshuffling the rest
    store.submit([p("one more")])
    b = [r.prompt_id for r in store.sample(TRAIN, 10, seed=7)]
    assert len(set(a) - set(b)) <= 1


def test_sample_is_roughly_uniform(engine):
    store = PromptStore(engine, announce, split_fractions=(1, 0, 0))
    ids = [o.prompt_id for o in store.submit([p(f"prompt {i}") for i in range(20)])]
    hits = dict.fromkeys(ids, 0)
    for seed in range(400):
        for r in store.sample(TRAIN, 5, seed=seed):
            hits[r.prompt_id] += 1
    assert min(hits.values()) > 50 and max(hits.values()) < 150  # expected 100 each


@pytest.mark.parametrize("count_,seed,match", [
    (0, 1, "count: must be 1..10000"),
    (10001, 1, "count: must be 1..10000"),
    (5, -1, "seed: must be an integer"),
    (5, 2**64, "seed: must be an integer"),
])
def test_sample_rejects_bad_arguments(store, count_, seed, match):
    with pytest.raises(DataError, match=match):
        store.sample(TRAIN, count_, seed)


def test_get_unknown_is_not_found(store):
    with pytest.raises(NotFoundError, match="not found"):
        store.get("0" * 32)


def test_concurrent_identical_submits_store_once(store, engine, count):
    results, errors = [], []
    barrier = threading.Barrier(8)

    def worker():
        try:
            barrier.wait()
            results.append(store.submit([p("the same prompt"), p("another shared one")]))
        except Exception as e:  # noqa: BLE001 - collected and asserted on below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert count("prompts") == 2 and count("outbox") == 2
    assert len({r[0].prompt_id for r in results}) == 1 and len({r[1].prompt_id for r in results}) == 1
    assert sum(not r[0].duplicate for r in results) == 1


def test_constructor_validates(engine):
    with pytest.raises(ConfigError, match="split_fractions"):
        PromptStore(engine, announce, split_fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ConfigError, match="max_prompt_chars"):
        PromptStore(engine, announce, max_prompt_chars=0)


def test_lost_race_on_the_unique_hash_is_retried(store, count, monkeypatch):
    """A concurrent submit stores the same text between our lookup and our insert: the insert hits
    the unique constraint, and the retried transaction answers duplicate."""
    first = store.submit([p("raced text")])[0]
    real = PromptStore._known
    calls = []

    def blind_once(conn, shas):
        calls.append(1)
        return {} if len(calls) == 1 else real(conn, shas)

    monkeypatch.setattr(PromptStore, "_known", staticmethod(blind_once))
    again = store.submit([p("new text"), p("raced text")])
    assert len(calls) == 2
    assert again[1].duplicate and again[1].prompt_id == first.prompt_id and not again[0].duplicate
    assert count("prompts") == 2 and count("outbox") == 2
