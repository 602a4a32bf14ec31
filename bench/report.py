"""Tables, targets and the JSON record of one benchmark run."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

# Targets for Strawgate (throughput as a fraction of the scenario's reference).
THROUGHPUT_TARGETS = {"me": 0.5, "login": 0.85, "refresh": 0.5}
# Targets of the scenarios measured on Strawgate alone, as multiples of other scenarios'
# Strawgate ok/s in the same run: scenario -> {other scenario: at least this multiple}.
RELATIVE_TARGETS: dict[str, dict[str, float]] = {
    "finishPasskeyLogin": {"login": 5.0, "refresh": 0.5},
    "signInWithIdToken": {"login": 5.0},
}
MAX_P99_OVER_P50 = 4.0
MAX_RSS_MIB = 150.0  # the target's "150 MB", read as MiB like the kernel's figures


@dataclass(frozen=True)
class Row:
    """One side of a scenario. ok_rps counts only correct answers (for login: AuthSession)."""

    label: str
    ok_rps: float | None = None
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    rss_mib: float | None = None
    ok_share: float | None = None
    error: str | None = None

    @property
    def tail_ratio(self) -> float | None:
        if self.p50_ms is None or self.p99_ms is None or self.p50_ms <= 0:
            return None
        return self.p99_ms / self.p50_ms


@dataclass
class Extra:
    """A measurement reported beside a scenario's, with no target: printed, never checked."""

    title: str
    row: Row
    refused_share: float | None = None  # share of answers that were RATE_LIMITED
    notes: list[str] = field(default_factory=list)


@dataclass
class Scenario:
    name: str
    title: str
    strawgate: Row
    reference: Row
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    extras: list[Extra] = field(default_factory=list)
    # Interleaved scenarios: ok/s strawgate / reference of each round (None where the
    # reference had no correct answer), and each round's order, e.g. "S R".
    round_ratios: list[float | None] = field(default_factory=list)
    round_orders: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        """Strawgate's throughput over the reference's: the median of the per-round ratios
        when the sides were measured in rounds, else the ratio of the two rows."""
        ours, theirs = self.strawgate.ok_rps, self.reference.ok_rps
        if ours is None or not theirs:
            return None
        if self.round_ratios:
            ratios = [r for r in self.round_ratios if r is not None]
            if len(ratios) < len(self.round_ratios):
                return None
            return statistics.median(ratios)
        return ours / theirs


@dataclass
class Reported:
    """A scenario measured on Strawgate alone, with no reference and no target: printed
    right after the scenario named `beside`, never checked."""

    name: str
    title: str
    row: Row
    beside: str
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass
class Relative:
    """A scenario measured on Strawgate alone whose throughput targets are multiples of
    other scenarios' Strawgate ok/s in the same run (RELATIVE_TARGETS); p99/p50 and peak
    RSS are checked as for every scenario."""

    name: str
    title: str
    row: Row
    others: dict[str, float | None] = field(default_factory=dict)  # scenario -> its ok/s
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    def ratio(self, other: str) -> float | None:
        """This scenario's ok/s over `other`'s Strawgate ok/s."""
        ours, theirs = self.row.ok_rps, self.others.get(other)
        if ours is None or not theirs:
            return None
        return ours / theirs


@dataclass(frozen=True)
class Check:
    name: str
    value: float | None
    limit: float
    at_least: bool  # value >= limit passes; otherwise value <= limit passes
    unit: str = ""

    @property
    def passed(self) -> bool:
        if self.value is None:
            return False
        return self.value >= self.limit if self.at_least else self.value <= self.limit

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": None if self.value is None else round(self.value, 4),
            "limit": self.limit,
            "comparison": ">=" if self.at_least else "<=",
            "passed": self.passed,
        }


