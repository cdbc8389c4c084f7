"""Keys and tokens for the authentication tests (made fresh for each test session)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from functools import cache
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

SECRET = "s3cret-for-tests-only-0123456789abcdef"  # HS256 wants 32+ bytes


def claims(**extra: Any) -> dict[str, Any]:
    return {
        "sub": "alice",
        "exp": int(time.time()) + 600,
        "groups": ["chat", "team.*"],
        "publish": ["chat"],
        **extra,
    }


def hs256(secret: str = SECRET, **extra: Any) -> str:
    return jwt.encode(claims(**extra), secret, algorithm="HS256")


@cache
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@cache
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def rs256(kid: str | None = None, **extra: Any) -> str:
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims(**extra), rsa_key(), algorithm="RS256", headers=headers)


def es256(kid: str | None = None, **extra: Any) -> str:
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims(**extra), ec_key(), algorithm="ES256", headers=headers)


def write_jwks(path: Path, kid: str, ec_kid: str | None = None) -> Path:
    """A JWKS with the RSA key as `kid` (RS256) and, with `ec_kid`, the EC key as ES256 too."""
    keys = [{**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key().public_key())), "alg": "RS256"}]
    keys[0]["kid"] = kid
    if ec_kid is not None:
        ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key().public_key()))
        keys.append({**ec_jwk, "kid": ec_kid, "alg": "ES256"})
    path.write_text(json.dumps({"keys": [{**k, "use": "sig"} for k in keys]}))
    return path


def unsigned(**extra: Any) -> str:
    """An `alg: none` token: no signature at all."""
    return jwt.encode(claims(**extra), None, algorithm="none")  # type: ignore[arg-type]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(part: Any) -> str:
    """A token segment: bytes as they are, anything else as its JSON, base64url-encoded."""
    return b64url(part if isinstance(part, bytes) else json.dumps(part).encode())


def crafted(header: Any, payload: Any = None, signature: bytes = b"not-a-signature") -> str:
    """A token built by hand, for headers and payloads PyJWT refuses to encode (`alg: 1`, a list)."""
    return f"{segment(header)}.{segment(claims() if payload is None else payload)}.{b64url(signature)}"


def hmac_signed(key: bytes, header: Any = None, payload: Any = None) -> str:
    """An HS256 token whose HMAC key is `key`, whatever it is: PyJWT will not sign with a PEM public
    key (the algorithm-confusion attack), so this signs by hand."""
    header = {"alg": "HS256", "typ": "JWT"} if header is None else header
    signing_input = f"{segment(header)}.{segment(claims() if payload is None else payload)}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def _signed(payload: object) -> str:
    """A correctly signed HS256 token with any payload (PyJWT validates claims only on decode)."""
    return hmac_signed(SECRET.encode(), payload=payload)


@cache
def malformed() -> dict[str, str]:
    """Tokens a client may send that are no JWT relay can verify, by what is wrong with them."""
    return {
        "alg 1": crafted({"alg": 1}),
        "alg null": crafted({"alg": None}),
        "alg list": crafted({"alg": ["HS256"]}),
        "alg object": crafted({"alg": {"HS256": True}}),
        "alg true": crafted({"alg": True}),
        "alg float": crafted({"alg": 1e999}),
        "alg missing": crafted({"typ": "JWT"}),
        "alg empty": crafted({"alg": ""}),
        "alg lower case": crafted({"alg": "hs256"}),
        "alg unknown": crafted({"alg": "HS999"}),
        "header list": crafted(["HS256"]),
        "header string": crafted("HS256"),
        "header number": crafted(1),
        "header null": crafted(None),
        "header not json": crafted(b"{alg: HS256"),
        "header deeply nested": crafted(b"[" * 10_000 + b"]" * 10_000),
        "header bad base64": "!!!!." + segment(claims()) + ".c2ln",
        "header not utf-8": crafted(b"\xff\xfe{}"),
        "kid number": crafted({"alg": "HS256", "kid": 5}),
        "kid list": crafted({"alg": "HS256", "kid": ["a"]}),
        "crit not a list": crafted({"alg": "HS256", "crit": 5}),
        "crit unknown": crafted({"alg": "HS256", "crit": ["x"], "x": 1}),
        "typ number": crafted({"alg": "HS256", "typ": 1}),
        "one segment": "abc",
        "two segments": "abc.def",
        "four segments": "a.b.c.d",
        "empty segments": "..",
        "dots only": "." * 1000,
        "huge": "a" * 100_000,
        "huge but well formed": hs256(pad="x" * 20_000),
        "non-ascii": hs256() + "\u00e9",
        "control characters": "\x00.\x01.\x02",
        "payload not an object": _signed([1, 2]),
        "payload not json": hmac_signed(SECRET.encode(), payload=b"{"),
        "payload string": _signed("alice"),
        "exp string": _signed({"exp": "tomorrow"}),
        "exp huge": hmac_signed(SECRET.encode(), payload=b'{"exp": 1' + b"0" * 400 + b"}"),
        "exp infinite": hmac_signed(SECRET.encode(), payload=b'{"exp": Infinity}'),
        "exp nan": hmac_signed(SECRET.encode(), payload=b'{"exp": NaN}'),
        "sub number": _signed(claims(sub=5)),
        "groups string": _signed(claims(groups="chat")),
        "publish numbers": _signed(claims(publish=[1])),
        "nbf infinite": hmac_signed(SECRET.encode(), payload=b'{"exp": 9999999999, "nbf": -Infinity}'),
        "signature not base64": hs256()[:-4] + "!!!!",
        "signature cut": hs256()[:-10],
    }
