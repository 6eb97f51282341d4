"""The late-infusion rehearsal: a late infusion moves its PK samples; a missed one is replaced."""

from __future__ import annotations

import pytest
from sqlmodel import Session, select

from models.tables import Administration, LabResult, Subject
from protocol.dates import to_local
from tests.flows.rehearsals import P, ends_where_the_3_plus_3_rules_say


@pytest.mark.parametrize("name", ["late-infusion"])
def test_the_rehearsal_ends_where_the_3_plus_3_rules_say(rehearsed, name):
    ends_where_the_3_plus_3_rules_say(*rehearsed(name)[:2])


def test_a_late_infusion_moves_its_pk_samples_and_a_missed_one_is_replaced(rehearsed):
    res, engine, _ = rehearsed("late-infusion")
    with Session(engine) as s:
        def infusion_2_day(sid):
            subj = s.exec(select(Subject).where(Subject.subject_id == sid)).one()
            a = s.exec(select(Administration).where(Administration.subject_pk == subj.id, Administration.event_key == "nk_infusion-2")).first()
            return subj, a

        subj, a = infusion_2_day("S-301")
        day0 = to_local(P.timezone, subj.planned_day0_at).date()
        assert (to_local(P.timezone, a.given_at).date() - day0).days == 16
        pk = s.exec(select(LabResult).where(LabResult.subject_pk == subj.id, LabResult.event_key == "pk_sample-infusion_2+1")).one()
        assert (pk.sampled_on - day0).days == 17  # infusion 2 + 1 day, not the planned day 15
        _, late = infusion_2_day("S-302")
        assert late.deviation_reason == "donor product released late"
        _, missed = infusion_2_day("S-303")
        assert missed is None
    by = {p["subject_id"]: p for p in res.patients}
    assert by["S-303"]["evaluable"] is False and by["S-304"]["cohort"] == 1 and by["S-304"]["evaluable"] is True
