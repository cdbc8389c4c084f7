"""Token verification, permissions, origins and quotas: pure logic, real keys."""

from __future__ import annotations

import time
from pathlib import Path

import jwt
import pytest

from service.auth import ANONYMOUS, Authenticator, AuthError, origin_allowed, token_from
from service.config import Settings, SettingsError
from service.limits import Quotas
from service.protocol import CloseCode
from tests import tokens


def hs_auth(**overrides: object) -> Authenticator:
    return Authenticator(Settings(jwt_secret=tokens.SECRET, **overrides))  # type: ignore[arg-type]


def test_auth_is_off_without_a_key() -> None:
    assert Authenticator(Settings()).authenticate(None) is ANONYMOUS


def test_a_valid_hs256_token_gives_its_claims() -> None:
    identity = hs_auth().authenticate(tokens.hs256(direct=True))
    assert identity.sub == "alice" and identity.direct
    assert identity.may_join("chat") and identity.may_join("team.red") and not identity.may_join("teams")
    assert identity.may_publish("chat") and not identity.may_publish("team.red")
    assert identity.expires_at is not None and identity.expires_at > time.time()


@pytest.mark.parametrize(
    ("token", "code"),
    [
        (None, CloseCode.UNAUTHORIZED),
        ("", CloseCode.UNAUTHORIZED),
        ("not.a.jwt", CloseCode.UNAUTHORIZED),
        (tokens.hs256(secret="another-secret-of-thirty-two-bytes!!"), CloseCode.UNAUTHORIZED),  # forged
        (tokens.hs256(exp=int(time.time()) - 60), CloseCode.TOKEN_EXPIRED),
        (tokens.unsigned(), CloseCode.UNAUTHORIZED),  # alg: none
        (tokens.rs256(), CloseCode.UNAUTHORIZED),  # an algorithm the pod does not accept
        (tokens.hs256(exp=None), CloseCode.UNAUTHORIZED),  # exp is required by default
        (tokens.hs256(groups="chat"), CloseCode.UNAUTHORIZED),  # claims of the wrong type
    ],
)
def test_bad_tokens_are_refused_with_their_code(token: str | None, code: CloseCode) -> None:
    with pytest.raises(AuthError) as refused:
        hs_auth().authenticate(token)
    assert refused.value.code == code
    if token:
        assert token not in refused.value.reason  # reasons are safe to log


def test_audience_and_issuer_are_checked_when_configured() -> None:
    auth = hs_auth(jwt_audience="relay", jwt_issuer="https://id.example")
    good = tokens.hs256(aud="relay", iss="https://id.example")
    assert auth.authenticate(good).sub == "alice"
    for bad in (
        tokens.hs256(aud="other", iss="https://id.example"),
        tokens.hs256(aud="relay"),
        tokens.hs256(),
    ):
        with pytest.raises(AuthError):
            auth.authenticate(bad)


def test_rs256_and_es256_with_a_public_key_file(tmp_path: Path) -> None:
    rsa_file = tmp_path / "rsa.pem"
    rsa_file.write_text(tokens.public_pem(tokens.rsa_key()))
    auth = Authenticator(Settings(jwt_public_key_file=str(rsa_file)))
    assert auth.authenticate(tokens.rs256()).sub == "alice"
    with pytest.raises(AuthError):
        auth.authenticate(tokens.hs256())  # HS256 signed with anything is not accepted here
    # Algorithm confusion: an HS256 token "signed" with the public key must fail.
    confused = jwt.encode(tokens.claims(), tokens.SECRET, algorithm="HS256")
    with pytest.raises(AuthError):
        auth.authenticate(confused)
    ec_file = tmp_path / "ec.pem"
    ec_file.write_text(tokens.public_pem(tokens.ec_key()))
    assert (
        Authenticator(Settings(jwt_public_key_file=str(ec_file))).authenticate(tokens.es256()).sub == "alice"
    )


def test_jwks_picks_the_key_by_kid(tmp_path: Path) -> None:
    jwks = tokens.write_jwks(tmp_path / "jwks.json", kid="k1")
    auth = Authenticator(Settings(jwt_jwks_file=str(jwks)))
    assert auth.authenticate(tokens.rs256(kid="k1")).sub == "alice"
    with pytest.raises(AuthError):
        auth.authenticate(tokens.rs256(kid="unknown"))


def test_unreadable_key_files_stop_start_up_with_the_variable_named(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="RELAY_JWT_PUBLIC_KEY_FILE"):
        Authenticator(Settings(jwt_public_key_file=str(tmp_path / "missing.pem")))
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(SettingsError, match="RELAY_JWT_JWKS_FILE"):
        Authenticator(Settings(jwt_jwks_file=str(bad)))
    with pytest.raises(SettingsError, match="RELAY_JWT_ALGORITHMS"):
        Settings(jwt_secret="x", jwt_algorithms="none")


def test_token_is_read_from_the_query_or_the_authorization_header() -> None:
    assert token_from({"query_string": b"a=1&token=abc", "headers": []}) == "abc"
    assert token_from({"query_string": b"", "headers": [(b"authorization", b"Bearer xyz")]}) == "xyz"
    assert token_from({"query_string": b"", "headers": [(b"authorization", b"Basic xyz")]}) is None


@pytest.mark.parametrize(
    ("origin", "allowed", "ok"),
    [
        ("https://evil.example", [], True),
        (None, ["https://app.example"], True),
        ("https://app.example", ["https://app.example"], True),
        ("https://APP.example", ["https://app.example"], True),
        ("https://x.app.example", ["https://*.app.example"], True),
        ("https://evil.example", ["https://app.example", "https://*.app.example"], False),
        ("https://app.example.evil", ["https://app.example"], False),
    ],
)
def test_origin_allow_list(origin: str | None, allowed: list[str], ok: bool) -> None:
    assert origin_allowed(origin, allowed) is ok


def quotas(**kw: float) -> Quotas:
    values = {
        "connect_rate": 0.0,
        "publish_rate": 0.0,
        "user_max_connections": 0,
        "user_connect_rate": 0.0,
        "user_publish_rate": 0.0,
        **kw,
    }
    return Quotas(now=0.0, **values)  # type: ignore[arg-type]


def test_user_connection_cap_counts_open_sockets_only() -> None:
    q = quotas(user_max_connections=2)
    assert q.admit("a", 0) is None and q.admit("a", 0) is None
    assert q.admit("a", 0) == "user_connections"
    assert q.admit("b", 0) is None  # per user
    q.release("a")
    assert q.admit("a", 0) is None
    assert q.admit(None, 0) is None  # anonymous sockets have no user limits


def test_connect_and_publish_rates_per_pod_and_per_user() -> None:
    q = quotas(connect_rate=1, user_connect_rate=0.5, user_publish_rate=1, publish_rate=2)
    assert [q.admit(None, 0) for _ in range(3)] == [None, None, "connect_rate"]  # burst of 2
    assert q.admit("u", 10) is None and q.admit("u", 10) == "user_connect_rate"  # burst of 1
    assert [q.allow_publish("u", 10) for _ in range(3)] == [True, True, False]
    assert q.allow_publish(None, 10) is True  # the pod's bucket still has tokens left


def test_users_without_sockets_are_forgotten() -> None:
    q = quotas(user_max_connections=5)
    q.admit("gone", 0)
    q.release("gone")
    q.admit("other", 100)  # triggers the sweep
    assert q.users() == 1