def checks_for(scenario: Scenario) -> list[Check]:
    ours = scenario.strawgate
    checks = [
        Check(
            f"{scenario.name}: throughput / reference",
            scenario.ratio,
            THROUGHPUT_TARGETS[scenario.name],
            at_least=True,
            unit="x",
        ),
        Check(f"{scenario.name}: p99 / p50", ours.tail_ratio, MAX_P99_OVER_P50, at_least=False),
        Check(
            f"{scenario.name}: peak RSS",
            ours.rss_mib,
            MAX_RSS_MIB,
            at_least=False,
            unit=" MiB",
        ),
    ]
    failed = scenario.raw.get("strawgate_failed_answers")
    if scenario.name == "refresh" and isinstance(failed, int):
        checks.append(Check("refresh: non-AuthSession answers", float(failed), 0.0, at_least=False))
    return checks


def checks_for_relative(relative: Relative) -> list[Check]:
    row = relative.row
    return [
        *(
            Check(f"{relative.name} / {other} ok/s", relative.ratio(other), limit, True, "x")
            for other, limit in RELATIVE_TARGETS[relative.name].items()
        ),
        Check(f"{relative.name}: p99 / p50", row.tail_ratio, MAX_P99_OVER_P50, at_least=False),
        Check(f"{relative.name}: peak RSS", row.rss_mib, MAX_RSS_MIB, at_least=False, unit=" MiB"),
    ]


# -- printing -----------------------------------------------------------------------------


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


HEADER = (
    f"  {'':<11}{'ok/s':>10}{'req/s':>10}{'ok':>8}"
    f"{'p50 ms':>10}{'p99 ms':>10}{'p99/p50':>9}{'RSS MiB':>9}"
)


def format_row(row: Row) -> str:
    if row.error is not None:
        return f"  {row.label:<11}ERROR: {row.error}"
    return (
        f"  {row.label:<11}{_num(row.ok_rps):>10}{_num(row.rps):>10}{_pct(row.ok_share):>8}"
        f"{_num(row.p50_ms, 2):>10}{_num(row.p99_ms, 2):>10}{_num(row.tail_ratio, 2):>9}"
        f"{_num(row.rss_mib):>9}"
    )


def format_check(check: Check) -> str:
    sign = ">=" if check.at_least else "<="
    value = "n/a" if check.value is None else f"{check.value:.2f}{check.unit}"
    target = f"{sign} {check.limit:g}{check.unit}"
    return (
        f"  {'PASS' if check.passed else 'FAIL'}  {check.name:<38}{value:>12}   (target {target})"
    )


def format_scenario(scenario: Scenario) -> str:
    lines = [f"[{scenario.name}] {scenario.title}", HEADER]
    lines.append(format_row(scenario.strawgate))
    lines.append(format_row(scenario.reference))
    ratio = scenario.ratio
    target = THROUGHPUT_TARGETS[scenario.name]
    if scenario.round_ratios:
        lines.append(
            f"  throughput ratio strawgate/reference: {_num(ratio, 2)}, median of"
            f" {len(scenario.round_ratios)} rounds (target >= {target:g})"
        )
        shown = "  ".join(
            f"{_num(r, 2)} ({order})"
            for r, order in zip(scenario.round_ratios, scenario.round_orders, strict=True)
        )
        lines.append(f"  per-round ratios (S = strawgate, R = reference, in run order): {shown}")
    else:
        lines.append(
            f"  throughput ratio strawgate/reference: {_num(ratio, 2)} (target >= {target:g})"
        )
    lines.extend(f"  {note}" for note in scenario.notes)
    for extra in scenario.extras:
        lines.extend(["", *format_extra(extra)])
    return "\n".join(lines)


EXTRA_HEADER = (
    f"  {'':<11}{'ok/s':>10}{'req/s':>10}{'refused':>8}{'p50 ms':>10}{'p99 ms':>10}{'RSS MiB':>9}"
)


def format_extra(extra: Extra) -> list[str]:
    lines = [f"  {extra.title}", EXTRA_HEADER]
    row = extra.row
    if row.error is not None:
        lines.append(f"  {row.label:<11}ERROR: {row.error}")
    else:
        lines.append(
            f"  {row.label:<11}{_num(row.ok_rps):>10}{_num(row.rps):>10}"
            f"{_pct(extra.refused_share):>8}{_num(row.p50_ms, 2):>10}{_num(row.p99_ms, 2):>10}"
            f"{_num(row.rss_mib):>9}"
        )
    lines.extend(f"  {note}" for note in extra.notes)
    return lines


