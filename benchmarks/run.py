"""DriftScope benchmark: how right and how cheap an audit is, measured against ground truth.

    python benchmarks/run.py [--quick | --medium] [--modes screen,scan,paper] [--out benchmarks/results]

For every case (cases.py) x search mode x search seed, the DriftScope Audit node's own entry
point (nodes.audit.audit_models -> driftscope_core.audit.run_audit) runs in process on the case's
candidate words; the report is compared with the case's ground truth (ground_truth.py, cached).
Search modes are read from driftscope_core.search.SEARCHES at run time, so a new mode joins
the table by itself; the default mode is AuditSettings().mode. Writes results.json (every
figure) and results.md (the tables) to --out and prints the tables.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Sequence

import cases as case_lib
import environment
import ground_truth
import metrics

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results"

# Every audit: the node's default preset, scaled to the tiny models (32 px, a 20-step schedule)
# and asked for 20 words so that recall@20 can be measured.
PRESET = "standard"
COMMON = dict(width=32, height=32, schedule_steps=20, cfg=7.5, top_k=20, direction="most", objective="attention")
# Per mode, on top of COMMON; a mode not named here runs with the preset's and AuditSettings' defaults.
MODE_SETTINGS = {
    # the paper's loop (method.md steps 5-7): 4 kept steps, batch 4, AdamW lr 0.1, 100 steps; the
    # early stop after 20 steps on one word is the pack's paper preset's (the reference's never fires)
    "paper": dict(kept_steps=4, noise_batch=4, opt_steps=100, lr=0.1, patience=20, max_runs_factor=2,
                  # the re-scoring its latest rows ran with (25 CPU-minutes per audit here); 8 would
                  # only re-order the words its search found
                  rescore_seeds=4),
    # the exhaustive cheap screen: every candidate, 2 seeds, 4 kept steps
    "scan": dict(kept_steps=4, noise_batch=2),
}
MICRO_BATCH = 64
SHOWN_SETTINGS = ("width", "schedule_steps", "kept_steps", "cfg", "noise_batch", "top_k", "rescore_seeds", "calibration_size",
                  "calibration_seeds", "false_alarms")
SHOWN_FOR_MODE = {"screen": ("screen_seeds", "finalists"), "paper": ("opt_steps", "lr", "patience", "max_runs_factor", "tau"),
                  "scan": ()}
SEARCH_SEEDS = (0, 1, 2)
# --set NAME=VALUE: audit settings explored on top of every mode's (a labelled run, see with_settings)
SETTING_OVERRIDES: dict = {}


@dataclass(frozen=True)
class Variant:
    name: str
    specs: tuple[case_lib.CaseSpec, ...]
    candidates: int | None  # None: the full filtered vocabulary
    modes: tuple[str, ...] | None = None  # None: every mode in SEARCHES
    search_seeds: tuple[int, ...] = SEARCH_SEEDS
    truth: ground_truth.TruthSettings = field(default_factory=ground_truth.TruthSettings)
    only_kinds: dict = field(default_factory=dict)  # {mode: kinds it runs on}; other modes run on every case
    note: str = ""

    def runs_on(self, mode: str, kind: str) -> bool:
        return kind in self.only_kinds.get(mode, (kind,))


def _specs(families, seeds, kinds):
    return tuple(case_lib.CaseSpec(f, s, k) for f in families for s in seeds for k in kinds)


VARIANTS = {
    # CI smoke test: one planted case, a small candidate set, the default mode and scan
    "quick": Variant("quick", _specs(["sd15"], [0], ["planted"]), candidates=150, modes=("default", "scan"),
                     truth=ground_truth.TruthSettings(refine_top=20),
                     note="one planted case, 150 random candidates + the planted words"),
    # about 3 CPU-hours of audits, plus about 45 minutes per truth not yet cached: one SD1.5
    # model seed of every kind and an SD2.x planted case; paper mode (25-30 CPU-minutes per
    # audit here, most of the total) on the planted cases only
    # SDXL and Flux.1 dev (64 px, cases.FAMILY_RESOLUTION; Flux at CFG 1, guidance 3.5, "simple":
    # cases.FAMILY_SAMPLING): a planted case and the diffuse null each
    "medium": Variant("medium", _specs(["sd15"], [0], case_lib.KINDS) + _specs(["sd2"], [0], ["planted"])
                      + _specs(["sdxl", "flux"], [0], ["planted", "null_diffuse"]), candidates=2000,
                      only_kinds={"paper": ("planted",)},
                      note="SD1.5 model seed 0, all four kinds, an SD2.x (v-prediction) planted case, and SDXL "
                           "and Flux.1 dev planted and diffuse-null cases (64 px); 2,000 random candidates + "
                           "targets; paper mode on the planted cases only"),
    # the benchmark: two model seeds of SD1.5 and an SD2.x pair; paper mode on the adapted
    # (non-null) cases only
    "full": Variant("full", _specs(["sd15"], [0, 1], case_lib.KINDS) + _specs(["sd2"], [0], ["planted", "null_identical"]),
                    candidates=2000, only_kinds={"paper": ("planted", "lora_trained")},
                    note="SD1.5 model seeds 0 and 1, all four kinds; SD2.x seed 0 planted and identical; "
                         "2,000 random candidates + targets; paper mode on planted and LoRA cases only"),
}


# -- one audit ------------------------------------------------------------------------------------
class PeakMemory:
    """Peak resident memory of this process while the block runs (sampled every 10 ms), and the
    peak CUDA allocation when there is a GPU."""

    def __init__(self):
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self.cuda_peak = None

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _watch(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._rss())

    def __enter__(self):
        import torch
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        if torch.cuda.is_available():
            self.cuda_peak = torch.cuda.max_memory_allocated()


def default_mode(env) -> str:
    return env.core.settings.AuditSettings().mode


def available_modes(env) -> list[str]:
    """Every search mode of driftscope_core, the default first."""
    modes = list(env.core.search.SEARCHES)
    first = default_mode(env)
    return [first] + [m for m in modes if m != first] if first in modes else modes


def resolve_modes(env, requested: Sequence[str] | None) -> list[str]:
    modes = available_modes(env)
    if not requested:
        return modes
    out = []
    for m in requested:
        m = default_mode(env) if m == "default" else m
        if m not in env.core.search.SEARCHES:
            raise SystemExit(f"unknown mode {m!r}; driftscope_core.search.SEARCHES has {', '.join(modes)}")
        if m not in out:
            out.append(m)
    return out


def family_size(family: str | None) -> dict:
    """width and height of a family's audits (cases.FAMILY_RESOLUTION, else COMMON's)."""
    if family is None:
        return {}
    size = case_lib.family_resolution(family, COMMON["width"])
    return {"width": size, "height": size}


def family_guidance(family: str | None) -> dict:
    """cfg and guidance of a family's audits where cases.FAMILY_SAMPLING sets them (Flux: 1 and
    3.5, the pack's defaults for Flux dev), else nothing (COMMON's cfg, no guidance)."""
    sampling = case_lib.FAMILY_SAMPLING.get(family or "", {})
    return {k: sampling[k] for k in ("cfg", "guidance") if k in sampling}


def audit_settings(env, mode: str, seed: int, family: str | None = None) -> dict:
    """The overrides an audit of `mode` runs with (only names AuditSettings knows); `family`
    sets its width and height (family_size), and its cfg and guidance (family_guidance)."""
    known = {f.name for f in fields(env.core.settings.AuditSettings)}
    wanted = {**COMMON, **MODE_SETTINGS.get(mode, {}), **family_size(family), **family_guidance(family),
              **SETTING_OVERRIDES, "seed": seed}
    return {k: v for k, v in wanted.items() if k in known}


AUDIT_SCHEDULER = "normal"  # the audits' scheduler, as the truth's (TruthSettings.scheduler), except per family


def audit_scheduler(family: str | None) -> str:
    return case_lib.FAMILY_SAMPLING.get(family or "", {}).get("scheduler", AUDIT_SCHEDULER)


def truth_settings(variant: Variant, family: str) -> ground_truth.TruthSettings:
    """The variant's truth settings at the family's pixel size (cases.FAMILY_RESOLUTION), CFG,
    guidance and scheduler (cases.FAMILY_SAMPLING); for other families the variant's own."""
    size = case_lib.family_resolution(family, variant.truth.width)
    sampling = case_lib.family_sampling(family, variant.truth.cfg, variant.truth.scheduler)
    return replace(variant.truth, width=size, height=size, **sampling)


