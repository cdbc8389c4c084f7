"""Which groups keep history, and how much: rules by group-name pattern, read once at start-up.

    # RELAY_GROUP_RULES_FILE=/etc/relay/groups.toml   (or .json, with the same structure)
    [[group]]
    match = "dashboard.*"     # a glob over group names; the first rule that matches wins
    history = 100             # messages kept per group (1-100000); recovery and gap fill reach this far
    ttl = 300                 # seconds the history lives after the group's last message
    latest = false            # true: a member that joins first receives the group's latest message
    presence = "off"          # "counts": connections and distinct users; "full": also who (docs/presence.md)
    presence_events = false   # true: v1 members get user-level join/leave events
    presence_claims = []      # "full": token claims shown with each member, e.g. ["name", "avatar"]

A group that no rule matches keeps no history and no presence: its messages carry no position and
cost one PUBLISH, as before. Every error in the file stops the pod at start-up with the file, the
rule and the field named, like the settings do.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from service.config import SettingsError

MAX_HISTORY = 100_000
MAX_TTL = 30 * 24 * 3600.0
FIELDS = {"match", "history", "ttl", "latest", "presence", "presence_events", "presence_claims"}
PRESENCE_MODES = ("off", "counts", "full")
MAX_PRESENCE_CLAIMS = 16
CLAIM_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


@dataclass(frozen=True, slots=True)
class GroupRule:
    """What a rule says about the groups it matches."""

    match: str
    history: int  # messages kept; 0 for none
    ttl: float  # seconds after the last message
    latest: bool  # send the latest message to every member that joins
    presence: str = "off"  # off | counts | full
    presence_events: bool = False  # user-level join/leave events to v1 members
    presence_claims: tuple[str, ...] = ()  # claims shown with each member (full)

    @property
    def keeps_history(self) -> bool:
        return self.history > 0

    @property
    def keeps_presence(self) -> bool:
        return self.presence != "off"


class GroupRules:
    """The rules in file order; `for_group` gives the first that matches, cached per name."""

    def __init__(self, rules: list[GroupRule]) -> None:
        self.rules = tuple(rules)
        self._cache: dict[str, GroupRule | None] = {}
        # Every claim some rule shows: a connection keeps only these of its token (not all of it).
        self.claims_shown = frozenset(c for r in self.rules for c in r.presence_claims)

    def for_group(self, group: str) -> GroupRule | None:
        try:
            return self._cache[group]
        except KeyError:
            pass
        found = next((r for r in self.rules if fnmatchcase(group, r.match)), None)
        if len(self._cache) < 100_000:  # names are client input: never grow without bound
            self._cache[group] = found
        return found

    def document(self) -> str:
        """The rules as canonical JSON (the file's structure), for other writers that need them:
        the pods publish it in Redis as `<prefix>:rules` (the Django channel layer reads it)."""
        return json.dumps(
            {
                "group": [
                    {"match": r.match, "history": r.history, "ttl": r.ttl, "latest": r.latest}
                    for r in self.rules
                ]
            },
            separators=(",", ":"),
        )

    def history_for(self, group: str) -> GroupRule | None:
        """The matching rule if it keeps history, else None."""
        rule = self.for_group(group)
        return rule if rule is not None and rule.keeps_history else None

    def presence_for(self, group: str) -> GroupRule | None:
        """The matching rule if it keeps presence, else None."""
        rule = self.for_group(group)
        return rule if rule is not None and rule.keeps_presence else None

    @classmethod
    def load(cls, path: str) -> GroupRules:
        """The rules in `path` (TOML, or JSON for a `.json` file); none for an empty path."""
        if not path:
            return cls([])
        where = f"RELAY_GROUP_RULES_FILE={path!r}"
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise SettingsError(f"{where} cannot be read: {exc.strerror}") from None
        try:
            document = json.loads(text) if path.endswith(".json") else tomllib.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(
                f"{where} is not valid {'JSON' if path.endswith('.json') else 'TOML'}: {exc}"
            ) from None
        return cls.parse(document, where)

    @classmethod
    def parse(cls, document: Any, where: str = "group rules") -> GroupRules:
        if not isinstance(document, dict) or set(document) - {"group"}:
            raise SettingsError(f"{where}: expected only a list named `group` ([[group]] tables)")
        entries = document.get("group", [])
        if not isinstance(entries, list):
            raise SettingsError(f"{where}: `group` must be a list of tables")
        return cls([_rule(entry, f"{where}: group rule {n}") for n, entry in enumerate(entries, 1)])


def _rule(entry: Any, where: str) -> GroupRule:
    if not isinstance(entry, dict):
        raise SettingsError(f"{where} must be a table")
    unknown = sorted(set(entry) - FIELDS)
    if unknown:
        raise SettingsError(f"{where}: unknown field {unknown[0]!r} (expected {', '.join(sorted(FIELDS))})")
    match = entry.get("match")
    if not isinstance(match, str) or not match:
        raise SettingsError(f'{where}: `match` must be a non-empty glob such as "dashboard.*"')
    latest = entry.get("latest", False)
    if not isinstance(latest, bool):
        raise SettingsError(f"{where} ({match}): `latest` must be true or false")
    history = entry.get("history", 1 if latest else 0)
    if isinstance(history, bool) or not isinstance(history, int) or not 0 <= history <= MAX_HISTORY:
        raise SettingsError(f"{where} ({match}): `history` must be a whole number from 0 to {MAX_HISTORY}")
    if latest and history < 1:
        raise SettingsError(f"{where} ({match}): `latest` needs a history of at least 1")
    ttl = entry.get("ttl", 300)
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl <= MAX_TTL:
        raise SettingsError(
            f"{where} ({match}): `ttl` must be a number of seconds above 0, at most {int(MAX_TTL)}"
        )
    presence = entry.get("presence", "off")
    if presence not in PRESENCE_MODES:
        raise SettingsError(f'{where} ({match}): `presence` must be "off", "counts" or "full"')
    events = entry.get("presence_events", False)
    if not isinstance(events, bool):
        raise SettingsError(f"{where} ({match}): `presence_events` must be true or false")
    if events and presence == "off":
        raise SettingsError(f'{where} ({match}): `presence_events` needs `presence` "counts" or "full"')
    claims = entry.get("presence_claims", [])
    if (
        not isinstance(claims, list)
        or len(claims) > MAX_PRESENCE_CLAIMS
        or not all(isinstance(c, str) and CLAIM_NAME.fullmatch(c) for c in claims)
    ):
        raise SettingsError(
            f"{where} ({match}): `presence_claims` must be a list of at most {MAX_PRESENCE_CLAIMS} claim "
            "names (1-64 of A-Za-z0-9 _ . : -)"
        )
    if claims and presence != "full":
        raise SettingsError(f'{where} ({match}): `presence_claims` needs `presence = "full"`')
    return GroupRule(
        match=match,
        history=history,
        ttl=float(ttl),
        latest=latest,
        presence=presence,
        presence_events=events,
        presence_claims=tuple(claims),
    )
