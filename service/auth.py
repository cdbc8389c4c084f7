"""Who may connect, join and publish: JWT verification, group permissions and the Origin check.

Pure functions and one `Authenticator` built from the settings at start-up (keys are read then, so
a missing key file stops the pod with a clear message instead of failing the first client). Tokens
arrive in the `token` query parameter (browsers cannot set headers on a WebSocket) or an
`Authorization: Bearer` header. A token never reaches a log line: errors carry only a reason.

Claims relay reads: `sub` (the user, for per-user limits), `groups` (groups the connection may
join, exact names or globs such as `chat.*`), `publish` (groups it may publish to), `direct`
(true: it may send to a channel id), `exp` (the socket is closed with 4001 when it passes), `iat`
(a token issued after a server-API revocation of its `sub` is not refused, service/revocations.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import jwt
from jwt.algorithms import HMACAlgorithm, get_default_algorithms

from service.config import Settings, SettingsError, split
from service.protocol import CloseCode

Scope = dict[str, Any]

# Longer tokens are refused unparsed. Real ones are well under 4 KiB: the HTTP server refuses
# request lines and headers much longer than this anyway.
MAX_TOKEN_CHARS = 16384

MAX_EXP = 253402300799  # 9999-12-31T23:59:59Z

_ALGORITHMS = get_default_algorithms()  # name -> PyJWT's verifier, to tell HMAC from public-key ones


@dataclass(frozen=True, slots=True)
class Identity:
    """What a verified token allows. `ANONYMOUS` (auth off) allows everything."""

    sub: str | None
    groups: tuple[str, ...]
    publish: tuple[str, ...]
    direct: bool
    expires_at: float | None  # wall-clock seconds (the token's exp)
    issued_at: float | None = None  # wall-clock seconds (the token's iat): a revocation spares later tokens
    # Every claim of the token, for the few a presence rule shows beside the user (docs/presence.md).
    claims: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def may_join(self, group: str) -> bool:
        return any(fnmatchcase(group, pattern) for pattern in self.groups)

    def may_publish(self, group: str) -> bool:
        return any(fnmatchcase(group, pattern) for pattern in self.publish)


ANONYMOUS = Identity(sub=None, groups=("*",), publish=("*",), direct=True, expires_at=None)


class AuthError(Exception):
    """The handshake is refused: `code` is the close code, `reason` is safe to log and to send."""

    def __init__(self, code: CloseCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Authenticator:
    """Verifies client tokens against the configured key, algorithms and claims."""

    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.auth_enabled
        self._secret = settings.jwt_secret
        self._public_key = _read(settings.jwt_public_key_file, "RELAY_JWT_PUBLIC_KEY_FILE")
        self._jwks = _jwks(settings.jwt_jwks_file)
        default = ["HS256"] if settings.jwt_secret else ["RS256", "ES256"]
        self._algorithms = split(settings.jwt_algorithms) or default
        self._audience = settings.jwt_audience or None
        self._issuer = settings.jwt_issuer or None
        self._required = split(settings.jwt_required_claims)
        self._leeway = settings.jwt_leeway
        if self.enabled and any(a.startswith("HS") for a in self._algorithms) and not self._secret:
            raise SettingsError("RELAY_JWT_ALGORITHMS names an HS algorithm but RELAY_JWT_SECRET is unset")

    def authenticate(self, token: str | None) -> Identity:
        """The identity a token proves; ANONYMOUS when auth is off. Raises AuthError, and only
        AuthError, for anything a client can send (a malformed token is just an invalid one)."""
        if not self.enabled:
            return ANONYMOUS
        if not token:
            raise AuthError(CloseCode.UNAUTHORIZED, "token required")
        # A JWT is base64url segments and dots: anything longer or non-ASCII is refused before parsing.
        if len(token) > MAX_TOKEN_CHARS or not token.isascii():
            raise AuthError(CloseCode.UNAUTHORIZED, "invalid token: malformed")
        try:
            claims = jwt.decode(
                token,
                key=self._key_for(token),
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": self._required, "verify_aud": self._audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(CloseCode.TOKEN_EXPIRED, "token expired") from None
        except jwt.PyJWTError as exc:
            raise AuthError(CloseCode.UNAUTHORIZED, f"invalid token: {type(exc).__name__}") from None
        return _identity(claims)

    def _key_for(self, token: str) -> Any:
        """The key to verify `token` with, chosen from its unverified header. Every field is the
        client's: checked for type before use, and refused with a PyJWTError, never another error."""
        header = jwt.get_unverified_header(token)  # DecodeError unless a JSON object
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self._algorithms:
            raise jwt.InvalidAlgorithmError("the token's alg is not an accepted algorithm")
        verifier = _ALGORITHMS.get(algorithm)
        if verifier is None:
            raise jwt.InvalidAlgorithmError("the token's alg is not supported")
        if isinstance(verifier, HMACAlgorithm):
            # An HMAC token is only ever checked against the shared secret, never against a public
            # key (algorithm confusion: the public key is public, so anyone could sign with it).
            if not self._secret:
                raise jwt.InvalidAlgorithmError("no shared secret configured")
            return self._secret
        if self._jwks is not None:
            kid = header.get("kid")  # get_unverified_header has checked it is a string if present
            keys = [
                k
                for k in self._jwks.keys
                if (kid is None or k.key_id == kid) and isinstance(verifier, type(k.Algorithm))
            ]
            if len(keys) != 1:
                raise jwt.InvalidKeyError("no single JWKS key of this algorithm matches the token's kid")
            return keys[0].key
        if self._public_key:
            return self._public_key
        raise jwt.InvalidAlgorithmError("no key configured for this algorithm")