def with_candidates(variant: Variant, candidates: int, refine_top: int | None = None) -> Variant:
    """`variant` on `candidates` random candidates (+ targets) instead of its own count, and its
    truth's refined top `refine_top` words (None: the variant's): a labelled stand-in where its
    truth does not fit the time at hand. Its name says so (e.g. medium-c150-r20), so its results
    never pass for the variant's."""
    name, note = f"{variant.name}-c{candidates}", f"{candidates:,} random candidates + targets"
    truth = variant.truth
    if refine_top is not None:
        name, note = f"{name}-r{refine_top}", f"{note}, truth refined on its top {refine_top}"
        truth = replace(truth, refine_top=refine_top)
    return replace(variant, name=name, candidates=candidates, truth=truth,
                   note=f"{variant.note}; REDUCED to {note} by --candidates/--refine-top")


def with_settings(variant: Variant, env, pairs: list[str]) -> Variant:
    """Parse --set NAME=VALUE pairs (AuditSettings fields, values as their defaults' type) into
    SETTING_OVERRIDES and name the variant after them (e.g. medium-c150-r20-rescore_seeds16), so
    an explored setting never passes for the defaults."""
    defaults = env.core.settings.AuditSettings()
    for pair in pairs:
        name, _, value = pair.partition("=")
        if not value or not hasattr(defaults, name):
            raise SystemExit(f"--set {pair}: expected NAME=VALUE with NAME a field of AuditSettings")
        kind = type(getattr(defaults, name))
        SETTING_OVERRIDES[name] = kind(float(value)) if kind in (int, float) else value
    label = "-".join(f"{k}{v}" for k, v in SETTING_OVERRIDES.items())
    return replace(variant, name=f"{variant.name}-{label}",
                   note=f"{variant.note}; EXPLORED settings {SETTING_OVERRIDES} by --set")


