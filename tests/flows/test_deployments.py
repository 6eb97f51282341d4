"""prefect.yaml: one deployment per flow, typed forms, schedules in the site timezone, and it deploys."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import yaml
from prefect import get_client
from prefect.settings import PREFECT_API_URL

from flows.deployments import INTERNAL
from protocol.roles import Act, Role, allowed_roles
from tasks.runtime import protocol
from tests.flows.conftest import ALL_FLOWS

ROOT = Path(__file__).parents[2]
SPEC = yaml.safe_load((ROOT / "prefect.yaml").read_text(encoding="utf-8"))


def _flow(entrypoint: str):
    path, name = entrypoint.split(":")
    return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)


def test_every_flow_has_exactly_one_deployment_named_after_it_in_the_same_order():
    names = [d["name"] for d in SPEC["deployments"]]
    assert names == [f.name for f in ALL_FLOWS]
    for d in SPEC["deployments"]:
        assert _flow(d["entrypoint"]).name == d["name"]
        assert d["enforce_parameter_schema"] is True
        assert d["work_pool"]["name"] == "nktrial"


# Which act of the delegation log each staff form performs: its description must name exactly the roles the log allows.
FORM_ACTS = {"enroll-patient": Act.ENROLL, "record-infusion": Act.RECORD_INFUSION, "record-il2-dose": Act.RECORD_IL2,
             "record-visit": Act.RECORD_VISIT_OR_LAB, "record-lab-result": Act.RECORD_VISIT_OR_LAB, "report-adverse-event": Act.REPORT_AE,
             "update-adverse-event": Act.REPORT_AE, "adjudicate-dlt": Act.ADJUDICATE_DLT, "cohort-review": Act.SIGN_ESCALATION,
             "off-study": Act.OFF_STUDY, "manage-staff": Act.MANAGE_STAFF, "daily-rounds": None}
INTERNAL_NOTE = "Internal — started by the system, not by hand: "


def _roles_named(description: str) -> set[str]:
    """'Nurse, coordinator or PI: ...' -> {'nurse', 'coordinator', 'pi'}."""
    head = description.split(": ", 1)[0]
    return {w.strip().lower() for w in head.replace(" or ", ", ").split(",")}


def test_each_deployment_says_who_uses_it_and_is_tagged_for_staff_or_internal():
    internal = {f.name for f in INTERNAL}
    assert internal == {"patient-treatment", "treatment-event", "sae-deadline"}
    kinds = []
    for d in SPEC["deployments"]:
        name, text, tags = d["name"], d["description"], set(d["tags"])
        assert "\n" not in text and len(text) <= 200, name
        assert len(tags & {"for-staff", "internal"}) == 1, name
        if name in internal:
            assert "internal" in tags and text.startswith(INTERNAL_NOTE), name
        else:
            assert "for-staff" in tags, name
            named = _roles_named(text)
            assert named <= {r.value for r in Role}, (name, named)
            act = FORM_ACTS[name]
            if act is not None:
                assert named == {r.value for r in allowed_roles(protocol().authority.acts, act)}, (name, named)
        kinds.append(name in internal)
    assert kinds == sorted(kinds), "the forms staff use come first, the internal deployments last"


def test_every_schedule_runs_in_the_protocol_site_timezone():
    schedules = [s for d in SPEC["deployments"] for s in d.get("schedules", [])]
    assert schedules, "daily-rounds must be scheduled"
    assert all(s["timezone"] == protocol().timezone for s in schedules)
    rounds = next(d for d in SPEC["deployments"] if d["name"] == "daily-rounds")
    assert rounds["schedules"][0]["cron"] == "0 7 * * *"


def test_enrollment_is_serialized_by_deployment_concurrency():
    enroll = next(d for d in SPEC["deployments"] if d["name"] == "enroll-patient")
    assert enroll["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}


def test_prefect_yaml_deploys_to_a_real_server_with_typed_forms(prefect_server, tmp_path):
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path)}
    prefect = str(Path(sys.executable).with_name("prefect"))
    subprocess.run([prefect, "work-pool", "create", "nktrial", "--type", "process"], env=env, cwd=ROOT, check=False, capture_output=True)
    out = subprocess.run([prefect, "--no-prompt", "deploy", "--all"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("enroll-patient/enroll-patient")
        schema = dep.parameter_openapi_schema
        assert dep.enforce_parameter_schema and dep.work_pool_name == "nktrial"
        screening = [d for name, d in schema["definitions"].items() if name != "EnrollmentRequest"]  # the screening record's parts
        assert screening and all(d["additionalProperties"] is False for d in screening)  # an unknown field is refused at submit
        rounds = client.read_deployment_by_name("daily-rounds/daily-rounds")
        assert rounds.schedules[0].schedule.timezone == protocol().timezone
        event = client.read_deployment_by_name("treatment-event/treatment-event")
        assert "internal" in event.tags and event.description.startswith(INTERNAL_NOTE)
        infusion = client.read_deployment_by_name("record-infusion/record-infusion")
        assert "for-staff" in infusion.tags and infusion.description.startswith("Nurse or investigator: ")
        given_at = infusion.parameter_openapi_schema["definitions"]["InfusionRecord"]["properties"]["given_at"]
        assert given_at["type"] == "string" and given_at["title"] == f"Given at (site time, {protocol().timezone})"
    assert not (ROOT / "prefect.yaml").read_text(encoding="utf-8").count("set_working_directory")  # no machine path was written back
