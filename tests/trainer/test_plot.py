import json
import math

import matplotlib.image
import pytest

from srpo_megatron.plot import EVAL_KEY, PANELS, REWARD_KEY, load_run, main, make_figure

STEPS = 30


def _record(step: int, reward: float, with_eval: bool) -> dict:
    record = {
        "step": step,
        "reward_mean": reward,
        "sdpo_fraction": 0.5 + 0.01 * step,
        "grpo_fraction": 0.5 - 0.01 * step,
        "teacher_entropy_mean": 1.0 / step,
        "response_length_mean": 100.0 + step,
        "logp_gap_mean": 0.01,
        "time/total": 60.0,
        "loss": 0.1 * math.sin(step),
        "grad_norm": 1.0 + 0.1 * step,
    }
    if with_eval and step % 10 == 0:
        record[EVAL_KEY] = 0.02 * step
        record["eval/chemistry/avg@16"] = 0.02 * step
    return record


def _write_run(run_dir, rewards, *, with_eval=False, truncated_tail=False):
    run_dir.mkdir(parents=True)
    lines = [json.dumps(_record(s, r, with_eval)) for s, r in enumerate(rewards, start=1)]
    text = "\n".join(lines) + "\n"
    if truncated_tail:  # a crash while writing step len+1
        text += json.dumps(_record(len(rewards) + 1, 0.0, with_eval))[:25]
    (run_dir / "metrics.jsonl").write_text(text)
    return run_dir


@pytest.fixture
def two_runs(tmp_path):
    rewards_a = [0.1 + 0.02 * s for s in range(STEPS)]
    rewards_b = [0.3 + 0.1 * math.sin(s) for s in range(STEPS)]
    run_a = _write_run(tmp_path / "srpo", rewards_a, with_eval=True)
    run_b = _write_run(tmp_path / "grpo", rewards_b, truncated_tail=True)
    return run_a, run_b, rewards_a, rewards_b


def test_main_writes_a_png_and_prints_a_summary(two_runs, tmp_path, capsys):
    run_a, run_b, rewards_a, _ = two_runs
    out = tmp_path / "plots" / "curves.png"
    assert main([str(run_a), str(run_b / "metrics.jsonl"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(out).shape
    assert width > 1000 and height > 500
    captured = capsys.readouterr()
    assert f"warning: {run_b / 'metrics.jsonl'}:31: skipping the unparsable last line" in captured.err
    printed = captured.out
    assert str(out) in printed
    first, last = sum(rewards_a[:10]) / 10, sum(rewards_a[-10:]) / 10
    assert f"srpo: 30 steps (1..30), reward_mean first 10 {first:.3f}, last 10 {last:.3f}" in printed
    assert "grpo: 30 steps (1..30)" in printed  # the truncated 31st line is not counted


def test_figure_draws_each_runs_own_values(two_runs):
    run_a, run_b, rewards_a, rewards_b = two_runs
    with pytest.warns(UserWarning, match="metrics.jsonl:31: skipping the unparsable last line"):
        runs = [load_run(str(run_a)), load_run(str(run_b), label="B")]
    fig = make_figure(runs, smooth=5)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["srpo", "B"]
    panel = {key: ax for ax, (key, _) in zip(fig.axes, PANELS, strict=False)}

    reward_lines = {line.get_label(): line for line in panel[REWARD_KEY].get_lines()}
    assert list(reward_lines["srpo"].get_xdata()) == list(range(1, STEPS + 1))
    assert list(reward_lines["srpo"].get_ydata()) == pytest.approx(rewards_a)
    assert list(reward_lines["B"].get_ydata()) == pytest.approx(rewards_b)
    smoothed_b = reward_lines["_B avg"].get_ydata()
    assert smoothed_b[0] == pytest.approx(rewards_b[0])
    assert smoothed_b[-1] == pytest.approx(sum(rewards_b[-5:]) / 5)
    assert reward_lines["srpo"].get_color() == panel["grad_norm"].get_lines()[0].get_color()

    (eval_line,) = panel[EVAL_KEY].get_lines()  # only run A evaluated, at steps 10, 20, 30
    assert eval_line.get_label() == "srpo"
    assert list(eval_line.get_xdata()) == [10, 20, 30]
    assert list(eval_line.get_ydata()) == pytest.approx([0.2, 0.4, 0.6])


def test_time_axis_is_cumulative_hours(two_runs):
    run_a, _, _, _ = two_runs
    fig = make_figure([load_run(str(run_a))], x="time")
    (line,) = fig.axes[PANELS.index(("loss", "loss"))].get_lines()
    assert list(line.get_xdata()) == pytest.approx([s / 60 for s in range(1, STEPS + 1)])  # 60 s/step


def test_no_eval_and_missing_metric_leave_notes(tmp_path, capsys):
    run = _write_run(tmp_path / "run", [0.1, 0.2, 0.3])
    text = (run / "metrics.jsonl").read_text().replace('"grad_norm"', '"other"')
    (run / "metrics.jsonl").write_text(text)
    fig = make_figure([load_run(str(run))])
    notes = {ax.get_title(): [t.get_text() for t in ax.texts] for ax in fig.axes}
    assert notes["eval accuracy (avg@16)"] == ["no evaluation yet"]
    assert notes["grad norm"] == ["'grad_norm' not logged by any run"]
    assert "no run logged 'grad_norm'" in capsys.readouterr().err


def test_unparsable_line_mid_file_is_an_error(tmp_path, capsys):
    run = _write_run(tmp_path / "run", [0.1, 0.2, 0.3])
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:20]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert main([str(run), "--out", str(tmp_path / "x.png")]) == 2
    assert f"{run / 'metrics.jsonl'}:2: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "no such file"), ("", "no metric records"), ('{"reward_mean": 1}\n', "integer 'step'")],
)
def test_bad_inputs_are_clear_errors(tmp_path, capsys, content, message):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    assert main([str(run), "--out", str(tmp_path / "x.png")]) == 2
    assert message in capsys.readouterr().err


def test_runs_with_the_same_name_need_labels(tmp_path, capsys):
    run_a = _write_run(tmp_path / "a" / "seed0", [0.1, 0.2])
    run_b = _write_run(tmp_path / "b" / "seed0", [0.3, 0.4])
    args = [str(run_a), str(run_b), "--out", str(tmp_path / "x.png")]
    assert main(args) == 2
    assert "runs share a label" in capsys.readouterr().err
    assert main([*args, "--labels", "a,b"]) == 0