def variant_order(name: str) -> list[str]:
    """Case names of the variant called `name` (or of the one it was reduced from), in order."""
    base = VARIANTS.get(name) or VARIANTS.get(name.split("-", 1)[0])
    return [s.name for s in base.specs] if base else []


def run_one_audit(env, case, mode: str, seed: int) -> dict:
    import torch

    overrides = audit_settings(env, mode, seed, case.spec.family)
    t = time.perf_counter()
    with PeakMemory() as mem, torch.inference_mode():  # ComfyUI runs nodes in inference mode
        report = env.pack.nodes.audit.audit_models(
            case.base_model, case.base_clip, case.adapted_model, case.adapted_clip,
            vocabulary="custom", custom_words="\n".join(case.words), templates=case_lib.TEMPLATE, preset=PRESET,
            mode=mode, scheduler=audit_scheduler(case.spec.family), precision="fp32", micro_batch=MICRO_BATCH, gradient_checkpointing=False,
            **overrides)
    wall = time.perf_counter() - t
    if report.vocabulary["size"] != len(case.words):
        raise RuntimeError(f"the audit saw {report.vocabulary['size']} words, the case has {len(case.words)}")
    ev = report.evaluations
    return {
        "seed": seed,
        "tokens": [e.token for e in report.entries],
        "drift": [e.drift for e in report.entries],
        "calibrated": [e.calibrated for e in report.entries],
        "significant": [e.token for e in report.entries if e.significant],
        "evaluations": ev,
        "unet_forward": sum(v["unet_forward"] for v in ev.values()),
        "unet_backward": sum(v["unet_backward"] for v in ev.values()),
        "text_forward": sum(v["text_forward"] for v in ev.values()),
        "text_backward": sum(v["text_backward"] for v in ev.values()),
        "timings": report.timings,
        # UNet forward + backward passes of both models per stage (search, rescore, calibrate)
        "stage_unet": {stage: sum(c["unet_forward"] + c["unet_backward"] for c in sides.values())
                       for stage, sides in report.evaluations_by_stage.items()},
        "wall_seconds": wall,
        "peak_rss_mb": mem.peak / 2**20,
        "peak_rss_increase_mb": (mem.peak - mem.start) / 2**20,
        "cuda_peak_mb": None if mem.cuda_peak is None else mem.cuda_peak / 2**20,
        "settings": report.settings,
    }


# -- figures ------------------------------------------------------------------------------------------
AGREEMENT_SEEDS = (4, 8, 12)  # 4: the default re-scoring seeds


def seed_agreement(truth: ground_truth.Truth, words: Sequence[str]) -> dict[str, float]:
    """{k: mean pairwise top-10 overlap between groups of k seeds} for the refined top words, on
    the seeds they got past the truth's first `seeds` (those chose them for refinement)."""
    skip = truth.settings["seeds"]
    out = {}
    for k in AGREEMENT_SEEDS:
        groups = truth.seed_group_rankings(words, k, skip)
        if len(groups) >= 2 and len(groups[0]) > 10:
            out[str(k)] = metrics.overlap_at(groups, 10)
    return out


