"""The one-of-three-expansion rehearsal: one DLT in three expands the level before escalating."""

from __future__ import annotations

import pytest

from tests.flows.rehearsals import ends_where_the_3_plus_3_rules_say


@pytest.mark.parametrize("name", ["one-of-three-expansion"])
def test_the_rehearsal_ends_where_the_3_plus_3_rules_say(rehearsed, name):
    ends_where_the_3_plus_3_rules_say(*rehearsed(name)[:2])


def test_one_dlt_in_three_expands_the_level_before_escalating(rehearsed):
    res, engine, _ = rehearsed("one-of-three-expansion")
    s102 = next(p for p in res.patients if p["subject_id"] == "S-102")
    assert s102["dlts"] == 1 and s102["cohort"] == 1
    assert [p["cohort"] for p in res.patients if p["subject_id"] in ("S-104", "S-105", "S-106")] == [2, 2, 2]
    assert [(d["history"], d["signed"]) for d in res.decisions] == [("1NTN", "expand"), ("1NTN 1NNN", "escalate")]
