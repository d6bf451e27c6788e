"""Promotion gate: the registered `candidate` version gets the alias `champion` only if the
evidence says so.

Both versions are downloaded from the registry and run on the same frozen test split (the
manifest and split.json the branch was evaluated on). The candidate is promoted when every
check passes:
    non_inferiority  the 95% bootstrap CI of (candidate - champion) on the primary metric has its
                     lower bound >= -margin (not worse by more than `margin`, with 95% confidence)
    per_class        no per-class metric drops by more than `per_class_margin`
    floor            the candidate's primary metric >= `floor` (with no champion, this and
                     export parity alone decide)
    export           the exported model (visionflow.deploy.export) agrees with PyTorch within tolerance
A tie (identical predictions: delta 0, CI [0, 0]) passes non_inferiority, so it is promoted
exactly when the other checks pass. The rule, the statistics and where the evidence lives:
docs/promotion.md.

Primary / per-class metrics are the task's (Task.test_metric, the evaluate stage's own scoring
path): classify accuracy / F1, detect COCO AP50 (bbox) / AP50, segment miou / IoU (background
included).
"""
from __future__ import annotations

import logging
import math
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

from visionflow.core.config import BranchParams, PromoteParams, RegisterParams, model_name
from visionflow.core.errors import DataError, UserError
from visionflow.core.files import file_digest, read_json, write_json
from visionflow.manifest import Category, Sample, read_categories, read_manifest, samples_in_split
from visionflow.core.paths import Paths

if TYPE_CHECKING:  # torch and albumentations stay off the CLI's start-up path
    from visionflow.tasks.base import TestScore

log = logging.getLogger(__name__)

CONFIDENCE = 0.95
EXIT_REFUSED = 3  # `visionflow promote` exit code for a refused candidate (0 promoted, 2 user error)
_EPS = 1e-12  # float slack: "not worse by more than m" must hold for a delta of exactly -m


def report_path(paths: Paths) -> Path:
    return paths.promotion


# --- scoring both models on the test split ---------------------------------------------------

def score_model(model_dir: Path, test: list[Sample], root: Path, categories: list[Category]) -> TestScore:
    """The model folder on the test split through the task's one scoring path (the evaluate
    stage's numbers, with per-image values for the bootstrap)."""
    from visionflow.deploy.predictor import load_predictor

    score = load_predictor(model_dir).score(test, root, categories)
    if not math.isfinite(score.value) or score.value < 0:  # COCO says -1 when there is no GT
        raise DataError("test split", f"nothing to score: {score.name} is undefined on these samples "
                                      f"(no labelled objects or pixels)")
    return score


# --- statistics ------------------------------------------------------------------------------

def bootstrap_diff(candidate: Callable[[np.ndarray], np.ndarray], champion: Callable[[np.ndarray], np.ndarray],
                   n: int, resamples: int, seed: int, chunk: int = 100) -> np.ndarray:
    """Paired bootstrap over test images: each resample (n images drawn with replacement, as
    per-image counts) scores both models. -> (resamples,) candidate - champion."""
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        idx = rng.integers(0, n, size=(b, n)) + n * np.arange(b)[:, None]
        w = np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(float)  # (b, n) counts
        out.append(candidate(w) - champion(w))
    return np.concatenate(out)


