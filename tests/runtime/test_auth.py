"""Authentication in the bootstrap: credentials files, roles per RPC, TLS and mutual TLS."""

from __future__ import annotations

import asyncio
import importlib
import subprocess
import time

import grpc
import pytest
import yaml
from rlhf_client import reward_grpc

from rlhf.errors import ConfigError
from rlhf.metrics import ServiceMetrics
from rlhf.runtime import auth
from rlhf.runtime.auth import (ANONYMOUS, AuthError, Authenticator, CredentialsFile, Principal, labeler_of,
                               parse_credentials, token_sha256)
from rlhf_client.channel import Credentials, channel
from rlhf.runtime.server import BaseServiceSettings, check_rpc_roles, serve
from services import SERVICES
from tests.runtime.echo_service import EchoService
from tests.runtime.test_server import score_request

LONG = "x" * 24


def _file(tmp_path, callers, name="creds.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump({"callers": callers}))
    return p


def test_credentials_file_lists_every_problem():
    doc = {"callers": [
        {"name": "a", "roles": ["product"], "token": "short"},
        {"name": "b", "roles": ["wizard"], "token": LONG},
        {"name": "c", "roles": ["labeler"], "token": LONG, "token_sha256": "0" * 64},
        {"name": "d", "roles": ["operator"]},
        {"name": "e", "roles": ["operator"], "token": LONG},
        {"name": "f", "roles": ["operator"], "token_sha256": token_sha256(LONG)},
        {"name": "e", "roles": ["operator"], "token_sha256": "zz"},
    ]}
    with pytest.raises(ConfigError) as e:
        parse_credentials(doc, "creds.yaml")
    msg = str(e.value)
    for needle in ("callers[0] (a): token must be 16", "callers[1] (b): roles must be", "not both",
                   "callers[3] (d): needs a token", "callers[5] (f): the same token is given to two callers",
                   "callers[6]: name 'e' appears twice", "64 hex digits"):
        assert needle in msg, needle


def test_tokens_map_to_principals_and_rotate_without_a_restart(tmp_path, monkeypatch):
    monkeypatch.setattr(auth, "RELOAD_CHECK_SECONDS", 0.0)
    old, new = "old-token-" + LONG, "new-token-" + LONG
    f = _file(tmp_path, [{"name": "search", "roles": ["product"], "token_sha256": token_sha256(old)},
                         {"name": "alice", "roles": ["labeler"], "token": "alice-" + LONG}])
    a = Authenticator(CredentialsFile(f))
    p = a.authenticate([("authorization", f"Bearer {old}")])
    assert (p.name, p.team, p.roles) == ("search", "search", frozenset({"product"}))
    assert a.authenticate({"authorization": "Bearer alice-" + LONG}).labeler_id == "alice"
    with pytest.raises(AuthError, match="Bearer"):
        a.authenticate([])
    with pytest.raises(AuthError, match="not valid"):
        a.authenticate([("authorization", "Bearer nope-" + LONG)])
    with pytest.raises(AuthError, match="'Bearer <token>'"):
        a.authenticate([("authorization", "Basic abc")])
    time.sleep(0.01)  # a new mtime
    _file(tmp_path, [{"name": "search", "roles": ["product"], "token_sha256": token_sha256(new)}])
    assert a.authenticate([("authorization", f"Bearer {new}")]).name == "search"
    with pytest.raises(AuthError):
        a.authenticate([("authorization", f"Bearer {old}")])  # rotated out
    f.write_text("callers: [{name: broken")  # a bad edit keeps the last good callers
    assert a.authenticate([("authorization", f"Bearer {new}")]).name == "search"


def test_nothing_configured_refuses_to_start_unless_anonymous_is_asked_for():
    with pytest.raises(ConfigError, match="allow_anonymous"):
        Authenticator(CredentialsFile())
    a = Authenticator(CredentialsFile(), allow_anonymous=True)
    assert a.authenticate([("authorization", "Bearer whatever-" + LONG)]) is ANONYMOUS  # off: all trusted


def test_an_optional_resolver_identifies_without_turning_authentication_on(tmp_path):
    alice = Principal("alice", frozenset({"labeler"}), labeler_id="alice")
    known = {"alice-token-" + LONG: alice}
    dev = Authenticator(CredentialsFile(), allow_anonymous=True)
    dev.add_resolver(known.get, required=False)
    assert not dev.enabled  # anonymous callers are still trusted ...
    assert dev.authenticate([]) is ANONYMOUS
    assert dev.authenticate([("authorization", "Bearer unknown-" + LONG)]) is ANONYMOUS
    assert dev.authenticate([("authorization", "garbage")]) is ANONYMOUS
    # ... and a caller presenting a token the resolver knows is that caller
    assert dev.authenticate([("authorization", "Bearer alice-token-" + LONG)]) is alice
    assert dev.from_token("alice-token-" + LONG) is alice
    # with credentials configured, the optional resolver's tokens work beside the file's
    prod = Authenticator(CredentialsFile(_file(tmp_path, [{"name": "ops", "roles": ["operator"], "token": "ops-" + LONG}])))
    prod.add_resolver(known.get, required=False)
    assert prod.authenticate([("authorization", "Bearer alice-token-" + LONG)]) is alice
    assert prod.authenticate([("authorization", "Bearer ops-" + LONG)]).name == "ops"
    with pytest.raises(AuthError, match="not valid"):
        prod.authenticate([("authorization", "Bearer unknown-" + LONG)])


def test_a_labeler_id_comes_from_the_credential():
    alice = Principal("alice", frozenset({"labeler"}), labeler_id="alice")
    assert labeler_of(alice, "") == labeler_of(alice, "alice") == "alice"
    with pytest.raises(AuthError, match="not yours") as e:
        labeler_of(alice, "bob")
    assert e.value.denied
    with pytest.raises(AuthError, match="not a labeler"):
        labeler_of(Principal("ops", frozenset({"operator"})), "alice")
    assert labeler_of(ANONYMOUS, "bob") == "bob"  # authentication off: the request's id stands


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_rpc_of_every_service_declares_its_roles(name):
    mod = importlib.import_module(SERVICES[name])
    cls = next(v for v in vars(mod).values() if isinstance(v, type) and getattr(v, "name", None) == name
               and hasattr(v, "service_names"))
    roles = check_rpc_roles(cls)
    assert all(r and r <= auth.ROLES for r in roles.values())


class TrainerOnly(EchoService):
    rpc_roles = {**EchoService.rpc_roles, "Score": frozenset({"trainer"})}


async def _serve(service, settings):
    stop = asyncio.Event()
    ready = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(service, BaseServiceSettings(port=0, metrics_port=-1, **settings),
                                     ServiceMetrics("echo"), ready=lambda g, m: ready.set_result(g), stop_event=stop))
    done, _ = await asyncio.wait({task, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    return ready.result(), stop, task


def test_roles_per_rpc_through_the_interceptor(tmp_path):
    f = _file(tmp_path, [{"name": "eng", "roles": ["trainer"], "token": "eng-" + LONG},
                         {"name": "team", "roles": ["product"], "token": "team-" + LONG}])

    async def main():
        port, stop, task = await _serve(TrainerOnly(), {"credentials_file": str(f)})
        target = f"127.0.0.1:{port}"
        try:
            for token, code in (("eng-" + LONG, grpc.StatusCode.OK), ("team-" + LONG, grpc.StatusCode.PERMISSION_DENIED),
                                ("", grpc.StatusCode.UNAUTHENTICATED)):
                async with channel(target, creds=Credentials(token=token)) as ch:
                    try:
                        await reward_grpc.RewardServiceStub(ch).Score(score_request("a"))
                        got, details = grpc.StatusCode.OK, ""
                    except grpc.aio.AioRpcError as e:
                        got, details = e.code(), e.details()
                assert got == code, (token[:4], details)
                if code == grpc.StatusCode.PERMISSION_DENIED:
                    assert "team (roles: product) may not call Score; it needs one of: trainer" == details
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
    asyncio.run(main())


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate (CN=trainer), by openssl."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=test-ca", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, cn in (("server", "localhost"), ("client", "trainer")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={cn}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", *(["-extfile", "san.ext"] if name == "server" else []), cwd=d)
    return d


def test_tls_with_a_token_and_mutual_tls_with_a_client_certificate(pki, tmp_path):
    f = _file(tmp_path, [{"name": "eng", "roles": ["trainer"], "token": "eng-" + LONG},
                         {"name": "trainer-svc", "roles": ["trainer"], "cert_common_name": "trainer"}])
    ca, cert, key = ((pki / n).read_bytes() for n in ("ca.pem", "client.pem", "client.key"))

    async def call(target, creds):
        async with channel(target, creds=creds) as ch:
            try:
                await reward_grpc.RewardServiceStub(ch).Score(score_request("a"), timeout=10)
                return grpc.StatusCode.OK
            except grpc.aio.AioRpcError as e:
                return e.code()

    async def main():
        tls = {"credentials_file": str(f), "tls_cert_file": str(pki / "server.pem"), "tls_key_file": str(pki / "server.key")}
        port, stop, task = await _serve(TrainerOnly(), tls)
        target = f"127.0.0.1:{port}"
        try:
            assert await call(target, Credentials(token="eng-" + LONG, ca=ca)) == grpc.StatusCode.OK
            assert await call(target, Credentials(ca=ca)) == grpc.StatusCode.UNAUTHENTICATED
            assert await call(target, Credentials(token="eng-" + LONG)) == grpc.StatusCode.UNAVAILABLE  # plaintext
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
        port, stop, task = await _serve(TrainerOnly(), {**tls, "tls_client_ca_file": str(pki / "ca.pem")})
        target = f"127.0.0.1:{port}"
        try:
            # the client certificate alone names the caller; without one the handshake fails
            assert await call(target, Credentials(ca=ca, cert=cert, key=key)) == grpc.StatusCode.OK
            assert await call(target, Credentials(token="eng-" + LONG, ca=ca)) == grpc.StatusCode.UNAVAILABLE
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
    asyncio.run(main())


def test_settings_check_the_secret_files(tmp_path):
    with pytest.raises(ConfigError) as e:
        BaseServiceSettings(credentials_file=str(tmp_path / "missing.yaml"), tls_cert_file=str(tmp_path / "c.pem"))
    msg = str(e.value)
    assert "credentials_file: file" in msg and "does not exist" in msg and "tls_cert_file and tls_key_file go together" in msg
