"""``srpo-compare``: SRPO against its baselines on the tiny CPU task, several seeds each.

    srpo-compare                                            # grpo, sdpo, srpo, srpo_no_dw x 3 seeds, 60 steps
    srpo-compare --variants srpo grpo --steps 150           # the same runs of those two, continued to 150

Each (variant, seed) is one ``srpo-train`` run of ``--config`` (default ``configs/tiny_cpu.yaml``,
whose starting checkpoint ``examples/run_tiny_cpu.sh`` makes) with only ``algorithm.variant`` and
``train.seed`` changed, in ``<out>/<variant>_s<seed>``, one run after another (each takes the
``--nproc`` processes of the tiny run). Every run evaluates avg@16 every ``--eval-every`` steps and
at the end, and saves a checkpoint every ``--save-every`` steps.

Killed, the comparison resumes where it stopped: a run whose metrics reach ``--steps`` is kept, an
unfinished one continues from its newest checkpoint (the trainer's ``ckpt.resume=auto``, exact),
the others start. So a larger ``--steps`` continues finished runs (the tiny config's learning rate
is constant after warm-up, so a continued run is the run it would have been).

Then it writes ``<out>/compare.png`` (per variant the mean over seeds and a band of one standard
deviation either side, against step) and ``<out>/compare.md`` (mean +- standard deviation over
seeds, the sample one, n - 1), and prints the table.
"""

import argparse
import math
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from srpo_megatron.plot import REWARD_KEY, moving_average, read_metrics
from srpo_megatron.runtime.lifetime import die_with_parent

VARIANTS = ("grpo", "sdpo", "srpo", "srpo_no_dw")
PANELS = (
    (REWARD_KEY, "reward (mean)"),
    ("eval", "eval accuracy"),  # eval/avg@<eval.n_samples>
    ("sdpo_fraction", "SDPO fraction"),
    ("response_length_mean", "response length (tokens)"),
    ("teacher_entropy_mean", "teacher entropy"),
    ("stop_fraction", "rollouts ending with a stop token"),
)
WINDOW = 10  # steps of the first / last reward columns


def run_dir(out: Path, variant: str, seed: int) -> Path:
    return out / f"{variant}_s{seed}"


def logged_steps(path: Path) -> int:
    """The last step ``path/metrics.jsonl`` holds (0: none yet)."""
    metrics = path / "metrics.jsonl"
    if not metrics.is_file() or metrics.stat().st_size == 0:
        return 0
    return read_metrics(metrics)[-1]["step"]


def train_command(args, variant: str, seed: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.nproc}",
        "-m",
        "srpo_megatron.train",
        "--config",
        str(args.config),
        f"algorithm.variant={variant}",
        f"train.seed={seed}",
        f"train.total_steps={args.steps}",
        f"eval.every={args.eval_every}",
        f"ckpt.save_every={args.save_every}",
        f"log.output_dir={run_dir(args.out, variant, seed)}",
        f"log.run_name={variant}_s{seed}",
        *args.overrides,
    ]


def train(args, variant: str, seed: int) -> None:
    """One run to ``--steps``: its output in ``<run>/train.log``, its step lines echoed here."""
    path = run_dir(args.out, variant, seed)
    path.mkdir(parents=True, exist_ok=True)
    command = train_command(args, variant, seed)
    with open(path / "train.log", "a") as log:
        log.write(f"\n$ {shlex.join(command)}\n")
        log.flush()
        # the trainer dies with this process (a killed comparison leaves no run behind to race
        # the resumed one for the run directory; the trainer's ranks die with torchrun)
        proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            preexec_fn=die_with_parent,
        )
        for line in proc.stdout:
            log.write(line)
            if line.startswith(("step ", "reward_mean:")):
                print(f"  {variant} s{seed}: {line.rstrip()}", flush=True)
        if proc.wait() != 0:
            raise SystemExit(
                f"srpo-compare: {variant} seed {seed} failed (exit code {proc.returncode}); its log: "
                f"{path / 'train.log'}; run srpo-compare again to continue"
            )


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def load(args) -> dict[str, list[list[dict]]]:
    """Per variant, each seed's records of steps 1..--steps."""
    return {
        v: [read_metrics(run_dir(args.out, v, s) / "metrics.jsonl")[: args.steps] for s in seeds(args)]
        for v in args.variants
    }


def seeds(args) -> list[int]:
    return [args.first_seed + i for i in range(args.seeds)]


def over_seeds(runs: list[list[dict]], key: str, smooth: int) -> tuple[list[int], list[float], list[float]]:
    """(steps, mean, std) of ``key`` over the seeds, at the steps every seed logged it; the reward is
    first smoothed per seed (trailing ``smooth``-step mean)."""
    per_seed = []
    for records in runs:
        if key == "teacher_entropy_mean":  # only the steps that ran the teacher (none for grpo)
            records = [r for r in records if r.get("teacher_rollouts")]
        values = {r["step"]: float(r[key]) for r in records if isinstance(r.get(key), int | float)}
        if key == REWARD_KEY and smooth > 1:
            values = dict(zip(values, moving_average(list(values.values()), smooth), strict=True))
        per_seed.append(values)
    steps = sorted(set.intersection(*(set(v) for v in per_seed))) if per_seed else []
    stats = [mean_std([v[s] for v in per_seed]) for s in steps]
    return steps, [m for m, _ in stats], [sd for _, sd in stats]