def confidence_interval(diffs: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile interval of the bootstrap distribution."""
    tail = 50 * (1 - confidence)
    low, high = np.nanpercentile(diffs, [tail, 100 - tail])
    return float(low), float(high)


# --- the decision ----------------------------------------------------------------------------

def decide(params: PromoteParams, evidence: dict[str, Any]) -> list[dict[str, Any]]:
    """The checks, each {"check", "passed", "detail"}; the candidate is promoted iff all pass."""
    p, metric, checks = evidence["primary"], evidence["primary"]["metric"], []
    if p["delta"] is not None:
        checks.append({"check": "non_inferiority", "passed": p["ci_low"] >= -params.margin - _EPS,
                       "detail": f"{metric} {CONFIDENCE:.0%} CI of candidate - champion [{p['ci_low']:+.4f}, "
                                 f"{p['ci_high']:+.4f}], lower bound must be >= {-params.margin:+.4f}"})
        worse = {c: v["delta"] for c, v in evidence["per_class"].items()
                 if v["delta"] is not None and v["delta"] < -params.per_class_margin - _EPS}
        what = f"{evidence['per_class_metric']} dropped by more than {params.per_class_margin:.4f}"
        dropped = ", ".join(f"{c} {d:+.4f}" for c, d in sorted(worse.items(), key=lambda kv: kv[1]))
        checks.append({"check": "per_class", "passed": not worse,
                       "detail": f"{what}: {dropped}" if worse else f"no {what}"})
    checks.append({"check": "floor", "passed": p["candidate"] >= params.floor - _EPS,
                   "detail": f"{metric} {p['candidate']:.4f} must be >= {params.floor:.4f}"})
    export = evidence["export"]
    checks.append({"check": "export", "passed": export["passed"], "detail": export["detail"]})
    return checks


def export_parity(params: PromoteParams, model_dir: Path, test: list[Sample],
                  root: Path) -> tuple[dict[str, Any], Optional[Path]]:
    """(the export evidence, the exported file when one was checked)."""
    if not params.require_export:
        return {"status": "skipped", "passed": True, "detail": "skipped (promote.require_export: false)"}, None
    try:
        from visionflow.deploy.parity import export_and_check
    except ImportError as exc:
        return {"status": "not available", "passed": False, "detail": f"export parity: not available ({exc})"}, None
    try:
        r = export_and_check(model_dir, test, root, params.export_tolerance)
    except Exception as exc:  # a model that cannot be exported is evidence against deploying it
        log.warning("export parity check failed", exc_info=True)
        return {"status": "error", "passed": False, "detail": f"export failed: {type(exc).__name__}: {exc}"}, None
    # The exported file lies in the temporary download folder: promote() logs it to the
    # candidate's version; the evidence keeps its figures, not its path.
    result = {k: v for k, v in r.items() if k != "path" and (isinstance(v, (str, int, float, bool)) or v is None)}
    passed = bool(r["within_tolerance"])
    metric = (f", {r['metric']} {r['metric_export']:.4f} exported vs {r['metric_torch']:.4f} PyTorch"
              if "metric_torch" in r else "")
    return {"status": "checked", **result, "passed": passed,
            "detail": f"{r.get('format')} on {r.get('n')} test images: max |PyTorch - export| "
                      f"{r['max_abs_diff']:.2e} (tolerance {params.export_tolerance:g}){metric}: "
                      f"{'within' if passed else 'NOT within'} tolerance"}, Path(r["path"])


# --- the stage -------------------------------------------------------------------------------

def promote(params: PromoteParams, register: RegisterParams, paths: Paths) -> dict[str, Any]:
    """Compare alias_from with alias_to on the test split, record the evidence, move alias_to
    when every check passes. Returns the evidence (also written to reports/<task>/promotion.json)."""
    from visionflow.integrations import mlflow as tracking  # mlflow is slow to import; only when the stage runs

    task, name = paths.task, model_name(paths.task, register)
    uri = tracking.resolve_tracking_uri(register, paths)
    candidate = tracking.find_version_by_alias(name, params.alias_from, uri)
    if candidate is None:
        raise UserError(f"registered model {name!r} has no version with alias {params.alias_from!r} in {uri}; "
                        f"run the register stage (visionflow stage register-{task}) first")
    champion = tracking.find_version_by_alias(name, params.alias_to, uri)
    evidence: dict[str, Any] = {
        "task": task, "model_name": name, "tracking_uri": uri,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "params": params.model_dump(mode="json"),
        "candidate": {"version": candidate["version"], "alias": params.alias_from, "run_id": candidate["run_id"]},
        "champion": champion and {"version": champion["version"], "alias": params.alias_to,
                                  "run_id": champion["run_id"]},
    }
    if champion and champion["version"] == candidate["version"]:
        standing = _standing(paths, evidence, promoted=True)
        if standing:
            return {**standing, "decision": "already_champion"}
        evidence.update(decision="already_champion", promoted=True, checks=[],
                        reason=f"version {candidate['version']} already holds both {params.alias_from!r} and "
                               f"{params.alias_to!r}; nothing to compare")
        write_json(report_path(paths), evidence)
        return evidence
    test, categories, data = _test_split(paths)
    standing = _standing(paths, {**evidence, "data": data}, promoted=False)
    if standing:
        return standing
    with tempfile.TemporaryDirectory(prefix="visionflow-promote-") as tmp:
        def fetch(version: str) -> Path:
            return tracking.download_model_dir(f"models:/{name}/{version}", uri, Path(tmp) / f"v{version}")

        cand_dir = fetch(candidate["version"])
        _require_classes(cand_dir, task, categories, f"candidate version {candidate['version']}")
        cand = score_model(cand_dir, test, paths.root, categories)
        champ, note = None, None
        if champion:
            champ_dir = fetch(champion["version"])
            note = _comparable(champ_dir, task, categories)
            if note is None:
                champ = score_model(champ_dir, test, paths.root, categories)
            else:
                evidence["champion"]["not_compared"] = note
        evidence["export"], exported = export_parity(params, cand_dir, test, paths.root)
        if exported:  # the checked file, kept with the version it was made from (passed or not)
            from visionflow.deploy.export import sidecar_path
            from visionflow.deploy.parity import export_tags

            evidence["export"]["artifact_uri"] = tracking.log_exported(
                name, candidate["version"], candidate["run_id"], [exported, sidecar_path(exported)], uri,
                export_tags(exported, evidence["export"]))
    evidence.update(data=data, per_class_metric=cand.per_class_name, **_comparison(params, cand, champ, len(test)))
    _conclude(params, evidence)
    _record(params, register, paths, uri, evidence)
    return evidence


def _conclude(params: PromoteParams, evidence: dict[str, Any]) -> None:
    evidence["checks"] = decide(params, evidence)
    failed = [c for c in evidence["checks"] if not c["passed"]]
    evidence["promoted"] = not failed
    evidence["decision"] = "refused" if failed else "promoted"
    evidence["reason"] = ("failed: " + "; ".join(f"{c['check']} ({c['detail']})" for c in failed) if failed else
                          "all checks passed: " + ", ".join(c["check"] for c in evidence["checks"]))


def _test_split(paths: Paths) -> tuple[list[Sample], list[Category], dict[str, Any]]:
    for f, stage in ((paths.manifest, "ingest"), (paths.categories, "ingest"), (paths.split_file, "split")):
        if not f.exists():
            raise UserError(f"promote: {f} is missing (made by the {stage} stage: visionflow stage {stage})")
    test = samples_in_split(read_manifest(paths.manifest), paths.split_file, "test")
    if not test:
        raise DataError(paths.split_file, "the test split is empty: nothing to compare the models on")
    data = {"manifest_md5": file_digest(paths.manifest, "md5"), "split_md5": file_digest(paths.split_file, "md5"),
            "test_images": len(test)}
    return test, read_categories(paths.categories), data


def _standing(paths: Paths, evidence: dict[str, Any], promoted: bool) -> dict[str, Any] | None:
    """The decision already on record for this very question, if any: the same model, store,
    gate params and candidate version, and (for a refusal) the same champion and test data.
    A rerun with nothing changed then leaves promotion.json (a DVC output) as it was instead of
    recording a new decision: the file is a function of the stage's inputs."""
    try:
        prev = read_json(report_path(paths))
    except (OSError, ValueError):
        return None
    same = all(prev.get(k) == evidence.get(k) for k in ("model_name", "tracking_uri", "params")) and \
        (prev.get("candidate") or {}).get("version") == evidence["candidate"]["version"]
    if not same or bool(prev.get("promoted")) != promoted or "checks" not in prev:
        return None
    if not promoted and ((prev.get("champion") or {}).get("version") != (evidence.get("champion") or {}).get("version")
                         or prev.get("data") != evidence.get("data")):
        return None
    log.info("%s v%s: the decision on record stands (%s, %s); %s unchanged", evidence["model_name"],
             evidence["candidate"]["version"], prev.get("decision"), prev.get("timestamp"), report_path(paths))
    return prev


def _require_classes(model_dir: Path, task: str, categories: list[Category], what: str) -> None:
    note = _comparable(model_dir, task, categories)
    if note:
        raise UserError(f"{what}: {note}; it cannot be evaluated on this data (re-run train and register)")


def _comparable(model_dir: Path, task: str, categories: list[Category]) -> str | None:
    """Why a model folder cannot be scored on this data, or None."""
    meta = read_json(model_dir / "meta.json")
    names = [c.name for c in categories]
    if meta.get("task") != task:
        return f"it is a {meta.get('task')} model, not {task}"
    if meta.get("classes") != names:
        return f"its classes {meta.get('classes')} differ from the data's {names}"
    return None


def _comparison(params: PromoteParams, cand: TestScore, champ: TestScore | None, n: int) -> dict[str, Any]:
    primary = {"metric": cand.name, "candidate": cand.value, "champion": None, "delta": None,
               "ci_low": None, "ci_high": None}
    per_class = {c: {"candidate": v, "champion": None, "delta": None} for c, v in cand.per_class.items()}
    if champ is not None:
        diffs = bootstrap_diff(cand.resample, champ.resample, n, params.bootstrap, params.seed)
        low, high = confidence_interval(diffs)
        primary.update(champion=champ.value, delta=cand.value - champ.value, ci_low=low, ci_high=high,
                       confidence=CONFIDENCE, resamples=params.bootstrap, seed=params.seed, unit="test image")
        for c in sorted(set(cand.per_class) | set(champ.per_class)):
            a, b = cand.per_class.get(c), champ.per_class.get(c)
            per_class[c] = {"candidate": a, "champion": b, "delta": None if a is None or b is None else a - b}
    return {"primary": primary, "per_class": per_class}


# --- the record: registry, run, report -------------------------------------------------------

def _record(params: PromoteParams, register: RegisterParams, paths: Paths, uri: str, evidence: dict[str, Any]) -> None:
    from visionflow.integrations import mlflow as tracking

    name, version = evidence["model_name"], evidence["candidate"]["version"]
    champion = evidence["champion"]
    run_name = f"promote-{paths.task}-v{version}"
    description = describe(evidence)
    report = report_path(paths)
    write_json(report, evidence)
    run_id = tracking.log_promotion_run(
        register, paths, run_name, metrics=_run_metrics(evidence),
        run_params={k: str(v) for k, v in {**evidence["params"], "candidate_version": version,
                                           "champion_version": champion and champion["version"]}.items()},
        tags={"visionflow.task": paths.task, "promotion.model_name": name, "promotion.candidate_version": version,
              "promotion.decision": evidence["decision"], "mlflow.note.content": description},
        evidence=report)
    evidence["run"] = {"id": run_id, "name": run_name, "artifact": report.name}
    tracking.annotate_version(name, version, uri, _version_tags(evidence), description)
    if evidence["promoted"]:
        tracking.set_alias(name, params.alias_to, version, uri)
        if champion:
            tracking.annotate_version(name, champion["version"], uri, {
                "promotion.superseded_by": version, "promotion.superseded_at": evidence["timestamp"]})
    write_json(report, evidence)
    log.info("%s v%s: %s (%s)", name, version, evidence["decision"], evidence["reason"])


def _fmt(v: Any, sign: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{v:+.4f}" if sign else f"{v:.4f}"


def _version_tags(evidence: dict[str, Any]) -> dict[str, str]:
    p, champion = evidence["primary"], evidence["champion"]
    return {
        "promotion.decision": evidence["decision"], "promotion.reason": evidence["reason"],
        "promotion.timestamp": evidence["timestamp"], "promotion.metric": p["metric"],
        "promotion.candidate_value": _fmt(p["candidate"]), "promotion.champion_value": _fmt(p["champion"]),
        "promotion.champion_version": champion["version"] if champion else "none",
        "promotion.primary_delta": _fmt(p["delta"], True), "promotion.ci_low": _fmt(p["ci_low"], True),
        "promotion.ci_high": _fmt(p["ci_high"], True),
        "promotion.checks": " ".join(f"{c['check']}={'pass' if c['passed'] else 'fail'}" for c in evidence["checks"]),
        "promotion.export": evidence["export"]["status"], "promotion.run_id": evidence["run"]["id"],
        "promotion.export_uri": evidence["export"].get("artifact_uri", "none"),
        "promotion.data.manifest_md5": evidence["data"]["manifest_md5"],
        "promotion.data.split_md5": evidence["data"]["split_md5"],
        "promotion.test_images": str(evidence["data"]["test_images"]),
    }


def _run_metrics(evidence: dict[str, Any]) -> dict[str, float]:
    p, m = evidence["primary"], evidence["primary"]["metric"]
    out = {f"candidate_{m}": p["candidate"], "promoted": float(evidence["promoted"]),
           "test_images": evidence["data"]["test_images"]}
    for key in ("champion", "delta", "ci_low", "ci_high"):
        if p[key] is not None:
            out[f"{key}_{m}" if key == "champion" else key] = p[key]
    for c, v in evidence["per_class"].items():
        if v["delta"] is not None:
            out[f"delta_{evidence['per_class_metric']}_{c}"] = v["delta"]
    if isinstance(evidence["export"].get("max_abs_diff"), (int, float)):
        out["export_max_abs_diff"] = evidence["export"]["max_abs_diff"]
    return out


# --- the decision table (CLI and the version's description) ----------------------------------

def table_rows(evidence: dict[str, Any]) -> list[list[str]]:
    """[metric, champion, candidate, delta, 95% CI, verdict] per row."""
    if not evidence.get("checks"):
        return []
    verdict = {c["check"]: "pass" if c["passed"] else "FAIL" for c in evidence["checks"]}
    p = evidence["primary"]
    ci = f"[{p['ci_low']:+.4f}, {p['ci_high']:+.4f}]" if p["ci_low"] is not None else "-"
    rows = [[p["metric"], _fmt(p["champion"]), _fmt(p["candidate"]), _fmt(p["delta"], True), ci,
             verdict.get("non_inferiority", "-")]]
    margin = evidence["params"]["per_class_margin"]
    for c, v in evidence["per_class"].items():
        ok = v["delta"] is None or v["delta"] >= -margin - _EPS
        rows.append([f"{evidence['per_class_metric']} {c}", _fmt(v["champion"]), _fmt(v["candidate"]),
                     _fmt(v["delta"], True), "-", ("pass" if ok else "FAIL") if v["delta"] is not None else "-"])
    rows.append([f"floor {evidence['params']['floor']:.4f}", "-", _fmt(p["candidate"]), "-", "-", verdict["floor"]])
    export = evidence["export"]
    diff = export.get("max_abs_diff")
    rows.append(["export max |diff|", "-", f"{diff:.2e}" if isinstance(diff, (int, float)) else export["status"],
                 "-", "-", "skipped" if export["status"] == "skipped" else verdict["export"]])
    return rows


HEADER = ["metric", "champion", "candidate", "delta", f"{CONFIDENCE:.0%} CI", "verdict"]


def _title(evidence: dict[str, Any]) -> str:
    champion = evidence["champion"]
    against = f"champion v{champion['version']}" if champion else "no champion"
    if champion and champion.get("not_compared"):
        against += f" (not compared: {champion['not_compared']})"
    data = evidence.get("data")
    on = f" on {data['test_images']} test images" if data else ""
    return f"{evidence['model_name']}: candidate v{evidence['candidate']['version']} vs {against}{on}"


def format_table(evidence: dict[str, Any]) -> str:
    """Plain-text decision table for the terminal."""
    lines = [_title(evidence)]
    rows = table_rows(evidence)
    if rows:
        widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
        for r in [HEADER, *rows]:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    lines.append(f"decision: {evidence['decision'].upper()}: {evidence['reason']}")
    if evidence["decision"] == "promoted":
        lines.append(f"alias {evidence['params']['alias_to']!r} -> version {evidence['candidate']['version']}")
    return "\n".join(lines)


def describe(evidence: dict[str, Any]) -> str:
    """The candidate version's description: the decision table as markdown."""
    lines = [f"**Promotion decision: {evidence['decision']}** ({evidence['timestamp']}). {_title(evidence)}", ""]
    rows = table_rows(evidence)
    lines += ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in r) + " |" for r in rows]  # "max |diff|"
    data = evidence["data"]
    lines += ["", f"Reason: {evidence['reason']}", "",
              f"Data: manifest md5 `{data['manifest_md5']}`, split md5 `{data['split_md5']}`. "
              f"Evidence: run `promote-{evidence['task']}-v{evidence['candidate']['version']}`, artifact "
              f"`promotion.json`; rule: docs/promotion.md."]
    return "\n".join(lines)


def promote_branch(branch: BranchParams, paths: Paths) -> dict[str, Any]:
    """The pipeline's promote-<task> stage: the gate on this branch's candidate. A refusal is a
    result, not a failure (the evidence says why); only a missing candidate or store raises."""
    evidence = promote(branch.promote, branch.register, paths)
    aliases = [branch.promote.alias_from] + ([branch.promote.alias_to] if evidence["promoted"] else [])
    return {"decision": evidence["decision"], "promoted": evidence["promoted"], "reason": evidence.get("reason"),
            "candidate_version": evidence["candidate"]["version"], "aliases": aliases,
            "report": str(paths.promotion)}