def truth_summary(case, truth: ground_truth.Truth, words: Sequence[str]) -> dict:
    ranking = truth.ranking(words)
    means = [truth.mean(w) for w in ranking]
    degenerate = len(means) < 11 or means[0] == means[-1]
    half = [truth.half_ranking(words, h) for h in (0, 1)]
    top = ranking[:20]
    return {
        "words": len(words),
        "degenerate": degenerate,  # every word drifts alike (identical models): no ranking to recover
        "top20": [{"token": w, "drift": truth.mean(w), "seeds": truth.seed_count(w)} for w in top],
        "median_drift": sorted(means)[len(means) // 2],
        "targets_rank": {w: ranking.index(w) + 1 for w in case.targets if w in ranking},
        "targets_in_top10": sum(w in ranking[:10] for w in case.targets),
        "self_agreement_at_10": None if degenerate else metrics.overlap_at(half, 10),
        # top-10 agreement of the refined top between disjoint groups of k refinement seeds: what an
        # audit whose final ranking rests on k seeds per word could reach at best (AGREEMENT_SEEDS)
        "agreement_at_10_by_seeds": None if degenerate else seed_agreement(truth, words),
        "seeds_per_word": {str(n): sum(truth.seed_count(w) == n for w in words)
                           for n in sorted({truth.seed_count(w) for w in words})},
        "cost": truth.cost,
        "settings": truth.settings,
        "cache_file": truth.path.name if truth.path else None,
    }


def mode_summary(case, truth: ground_truth.Truth | None, runs: list[dict], truth_ok: bool) -> dict:
    n = len(case.words)
    ranking = truth.ranking(case.words) if truth_ok else None
    per_run = []
    for r in runs:
        row = {"seed": r["seed"], "significant": len(r["significant"])}
        if ranking is not None:
            row.update(recall_at_10=metrics.recall_at(r["tokens"], ranking, 10),
                       recall_at_20=metrics.recall_at(r["tokens"], ranking, 20),
                       spearman_top50=metrics.spearman_top(r["tokens"], ranking, 50))
        per_run.append(row)

    def avg(key):
        return metrics.mean([r[key] for r in runs])

    def agg(key):
        vals = [p[key] for p in per_run if p.get(key) is not None]
        return {"mean": metrics.mean(vals), "min": min(vals), "max": max(vals)} if vals else None

    sig = [p["significant"] for p in per_run]
    return {
        "recall_at_10": agg("recall_at_10"), "recall_at_20": agg("recall_at_20"), "spearman_top50": agg("spearman_top50"),
        "significant": {"mean": metrics.mean(sig), "max": max(sig),
                        "per_10k": metrics.per_ten_thousand(metrics.mean(sig), n)},
        "overlap_at_10": metrics.overlap_at([r["tokens"] for r in runs], 10),
        "cost": {k: avg(k) for k in ("unet_forward", "unet_backward", "text_forward", "text_backward", "wall_seconds",
                                     "peak_rss_mb", "peak_rss_increase_mb")}
                | {"unet_per_stage": {stage: metrics.mean([r["stage_unet"].get(stage, 0) for r in runs])
                                      for stage in runs[0]["stage_unet"]}}
                | {"per_model": {side: {k: metrics.mean([r["evaluations"][side][k] for r in runs])
                                        for k in runs[0]["evaluations"][side]} for side in runs[0]["evaluations"]}},
        "per_run": per_run,
    }


def _at_least(value: float | None, floor: float) -> bool:
    """value >= floor for means of a few tenths: (0.6 + 0.7 + 0.8) / 3 is 0.6999999999999998 in floats."""
    return value is not None and round(value - floor, 9) >= 0


def _at_most(value: float | None, ceiling: float) -> bool:
    return value is not None and _at_least(ceiling, value)


def targets_check(results: dict) -> list[dict]:
    """The issue's targets for the default mode, each with the figures it rests on."""
    mode = results["default_mode"]
    rows = []
    by_case = results["cases"]
    planted = [c for c in by_case if c["kind"] == "planted" and mode in c["modes"]]
    nulls = [c for c in by_case if c["kind"] in case_lib.NULL_KINDS and mode in c["modes"]]
    non_null = [c for c in by_case if c["kind"] not in case_lib.NULL_KINDS and mode in c["modes"]]
    if planted:
        vals = {c["name"]: c["modes"][mode]["recall_at_10"]["mean"] for c in planted}
        rows.append({"target": "recall@10 >= 0.9 on every planted case", "figures": vals,
                     "met": all(_at_least(v, 0.9) for v in vals.values())})
    if nulls:
        vals = {c["name"]: c["modes"][mode]["significant"]["per_10k"] for c in nulls}
        rows.append({"target": "at most 1 significant token per 10,000 candidates on null cases", "figures": vals,
                     "met": all(_at_most(v, 1.0) for v in vals.values())})
    if non_null:
        vals = {c["name"]: c["modes"][mode]["overlap_at_10"] for c in non_null}
        rows.append({"target": "top-10 overlap across search seeds >= 0.7 (non-null cases)", "figures": vals,
                     "met": all(_at_least(v, 0.7) for v in vals.values())})
    paired = [c for c in planted if "paper" in c["modes"] and mode != "paper"]
    if paired:
        vals, met = {}, True
        for c in paired:
            d, p = c["modes"][mode], c["modes"]["paper"]
            ud = d["cost"]["unet_forward"] + d["cost"]["unet_backward"]
            up = p["cost"]["unet_forward"] + p["cost"]["unet_backward"]
            ratio = up / ud if ud else None
            vals[c["name"]] = {"paper_over_default_unet_evaluations": ratio,
                               "recall_at_10_default": d["recall_at_10"]["mean"], "recall_at_10_paper": p["recall_at_10"]["mean"]}
            met &= _at_least(ratio, 10) and _at_least(d["recall_at_10"]["mean"], p["recall_at_10"]["mean"])
        rows.append({"target": ">= 10x fewer UNet evaluations than paper mode with equal or better recall@10 (planted cases)",
                     "figures": vals, "met": met})
    return rows


# -- the run ------------------------------------------------------------------------------------------
def machine_info(env) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=HERE, capture_output=True, text=True, check=True).stdout.strip()  # noqa: E731
        commit = git("rev-parse", "--short", "HEAD")
        if git("status", "--porcelain", "-uall", "--", "driftscope_core", "nodes", "benchmarks/*.py"):
            commit += " + uncommitted changes"
    except (OSError, subprocess.CalledProcessError):
        commit = None
    try:
        import comfyui_version
        comfy_version = comfyui_version.__version__
    except ImportError:
        comfy_version = None
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": env.threads, "torch": torch.__version__,
            "device": "cuda" if torch.cuda.is_available() else "cpu", "python": platform.python_version(),
            "os": f"{platform.system()} {platform.release()}", "comfyui": comfy_version, "git_commit": commit}


