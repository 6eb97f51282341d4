"""The protocol file: every value carries its source, and a bad file fails naming the key."""

from __future__ import annotations

import pytest
import yaml

from protocol.definition import load_protocol, parse_protocol
from protocol.errors import ProtocolFileError
from tests.helpers import DELETE, RAW, protocol_data_with


def test_the_shipped_protocol_holds_the_registry_values(protocol):
    assert protocol.protocol.trial_id == "NCT06641648"
    assert [lvl.cells_per_infusion for lvl in protocol.dose_levels.levels] == [1.0e8, 5.0e8, 2.0e9]
    assert [i.day for i in protocol.nk_infusions.infusions] == [0, 14]
    assert protocol.il2.dose_miu.value == 1.0 and protocol.il2.duration_days.value == 28
    assert (protocol.dlt.window.open_day, protocol.dlt.window.close_day) == (0, 28)
    assert protocol.escalation.target_enrollment.value == 12
    assert protocol.timezone == "Asia/Shanghai"


def test_registry_and_assumption_are_told_apart(protocol):
    assert protocol.dose_levels.source == "registry"
    assert protocol.nk_infusions.infusions[1].window.source == "assumption"
    assert protocol.il2.first_day.source == "assumption"
    assert protocol.dlt.rules.source == "assumption"
    assert protocol.escalation.design.source == "assumption"
    assert protocol.site.timezone.source == "assumption"


def test_every_sourced_value_in_the_file_names_its_source():
    missing = []

    def walk(node, path):
        if isinstance(node, dict):
            if "value" in node and "source" not in node:
                missing.append(path)
            for k, v in node.items():
                walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(RAW, "")
    assert missing == []


@pytest.mark.parametrize(
    ("path", "value", "names"),
    [
        ("nk_infusions.infusions.1.window.minus_days", -1, "nk_infusions.infusions.1.window.minus_days"),
        ("nk_infusions.infusions.1.window.plus_days", -2, "nk_infusions.infusions.1.window.plus_days"),
        ("dose_levels.levels.1.cells_per_infusion", 5.0e7, "cells_per_infusion"),
        ("dose_levels.levels.2.level", 5, "levels[2].level"),
        ("site.timezone.value", "Mars/Olympus_Mons", "site.timezone"),
        ("site.default_event_time.value", "9 o'clock", "site.default_event_time"),
        ("protocol.version", "one", "protocol.version"),
        ("visits.0.window.minus_days", -3, "visits.0.window.minus_days"),
        ("dlt.window.close_day", 7, "close_day"),
        ("il2.duration_days.value", 0, "duration_days"),
        ("escalation.cohort_size.value", 4, "max_per_level"),
        ("nk_infusions.infusions.0.day", 2, "day 0"),
        ("dose_levels.levels.0.source", "rumour", "dose_levels.levels.0.source"),
        ("il2.dose_miu.source", "hearsay", "il2.dose_miu.source"),
        ("escalation", DELETE, "escalation"),
        ("site.colour", "blue", "site.colour"),
    ],
)
def test_a_malformed_file_fails_naming_the_key(path, value, names):
    with pytest.raises(ProtocolFileError) as err:
        parse_protocol(protocol_data_with(path, value))
    msg = str(err.value)
    assert names in msg, msg
    assert "\n" not in msg


def test_an_unreadable_or_broken_file_is_one_sentence(tmp_path):
    with pytest.raises(ProtocolFileError, match="cannot be read"):
        load_protocol(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("site: [unclosed\n", encoding="utf-8")
    with pytest.raises(ProtocolFileError, match="not valid YAML at line"):
        load_protocol(bad)
    bad.write_text("- a list\n", encoding="utf-8")
    with pytest.raises(ProtocolFileError, match="top level must be a mapping"):
        load_protocol(bad)


def test_an_amended_file_loads_with_its_new_values(tmp_path):
    data = protocol_data_with("nk_infusions.infusions.1.window.plus_days", 5)
    data["protocol"]["version"] = "1.1.0"
    f = tmp_path / "amended.yaml"
    f.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    p = load_protocol(f)
    assert p.version == "1.1.0"
    assert p.nk_infusions.infusions[1].window.plus_days == 5
