"""The classical 3+3 dose-escalation rule as a decision table over the whole outcome history.

A history is written in the outcome notation of the R package `escalation`: "1NNN 2NTN" means a
cohort of three at level 1 with no DLT, then three at level 2 with one DLT (the second patient).
`next_action` is a pure function of that history, so every decision can be replayed. It reads one
group as one cohort, as the trial's own records write it; `next_action_in_full_notation` also reads
the R package's full notation, where a level's patients may be one group and the last cohort may
still be filling.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from protocol.errors import HistoryError

_GATEKEEPER = re.compile(r"^\s*(?:\d+[A-Za-z]+(?:\s+\d+[A-Za-z]+)*)?\s*$")
_COHORT = re.compile(r"(\d+)([A-Za-z]+)")


class Action(StrEnum):
    """Next actions, boldest first; the order ranks how bold a choice is."""

    ESCALATE = "escalate"
    ENROLL = "enroll"
    EXPAND = "expand"
    DEESCALATE = "deescalate"
    STOP = "stop"


TOO_TOXIC_DLTS = 2  # DLTs that make a dose level too toxic, in 3 or in 6; they end its cohort at once


def too_toxic(dlts: int) -> bool:
    """Two DLTs at a level make it too toxic: stop escalating, and end its cohort without waiting."""
    return dlts >= TOO_TOXIC_DLTS


BOLDNESS = {Action.ESCALATE: 3, Action.ENROLL: 2, Action.EXPAND: 2, Action.DEESCALATE: 1, Action.STOP: 0}


@dataclass(frozen=True)
class Cohort:
    dose_level: int
    outcomes: str  # one letter a patient: N no DLT, T DLT

    @property
    def n(self) -> int:
        return len(self.outcomes)

    @property
    def dlts(self) -> int:
        return self.outcomes.count("T")


@dataclass(frozen=True)
class Tally:
    n: int = 0
    dlts: int = 0


@dataclass(frozen=True)
class Decision:
    action: Action
    dose_level: int | None
    patients: int
    mtd: int | None
    reason: str

    def as_dict(self) -> dict:
        return {"action": self.action.value, "dose_level": self.dose_level, "patients": self.patients, "mtd": self.mtd, "reason": self.reason}


@dataclass(frozen=True)
class Design:
    """A 3+3 design over `num_levels` dose levels."""

    num_levels: int
    cohort_size: int = 3

    @property
    def max_per_level(self) -> int:
        return 2 * self.cohort_size

    def parse(self, history: str) -> list[Cohort]:
        """Validate the notation (the gate-keeper) and split it into cohorts."""
        if not _GATEKEEPER.match(history):
            raise HistoryError(f"history '{history}' is not in outcome notation: cohorts like '1NNN 2NTN', a level then N/T letters, separated by spaces")
        cohorts = []
        for i, (level, letters) in enumerate(_COHORT.findall(history), start=1):
            bad = sorted(set(letters) - {"N", "T"})
            if bad:
                raise HistoryError(f"history cohort {i} ('{level}{letters}') has unknown letter '{bad[0]}'; use N for no DLT and T for a DLT")
            lvl = int(level)
            if not 1 <= lvl <= self.num_levels:
                raise HistoryError(f"history cohort {i} is at level {lvl}, which does not exist; dose levels are 1 to {self.num_levels}")
            cohorts.append(Cohort(lvl, letters))
        return cohorts

    def tallies(self, cohorts: list[Cohort]) -> dict[int, Tally]:
        t = {lvl: Tally() for lvl in range(1, self.num_levels + 1)}
        for c in cohorts:
            t[c.dose_level] = Tally(t[c.dose_level].n + c.n, t[c.dose_level].dlts + c.dlts)
        return t

    def decide(self, cohorts: list[Cohort]) -> Decision:
        """The decision table, read at the level of the last cohort. Assumes a valid history."""
        k = self.cohort_size
        if not cohorts:
            return Decision(Action.ENROLL, 1, k, None, f"no patients yet: enrol {k} at level 1")
        t = self.tallies(cohorts)
        lvl = cohorts[-1].dose_level
        n, d = t[lvl].n, t[lvl].dlts
        top = lvl == self.num_levels
        above_toxic = not top and too_toxic(t[lvl + 1].dlts)
        tally = f"{d} DLT in {n} at level {lvl}"
        # (dlts, n) -> decision; the table reads top to bottom, first match wins.
        if too_toxic(d):
            if lvl == 1:
                return Decision(Action.STOP, None, 0, None, f"{tally}: level 1 is too toxic; stop with no tolerable dose")
            below = t[lvl - 1]
            if below.n >= self.max_per_level:
                return Decision(Action.STOP, None, 0, lvl - 1, f"{tally}: too toxic; level {lvl - 1} has {below.dlts} DLT in {below.n} and is the MTD")
            return Decision(Action.DEESCALATE, lvl - 1, k, None,
                            f"{tally}: too toxic; the MTD needs {self.max_per_level} at level {lvl - 1}, so enrol {k} more there")
        if n < self.max_per_level and d == 1:
            return Decision(Action.EXPAND, lvl, k, None, f"{tally}: expand level {lvl} to {self.max_per_level}")
        if n < self.max_per_level:  # 0 DLT in the first cohort
            if top:
                return Decision(Action.EXPAND, lvl, k, None, f"{tally}: top level; expand to {self.max_per_level} to confirm")
            if above_toxic:
                return Decision(Action.EXPAND, lvl, k, None, f"{tally}: level {lvl + 1} is too toxic; expand to {self.max_per_level} to confirm the MTD")
            return Decision(Action.ESCALATE, lvl + 1, k, None, f"{tally}: escalate to level {lvl + 1}")
        # n == max_per_level, at most 1 DLT
        if top:
            return Decision(Action.STOP, None, 0, lvl, f"{tally}: top level tolerated; level {lvl} is the MTD/RP2D")
        if above_toxic:
            return Decision(Action.STOP, None, 0, lvl, f"{tally}: level {lvl + 1} is too toxic; level {lvl} is the MTD")
        return Decision(Action.ESCALATE, lvl + 1, k, None, f"{tally}: escalate to level {lvl + 1}")

    def validate(self, cohorts: list[Cohort]) -> None:
        """Refuse a history that 3+3 could not have produced, with one sentence."""
        for i, c in enumerate(cohorts, start=1):
            before = cohorts[: i - 1]
            self._refuse_after_stop(i, c, before)
            self._refuse_wrong_size(i, c, before)
            self._refuse_wrong_level(i, c, before)

    def _refuse_after_stop(self, i: int, c: Cohort, before: list[Cohort]) -> None:
        rule = self.decide(before)
        if rule.action is Action.STOP:
            raise HistoryError(f"history cohort {i} ('{c.dose_level}{c.outcomes}') comes after 3+3 stopped the trial ({rule.reason})")

    def _refuse_wrong_size(self, i: int, c: Cohort, before: list[Cohort]) -> None:
        where = f"history cohort {i} ('{c.dose_level}{c.outcomes}')"
        if c.n > self.cohort_size:
            raise HistoryError(f"{where} has {c.n} patients; a cohort has {self.cohort_size}")
        if c.n < self.cohort_size and not too_toxic(self.tallies(before)[c.dose_level].dlts + c.dlts):
            raise HistoryError(f"{where} has {c.n} patients; a cohort has {self.cohort_size} unless a second DLT at the level ends it early")
        if c.n < self.cohort_size and not c.outcomes.endswith("T"):
            raise HistoryError(f"{where} goes on after the second DLT ended it; list only patients dosed before the stop")

    def _refuse_wrong_level(self, i: int, c: Cohort, before: list[Cohort]) -> None:
        rule = self.decide(before)
        t = self.tallies(before)
        where = f"history cohort {i} ('{c.dose_level}{c.outcomes}')"
        if c.dose_level == rule.dose_level:
            return
        if too_toxic(t[c.dose_level].dlts):
            raise HistoryError(f"{where} returns to level {c.dose_level}, already declared too toxic")
        if c.dose_level > max((x.dose_level for x in before), default=0) + 1:
            raise HistoryError(f"{where} skips a level: escalation goes one level at a time")
        if t[c.dose_level].n == self.cohort_size and t[c.dose_level].dlts == 0 and rule.action is Action.ESCALATE:
            raise HistoryError(f"{where} adds patients to level {c.dose_level}, which had 0 DLT in {self.cohort_size}; 3+3 escalates to level {rule.dose_level}")
        raise HistoryError(f"{where} is at level {c.dose_level}, but 3+3 said {rule.action.value} at level {rule.dose_level} ({rule.reason})")

    def split_groups(self, groups: list[Cohort]) -> list[Cohort]:
        """The R package's full notation: a group of a level's patients ('1NTNNNN') is its cohorts in
        order ('1NTN 1NNN'); the last one may be short."""
        k = self.cohort_size
        return [Cohort(g.dose_level, g.outcomes[i:i + k]) for g in groups for i in range(0, g.n, k)]

    def next_action_in_full_notation(self, history: str) -> Decision:
        """Like `next_action`, for a history in the R package's full notation: groups of any size are
        split into cohorts, and a history may end inside a cohort ('1NNN 2NT': enrol 1 more at level 2)."""
        cohorts = self.split_groups(self.parse(history))
        last = cohorts[-1] if cohorts else None
        if last is None or last.n >= self.cohort_size or too_toxic(self.tallies(cohorts)[last.dose_level].dlts):
            self.validate(cohorts)
            return self.decide(cohorts)
        before = cohorts[:-1]
        self.validate(before)
        self._refuse_after_stop(len(cohorts), last, before)
        self._refuse_wrong_level(len(cohorts), last, before)
        more = self.cohort_size - last.n
        return Decision(Action.ENROLL, last.dose_level, more, None,
                        f"the cohort at level {last.dose_level} has {last.n} of {self.cohort_size} patients "
                        f"({last.dlts} DLT): enrol {more} more at level {last.dose_level}")

    def next_action(self, history: str) -> Decision:
        cohorts = self.parse(history)
        self.validate(cohorts)
        return self.decide(cohorts)
