"""The audit report: a versioned, JSON-serializable record of what was found and how."""
from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import asdict, dataclass, field

from .text import visible

REPORT_VERSION = 3  # 2: calibrated scores on log drift, baseline log_scale; 3: the placebo reference, placebo_drift
CSV_COLUMNS = ("rank", "token", "token_ids", "drift", "spread", "calibrated", "percentile", "significant", "direction", "search_drift", "placebo_drift")
# OWASP's CSV-injection rule (and ASVS 1.2.10): a spreadsheet runs a cell that starts with one
# of these as a formula, so such a text cell gets a leading single quote and shows as text.
FORMULA_STARTS = ("=", "+", "-", "@")
LEADING_CONTROLS = ("\t", "\r", "\0")
_LEADING_BLANKS = re.compile(r"[\s\x00-\x1f\x7f-\x9f]*")  # whitespace and control characters


def csv_text(cell: str) -> str:
    """A text cell made safe for a spreadsheet. First OWASP's rule: a cell that begins with a
    tab, a carriage return or NUL, or whose first character past leading whitespace and control
    characters is =, +, - or @, gets a leading single quote. Then every control character (C0,
    DEL, C1: NUL, ESC, tab, newline, ...), line separator and bidirectional formatting character
    (U+202E ...) is written as an escape such as \\x00 (text.visible), so none reaches the
    file raw. Numbers are not text cells: the pack's own -1.5 stays a number."""
    rest = cell[_LEADING_BLANKS.match(cell).end():]
    if cell.startswith(LEADING_CONTROLS) or rest.startswith(FORMULA_STARTS):
        cell = "'" + cell
    return visible(cell)


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
    encoder_token_ids: dict[str, list[int]] = field(default_factory=dict)  # ids in encoders with their own tokenizer (Flux's T5)
    placebo_drift: float | None = None  # mean drift under the placebo on the calibration seeds (None: no placebo)


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
        """The ranked table as CSV, one line per entry. Every text cell goes through csv_text
        (no formulas, no raw control characters); numbers and flags are written as they are.
        The JSON (to_json) keeps the exact text."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(CSV_COLUMNS)
        for e in self.entries:
            row = asdict(e)
            row["token_ids"] = " ".join(map(str, e.token_ids))
            w.writerow([csv_text(row[c]) if isinstance(row[c], str) else row[c] for c in CSV_COLUMNS])
        return buf.getvalue()

    def table(self) -> str:
        """The ranked table as plain text, for the node and the terminal. Control and
        bidirectional formatting characters in the text are shown escaped (text.visible),
        so a token cannot garble the terminal or reorder the line."""
        head = "most drifted" if self.settings.get("direction") == "most" else "least drifted"
        lines = [
            f"DriftScope: {len(self.entries)} {head} of {self.vocabulary['size']} words "
            + visible(f"({self.vocabulary['name']}), objective {self.settings.get('objective')}, mode {self.settings.get('mode')}"),
            f"{'#':>3}  {'token':<20} {'drift':>10} {'spread':>9} {'z':>7}  flag",
        ]
        for e in self.entries:
            flag = "*" if e.significant else ""
            lines.append(f"{e.rank:>3}  {visible(e.token)[:20]:<20} {e.drift:>10.4g} {e.spread:>9.2g} {e.calibrated:>7.1f}  {flag}")
        b = self.baseline
        if b.get("reference") == "placebo":
            lines.append(f"baseline: {b['size']} random words, scored against a placebo (beta {b['placebo_slope']:.2f}), "
                         f"robust sd of the score {b['log_scale']:.2g}; * = z >= {b['z_threshold']:.2f}")
        else:
            lines.append(f"baseline: {b['size']} random words, median {b['median']:.4g}, robust sd of log drift {b['log_scale']:.2g}; * = z >= {b['z_threshold']:.2f}")
        return "\n".join(lines)
