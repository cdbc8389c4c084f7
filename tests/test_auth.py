"""Token verification, permissions, origins and quotas: pure logic, real keys."""

from __future__ import annotations

import time
from pathlib import Path

import jwt
import pytest

from service.auth import ANONYMOUS, MAX_EXP, Authenticator, AuthError, origin_allowed, origin_of, token_from
from service.config import Settings, SettingsError
from service.protocol import CloseCode
from tests import tokens
from tests.helpers import quotas


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


MALFORMED = tokens.malformed()


@pytest.mark.parametrize("token", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_tokens_are_refused_as_unauthorized(token: str) -> None:
    """Whatever the client sends, the answer is AuthError(4501), never another exception."""
    for auth in (hs_auth(), hs_auth(jwt_algorithms="HS256,HS384,HS512")):
        with pytest.raises(AuthError) as refused:
            auth.authenticate(token)
        assert refused.value.code == CloseCode.UNAUTHORIZED
        assert token[:16] not in refused.value.reason


@pytest.mark.parametrize("token", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_tokens_are_refused_by_public_key_pods(
    public_key_settings: dict[str, str], token: str
) -> None:
    auth = Authenticator(Settings(**public_key_settings))  # type: ignore[arg-type]
    with pytest.raises(AuthError) as refused:
        auth.authenticate(token)
    assert refused.value.code == CloseCode.UNAUTHORIZED


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
    with pytest.raises(AuthError):
        auth.authenticate(tokens.es256())  # the right family matters: an RSA key checks no ES256
    ec_file = tmp_path / "ec.pem"
    ec_file.write_text(tokens.public_pem(tokens.ec_key()))
    assert (
        Authenticator(Settings(jwt_public_key_file=str(ec_file))).authenticate(tokens.es256()).sub == "alice"
    )


def test_jwks_picks_the_key_by_kid(tmp_path: Path) -> None:
    jwks = tokens.write_jwks(tmp_path / "jwks.json", kid="k1", ec_kid="e1")
    auth = Authenticator(Settings(jwt_jwks_file=str(jwks)))
    assert auth.authenticate(tokens.rs256(kid="k1")).sub == "alice"
    assert auth.authenticate(tokens.es256(kid="e1")).sub == "alice"
    for wrong in (
        tokens.rs256(kid="unknown"),
        tokens.rs256(kid="e1"),  # the EC key's kid on an RS256 token: PyJWT would raise TypeError
        tokens.es256(kid="k1"),  # and the other way round
        tokens.crafted({"alg": "ES256", "kid": "k1"}),
    ):
        with pytest.raises(AuthError) as refused:
            auth.authenticate(wrong)
        assert refused.value.code == CloseCode.UNAUTHORIZED


# Algorithm confusion: a verifier that picks the key by the token's `alg` and is handed the public key
# for an HS256 token would check an HMAC keyed with the public key, which anyone can compute.
PUBLIC_ONLY_ALGORITHMS = ["", "RS256", "ES256", "RS256,ES256", "HS256", "HS256,RS256", "RS256,HS384,HS256"]


def confused_tokens() -> list[str]:
    """HS256 tokens whose HMAC key is the public key, in the spellings a verifier may hold it in."""
    pem = tokens.public_pem(tokens.rsa_key()).encode()
    return [tokens.hmac_signed(key) for key in (pem, pem.strip(), pem.replace(b"\n", b"\r\n"))]


def test_the_hand_signed_tokens_are_well_formed_hs256() -> None:
    # The confusion tests below would prove nothing if relay refused these tokens for their shape:
    # signed the same way with the shared secret, one is accepted.
    assert hs_auth().authenticate(tokens.hmac_signed(tokens.SECRET.encode())).sub == "alice"
    with pytest.raises(AuthError):
        hs_auth().authenticate(tokens.hmac_signed(b"another-secret-of-thirty-two-bytes!!"))


@pytest.fixture(params=["public_key_file", "jwks_file"])
def public_key_settings(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """A pod with only a public key: a PEM file, or a JWKS with that key (and an EC one)."""
    if request.param == "public_key_file":
        pem = tmp_path / "rsa.pem"
        pem.write_text(tokens.public_pem(tokens.rsa_key()))
        return {"jwt_public_key_file": str(pem)}
    return {"jwt_jwks_file": str(tokens.write_jwks(tmp_path / "jwks.json", kid="k1", ec_kid="e1"))}


@pytest.mark.parametrize("pyjwt_guard", [True, False], ids=["pyjwt-guard", "no-pyjwt-guard"])
@pytest.mark.parametrize("algorithms", PUBLIC_ONLY_ALGORITHMS)
def test_an_hs256_token_keyed_with_the_public_key_is_refused(
    public_key_settings: dict[str, str], algorithms: str, pyjwt_guard: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not pyjwt_guard:
        # PyJWT refuses a PEM key as an HMAC secret; relay must not depend on it (an older or
        # newer PyJWT, or a key in another format, may not): without the guard, still refused.
        monkeypatch.setattr(jwt.algorithms, "is_pem_format", lambda key: False)
    try:
        auth = Authenticator(Settings(jwt_algorithms=algorithms, **public_key_settings))  # type: ignore[arg-type]
    except SettingsError as exc:  # an HS algorithm without a shared secret: the pod does not start
        assert "HS" in algorithms and "RELAY_JWT_SECRET" in str(exc)
        return
    if "RS256" in (algorithms or "RS256"):
        assert auth.authenticate(tokens.rs256(kid="k1")).sub == "alice"  # the key itself works
    for token in confused_tokens():
        with pytest.raises(AuthError) as refused:
            auth.authenticate(token)
        assert refused.value.code == CloseCode.UNAUTHORIZED


@pytest.mark.parametrize("pyjwt_guard", [True, False], ids=["pyjwt-guard", "no-pyjwt-guard"])
def test_with_a_secret_and_a_public_key_hs256_is_checked_with_the_secret_only(
    tmp_path: Path, pyjwt_guard: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not pyjwt_guard:
        monkeypatch.setattr(jwt.algorithms, "is_pem_format", lambda key: False)
    pem = tmp_path / "rsa.pem"
    pem.write_text(tokens.public_pem(tokens.rsa_key()))
    auth = hs_auth(jwt_public_key_file=str(pem), jwt_algorithms="HS256,RS256")
    assert auth.authenticate(tokens.hs256()).sub == "alice"
    assert auth.authenticate(tokens.rs256()).sub == "alice"
    for token in confused_tokens():
        with pytest.raises(AuthError):
            auth.authenticate(token)


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


def test_user_connection_cap_counts_open_sockets_only() -> None:
    q = quotas(user_max_connections=2)
    assert q.admit("a", 0) is None and q.admit("a", 0) is None
    assert q.admit("a", 0) == "user_connections"
    assert q.admit("b", 0) is None  # per user
    q.release("a")
    assert q.admit("a", 0) is None
    assert q.admit(None, 0) is None  # anonymous sockets have no user limits


def test_connect_and_publish_rates_per_pod_and_per_user() -> None:
    q = quotas(connect_rate=1, user_connect_rate=0.5, user_publish_rate=1, frame_rate=2)
    assert [q.admit(None, 0) for _ in range(3)] == [None, None, "connect_rate"]  # burst of 2
    assert q.admit("u", 10) is None and q.admit("u", 10) == "user_connect_rate"  # burst of 1
    assert [q.allow("u", True, 10) for _ in range(3)] == [True, True, False]
    assert q.allow(None, True, 10) is True  # the pod's bucket still has tokens left


def test_users_without_sockets_are_forgotten() -> None:
    q = quotas(user_max_connections=5)
    q.admit("gone", 0)
    q.release("gone")
    q.admit("other", 100)  # triggers the sweep
    assert q.users() == 1


def signed(claims: dict[str, object]) -> str:
    return jwt.encode(claims, tokens.SECRET, algorithm="HS256")


def test_a_token_without_sub_groups_or_publish_is_no_user_and_allows_no_group() -> None:
    identity = hs_auth().authenticate(signed({"exp": int(time.time()) + 60}))
    assert identity.sub is None  # not a user named "None": no per-user limits apply
    assert identity.groups == () and identity.publish == () and identity.direct is False
    assert not identity.may_join("chat") and not identity.may_publish("chat")


def test_without_required_claims_a_token_without_exp_never_expires() -> None:
    identity = hs_auth(jwt_required_claims="").authenticate(signed({"sub": "bob", "groups": ["g"]}))
    assert identity.expires_at is None and identity.sub == "bob" and identity.may_join("g")


def test_only_direct_true_allows_direct_sends() -> None:
    for value, allowed in [(True, True), (1, False), ("true", False), (False, False)]:
        assert hs_auth().authenticate(tokens.hs256(direct=value)).direct is allowed


def test_an_exp_up_to_the_year_9999_is_kept_and_past_it_refused() -> None:
    last = 253402300799  # 9999-12-31T23:59:59Z
    assert hs_auth().authenticate(tokens.hs256(exp=last)).expires_at == float(last)
    for exp in (last + 1, 10**400):
        with pytest.raises(AuthError) as refused:
            hs_auth().authenticate(tokens.hs256(exp=exp))
        assert refused.value.code == CloseCode.UNAUTHORIZED
        assert refused.value.reason == "claim 'exp' is out of range"


def test_the_refusal_reason_is_the_exception_message() -> None:
    with pytest.raises(AuthError) as refused:
        hs_auth().authenticate(None)
    assert str(refused.value) == refused.value.reason == "token required"


def test_an_algorithm_the_pod_does_not_accept_is_named_as_the_reason(tmp_path: Path) -> None:
    """The reason tells the operator what to fix: the algorithm, not a missing key."""
    jwks = tokens.write_jwks(tmp_path / "jwks.json", kid="k1", ec_kid="e1")
    auth = Authenticator(Settings(jwt_jwks_file=str(jwks), jwt_algorithms="RS256"))
    assert auth.authenticate(tokens.rs256(kid="k1")).sub == "alice"
    for token in (tokens.es256(kid="e1"), tokens.es256(kid="unknown"), tokens.es256()):
        with pytest.raises(AuthError) as refused:
            auth.authenticate(token)
        assert refused.value.reason == "invalid token: InvalidAlgorithmError"


def test_token_from_takes_the_whole_value_and_allows_a_scope_without_a_query_string() -> None:
    assert token_from({"query_string": b"token=abc==&x=1", "headers": []}) == "abc=="  # unescaped padding
    assert token_from({"query_string": b"token=&token=second", "headers": []}) == "second"  # first non-empty
    # The ASGI spec makes query_string optional: a server may leave it out.
    assert token_from({"headers": [(b"authorization", b"Bearer xyz")]}) == "xyz"
    assert token_from({}) is None


def test_refusal_reasons_and_the_claims_required_by_default() -> None:
    """The reason is the close frame's reason: clients and operators read it."""
    cases = [
        (
            signed({"sub": "a", "groups": ["g"]}),
            CloseCode.UNAUTHORIZED,
            "invalid token: MissingRequiredClaimError",
        ),
        ("x" * 16385, CloseCode.UNAUTHORIZED, "invalid token: malformed"),
        ("x" * 16384, CloseCode.UNAUTHORIZED, "invalid token: DecodeError"),  # at the cap: parsed
        ("caf\u00e9.x.y", CloseCode.UNAUTHORIZED, "invalid token: malformed"),
        (tokens.hs256(exp=int(time.time()) - 60), CloseCode.TOKEN_EXPIRED, "token expired"),
    ]
    for token, code, reason in cases:
        with pytest.raises(AuthError) as refused:
            hs_auth().authenticate(token)
        assert (refused.value.code, refused.value.reason) == (code, reason)


def test_leeway_and_an_audience_the_pod_does_not_check() -> None:
    just_expired = tokens.hs256(exp=int(time.time()) - 2)
    assert hs_auth(jwt_leeway=30).authenticate(just_expired).sub == "alice"  # clock skew allowed
    assert hs_auth().authenticate(tokens.hs256(aud="someone")).sub == "alice"  # no audience configured


# RELAY_JWT_LEEWAY has no upper bound, and PyJWT compares exp and iat with the clock only within it:
# with this much (about 31,700 years) it lets any exp or iat of a real token through, so the range
# relay keeps for both, 1970 to the end of the year 9999, is relay's own check.
LENIENT = 10**12


def test_an_exp_from_1970_on_is_kept_and_before_it_refused_whatever_the_leeway() -> None:
    auth = hs_auth(jwt_leeway=LENIENT)
    assert auth.authenticate(tokens.hs256(exp=0)).expires_at == 0.0
    with pytest.raises(AuthError) as refused:
        auth.authenticate(tokens.hs256(exp=-1))
    assert refused.value.reason == "claim 'exp' is out of range"


def test_iat_is_the_issue_time_a_revocation_compares_and_only_a_real_time_counts() -> None:
    """service/revocations.py lets a token in when its iat is later than the revocation: an iat that
    is not a time in 1970 to 9999 counts as none (the token is refused like one without iat)."""
    issued = int(time.time()) - 60
    assert hs_auth().authenticate(tokens.hs256(iat=issued)).issued_at == float(issued)
    assert hs_auth().authenticate(tokens.hs256(iat=issued + 0.5)).issued_at == issued + 0.5
    assert hs_auth().authenticate(tokens.hs256()).issued_at is None  # no iat at all
    auth = hs_auth(jwt_leeway=LENIENT)
    for iat, kept in [(0, 0.0), (MAX_EXP, float(MAX_EXP)), (-1, None), (MAX_EXP + 1, None), ("1", None)]:
        assert auth.authenticate(tokens.hs256(iat=iat)).issued_at == kept, iat


def test_the_origin_is_the_origin_header_and_a_scope_without_headers_has_none() -> None:
    assert origin_of({"headers": [(b"host", b"relay"), (b"origin", b"https://app.example")]}) == (
        "https://app.example"
    )
    assert origin_of({"headers": [(b"host", b"relay")]}) is None  # not a browser
    assert origin_of({}) is None  # read like token_from reads it: no headers, no Origin
