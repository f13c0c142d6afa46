"""A PNG of two compared curves and their difference (matplotlib, no display needed)."""

from __future__ import annotations


def plot_comparison(
    report: dict,
    path: str,
    labels: tuple[str, str] = ("A", "B"),
    marks: dict[str, int] | None = None,
) -> str:
    """Draw both curves of `report` (from trainer.verify.compare) and B - A per step into `path`.

    `marks` are labelled vertical lines, e.g. {"interrupted": 100, "resumed from": 75}.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pa, pb = dict(report["points"]["a"]), dict(report["points"]["b"])
    common = sorted(set(pa) & set(pb))
    evals = report.get("eval_points")
    if evals:
        fig, (top, bottom, ev) = plt.subplots(
            3, 1, figsize=(9, 8.5), sharex=True, height_ratios=(3, 2, 2)
        )
    else:
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, height_ratios=(3, 2))
    top.plot(sorted(pa), [pa[s] for s in sorted(pa)], lw=2.5, alpha=0.5, label=labels[0])
    top.plot(sorted(pb), [pb[s] for s in sorted(pb)], lw=1, ls="--", color="k", label=labels[1])
    top.set_ylabel(report["tag"])
    curve = report["curve"]
    first = curve["first_divergent_step"]
    verdict = "identical at every step" if first is None else f"first divergent step {first}"
    if first is None and report["atol"] > 0:
        verdict = f"equal within atol={report['atol']:g}"
    top.set_title(
        f"{'MATCH' if report['ok'] else 'DIFFERENT'}: {', '.join(_reasons(report)) or 'every check equal'}\n"
        f"{report['tag']}: {curve['steps_compared']} steps compared, {verdict}, "
        f"max |diff| {curve['max_abs_diff']:.3g}",
        color="black" if report["ok"] else "tab:red",
    )
    if evals:
        ea, eb = dict(evals["a"]), dict(evals["b"])
        ev.plot(sorted(ea), [ea[s] for s in sorted(ea)], "o-", lw=2.5, alpha=0.5, label=labels[0])
        ev.plot(sorted(eb), [eb[s] for s in sorted(eb)], "x--", lw=1, color="k", label=labels[1])
        ev.set_ylabel("eval loss")
        diff = report.get("other_tags", {}).get("eval/loss")
        if diff:
            first_eval = diff["first_divergent_step"]
            ev.set_title(
                "eval loss: "
                + (
                    "equal at every eval"
                    if first_eval is None
                    else f"differs from step {first_eval}"
                )
                + f", max |diff| {diff['max_abs_diff']:.3g}",
                fontsize=9,
            )
        ev.legend(loc="upper right")
    bottom.plot(common, [pb[s] - pa[s] for s in common], color="tab:red", lw=1)
    bottom.axhline(0.0, color="grey", lw=0.5)
    bottom.set_ylabel(f"{labels[1]} - {labels[0]}")
    (ev if evals else bottom).set_xlabel("step")
    for ax in (top, bottom):
        for i, (name, step) in enumerate((marks or {}).items()):
            ax.axvline(step, color=f"C{i + 2}", ls=":", lw=1, label=name if ax is top else None)
        if first is not None:
            ax.axvline(first, color="tab:red", lw=1, alpha=0.6)
    top.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _reasons(report: dict) -> list[str]:
    """What made a comparison differ, in a few words each (as the printed report says it)."""
    out = []
    if report["curve"]["first_divergent_step"] is not None:
        out.append(f"{report['tag']} from step {report['curve']['first_divergent_step']}")
    for tag, d in report.get("other_tags", {}).items():
        if not d["ok"]:
            out.append(f"{tag} from step {d['first_divergent_step']}")
    state = report.get("final_state")
    if state is None:
        out.append("final state not compared (no verified checkpoint)")
    elif not state["equal"]:
        out.append("final state")
    return out[:4]