def _identity(claims: dict[str, Any]) -> Identity:
    def patterns(name: str) -> tuple[str, ...]:
        value = claims.get(name, [])
        if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
            raise AuthError(CloseCode.UNAUTHORIZED, f"claim {name!r} must be a list of strings")
        return tuple(value)

    sub = claims.get("sub")
    exp = claims.get("exp")
    iat = claims.get("iat")
    # PyJWT has compared exp with the clock; it still may be any JSON number (10**400 overflows a
    # float, and the expiry timer would take 1e300 badly): past the year 9999 it is not a real one.
    if isinstance(exp, int | float) and not 0 <= exp <= MAX_EXP:
        raise AuthError(CloseCode.UNAUTHORIZED, "claim 'exp' is out of range")
    return Identity(
        sub=str(sub) if sub is not None else None,
        groups=patterns("groups"),
        publish=patterns("publish"),
        direct=claims.get("direct") is True,
        expires_at=float(exp) if isinstance(exp, int | float) else None,
        issued_at=float(iat) if isinstance(iat, int | float) and 0 <= iat <= MAX_EXP else None,
        claims=claims,
    )


def token_from(scope: Scope) -> str | None:
    """The client's token: `?token=` (browsers) or `Authorization: Bearer` (everyone else)."""
    query: bytes = scope.get("query_string", b"")
    if b"token=" in query:
        # The first non-empty `token=`, its name exactly as written: what the log redaction and
        # every proxy's see too (parse_qs would also take a percent-encoded `%74oken=`).
        for pair in query.split(b"&"):
            name, _, value = pair.partition(b"=")
            if name == b"token" and value:
                return unquote_plus(value.decode("latin-1"))
    for name, value in scope.get("headers", ()):
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            return str(value[7:].decode("latin-1").strip())
    return None


def origin_of(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"origin":
            return str(value.decode("latin-1"))
    return None


def origin_allowed(origin: str | None, allowed: list[str]) -> bool:
    """True when no allow-list is set, the client sent no Origin (not a browser, so no cross-site
    hijacking is possible), or the Origin matches one of the globs (`https://*.example.com`)."""
    if not allowed or origin is None:
        return True
    return any(fnmatchcase(origin.lower(), pattern.lower()) for pattern in allowed)


def _read(path: str, env: str) -> str:
    if not path:
        return ""
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise SettingsError(f"{env}={path!r} cannot be read: {exc.strerror}") from None


def _jwks(path: str) -> jwt.PyJWKSet | None:
    text = _read(path, "RELAY_JWT_JWKS_FILE")
    if not text:
        return None
    try:
        return jwt.PyJWKSet.from_dict(json.loads(text))
    except (ValueError, jwt.PyJWTError) as exc:
        raise SettingsError(f"RELAY_JWT_JWKS_FILE={path!r} is not a usable JWKS: {exc}") from None
