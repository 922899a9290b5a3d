"""The audit report: a versioned, JSON-serializable record of what was found and how."""
from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field

REPORT_VERSION = 2  # 2: calibrated scores on log drift, baseline log_scale
CSV_COLUMNS = ("rank", "token", "token_ids", "drift", "spread", "calibrated", "percentile", "significant", "direction", "search_drift")


@dataclass
class ReportEntry:
    rank: int
    token: str
    token_ids: list[int]
    drift: float  # mean drift on the shared re-scoring seeds
    spread: float  # standard deviation of the drift across those seeds
    per_seed: list[float]
    calibrated: float  # robust z-score of log drift against random words (calibration.py)
    percentile: float  # share of random words with lower or equal drift, in percent
    significant: bool
    direction: str  # "most" or "least"
    search_drift: float  # what the search measured (its own seeds)


@dataclass
class DriftReport:
    entries: list[ReportEntry]
    settings: dict
    seeds: dict  # {"search": [...], "rescore": [...], "calibration_words": [...]}
    models: dict  # identities of base and adapted
    vocabulary: dict  # {"name": ..., "size": ...}
    templates: list[str]
    baseline: dict  # calibration.Baseline as a dict
    timings: dict  # seconds per stage
    evaluations: dict  # {"base": EvaluationCounts, "adapted": ...}
    evaluations_by_stage: dict = field(default_factory=dict)  # {"search" | "rescore" | "calibrate": {side: counts}}
    version: int = REPORT_VERSION
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @staticmethod
    def from_json(text: str) -> "DriftReport":
        data = json.loads(text)
        if data.get("version") != REPORT_VERSION:
            raise ValueError(f"report version {data.get('version')} is not {REPORT_VERSION}")
        data["entries"] = [ReportEntry(**e) for e in data["entries"]]
        return DriftReport(**data)

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(CSV_COLUMNS)
        for e in self.entries:
            row = asdict(e)
            row["token_ids"] = " ".join(map(str, e.token_ids))
            w.writerow([row[c] for c in CSV_COLUMNS])
        return buf.getvalue()

    def table(self) -> str:
        """The ranked table as plain text, for the node and the terminal."""
        head = "most drifted" if self.settings.get("direction") == "most" else "least drifted"
        lines = [
            f"DriftScope: {len(self.entries)} {head} of {self.vocabulary['size']} words "
            f"({self.vocabulary['name']}), objective {self.settings.get('objective')}, mode {self.settings.get('mode')}",
            f"{'#':>3}  {'token':<20} {'drift':>10} {'spread':>9} {'z':>7}  flag",
        ]
        for e in self.entries:
            flag = "*" if e.significant else ""
            lines.append(f"{e.rank:>3}  {e.token[:20]:<20} {e.drift:>10.4g} {e.spread:>9.2g} {e.calibrated:>7.1f}  {flag}")
        b = self.baseline
        lines.append(f"baseline: {b['size']} random words, median {b['median']:.4g}, robust sd of log drift {b['log_scale']:.2g}; * = z >= {b['z_threshold']:.2f}")
        return "\n".join(lines)
