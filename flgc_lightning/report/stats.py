"""Seeds as an axis: mean ± std per configuration, and paired differences with 95 % intervals."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional, Sequence

from flgc_lightning.report.runs import RunRow

# Paired comparisons the studies ask for, at equal G: (treatment, control).
COMPARISONS = (("FLGC", "grouped"), ("FLGC", "FLGC-frozen"), ("FLGC-balanced", "grouped"),
               ("FLGC-balanced", "FLGC"), ("FLGC-retrain", "FLGC-retrain-shuffled"), ("FLGC-retrain", "FLGC-frozen"),
               ("FLGC-retrain", "grouped"))


def comparisons_for(conv_types) -> list[tuple[str, str]]:
    """:data:`COMPARISONS`, plus for every other learned variant (an estimator: ``FLGC-ste+dw``) the same
    against the frozen control, the reference estimator and standard grouped conv, and against FLGC-retrain:
    when the retrained groups are that variant's (``retrain_from_arm``), this row asks whether learning the
    groups during training costs accuracy that the groups themselves, trained from scratch, do not."""
    pairs = list(COMPARISONS)
    base = {"dense", "grouped", "FLGC", "FLGC-frozen", "FLGC-balanced", "FLGC-retrain", "FLGC-retrain-shuffled"}
    for kind in sorted(set(conv_types) - base):
        if kind.startswith("FLGC"):
            pairs += [(kind, "FLGC-frozen"), (kind, "FLGC"), (kind, "grouped"), (kind, "FLGC-retrain")]
    return pairs


def t_quantile(df: int, level: float = 0.95) -> float:
    """Two-sided Student t quantile (scipy, which scikit-learn already installs)."""
    from scipy import stats

    return float(stats.t.ppf(0.5 + level / 2, df))


@dataclass
class Summary:
    """mean, std (n-1), n and the 95 % interval of the mean of some values."""

    mean: Optional[float]
    std: Optional[float]
    n: int
    low: Optional[float] = None
    high: Optional[float] = None

    @classmethod
    def of(cls, values: Sequence[float]) -> "Summary":
        values = [v for v in values if v is not None]
        if not values:
            return cls(None, None, 0)
        mean = statistics.fmean(values)
        if len(values) < 2:
            return cls(mean, None, 1)
        std = statistics.stdev(values)
        half = t_quantile(len(values) - 1) * std / math.sqrt(len(values))
        return cls(mean, std, len(values), mean - half, mean + half)


@dataclass
class ConfigGroup:
    """Runs that differ only in their seed."""

    key: str
    conv_type: str
    groups: Optional[int]
    runs: list[RunRow]

    def values(self, field: str) -> list[float]:
        return [getattr(r, field) for r in self.runs if r.status == "finished" and getattr(r, field) is not None]

    def summary(self, field: str) -> Summary:
        return Summary.of(self.values(field))

    @property
    def seeds(self) -> list:
        return [r.seed for r in self.runs]


def group_by_seed(rows: Sequence[RunRow]) -> list[ConfigGroup]:
    """Runs with equal overrides apart from the seed; each group is named by the overrides that vary
    between groups (those all runs share, such as ``data.root``, are left out of the name)."""
    groups: dict[str, ConfigGroup] = {}
    for row in rows:
        group = groups.setdefault(row.config_key, ConfigGroup(row.config_key, row.conv_type, row.groups, []))
        group.runs.append(row)
    shared = set.intersection(*(set(key.split()) for key in groups)) if len(groups) > 1 else set()
    for group in groups.values():
        group.key = " ".join(o for o in group.key.split() if o not in shared) or group.key
    return list(groups.values())


@dataclass
class Comparison:
    treatment: ConfigGroup
    control: ConfigGroup
    field: str
    differences: list[float]  # treatment - control, seed by seed
    seeds: list

    @property
    def summary(self) -> Summary:
        return Summary.of(self.differences)

    @property
    def higher_is_better(self) -> bool:
        return self.field not in LOWER_IS_BETTER

    @property
    def verdict(self) -> str:
        s = self.summary
        if s.n < 2:
            return "too few paired seeds"
        above, below = ("better", "worse") if self.higher_is_better else ("worse", "better")
        if s.low > 0:
            return f"treatment {above} (interval above 0)"
        if s.high < 0:
            return f"treatment {below} (interval below 0)"
        return "no difference shown (interval contains 0)"


LOWER_IS_BETTER = ("val_loss",)


def _same_apart_from_arm(a: ConfigGroup, b: ConfigGroup) -> bool:
    """Two configurations that differ only in conv type (the sweep's other settings equal)."""
    return a.groups == b.groups and a.runs[0].shared_key == b.runs[0].shared_key


def paired_comparisons(groups: Sequence[ConfigGroup], field: str, pairs=None) -> list[Comparison]:
    """Treatment − control at equal G, paired by seed (only seeds both finished)."""
    comparisons = []
    for treatment_type, control_type in pairs or comparisons_for(g.conv_type for g in groups):
        for treatment in (g for g in groups if g.conv_type == treatment_type):
            for control in (g for g in groups if g.conv_type == control_type and _same_apart_from_arm(treatment, g)):
                a = {r.seed: getattr(r, field) for r in treatment.runs if r.status == "finished"}
                b = {r.seed: getattr(r, field) for r in control.runs if r.status == "finished"}
                seeds = sorted(s for s in a.keys() & b.keys() if a[s] is not None and b[s] is not None)
                comparisons.append(Comparison(treatment, control, field, [a[s] - b[s] for s in seeds], seeds))
    return comparisons


def pooled_comparisons(comparisons: Sequence[Comparison]) -> list[Comparison]:
    """Each comparison pooled over G: every seed-by-seed difference at every G, one t-interval.

    More pairs (n = seeds x G) than a single G gives, at a price: the interval is for the difference
    averaged over the G values studied, and it treats pairs at different G as equally variable.
    Only comparisons made at two or more G are pooled.
    """
    pooled: dict[tuple, list[Comparison]] = {}
    for c in comparisons:
        if c.differences:
            key = (c.treatment.conv_type, c.control.conv_type, c.field, c.treatment.runs[0].shared_key)
            pooled.setdefault(key, []).append(c)
    result = []
    for (treatment_type, control_type, field, _), parts in pooled.items():
        if len(parts) < 2:
            continue
        sizes = [p.treatment.groups for p in parts]
        result.append(Comparison(
            ConfigGroup(f"{treatment_type} (G = {', '.join(map(str, sizes))})", treatment_type, None, []),
            ConfigGroup(f"{control_type} (G = {', '.join(map(str, sizes))})", control_type, None, []),
            field, [d for p in parts for d in p.differences],
            [f"G{p.treatment.groups}/{seed}" for p in parts for seed in p.seeds]))
    return result