def run_benchmark(env, variant: Variant, modes: Sequence[str] | None = None, out_dir: Path | None = DEFAULT_OUT,
                  cache_dir: Path = ground_truth.CACHE_DIR, log: Callable[[str], None] = print,
                  previous: dict | None = None) -> dict:
    """Build every case, measure its truth, run every mode x search seed, compute the figures;
    write results.json and results.md to `out_dir` after every case (None: write nothing).
    `previous`: an interrupted run's results of the same variant and modes; its finished cases
    are kept as they are and only the others run."""
    started = time.perf_counter()
    modes = resolve_modes(env, modes if modes is not None else variant.modes)
    done: dict[str, dict] = {}
    if previous is not None:
        if previous.get("variant") != variant.name or previous.get("modes") != modes:
            raise SystemExit(f"cannot resume: the earlier run was variant {previous.get('variant')!r} with modes "
                             f"{previous.get('modes')}, this one is {variant.name!r} with {modes}")
        wanted = {s.name for s in variant.specs}
        done = {c["name"]: c for c in previous["cases"] if c["name"] in wanted}
    builder = case_lib.CaseBuilder(env, variant.candidates, resolution=variant.truth.width, log=log)
    results = {
        "variant": variant.name, "note": variant.note,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(env), "modes": modes, "default_mode": default_mode(env),
        "search_seeds": list(variant.search_seeds), "preset": PRESET, "common_settings": COMMON,
        "mode_settings": {m: audit_settings(env, m, 0) for m in modes},
        "only_kinds": {m: list(k) for m, k in variant.only_kinds.items()},
        "truth_settings": asdict(variant.truth), "cases": [], "targets": [],
        "seconds": {"cases": 0.0, "truth_this_run": 0.0, "audits": 0.0, "total": 0.0},
    }
    if done:
        results["resumed"] = {"from": previous["date"], "machine": previous["machine"], "cases_kept": list(done)}
        results["seconds"] = {k: previous["seconds"][k] for k in results["seconds"]}
    carried = results["seconds"]["total"]
    for spec in variant.specs:
        if spec.name in done:
            log(f"[resume] {spec.name}: kept from the run of {previous['date']}")
            results["cases"].append(done[spec.name])
            continue
        t = time.perf_counter()
        case = builder.build(spec)
        results["seconds"]["cases"] += time.perf_counter() - t
        runs: dict[str, list[dict]] = {}
        errors: dict[str, str] = {}
        for mode in modes:
            if not variant.runs_on(mode, spec.kind):
                continue
            runs[mode] = []
            for seed in variant.search_seeds:
                try:
                    r = run_one_audit(env, case, mode, seed)
                except Exception as exc:  # a mode that fails is reported, not fatal for the others
                    errors[mode] = f"{type(exc).__name__}: {exc}"
                    log(f"[audit] {case.name} {mode} seed {seed}: FAILED {errors[mode]}")
                    break
                runs[mode].append(r)
                results["seconds"]["audits"] += r["wall_seconds"]
                log(f"[audit] {case.name} {mode} seed {seed}: {r['wall_seconds']:.1f}s, UNet fwd {r['unet_forward']} "
                    f"bwd {r['unet_backward']}, top {r['tokens'][:5]}, significant {len(r['significant'])}")
        # every candidate and every reported word gets a truth (cached words are read, not measured);
        # a null case has no concept to recall: null_identical's truth covers only the reported
        # words (all zero), null_diffuse gets none (its false alarms need no truth)
        reported = {w for rs in runs.values() for r in rs for w in r["tokens"]}
        if spec.kind == "null_diffuse":
            scored = []
        elif spec.is_null:
            scored = sorted(reported)
        else:
            scored = sorted(reported | set(case.words))
        t = time.perf_counter()
        truth = ground_truth.measure(env, case, scored, truth_settings(variant, spec.family), cache_dir, log,
                                     refine=not spec.is_null)
        results["seconds"]["truth_this_run"] += time.perf_counter() - t
        tsum = truth_summary(case, truth, scored) if scored else None
        truth_ok = tsum is not None and not tsum["degenerate"]
        results["cases"].append({
            "name": case.name, "kind": spec.kind, "family": spec.family, "model_seed": spec.model_seed,
            "candidates": len(case.words), "targets": list(case.targets), "recipe": case.recipe,
            "adaptation": case.info, "build_seconds": case.build_seconds, "truth": tsum,
            "modes": {m: mode_summary(case, truth, rs, truth_ok) for m, rs in runs.items() if rs},
            "errors": errors,
            "runs": {m: [{k: v for k, v in r.items() if k != "settings"} for r in rs] for m, rs in runs.items()},
            "settings_used": {m: rs[0]["settings"] for m, rs in runs.items() if rs},
        })
        results["targets"] = targets_check(results)
        results["seconds"]["total"] = carried + time.perf_counter() - started
        if out_dir is not None:
            write(results, Path(out_dir))
    return results


