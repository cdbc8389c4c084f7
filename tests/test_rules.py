"""Group rules (RELAY_GROUP_RULES_FILE): parsing, validation with useful messages, first match wins."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import SettingsError
from service.rules import GroupRule, GroupRules
from tests.helpers import start_pod_process


def test_toml_and_json_say_the_same_and_the_first_matching_rule_wins(tmp_path: Path) -> None:
    toml = tmp_path / "groups.toml"
    toml.write_text(
        '[[group]]\nmatch = "chat.vip"\nhistory = 1000\nttl = 60\n\n'
        '[[group]]\nmatch = "chat.*"\nhistory = 50\n\n'
        '[[group]]\nmatch = "dash.*"\nlatest = true\nttl = 3600.5\n'
    )
    json_file = tmp_path / "groups.json"
    json_file.write_text(
        '{"group": [{"match": "chat.vip", "history": 1000, "ttl": 60}, {"match": "chat.*", "history": 50},'
        ' {"match": "dash.*", "latest": true, "ttl": 3600.5}]}'
    )
    for path in (toml, json_file):
        rules = GroupRules.load(str(path))
        assert rules.for_group("chat.vip") == GroupRule("chat.vip", 1000, 60.0, False)
        assert rules.for_group("chat.lobby") == GroupRule("chat.*", 50, 300.0, False)
        assert rules.for_group("dash.cpu") == GroupRule("dash.*", 1, 3600.5, True)  # latest keeps one
        assert rules.for_group("other") is None and rules.history_for("other") is None


def test_no_file_means_no_rules() -> None:
    assert GroupRules.load("").rules == ()


def test_presence_fields_default_to_off_and_are_read_as_written() -> None:
    rules = GroupRules.parse(
        {
            "group": [
                {"match": "room.*", "presence": "full", "presence_events": True, "presence_claims": ["name"]},
                {"match": "count.*", "presence": "counts", "history": 10},
                {"match": "*"},
            ]
        }
    )
    room = rules.presence_for("room.1")
    assert room is not None and (room.presence, room.presence_events, room.presence_claims) == (
        "full",
        True,
        ("name",),
    )
    count = rules.presence_for("count.1")
    assert count is not None and count.presence == "counts" and count.keeps_history
    assert rules.presence_for("other") is None and rules.for_group("other") is not None
    # what a connection keeps of its token: only the claims some rule shows
    assert rules.claims_shown == {"name"} and GroupRules([]).claims_shown == set()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[group]]\nmatch = 'a'\nhistory = -1\n", "group rule 1 (a): `history` must be a whole number"),
        ("[[group]]\nmatch = 'a'\nhistory = 1.5\n", "`history` must be a whole number"),
        ("[[group]]\nmatch = 'a'\nhistory = true\n", "`history` must be a whole number"),
        ("[[group]]\nmatch = 'a'\nhistory = 100001\n", "from 0 to 100000"),
        ("[[group]]\nmatch = 'a'\nttl = 0\n", "`ttl` must be a number of seconds"),
        ("[[group]]\nmatch = 'a'\nlatest = 'yes'\n", "`latest` must be true or false"),
        ("[[group]]\nmatch = 'a'\nlatest = true\nhistory = 0\n", "`latest` needs a history of at least 1"),
        ("[[group]]\nhistory = 5\n", "`match` must be a non-empty glob"),
        ("[[group]]\nmatch = 'a'\nhistroy = 5\n", "unknown field 'histroy'"),
        ("[[groups]]\nmatch = 'a'\n", "expected only a list named `group`"),
        ("[[group]\n", "is not valid TOML"),
        ("[[group]]\nmatch = 'ok'\n\n[[group]]\nmatch = 'b'\nttl = -5\n", "group rule 2 (b)"),
        ("[[group]]\nmatch = 'a'\npresence = 'on'\n", '`presence` must be "off", "counts" or "full"'),
        ("[[group]]\nmatch = 'a'\npresence = true\n", '`presence` must be "off", "counts" or "full"'),
        ("[[group]]\nmatch = 'a'\npresence_events = true\n", "`presence_events` needs `presence`"),
        (
            "[[group]]\nmatch = 'a'\npresence = 'full'\npresence_events = 1\n",
            "`presence_events` must be true",
        ),
        (
            "[[group]]\nmatch = 'a'\npresence = 'counts'\npresence_claims = ['n']\n",
            'needs `presence = "full"`',
        ),
        (
            "[[group]]\nmatch = 'a'\npresence = 'full'\npresence_claims = 'name'\n",
            "`presence_claims` must be a list",
        ),
        ("[[group]]\nmatch = 'a'\npresence = 'full'\npresence_claims = ['a b']\n", "claim names (1-64 of"),
        (
            "[[group]]\nmatch = 'a'\npresence = 'full'\npresence_claims = [1]\n",
            "`presence_claims` must be a list",
        ),
    ],
)
def test_a_bad_rule_is_refused_with_the_file_the_rule_and_the_field(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "groups.toml"
    path.write_text(text)
    with pytest.raises(SettingsError) as refused:
        GroupRules.load(str(path))
    assert "RELAY_GROUP_RULES_FILE" in str(refused.value) and message in str(refused.value)


def test_a_missing_or_bad_file_stops_the_pod_at_start_up(tmp_path: Path) -> None:
    bad = tmp_path / "groups.json"
    bad.write_text('{"group": [{"match": "x", "history": "lots"}]}')
    for path in (bad, tmp_path / "missing.toml"):
        pod = start_pod_process({"RELAY_GROUP_RULES_FILE": str(path)})
        assert pod.wait() == 1
        assert pod.output[-1].startswith("relay: invalid setting: RELAY_GROUP_RULES_FILE="), pod.output
        assert not any("Traceback" in line for line in pod.output)
