"""Each run acts only on its own trial: a run tagged `trial:<instance>` of another trial database is refused
before it acts, ends Cancelled "Wrong trial" with one sentence, and the coordinators of the database the
worker serves are told. Two trial databases share the session's Prefect server, as a rehearsal and the real
trial do; "the worker's database" is the one the settings name when a run executes."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import sqlalchemy as sa
from prefect import get_client
from prefect.exceptions import Abort, Pause
from prefect.flow_engine import run_flow
from prefect.flow_runs import resume_flow_run
from prefect.states import Pending, Scheduled
from sqlmodel import Session, select

from flows.safety import cohort_review
from flows.staff import manage_staff
from flows.treatment import TreatmentEventRef, patient_treatment, treatment_event
from models.crud import register_protocol
from models.db import UnitOfWork
from models.migrate import upgrade
from models.queries import trial_instance
from models.tables import AuditLog, EscalationDecision, Signature, SigningCode, Staff
from protocol.eligibility import ScreeningRecord
from tasks import enrollment, recording
from tasks.runtime import protocol, trial_engine
from tasks.trial_guard import STATE_NAME
from tests.helpers import register_staff

EXAMPLE = json.loads((Path(__file__).parents[2] / "examples" / "screening-S-001.json").read_text())
DAY0 = dt.datetime(2027, 1, 31, 9, 0)
BOOKKEEPING = {"notification_outbox", "notification_delivery"}  # the coordinators' notice and its delivery


def _instance(engine) -> str:
    """The database's instance, registering the protocol first if nothing has yet (enrollment does it otherwise)."""
    with UnitOfWork(engine, actor="system:test", reason="the protocol in force") as u:
        register_protocol(u.session, protocol=protocol(), at=u.at)
        u.commit()
    with Session(engine) as s:
        return trial_instance(s)


def _ready_cohort(engine, clock, sids) -> None:
    """Three patients enrolled and given both infusions, their DLT windows closed by the in-process treatment-event
    flow (started by hand: no trial tag): the last close starts the cohort review, tagged for this trial."""
    for sid in sids:
        record = ScreeningRecord.model_validate({**EXAMPLE, "subject_id": sid})
        assert enrollment.enroll(engine, protocol(), record=record, planned_day0=DAY0, actor="coord-1",
                                 clock=clock).status is enrollment.EnrollmentStatus.ENROLLED
        for n, day in ((1, 0), (2, 14)):
            recording.record_infusion(engine, protocol(), subject_id=sid, infusion_number=n, given_at=DAY0 + dt.timedelta(days=day),
                                      dose_level=1, cells_infused=protocol().dose_level(1).cells_per_infusion, product_lot=f"LOT-{sid}-{n}",
                                      actor="nurse-7", clock=lambda: clock().replace(year=2027, month=3, day=31))
    clock.set(dt.datetime(2027, 3, 1, 0, 0, tzinfo=dt.UTC))
    for sid in sids:
        treatment_event(TreatmentEventRef(subject_id=sid, event_key="dlt_window_close"))


def _review_run(instance: str):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter, FlowRunFilterTags

    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"trial:{instance}"])),
                                       deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["cohort-review"])))
    return run


def _execute(flow, run_id):
    """Execute a run here as a worker would (Scheduled now); a suspension or a refusal ends the process's part."""
    with get_client(sync_client=True) as client:
        if not client.read_flow_run(run_id).state.is_pending():
            client.set_flow_run_state(run_id, Scheduled(), force=True)
        try:
            run_flow(flow, flow_run=client.read_flow_run(run_id), return_type="state")
        except (Pause, Abort):
            pass
        return client.read_flow_run(run_id).state


def _writes(engine) -> dict:
    """What a refused run must leave as it was: the audit rows (bar the notice's bookkeeping) and the tables it would write."""
    with Session(engine) as s:
        audit = s.exec(select(sa.func.count()).select_from(AuditLog).where(AuditLog.entity.not_in(BOOKKEEPING))).one()
        return {"audit rows": audit, **{t.__tablename__: s.exec(select(sa.func.count()).select_from(t)).one()
                                        for t in (EscalationDecision, SigningCode, Signature, Staff)}}


