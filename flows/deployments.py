"""Every flow that has a deployment, in prefect.yaml's order (a test checks the two agree): the forms staff use
first, then the runs the system starts by itself (`internal`)."""

from flows.enrollment import enroll_patient
from flows.recording import off_study, record_il2_dose, record_infusion, record_lab_result, record_visit
from flows.rounds import daily_rounds
from flows.safety import adjudicate_dlt, cohort_review, report_adverse_event, sae_deadline, update_adverse_event
from flows.staff import manage_staff
from flows.treatment import patient_treatment, treatment_event

FOR_STAFF = [enroll_patient, record_infusion, record_il2_dose, record_visit, record_lab_result, report_adverse_event,
             update_adverse_event, adjudicate_dlt, cohort_review, off_study, manage_staff, daily_rounds]
INTERNAL = [patient_treatment, treatment_event, sae_deadline]
ALL_FLOWS = FOR_STAFF + INTERNAL