PER_MODE = ("modes", "runs", "settings_used", "errors")  # a case's entries keyed by mode


def only_modes(results: dict, modes: Sequence[str]) -> dict:
    """`results` restricted to `modes` (cases that ran none of them are dropped): the part of an
    earlier run that is kept when a merge replaces its other modes."""
    keep = [m for m in results["modes"] if m in modes]
    cases = []
    for c in results["cases"]:
        if any(m in c["modes"] for m in keep):
            cases.append({**c, **{k: {m: v for m, v in c[k].items() if m in keep} for k in PER_MODE}})
    names = {c["name"] for c in cases}
    runs = [{**r, "modes": [m for m in r["modes"] if m in keep], "cases": [n for n in r["cases"] if n in names]}
            for r in _provenance(results)]
    # only the kept audits' time can be told apart; case building and truth stay with the run that re-ran
    audits = sum(r["wall_seconds"] for c in cases for rs in c["runs"].values() for r in rs)
    return {**results, "modes": keep, "mode_order": results.get("mode_order", results["modes"]), "cases": cases,
            "merged": [r for r in runs if r["cases"] and r["modes"]],
            "mode_settings": {m: v for m, v in results["mode_settings"].items() if m in keep},
            "seconds": {"cases": 0.0, "truth_this_run": 0.0, "audits": audits, "total": audits}}


def _provenance(results: dict) -> list[dict]:
    """Which run produced which cases and modes: a merged result's own list, else the run itself."""
    if results.get("merged"):
        return [{**r, "modes": r.get("modes", results["modes"])} for r in results["merged"]]
    return [{"date": results["date"], "commit": results["machine"]["git_commit"], "modes": results["modes"],
             "cases": [c["name"] for c in results["cases"]]}]


def _same_case(a: dict, b: dict) -> bool:
    """Two runs' entries of one case were built alike and judged by the same truth."""
    cache = lambda c: (c["truth"] or {}).get("cache_file")  # noqa: E731
    return a["recipe"] == b["recipe"] and a["candidates"] == b["candidates"] and cache(a) == cache(b)


def merge(parts: Sequence[dict]) -> dict:
    """One variant's results from several runs: of disjoint case subsets (e.g. in parallel
    processes, one per case), or of disjoint modes of the same cases (a mode re-run after a
    change, the others kept from an earlier run, see only_modes). Cases come in the variant's
    order; for a case in several runs, the latest run's case-level figures (its truth) are kept;
    seconds are summed, the targets re-checked."""
    first = parts[0]
    for p in parts[1:]:
        if p["variant"] != first["variant"]:
            raise SystemExit(f"cannot merge: variant {p['variant']} differs from {first['variant']}")
    cases: dict[str, dict] = {}
    for p in sorted(parts, key=lambda p: p["date"]):
        for c in p["cases"]:
            prev = cases.get(c["name"])
            if prev is None:
                cases[c["name"]] = c
                continue
            clash = set(prev["modes"]) & set(c["modes"])
            if clash:
                raise SystemExit(f"cannot merge: mode(s) {', '.join(sorted(clash))} of case {c['name']} are in more than one run")
            if not _same_case(prev, c):
                raise SystemExit(f"cannot merge: case {c['name']} was built differently (recipe, candidates or truth) in two runs")
            cases[c["name"]] = {**c, **{k: {**prev[k], **c[k]} for k in PER_MODE}}
    ran = {m for p in parts for m in p["modes"]}
    modes = [m for m in dict.fromkeys(m for p in parts for m in p.get("mode_order", p["modes"])) if m in ran]
    cases = {n: {**c, **{k: {m: c[k][m] for m in modes if m in c[k]} for k in PER_MODE}} for n, c in cases.items()}
    order = variant_order(first["variant"])
    latest = max(parts, key=lambda p: p["date"])  # its machine, commit and settings head the table
    merged = {**latest, "cases": sorted(cases.values(), key=lambda c: order.index(c["name"]) if c["name"] in order else len(order)),
              "modes": modes,
              "mode_settings": {m: v for p in parts for m, v in p["mode_settings"].items()},
              "only_kinds": {m: v for p in parts for m, v in p.get("only_kinds", {}).items()},
              "date": max(p["date"] for p in parts),
              "seconds": {k: sum(p["seconds"][k] for p in parts) for k in first["seconds"]},
              "merged": sorted((r for p in parts for r in _provenance(p)), key=lambda r: r["date"])}
    merged["targets"] = targets_check(merged)
    return merged


def write(results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out_dir / "results.md").write_text(markdown(results), encoding="utf-8")


