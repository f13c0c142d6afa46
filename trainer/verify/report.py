"""What a comparison tells the user: the printed report, report.json, and scripts/compare_runs.py."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from trainer.config import UserError
from trainer.verify.compare import compare_runs


def _steps(steps: list[int]) -> str:
    """'3 steps (81..83)' style summary of a list of steps."""
    if not steps:
        return "none"
    return f"{len(steps)} step{'s' if len(steps) > 1 else ''} ({steps[0]}..{steps[-1]})"


def format_report(report: dict, labels: tuple[str, str] = ("A", "B")) -> str:
    """The short human-readable report printed by verify_resume and compare_runs."""
    c, la, lb = report["curve"], *labels
    exact = "bit for bit" if report["atol"] == 0 else f"within atol={report['atol']:g}"
    first = c["first_divergent_step"]
    lines = [
        f"{report['tag']}: {c['steps_compared']} steps compared, first divergent step: "
        f"{first if first is not None else 'none'}, max abs difference: {c['max_abs_diff']:.6g}",
    ]
    for key, who in (("missing_in_a", la), ("missing_in_b", lb)):
        if c[key]:
            lines.append(f"  steps missing from {who}: {_steps(c[key])}")
    for key, who in (("duplicates_a", la), ("duplicates_b", lb)):
        if c[key]:
            lines.append(f"  {who} holds {_steps(c[key])} more than once (not one clean curve)")
    others = report["other_tags"]
    bad = {k: d for k, d in others.items() if not d["ok"]}
    if others:
        detail = ", ".join(
            f"{k} (first at step {d['first_divergent_step']})" for k, d in bad.items()
        )
        lines.append(
            f"other tags: {len(others)} compared, " + (f"differ: {detail}" if bad else "all equal")
        )
    s = report["final_state"]
    if s is None:
        who = " and ".join({"a": la, "b": lb}[x] for x in report.get("no_checkpoint", []))
        lines.append(
            f"final weights and optimizer state: NOT COMPARED ({who or 'a run'} without a verified "
            "checkpoint), so the runs cannot match"
        )
    else:
        where = f"step {s['step_a']}" + (f" vs {s['step_b']}" if s["step_b"] != s["step_a"] else "")
        verdict = "equal" if s["equal"] else "DIFFERENT"
        lines.append(
            f"final weights and optimizer state ({s['tensors_compared']} variables by Keras path "
            f"at {where}): {verdict}"
        )
        not_saved = s.get("not_saved") or {}
        listed = [
            (key, what, s[key])
            for key, what in (("differing", "differs"), ("missing", "only in one run"))
        ]
        listed += [
            ("not_saved", f"not in {who}'s checkpoint", not_saved.get(side, []))
            for side, who in (("a", la), ("b", lb))
        ]
        for _key, what, names in listed:
            lines += [f"  {what}: {name}" for name in names[:8]]
            if len(names) > 8:
                lines.append(f"  ... and {len(names) - 8} more (report.json)")
        if s.get("rebuild_error"):
            lines.append(f"  completeness not checked: {s['rebuild_error']}")
    exports = report.get("exports")
    for kind in ("keras", "saved_model") if exports else ():
        e = exports[kind]
        if "missing_in" in e:
            who = " and ".join({"a": la, "b": lb}[x] for x in e["missing_in"])
            lines.append(f"export {kind}: DIFFERENT (missing in {who})")
        elif "error" in e:
            lines.append(f"export {kind}: DIFFERENT ({e['error']})")
        else:
            verdict = "equal" if e["equal"] else "DIFFERENT: " + ", ".join(e["differing"][:4])
            lines.append(f"export {kind} ({e['arrays']} arrays): {verdict}")
    kills = (report.get("verify") or {}).get("kills")
    if kills:
        seed = report["verify"].get("seed")
        lines.append(f"chaos: {len(kills)} SIGKILLs (verify.seed={seed}):")
        for i, k in enumerate(kills, 1):
            lines.append(
                f"  {i}. {k['kind']:<16} after {k['delay']:.3f} s: last logged step "
                f"{k['last_logged_step']}, newest checkpoint {k['newest_checkpoint']}, {k['landed']}"
            )
    lines.append(f"RESULT: {'MATCH (' + exact + ')' if report['ok'] else 'DIFFERENT'}")
    return "\n".join(lines)


def write_report(report: dict, path: str) -> str:
    """Write `report` as JSON without the raw curve points (they live in the event files)."""
    with open(path, "w") as f:
        json.dump({k: v for k, v in report.items() if k != "points"}, f, indent=1)
    return path


def main(argv: list[str] | None = None) -> int:
    """scripts/compare_runs.py: compare two runs, print the report, write it; the exit code."""
    from trainer.verify.plot import plot_comparison

    parser = argparse.ArgumentParser(
        prog="compare_runs.py", description="Compare two runs from their TensorBoard event files."
    )
    parser.add_argument("run_a", metavar="RUN_A")
    parser.add_argument("run_b", metavar="RUN_B")
    parser.add_argument("--tag", default="loss", help="the train scalar to compare (default: loss)")
    parser.add_argument("--atol", type=float, default=0.0, help="0 (default): bit for bit")
    parser.add_argument("--out", default=None, help="where report.json and curves.png go")
    args = parser.parse_args(argv)
    out = args.out or os.path.join("outputs", "compare", time.strftime("%Y-%m-%d/%H-%M-%S"))
    try:
        if not args.atol >= 0:
            raise UserError(f"--atol: received {args.atol}; allowed: a number >= 0")
        from trainer.remote.download import resolve_run  # a run's URL: copied here first

        report = compare_runs(resolve_run(args.run_a), resolve_run(args.run_b), args.tag, args.atol)
        os.makedirs(out, exist_ok=True)
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    labels = (
        os.path.basename(os.path.normpath(args.run_a)),
        os.path.basename(os.path.normpath(args.run_b)),
    )
    if labels[0] == labels[1]:
        labels = ("A", "B")
    report["plot"] = plot_comparison(report, os.path.join(out, "curves.png"), labels)
    write_report(report, os.path.join(out, "report.json"))
    print(f"A: {args.run_a}\nB: {args.run_b}")
    print(format_report(report, labels))
    print(f"report: {os.path.join(out, 'report.json')}  plot: {report['plot']}")
    return 0 if report["ok"] else 1
