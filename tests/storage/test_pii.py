"""PII scrubbing and the split by user: pure functions, no database."""

from __future__ import annotations

import collections

import pytest
from rlhf_client import common_pb2

from rlhf.errors import DataError
from rlhf.storage.prompts import scrub_pii, split_for_user

E, P = "[EMAIL]", "[PHONE]"


@pytest.mark.parametrize("text,expected", [
    ("write to john.doe@example.com please", f"write to {E} please"),
    ("JANE+news@mail.example.co.uk.", f"{E}."),
    ("a_b-c%d@sub-domain.example.org,x@y.io", f"{E},{E}"),
    ("<bob@example.com>", f"<{E}>"),
    ("münchen@beispiel.de", E),
    ("mail me: first.last@example.museum", f"mail me: {E}"),
    ("two: a@b.cc and c@d.ee", f"two: {E} and {E}"),
])
def test_emails(text, expected):
    assert scrub_pii(text) == expected


@pytest.mark.parametrize("text", [
    "user@localhost is not routable",  # no top-level domain
    "@handle on social media",
    "price 5@3.00",  # no letters in the "domain"
    "a @ b.com with spaces",
    "email me at name at example dot com",
])
def test_not_emails(text):
    assert scrub_pii(text) == text


@pytest.mark.parametrize("text,expected", [
    ("call +1 555 123 4567 now", f"call {P} now"),
    ("+1-555-123-4567", P),
    ("+44 20 7946 0958", P),
    ("+44 (0)20 7946 0958", P),
    ("+4915112345678", P),
    ("+33 1 23 45 67 89", P),
    ("(555) 123-4567", P),
    ("(555)123-4567", P),
    ("555-123-4567", P),
    ("555.123.4567", P),
    ("555 123 4567", P),
    ("1-800-555-1234", P),
    ("020 7946 0958", P),
    ("0171 1234567", P),
    ("06-12345678", P),
    ("030/1234567", P),
    ("01 23 45 67 89", P),
    ("0044 20 7946 0958", P),
    ("555-1234", P),
    ("912 345 678", P),
    ("in 1999 555-1234", f"in 1999 {P}"),
    ("call 555-123-4567 2024", f"call {P} 2024"),
    ("1 800-555-1234", f"1 {P}"),
    ("ring 555-123-4567.", f"ring {P}."),
    ("tel:+1 555 123 4567, fax (555) 123-4568", f"tel:{P}, fax {P}"),
])
def test_phones(text, expected):
    assert scrub_pii(text) == expected


@pytest.mark.parametrize("text", [
    "in 1999 and 2004",
    "from 1999-2004",
    "1999 2004",
    "born 1999",
    "on 2024-01-15 at noon",
    "on 15.01.2024",
    "on 1/15/2024",
    "12/31/1999",
    "call 911",
    "room 12-34",
    "123-456",  # six digits
    "pi is 3.14159265",
    "host 192.168.100.200",
    "host 192.168.1.10",
    "1.234.567 inhabitants",
    "1 234 567 inhabitants",
    "order 5551234567",  # a bare digit run is an id, not a phone number
    "ISBN 978-3-16-148410-0",
    "version 1.2.3",
    "x555-1234",
    "555-1234abc",
    "card 4111 1111 1111 1111",  # 16 digits: not a phone number
    "ratio 1234/5678",
    "In 1999 123 people came",
    "in 2004 2008 2012",
    "scores 12 15 18 20",
    "10 100 200 people",
    "1999-2004 and 2010-2015",
])
def test_not_phones(text):
    assert scrub_pii(text) == text


def test_email_then_phone_and_text_kept():
    text = "Hi, I'm Ann (ann@example.com, +49 30 1234567). Born 1984, 2 kids, 3.5 cats."
    assert scrub_pii(text) == f"Hi, I'm Ann ({E}, {P}). Born 1984, 2 kids, 3.5 cats."


def test_long_digit_runs_are_fast():
    import time

    text = ("1 " * 20000) + "x" + ("12-" * 20000) + "y" + "9" * 50000
    t = time.perf_counter()
    scrub_pii(text)
    assert time.perf_counter() - t < 2.0


def test_split_deterministic_and_distributed():
    assert split_for_user("alice") == split_for_user("alice")
    counts = collections.Counter(split_for_user(f"user-{i}") for i in range(20000))
    assert set(counts) == {common_pb2.SPLIT_TRAIN, common_pb2.SPLIT_VALID, common_pb2.SPLIT_TEST}
    assert abs(counts[common_pb2.SPLIT_TRAIN] / 20000 - 0.8) < 0.02
    assert abs(counts[common_pb2.SPLIT_VALID] / 20000 - 0.1) < 0.02
    assert abs(counts[common_pb2.SPLIT_TEST] / 20000 - 0.1) < 0.02


def test_split_fractions():
    assert {split_for_user(f"u{i}", (1, 0, 0)) for i in range(200)} == {common_pb2.SPLIT_TRAIN}
    assert {split_for_user(f"u{i}", (0, 0, 1)) for i in range(200)} == {common_pb2.SPLIT_TEST}
    assert {split_for_user(f"u{i}", (0, 1, 0)) for i in range(200)} == {common_pb2.SPLIT_VALID}
    with pytest.raises(DataError, match="split_fractions"):
        split_for_user("u", (0.5, 0.2, 0.2))
    with pytest.raises(DataError, match="split_fractions"):
        split_for_user("u", (1.2, -0.1, -0.1))
