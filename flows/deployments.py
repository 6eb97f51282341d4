"""Every flow that has a deployment, in prefect.yaml's order (a test checks the two agree)."""

from flows.enrollment import enroll_patient
from flows.recording import off_study, record_il2_dose, record_infusion, record_lab_result, record_visit
from flows.rounds import daily_rounds
from flows.safety import adjudicate_dlt, cohort_review, report_adverse_event, sae_deadline, update_adverse_event
from flows.staff import manage_staff
from flows.treatment import patient_treatment, treatment_event

ALL_FLOWS = [enroll_patient, patient_treatment, treatment_event, daily_rounds, record_infusion, record_il2_dose,
             record_visit, record_lab_result, off_study, report_adverse_event, update_adverse_event, adjudicate_dlt, sae_deadline,
             cohort_review, manage_staff]