# -- tables -------------------------------------------------------------------------------------------
def _f(v, fmt="{:.2f}", none="–"):
    return none if v is None else fmt.format(v)


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"### DriftScope benchmark, variant `{results['variant']}` ({results['note']})",
        "",
        f"{results['date']}{_resumed(results)}; {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['torch_threads']} torch thread(s), "
        f"{m['device']}; torch {m['torch']}, ComfyUI {m['comfyui']}, commit {m['git_commit']}; "
        f"{results['seconds']['audits'] / 60:.1f} min of audits, {results['seconds']['truth_this_run'] / 60:.1f} min "
        f"measuring ground truth (the rest was cached), {results['seconds']['total'] / 60:.1f} min in all. Default mode: `{results['default_mode']}`; "
        f"search seeds {results['search_seeds']}; figures are means over the search seeds.",
        "",
        "| case | mode | R@10 | R@20 | ρ top-50 | significant (per 10k) | top-10 overlap | UNet fwd base / adapted | UNet bwd | UNet total | UNet search / rescore / calibrate | text fwd / bwd | wall s | peak RSS MB (+Δ) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in results["cases"]:
        for mode, s in c["modes"].items():
            pm = s["cost"]["per_model"]
            r10, r20, rho = (s[k]["mean"] if s[k] else None for k in ("recall_at_10", "recall_at_20", "spearman_top50"))
            lines.append(
                f"| {c['name']} | {mode} | {_f(r10)} | {_f(r20)} | {_f(rho)} | "
                f"{_f(s['significant']['mean'], '{:.1f}')} ({_f(s['significant']['per_10k'], '{:.0f}')}) | "
                f"{_f(s['overlap_at_10'])} | {_f(pm['base']['unet_forward'], '{:,.0f}')} / {_f(pm['adapted']['unet_forward'], '{:,.0f}')} | "
                f"{_f(s['cost']['unet_backward'], '{:,.0f}')} | {_f(s['cost']['unet_forward'] + s['cost']['unet_backward'], '{:,.0f}')} | "
                f"{' / '.join(_f(s['cost']['unet_per_stage'].get(k), '{:,.0f}') for k in ('search', 'rescore', 'calibrate'))} | "
                f"{_f(s['cost']['text_forward'], '{:,.0f}')} / {_f(s['cost']['text_backward'], '{:,.0f}')} | "
                f"{_f(s['cost']['wall_seconds'], '{:.0f}')} | {_f(s['cost']['peak_rss_mb'], '{:,.0f}')} "
                f"(+{_f(s['cost']['peak_rss_increase_mb'], '{:,.0f}')}) |")
        for mode, err in c["errors"].items():
            lines.append(f"| {c['name']} | {mode} | failed: {err[:120]} ||||||||||||")
    skipped = [f"`{m}` only on {', '.join(k)} cases" for m, k in results.get("only_kinds", {}).items() if m in results["modes"]]
    if skipped:
        lines += ["", "Modes restricted in this variant: " + "; ".join(skipped) + "."]
    lines += ["", "Settings each mode ran with (the `standard` preset, scaled to the tiny models):", ""]
    seen = {}
    for c in results["cases"]:
        for mode, st in c.get("settings_used", {}).items():
            seen.setdefault(mode, st)
    for mode, st in seen.items():
        keys = SHOWN_SETTINGS + SHOWN_FOR_MODE.get(mode, tuple(k for k in st if k not in SHOWN_SETTINGS))
        lines.append(f"- `{mode}`: " + ", ".join(f"{k} {st[k]}" for k in keys if k in st and k != "mode"))
    sizes = sorted({(c["family"], case_lib.family_resolution(c["family"], COMMON["width"])) for c in results["cases"]
                    if c["family"] in case_lib.FAMILY_RESOLUTION})
    if sizes:
        lines += ["", "Per family: " + "; ".join(f"{f} cases at {px}x{px} px (audits and truth)" for f, px in sizes) + "."]
    sampled = sorted({c["family"] for c in results["cases"] if c["family"] in case_lib.FAMILY_SAMPLING})
    if sampled:
        lines += ["", "Sampling per family (audits and truth): " + "; ".join(
            f"{f} at " + ", ".join(f"{k} {v}" for k, v in case_lib.FAMILY_SAMPLING[f].items()) for f in sampled) + "."]
    lines += ["", "Ground truth (every candidate, exhaustive; cached):", "",
              "| case | candidates | targets in truth top 10 | truth top 5 | truth self-agreement @10 | "
              f"truth @10 with {' / '.join(map(str, AGREEMENT_SEEDS))} seeds per word | truth UNet fwd | truth s |",
              "|---|---|---|---|---|---|---|---|"]
    for c in results["cases"]:
        t = c["truth"]
        if t is None:
            lines.append(f"| {c['name']} | {c['candidates']} | – | not measured (a null case has nothing to recall) | – | – | – | – |")
            continue
        tgt = f"{t['targets_in_top10']}/{len(c['targets'])}" if c["targets"] else "–"
        top5 = "all 0 (identical models)" if t["degenerate"] else ", ".join(x["token"] for x in t["top20"][:5])
        by_seeds = t.get("agreement_at_10_by_seeds") or {}  # absent from runs before it was measured
        agree = " / ".join(_f(by_seeds.get(str(k))) for k in AGREEMENT_SEEDS) if by_seeds else "–"
        lines.append(f"| {c['name']} | {c['candidates']} | {tgt} | {top5} | {_f(t['self_agreement_at_10'])} | {agree} | "
                     f"{t['cost']['unet_forward']:,} | {t['cost']['seconds']:.0f} |")
    if results["targets"]:
        lines += ["", f"Targets for the default mode (`{results['default_mode']}`):", "", "| target | met | figures |", "|---|---|---|"]
        for t in results["targets"]:
            figs = "; ".join(f"{k}: {_fig(v)}" for k, v in t["figures"].items())
            lines.append(f"| {t['target']} | {'yes' if t['met'] else 'no'} | {figs} |")
    return "\n".join(lines) + "\n"