def format_reported(reported: Reported) -> str:
    lines = [
        f"[{reported.name}] {reported.title}",
        "  (reported only: no reference, no target)",
        HEADER,
        format_row(reported.row),
    ]
    lines.extend(f"  {note}" for note in reported.notes)
    return "\n".join(lines)


def format_relative(relative: Relative) -> str:
    targets = RELATIVE_TARGETS[relative.name]
    lines = [
        f"[{relative.name}] {relative.title}",
        "  (no reference server: its throughput targets are multiples of "
        + " and ".join(f"{other}'s" for other in targets)
        + " Strawgate ok/s in this run)",
        HEADER,
        format_row(relative.row),
    ]
    for other, limit in targets.items():
        lines.append(
            f"  throughput ratio {relative.name}/{other}: {_num(relative.ratio(other), 2)}"
            f" (target >= {limit:g}; {other} {_num(relative.others.get(other))} ok/s)"
        )
    lines.extend(f"  {note}" for note in relative.notes)
    return "\n".join(lines)


def format_report(
    header: list[str],
    scenarios: list[Scenario],
    checks: list[Check],
    reported: list[Reported] | None = None,
    relative: list[Relative] | None = None,
) -> str:
    parts = ["\n".join(header)]
    extra = list(reported or [])
    for scenario in scenarios:
        parts.append(format_scenario(scenario))
        parts.extend(format_reported(r) for r in extra if r.beside == scenario.name)
    placed = {scenario.name for scenario in scenarios}
    parts.extend(format_reported(r) for r in extra if r.beside not in placed)
    parts.extend(format_relative(r) for r in relative or [])
    verdict = "all targets met" if checks and all(c.passed for c in checks) else "targets missed"
    parts.append("\n".join(["Targets", *(format_check(c) for c in checks), f"  => {verdict}"]))
    return "\n\n".join(parts)


def row_json(row: Row) -> dict[str, Any]:
    return {
        "ok_per_s": row.ok_rps,
        "requests_per_s": row.rps,
        "ok_share": row.ok_share,
        "p50_ms": row.p50_ms,
        "p99_ms": row.p99_ms,
        "p99_over_p50": row.tail_ratio,
        "peak_rss_mib": row.rss_mib,
        "error": row.error,
    }


def scenario_json(scenario: Scenario) -> dict[str, Any]:
    return {
        "title": scenario.title,
        "strawgate": row_json(scenario.strawgate),
        "reference": row_json(scenario.reference),
        "throughput_ratio": scenario.ratio,
        "throughput_ratio_of": (
            "median of the per-round ratios" if scenario.round_ratios else "ok/s of the rows"
        ),
        "round_ratios": scenario.round_ratios,
        "round_orders": scenario.round_orders,
        "notes": scenario.notes,
        "details": scenario.raw,
        "reported_only": [
            {
                "title": extra.title,
                **row_json(extra.row),
                "refused_share": extra.refused_share,
                "notes": extra.notes,
            }
            for extra in scenario.extras
        ],
    }


def reported_json(reported: Reported) -> dict[str, Any]:
    return {
        "title": reported.title,
        "reported_only": True,
        "targets": None,
        "strawgate": row_json(reported.row),
        "reference": None,
        "notes": reported.notes,
        "details": reported.raw,
    }


def relative_json(relative: Relative) -> dict[str, Any]:
    return {
        "title": relative.title,
        "strawgate": row_json(relative.row),
        "reference": None,
        "throughput_ratios": {
            other: {
                "ratio": relative.ratio(other),
                "of": f"ok/s over {other}'s Strawgate ok/s in this run",
                "other_ok_per_s": relative.others.get(other),
                "target_at_least": limit,
            }
            for other, limit in RELATIVE_TARGETS[relative.name].items()
        },
        "notes": relative.notes,
        "details": relative.raw,
    }
