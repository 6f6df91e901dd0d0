"""rlhf.runtime.apikeys: keys per team from a file or env, a token bucket per key, reload on change."""

from __future__ import annotations

import json
import os
import time

import pytest

from rlhf.errors import ConfigError
from rlhf.runtime.apikeys import ApiKeys, AuthError, QuotaExceededError, RateLimitedError, TokenBucket


def test_no_keys_means_auth_off():
    keys = ApiKeys()
    assert not keys.enabled and keys.check(None) == "anonymous" and keys.check("Bearer anything") == "anonymous"


def test_keys_name_their_team_and_bad_keys_are_refused():
    keys = ApiKeys(inline=json.dumps({"sk-ads-00000001": {"team": "ads"}, "sk-search-0002": "search"}))
    assert keys.check("Bearer sk-ads-00000001") == "ads" and keys.check("bearer sk-search-0002") == "search"
    for header in (None, "", "Bearer", "Basic sk-ads-00000001", "Bearer sk-nope-00000001"):
        with pytest.raises(AuthError):
            keys.check(header)


def test_a_key_is_limited_to_its_rate_and_recovers():
    keys = ApiKeys(inline=json.dumps({"sk-slow-00000001": {"team": "slow", "requests_per_minute": 120, "burst": 2}}))
    keys.check("Bearer sk-slow-00000001")
    keys.check("Bearer sk-slow-00000001")
    with pytest.raises(RateLimitedError) as e:
        keys.check("Bearer sk-slow-00000001")
    assert 0 < e.value.retry_after <= 0.5
    time.sleep(e.value.retry_after + 0.05)
    assert keys.check("Bearer sk-slow-00000001") == "slow"


def test_token_bucket_refills_at_its_rate():
    b = TokenBucket(rate=2.0, capacity=1.0, now=0.0)
    assert b.take(0.0) == 0.0 and b.take(0.0) == pytest.approx(0.5) and b.take(0.5) == 0.0


def test_the_file_is_read_again_when_it_changes(tmp_path):
    f = tmp_path / "keys.yaml"
    f.write_text("sk-old-000000001: {team: a}\n")
    keys = ApiKeys(f, reload_seconds=0.0)
    assert keys.check("Bearer sk-old-000000001") == "a"
    f.write_text("sk-new-000000001: {team: b, requests_per_minute: 10}\n")
    os.utime(f, (time.time() + 5, time.time() + 5))  # a new mtime even on coarse clocks
    assert keys.check("Bearer sk-new-000000001") == "b"
    with pytest.raises(AuthError):
        keys.check("Bearer sk-old-000000001")
    f.write_text("[not, a, mapping]")
    os.utime(f, (time.time() + 10, time.time() + 10))
    assert keys.check("Bearer sk-new-000000001") == "b"  # an invalid file keeps the previous keys


@pytest.mark.parametrize("text", ["[1, 2]", '{"short": {"team": "a"}}', '{"sk-long-enough": {}}',
                                  '{"sk-long-enough": {"team": "a", "rpm": 3}}'])
def test_invalid_key_files_are_refused_at_start(tmp_path, text):
    f = tmp_path / "keys.json"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        ApiKeys(f)
    assert "sk-long-enough" not in str(e.value)  # a key never appears in an error


TEAMS = """
teams:
  search: {}
  ads: {requests_per_minute: 120, burst: 1, tokens_per_minute: 100, tokens_per_day: 150}
keys:
  sk-search-000001: search
  sk-ads-00000001: ads
  sk-ads-00000002: {team: ads}
"""


def test_limits_belong_to_the_team_whatever_key_it_uses(tmp_path):
    keys = ApiKeys(inline=json.dumps(__import__("yaml").safe_load(TEAMS)))
    assert keys.teams == {"search", "ads"}
    assert keys.authenticate("Bearer sk-ads-00000001") == keys.authenticate("Bearer sk-ads-00000002") == "ads"
    keys.admit("ads")
    with pytest.raises(RateLimitedError, match="team ads"):
        keys.admit(keys.authenticate("Bearer sk-ads-00000002"))  # the team's other key: the same bucket
    for _ in range(50):
        keys.admit("search", 10_000)  # no limits
    assert keys.label("ads") == "ads" and keys.label("nobody") == "unauthenticated" and keys.label(None) == \
        "unauthenticated" and ApiKeys().label("anonymous") == "anonymous"


def test_token_quotas_reserve_and_give_back_what_was_not_used():
    keys = ApiKeys(inline=json.dumps({"teams": {"m": {"tokens_per_minute": 100}, "d": {"tokens_per_day": 50}},
                                      "keys": {"sk-m-00000001": "m", "sk-d-00000001": "d"}}))
    a = keys.admit("m", 80)
    with pytest.raises(QuotaExceededError, match="100 tokens per minute") as e:
        keys.admit("m", 30)
    assert 0 < e.value.retry_after < 60
    keys.settle(a, 20)  # it used 20 of its 80: 60 go back
    keys.admit("m", 70)
    with pytest.raises(QuotaExceededError, match="needs 101 tokens"):  # never fits in a minute
        keys.admit("m", 101)
    d = keys.admit("d", 40)
    with pytest.raises(QuotaExceededError, match="50 tokens per day"):
        keys.admit("d", 20)
    keys.settle(d, 10)
    keys.admit("d", 20)


@pytest.mark.parametrize("text", ['{"teams": {"a": {"rpm": 1}}, "keys": {}}',
                                  '{"teams": {}, "keys": {"sk-long-enough": "nobody"}}',
                                  '{"sk-long-enough-1": {"team": "a", "requests_per_minute": 1}, '
                                  '"sk-long-enough-2": {"team": "a", "requests_per_minute": 2}}'])
def test_inconsistent_team_files_are_refused(text):
    with pytest.raises(ConfigError) as e:
        ApiKeys(inline=text)
    assert "sk-long-enough" not in str(e.value)
