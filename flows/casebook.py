"""A patient's casebook artifact, published after every write about the patient, and the `subject:`
tag every run about a patient carries, so that the UI's Runs page filters to one patient."""

from __future__ import annotations

from prefect import get_client, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from sqlmodel import Session

from flows.common import current_clock, protocol, trial_engine
from flows.prefect_ui import artifact_key_url, artifact_url, ui_base
from models.queries import get_subject
from models.tables import AdverseEvent, Subject
from tasks.casebook import casebook_key, casebook_markdown, runs_range, runs_url, same_record


def casebook_link(subject_id: str, artifact_id: str | None = None) -> str | None:
    """The UI address of a patient's casebook: one version's page shows its text (`/artifacts/artifact/<id>`); the key's
    page (`/artifacts/key/<key>`) lists the versions, newest first, without the text."""
    return artifact_url(artifact_id) if artifact_id else artifact_key_url(casebook_key(subject_id))


def patient_runs_link(session: Session, subject_id: str) -> str | None:
    """The UI's Runs page for one patient: their tag, a date range from enrollment to past the last event, oldest first."""
    base = ui_base()  # PREFECT_UI_URL, or derived from the API's address
    if not base:
        return None
    start, end = runs_range(session, subject_id)
    return runs_url(base, subject_id, start, end)


def tag_run(subject_id: str | None) -> None:
    """Add `subject:<ID>` to the current flow run's tags (enrollment and recording runs are named by a form, not by us)."""
    run_id = flow_run.id
    if not subject_id or run_id is None:
        return
    tag = f"subject:{subject_id}"
    try:
        with get_client(sync_client=True) as client:
            tags = list(client.read_flow_run(run_id).tags or [])
            if tag not in tags:
                client.update_flow_run(run_id, tags=[*tags, tag])
    except Exception as exc:  # a tag is a convenience: it never stops a recording
        get_run_logger().warning("could not tag this run %s: %s", tag, exc)


def subject_of_ae(ae_id: int) -> str | None:
    """The subject ID an AE belongs to, or None when there is no such AE."""
    with Session(trial_engine()) as s:
        ae = s.get(AdverseEvent, ae_id)
        return s.get(Subject, ae.subject_pk).subject_id if ae else None


def _create(subject_id: str, markdown: str) -> str:
    artifact_id = create_markdown_artifact(key=casebook_key(subject_id), markdown=markdown,
                                           description=f"**{subject_id}** casebook: calendar planned and actual, administrations, AEs, "
                                                       "labs, decisions")
    return str(artifact_id)


@task(name="publish-casebook")
def _publish(subject_id: str) -> str | None:
    with Session(trial_engine()) as s:
        if get_subject(s, subject_id=subject_id) is None:
            return None
        markdown = casebook_markdown(s, protocol(), subject_id, now=current_clock()(), runs_link=patient_runs_link(s, subject_id))
    return _create(subject_id, markdown)


@task(name="refresh-casebooks")
def refresh_casebooks_task(subject_ids: list[str]) -> dict[str, str | None]:
    """Each patient's casebook, drawn again and published as a new version only where something in it changed since
    its latest version (the "as of" time aside): subject → the id of the version that shows it, for the worklist's
    links. Latest versions are read in one request per 200 patients, not one each."""
    from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterKey

    logger = get_run_logger()
    keys = [casebook_key(sid) for sid in subject_ids]
    latest = {}
    try:
        with get_client(sync_client=True) as client:
            for start in range(0, len(keys), 200):
                chunk = keys[start:start + 200]
                for art in client.read_latest_artifacts(
                        artifact_filter=ArtifactCollectionFilter(key=ArtifactCollectionFilterKey(any_=chunk)), limit=len(chunk)):
                    latest[art.key] = art
    except Exception as exc:  # noqa: BLE001 - without the latest versions, every casebook is published
        logger.warning("latest casebook versions not read, so every casebook is published: %s", exc)
    out: dict[str, str | None] = {}
    changed = failed = 0
    with Session(trial_engine()) as s:
        now, p = current_clock()(), protocol()
        for sid, key in zip(subject_ids, keys):
            try:  # one casebook that cannot be drawn or published never stops the others
                markdown = casebook_markdown(s, p, sid, now=now, runs_link=patient_runs_link(s, sid))
                prior = latest.get(key)
                if prior is not None and isinstance(prior.data, str) and same_record(prior.data, markdown):
                    out[sid] = str(prior.latest_id)
                    continue
                out[sid] = _create(sid, markdown)
                changed += 1
            except Exception as exc:  # noqa: BLE001
                s.rollback()
                out[sid], failed = None, failed + 1
                logger.warning("casebook of %s not refreshed: %s", sid, exc)
    logger.info("casebooks: %d changed and published, %d unchanged, %d not refreshed", changed,
                len(subject_ids) - changed - failed, failed)
    return out


def publish_casebook(subject_id: str | None) -> str | None:
    """Refresh the patient's casebook artifact and return its id; a casebook that cannot be drawn never undoes or fails
    the write before it."""
    if not subject_id:
        return None
    state = _publish(subject_id, return_state=True)
    if not state.is_completed():
        get_run_logger().warning("casebook of %s not refreshed: %s", subject_id, state.message)
        return None
    return state.result()


def recorded_about(subject_id: str | None) -> None:
    """After a write about a patient from a run named by a form (AEs, adjudications): tag the run, refresh the casebook."""
    tag_run(subject_id)
    publish_casebook(subject_id)