def eval_key(results: dict[str, list[list[dict]]]) -> str:
    """``eval/avg@<n>``, the one the runs logged."""
    keys = {
        k for runs in results.values() for records in runs for r in records for k in r if _EVAL.fullmatch(k)
    }
    if len(keys) != 1:
        found = ", ".join(sorted(keys)) or "no evaluation"
        raise SystemExit(f"srpo-compare: the runs need one evaluation metric, they logged {found}")
    return keys.pop()


_EVAL = re.compile(r"eval/avg@\d+")


def make_figure(results: dict[str, list[list[dict]]], *, smooth: int) -> Figure:
    cols = 3
    rows = math.ceil(len(PANELS) / cols)
    fig = Figure(figsize=(5 * cols, 3.6 * rows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, sharex=True, squeeze=False).flatten()
    colours = {v: f"C{VARIANTS.index(v)}" for v in results}  # a variant has one colour in every picture
    evals = eval_key(results)
    for ax, (key, title) in zip(axes, PANELS, strict=False):
        if key == "eval":
            key, title = evals, f"{title} ({evals.removeprefix('eval/')})"
        ax.set_title(f"{title}, {smooth}-step mean" if key == REWARD_KEY and smooth > 1 else title)
        ax.grid(alpha=0.3)
        for variant, runs in results.items():
            steps, mean, std = over_seeds(runs, key, smooth)
            if not steps:
                continue
            marker = "o-" if key == evals else "-"
            ax.plot(steps, mean, marker, color=colours[variant], markersize=4)
            low = [m - s for m, s in zip(mean, std, strict=True)]
            high = [m + s for m, s in zip(mean, std, strict=True)]
            ax.fill_between(steps, low, high, color=colours[variant], alpha=0.2, linewidth=0)
    for ax in axes[len(PANELS) :]:
        ax.set_visible(False)
    for ax in axes[-cols:]:
        ax.set_xlabel("step")
    seeds_n = len(next(iter(results.values())))
    handles = [Line2D([], [], color=colours[v], label=v) for v in results]
    fig.legend(
        handles=handles,
        loc="outside upper center",
        ncols=len(results),
        title=f"mean over {seeds_n} seeds, band: ±1 standard deviation",
    )
    return fig


def make_table(results: dict[str, list[list[dict]]], steps: int) -> str:
    k = min(WINDOW, steps)
    key = eval_key(results)
    name = key.removeprefix("eval/")
    lines = [
        f"| variant | reward, first {k} steps | reward, last {k} steps | final {name} | best {name} in {steps} steps |",
        "| --- | --- | --- | --- | --- |",
    ]
    for variant, runs in results.items():
        first, last, final, best = [], [], [], []
        for records in runs:
            rewards = [r[REWARD_KEY] for r in records]
            evals = [r[key] for r in records if key in r]
            if not evals:
                raise SystemExit(f"srpo-compare: a {variant} run logged no {key} in its first {steps} steps")
            first.append(statistics.fmean(rewards[:k]))
            last.append(statistics.fmean(rewards[-k:]))
            final.append(evals[-1])
            best.append(max(evals))
        cells = [_pm(*mean_std(c)) for c in (first, last, final, best)]
        lines.append(f"| `{variant}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pm(mean: float, std: float) -> str:
    return f"{mean:.3f} ± {std:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="srpo-compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/compare"), help="runs, PNG and table")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per variant")
    parser.add_argument("--first-seed", type=int, default=1234, help="train.seed of the first seed")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--config", type=Path, default=Path("configs/tiny_cpu.yaml"))
    parser.add_argument("--nproc", type=int, default=2, help="processes per run")
    parser.add_argument("--smooth", type=int, default=5, help="reward moving-average window (1: off)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="for every run")
    args = parser.parse_args(argv)
    for name in ("seeds", "steps", "eval_every", "save_every", "nproc", "smooth"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.config.is_file():
        parser.error(f"--config {args.config}: no such file")
    if len(set(args.variants)) != len(args.variants):
        parser.error(f"--variants names one twice: {' '.join(args.variants)}")

    todo = [
        (v, s)
        for v in args.variants
        for s in seeds(args)
        if logged_steps(run_dir(args.out, v, s)) < args.steps
    ]
    total = len(args.variants) * args.seeds
    print(f"srpo-compare: {total} runs of {args.steps} steps in {args.out}, {total - len(todo)} done already")
    for i, (variant, seed) in enumerate(todo, 1):
        start = time.monotonic()
        begun = logged_steps(run_dir(args.out, variant, seed))
        print(
            f"[{i}/{len(todo)}] {variant} seed {seed}"
            + (f", continued ({begun} steps logged)" if begun else ""),
            flush=True,
        )
        train(args, variant, seed)
        print(f"[{i}/{len(todo)}] {variant} seed {seed}: done in {(time.monotonic() - start) / 60:.1f} min")

    results = load(args)
    table = make_table(results, args.steps)
    command = shlex.join(["srpo-compare", *(argv if argv is not None else sys.argv[1:])])
    (args.out / "compare.md").write_text(
        f"`{command}`: {args.seeds} seeds ({', '.join(map(str, seeds(args)))}) per variant, mean ± std\n\n"
        f"{table}\n"
    )
    make_figure(results, smooth=args.smooth).savefig(args.out / "compare.png", dpi=110)
    print(table)
    print(f"wrote {args.out / 'compare.md'} and {args.out / 'compare.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
