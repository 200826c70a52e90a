"""``srpo-plot``: training curves of one or more runs in one PNG.

    srpo-plot outputs/srpo outputs/grpo --out curves.png
    srpo-plot outputs/srpo/metrics.jsonl --x time --smooth 10 --out srpo_hours.png

Each argument is a run directory holding ``metrics.jsonl`` (what ``srpo-train`` writes, one JSON
object per step) or the file itself. One panel per metric, every run on every panel in the same
colour, one legend. ``--x time`` puts cumulative wall-clock hours (the sum of ``time/total``) on the
x-axis, since the paper compares methods at equal training time (1 h / 5 h / 10 h), not equal steps.

Reading the log: a final line that does not parse is what a crash mid-write leaves, so it is
skipped with a warning; a bad line anywhere else means the file is not what we think and is an
error. A resumed run appends to the same file, so a step may appear twice: the last record wins.
"""

import argparse
import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

REWARD_KEY = "reward_mean"
EVAL_KEY = "eval/avg@16"  # the mean over data sources; eval/<data_source>/avg@16 are not drawn
# (metric key, panel title); the reward and eval panels come first and are drawn specially.
PANELS = (
    (REWARD_KEY, "reward (mean)"),
    (EVAL_KEY, "eval accuracy (avg@16)"),
    ("sdpo_fraction", "SDPO fraction"),
    ("teacher_entropy_mean", "teacher entropy"),
    ("response_length_mean", "response length (tokens)"),
    ("time/total", "seconds per step"),
    ("loss", "loss"),
    ("grad_norm", "grad norm"),
)
NUM_COLS = 4


@dataclass
class Run:
    label: str
    path: Path  # the metrics.jsonl
    records: list[dict]  # one per step, sorted by step, each with an int "step"


def read_metrics(path: Path) -> list[dict]:
    """Parse a metrics.jsonl into records sorted by step (the last record of a repeated step wins)."""
    lines = path.read_text().splitlines()
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    by_step: dict[int, dict] = {}
    for pos, (lineno, line) in enumerate(numbered):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if pos == len(numbered) - 1:
                warnings.warn(
                    f"{path}:{lineno}: skipping the unparsable last line (truncated by a crash?)",
                    stacklevel=2,
                )
                break
            raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}:{lineno}: expected a JSON object with an integer 'step'")
        by_step[record["step"]] = record
    if not by_step:
        raise ValueError(f"{path}: no metric records")
    return [by_step[step] for step in sorted(by_step)]


def load_run(arg: str, label: str | None = None) -> Run:
    """``arg`` is a run directory or its metrics.jsonl; the label defaults to the directory name."""
    path = Path(arg)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    return Run(label or path.resolve().parent.name, path, read_metrics(path))


def series(run: Run, key: str, x: str) -> tuple[list[float], list[float]]:
    """(x, y) of ``key`` over the steps that logged it; x is the step or the cumulative hours."""
    if x == "time":
        if any("time/total" not in r for r in run.records):
            raise ValueError(f"{run.path}: --x time needs 'time/total' on every line")
        hours, xs_all = 0.0, []
        for r in run.records:
            hours += r["time/total"] / 3600
            xs_all.append(hours)  # the step's value is known once the step has finished
    else:
        xs_all = [r["step"] for r in run.records]
    pairs = [(xv, r[key]) for xv, r in zip(xs_all, run.records, strict=True) if _is_number(r.get(key))]
    return [p[0] for p in pairs], [float(p[1]) for p in pairs]


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start), so it never looks ahead."""
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def make_figure(runs: list[Run], *, smooth: int = 5, x: str = "step") -> Figure:
    """One panel per entry of PANELS, in order (``fig.axes[i]`` is ``PANELS[i]``). The line of run
    ``r`` on a panel is labelled ``r.label``; a smoothed reward line is labelled ``_<label> avg``."""
    num_rows = math.ceil(len(PANELS) / NUM_COLS)
    fig = Figure(figsize=(4.5 * NUM_COLS, 3.4 * num_rows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)  # render off-screen: no display needed
    # A shared x-axis lines the panels up: a step (or an hour) is at the same place on each.
    axes = fig.subplots(num_rows, NUM_COLS, sharex=True, squeeze=False).flatten()
    colours = {run.label: f"C{i % 10}" for i, run in enumerate(runs)}
    for ax, (key, title) in zip(axes, PANELS, strict=False):
        ax.set_title(title)
        ax.grid(alpha=0.3)
        drawn = False
        for run in runs:
            xs, ys = series(run, key, x)
            if not xs:
                continue
            drawn, colour = True, colours[run.label]
            if key == EVAL_KEY:  # evaluated every few steps only: show where
                ax.plot(xs, ys, "o-", color=colour, markersize=4, label=run.label)
            elif key == REWARD_KEY and smooth > 1:
                ax.plot(xs, ys, color=colour, alpha=0.3, linewidth=1, label=run.label)
                ax.plot(xs, moving_average(ys, smooth), color=colour, label=f"_{run.label} avg")
            else:
                ax.plot(xs, ys, color=colour, label=run.label)
        if key == REWARD_KEY and smooth > 1:
            ax.set_title(f"{title}, faint: raw, solid: {smooth}-step mean")
        if not drawn:
            note = "no evaluation yet" if key == EVAL_KEY else f"'{key}' not logged by any run"
            ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes, color="grey")
            if key != EVAL_KEY:
                print(f"note: no run logged '{key}'; its panel is empty", file=sys.stderr)
    for ax in axes[len(PANELS) :]:
        ax.set_visible(False)
    for ax in axes[-NUM_COLS:]:
        ax.set_xlabel("wall-clock hours" if x == "time" else "step")
    handles = [Line2D([], [], color=colours[run.label], label=run.label) for run in runs]
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(runs), 6))
    return fig


def summarize(run: Run) -> str:
    _, rewards = series(run, REWARD_KEY, "step")
    steps = f"{len(run.records)} steps ({run.records[0]['step']}..{run.records[-1]['step']})"
    if not rewards:
        return f"{run.label}: {steps}, no {REWARD_KEY}"
    k = min(10, len(rewards))
    first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    return (
        f"{run.label}: {steps}, {REWARD_KEY} first {k} {first:.3f}, last {k} {last:.3f} ({last - first:+.3f})"
    )


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="srpo-plot", description="Plot SRPO training curves")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR_OR_METRICS_JSONL")
    parser.add_argument("--out", required=True, type=Path, help="PNG to write")
    parser.add_argument("--smooth", type=int, default=5, help="reward moving-average window (1: off)")
    parser.add_argument("--x", choices=("step", "time"), default="step", help="x-axis: step or hours")
    parser.add_argument("--labels", help="comma-separated run labels (default: directory names)")
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [None] * len(args.runs)
    if len(labels) != len(args.runs):
        parser.error(f"--labels has {len(labels)} names for {len(args.runs)} runs")
    if args.smooth < 1:
        parser.error("--smooth must be >= 1")
    try:
        with warnings.catch_warnings():  # one plain line per warning, not the source line
            warnings.showwarning = lambda message, *_, **__: print(
                f"srpo-plot: warning: {message}", file=sys.stderr
            )
            runs = [load_run(arg, label) for arg, label in zip(args.runs, labels, strict=True)]
        names = [run.label for run in runs]
        if len(set(names)) != len(names):
            raise ValueError(f"runs share a label ({', '.join(names)}); name them with --labels")
        fig = make_figure(runs, smooth=args.smooth, x=args.x)
    except ValueError as err:
        print(f"srpo-plot: {err}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(args.out)
    for run in runs:
        print(summarize(run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
