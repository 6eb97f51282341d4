"""Exact operating characteristics of the 3+3 design, by enumerating every dose path.

Patients are followed one at a time; a cohort ends early at the second DLT at its level (as
the design says). Each path is a history in outcome notation with its probability under true
DLT probabilities p[level]. No Monte Carlo: the sums are exact up to floating point.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product

from protocol.three_plus_three import Action, Cohort, Decision, Design, too_toxic


@dataclass(frozen=True)
class DosePath:
    history: str
    cohorts: tuple[Cohort, ...]
    final: Decision

    def probability(self, p: list[float]) -> float:
        prob = 1.0
        for c in self.cohorts:
            q = p[c.dose_level - 1]
            for letter in c.outcomes:
                prob *= q if letter == "T" else 1 - q
        return prob


@dataclass
class OperatingCharacteristics:
    p: list[float]
    p_mtd: dict[int, float] = field(default_factory=dict)  # P(level k declared MTD)
    p_no_tolerable_dose: float = 0.0
    expected_patients: dict[int, float] = field(default_factory=dict)
    expected_dlts: dict[int, float] = field(default_factory=dict)
    paths: int = 0

    def as_dict(self) -> dict:
        return {"p": self.p, "p_mtd": self.p_mtd, "p_no_tolerable_dose": self.p_no_tolerable_dose,
                "expected_patients": self.expected_patients, "expected_dlts": self.expected_dlts,
                "expected_total_patients": sum(self.expected_patients.values()), "paths": self.paths}


def _cohort_outcomes(size: int, dlts_before: int) -> list[str]:
    """Every way a cohort can go, stopping at the patient whose DLT is the level's second."""
    out = set()
    for letters in product("NT", repeat=size):
        seq = ""
        for letter in letters:
            seq += letter
            if too_toxic(dlts_before + seq.count("T")):
                break
        out.add(seq)
    return sorted(out)


def dose_paths(design: Design) -> list[DosePath]:
    """Every complete path the design can take, from the first cohort to its stop."""
    paths: list[DosePath] = []

    def walk(cohorts: list[Cohort]) -> None:
        decision = design.decide(cohorts)
        if decision.action is Action.STOP:
            history = " ".join(f"{c.dose_level}{c.outcomes}" for c in cohorts)
            paths.append(DosePath(history, tuple(cohorts), decision))
            return
        level = decision.dose_level
        before = design.tallies(cohorts)[level].dlts
        for seq in _cohort_outcomes(decision.patients, before):
            walk([*cohorts, Cohort(level, seq)])

    walk([])
    return paths


def operating_characteristics(design: Design, p: list[float]) -> OperatingCharacteristics:
    if len(p) != design.num_levels:
        raise ValueError(f"--p needs one DLT probability per dose level ({design.num_levels}), got {len(p)}")
    if any(not 0 <= q <= 1 for q in p):
        raise ValueError("--p values are probabilities: each must be between 0 and 1")
    levels = range(1, design.num_levels + 1)
    oc = OperatingCharacteristics(p=list(p), p_mtd={k: 0.0 for k in levels},
                                  expected_patients={k: 0.0 for k in levels}, expected_dlts={k: 0.0 for k in levels})
    for path in dose_paths(design):
        prob = path.probability(p)
        oc.paths += 1
        if path.final.mtd is None:
            oc.p_no_tolerable_dose += prob
        else:
            oc.p_mtd[path.final.mtd] += prob
        for c in path.cohorts:
            oc.expected_patients[c.dose_level] += prob * c.n
            oc.expected_dlts[c.dose_level] += prob * c.dlts
    return oc