def _resumed(results: dict) -> str:
    if results.get("merged"):
        def modes(m):
            return "" if m.get("modes", results["modes"]) == results["modes"] else f" ({', '.join(m['modes'])} only)"
        runs = "; ".join(f"{', '.join(m['cases'])}{modes(m)} at {m['date']}, commit {m['commit']}" for m in results["merged"])
        return f" (merged from {len(results['merged'])} runs: {runs})"
    r = results.get("resumed")
    if not r:
        return ""
    return f" (resumed; {', '.join(r['cases_kept'])} from the run of {r['from']}, commit {r['machine']['git_commit']})"


def _fig(v):
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fig(x)}" for k, x in v.items())
    return _f(v) if isinstance(v, (int, float)) or v is None else str(v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="DriftScope benchmark against ground truth (see benchmarks/README.md).")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="one planted case, small candidate set (a few minutes)")
    size.add_argument("--medium", action="store_true", help="one model seed, all four kinds")
    ap.add_argument("--modes", default=None, help="comma-separated search modes ('default' = AuditSettings().mode); "
                                                   "default: the variant's modes (full/medium: every mode in SEARCHES)")
    ap.add_argument("--out", type=Path, default=None, help="folder for results.json and results.md "
                                                           "(default: benchmarks/results/<variant>)")
    ap.add_argument("--cases", default=None, help="comma-separated case names to run (default: all of the variant's)")
    ap.add_argument("--candidates", type=int, default=None,
                    help="random candidates per case instead of the variant's (a labelled stand-in: the run is "
                         "named <variant>-c<N> and writes to benchmarks/results/<variant>-c<N>/ by default)")
    ap.add_argument("--refine-top", type=int, default=None,
                    help="with --candidates: the truth's top words measured on more seeds (default: the variant's)")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="an audit setting (AuditSettings field) on top of every mode's, to explore it; the run is "
                         "named after it and writes to benchmarks/results/<variant>-<name><value>/ by default")
    ap.add_argument("--cache", type=Path, default=ground_truth.CACHE_DIR, help="ground-truth cache folder")
    ap.add_argument("--comfy", default=None, help=f"ComfyUI folder (default: ${environment.COMFY_ENV} or .comfyui/ComfyUI)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steady timings)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the finished cases of an interrupted run's results.json in --out and run the rest")
    ap.add_argument("--render", type=Path, default=None, metavar="RESULTS_JSON",
                    help="only print the tables of an earlier run's results.json (and rewrite its results.md)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="RESULTS_JSON[:MODES]",
                    help="combine the results.json of runs of one variant into --out (default: the variant's "
                         "folder): runs of disjoint --cases (in parallel), or of disjoint modes; "
                         "'old/results.json:paper' keeps only that run's paper rows")
    a = ap.parse_args(argv)
    if a.merge:
        parts = []
        for arg in a.merge:
            path, keep = (arg, "") if Path(arg).is_file() or ":" not in arg else arg.rsplit(":", 1)
            part = json.loads(Path(path).read_text(encoding="utf-8"))
            parts.append(only_modes(part, keep.split(",")) if keep else part)
        results = merge(parts)
        out = a.out or DEFAULT_OUT / results["variant"]
        write(results, out)
        print(markdown(results))
        print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
        return 0
    if a.render:
        results = json.loads(a.render.read_text(encoding="utf-8"))
        a.render.with_name("results.md").write_text(markdown(results), encoding="utf-8")
        print(markdown(results))
        return 0
    variant = VARIANTS["quick" if a.quick else "medium" if a.medium else "full"]
    if a.candidates is not None:
        variant = with_candidates(variant, a.candidates, a.refine_top)
    env = environment.load(a.comfy, threads=a.threads)
    if a.set:
        variant = with_settings(variant, env, a.set)
    modes = a.modes.split(",") if a.modes else None
    if a.cases:
        wanted = a.cases.split(",")
        unknown = set(wanted) - {s.name for s in variant.specs}
        if unknown:
            raise SystemExit(f"unknown case(s) {', '.join(sorted(unknown))}; the {variant.name} variant has "
                             f"{', '.join(s.name for s in variant.specs)}")
        variant = replace(variant, specs=tuple(s for s in variant.specs if s.name in wanted))
    out = a.out or DEFAULT_OUT / variant.name
    previous = None
    if a.resume and (out / "results.json").is_file():
        previous = json.loads((out / "results.json").read_text(encoding="utf-8"))
    results = run_benchmark(env, variant, modes, out, a.cache, previous=previous)
    print()
    print(markdown(results))
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
