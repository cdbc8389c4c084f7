"""The pods' group rules, as they publish them in Redis: which groups keep history.

The pods write `{"group": [{"match": glob, "history": n, "ttl": s, "latest": b}, ...]}` to
`<prefix>:rules` on every Redis link (the server's service/rules.py, `GroupRules.document`). The
first rule whose glob matches a group name (case-sensitive) decides; a rule with no history means
a plain PUBLISH, as does no rule at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from fnmatch import fnmatchcase


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule: the glob, messages kept, seconds they live after the last one, latest-on-join."""

    match: str
    history: int
    ttl: float
    latest: bool


class Rules:
    """The rules in the pods' order; `history_for` is the one a message to a group must follow."""

    def __init__(self, rules: tuple[Rule, ...]) -> None:
        self.rules = rules
        self._cache: dict[str, Rule | None] = {}

    def history_for(self, group: str) -> Rule | None:
        """The first matching rule if it keeps history, else None (then: a plain publish)."""
        try:
            return self._cache[group]
        except KeyError:
            pass
        found = next((r for r in self.rules if fnmatchcase(group, r.match)), None)
        rule = found if found is not None and found.history > 0 else None
        if len(self._cache) < 10_000:  # group names may come from users: never grow without bound
            self._cache[group] = rule
        return rule

    @classmethod
    def parse(cls, document: bytes | str) -> Rules:
        """The rules in the pods' JSON document; ValueError when it is not one."""
        try:
            entries = json.loads(document)["group"]
            rules = tuple(
                Rule(str(e["match"]), int(e["history"]), float(e["ttl"]), bool(e["latest"])) for e in entries
            )
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"not relay's group rules: {exc!r}") from None
        return cls(rules)