def _real_trial(tmp_path, monkeypatch):
    """The second trial database, now the one the settings (the worker) serve."""
    monkeypatch.setenv("NKTRIAL_DATABASE_URL", f"sqlite:///{tmp_path / 'real-trial.db'}")
    real = trial_engine()
    upgrade(real)
    register_staff(real)
    return real


def test_a_rehearsals_paused_review_resumed_on_the_real_trial_is_refused_and_writes_nothing(trial_db, clock, channels, tmp_path,
                                                                                           monkeypatch):
    rehearsal = _instance(trial_db)
    _ready_cohort(trial_db, clock, ["S-901", "S-902", "S-903"])
    run = _review_run(rehearsal)
    assert _execute(cohort_review, run.id).is_paused()  # on its own trial the review acts: a decision waits for the PI
    with Session(trial_db) as s:
        assert s.exec(select(EscalationDecision)).one().review_flow_run_id == str(run.id)

    real = _real_trial(tmp_path, monkeypatch)
    served = _instance(real)
    assert served != rehearsal
    before = _writes(real)
    resume_flow_run(run.id, run_input={"decision": "escalate", "meaning": protocol().escalation.signature_meanings.value[0],
                                       "signer_id": "pi-01", "printed_name": "Principal Investigator", "signing_code": "12345678"})
    state = _execute(cohort_review, run.id)

    assert state.is_cancelled() and state.name == STATE_NAME, (state.name, state.message)
    assert state.message == (f"This run belongs to trial instance {rehearsal}, but this worker serves the trial database "
                             f"real-trial.db of instance {served}: it did nothing here.")
    assert _writes(real) == before  # no decision, code, signature or audit row on the real trial
    (told,) = [m.body for m in channels("coordinator") if "another trial database" in m.body]
    assert f"cohort-review run of trial {rehearsal}, this worker serves trial {served}" in told
    assert _execute(cohort_review, run.id).name == STATE_NAME  # resumed again: refused again, the coordinators told once
    assert len([m for m in channels("coordinator") if "another trial database" in m.body]) == 1


def test_a_run_of_the_workers_own_trial_acts_and_one_of_another_trial_is_refused_even_inside_a_task(trial_db, clock, channels, tmp_path,
                                                                                                   monkeypatch):
    other = _instance(trial_db)
    real = _real_trial(tmp_path, monkeypatch)
    served = _instance(real)

    def run_of(flow_name, parameters, instance):
        with get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name(f"{flow_name}/{flow_name}")
            return client.create_flow_run_from_deployment(dep.id, parameters=parameters, state=Pending(), tags=[f"trial:{instance}"]).id

    def add(staff_id, instance):
        change = {"action": "add", "staff_id": staff_id, "printed_name": "Nurse Nine", "roles": ["nurse"], "recorded_by": "pi-01"}
        return _execute(manage_staff, run_of("manage-staff", {"change": change}, instance))

    before = _writes(real)
    assert add("nurse-9", served).name == "Added"  # its own trial: the form's flow acts as before
    refused = add("nurse-8", other)
    assert refused.is_cancelled() and refused.name == STATE_NAME and f"trial instance {other}" in refused.message
    with Session(real) as s:
        assert [m.staff_id for m in s.exec(select(Staff).where(Staff.staff_id.in_(["nurse-8", "nurse-9"])))] == ["nurse-9"]
    # patient-treatment first reaches the database inside a task: refused there, the task run does not stay Running
    treatment = run_of("patient-treatment", {"subject": {"subject_id": "S-904"}}, other)
    assert _execute(patient_treatment, treatment).name == STATE_NAME
    with get_client(sync_client=True) as client:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[treatment])))
    assert tasks and all(t.state.is_final() for t in tasks), [(t.name, t.state.name) for t in tasks]
    after = _writes(real)
    assert after["staff"] == before["staff"] + 1 and after["audit rows"] > before["audit rows"]
    assert len([m for m in channels("coordinator") if "another trial database" in m.body]) == 2

