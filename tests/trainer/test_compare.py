"""srpo-compare: the table and picture from the runs' metrics, a killed comparison resuming where it
stopped, and real runs through the launcher (started, then continued to more steps)."""

import json

import pytest
from matplotlib.image import imread

from srpo_megatron import compare


def write_run(out, variant, seed, steps, reward, evals):
    """metrics.jsonl of a finished run: reward_mean(step) and eval/avg@16 at the steps of ``evals``."""
    path = out / f"{variant}_s{seed}"
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "metrics.jsonl", "w") as f:
        for step in range(1, steps + 1):
            record = {"step": step, "reward_mean": reward(step), "sdpo_fraction": 0.5}
            if step in evals:
                record["eval/avg@16"] = evals[step]
            f.write(json.dumps(record) + "\n")


def args_for(tmp_path, *extra):
    config = tmp_path / "config.yaml"
    config.write_text("{}\n")
    return ["--out", str(tmp_path / "cmp"), "--config", str(config), *extra]


def test_table_and_picture_from_finished_runs(tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    # grpo: reward 0.1 over the first 10 steps, 0.3 over the last 10; seed 2 is 0.2 higher throughout
    for seed, d in ((1, 0.0), (2, 0.2)):
        write_run(
            out, "grpo", seed, 20, lambda s, d=d: (0.1 if s <= 10 else 0.3) + d, {10: 0.4 + d, 20: 0.3 + d}
        )
        write_run(out, "srpo", seed, 20, lambda s, d=d: 0.5 + d, {10: 0.6 + d, 20: 0.7 + d})
    monkeypatch.setattr(compare, "train", lambda *a: pytest.fail("every run is finished"))
    assert (
        compare.main(
            args_for(
                tmp_path, "--variants", "grpo", "srpo", "--seeds", "2", "--first-seed", "1", "--steps", "20"
            )
        )
        == 0
    )
    table = (out / "compare.md").read_text()
    # std over two seeds 0.2 apart: 0.2 / sqrt(2) = 0.141
    assert "| `grpo` | 0.200 ± 0.141 | 0.400 ± 0.141 | 0.400 ± 0.141 | 0.500 ± 0.141 |" in table
    assert "| `srpo` | 0.600 ± 0.141 | 0.600 ± 0.141 | 0.800 ± 0.141 | 0.800 ± 0.141 |" in table
    assert "2 seeds (1, 2) per variant" in table
    assert (
        "| variant | reward, first 10 steps | reward, last 10 steps | final avg@16 | best avg@16 in 20 steps |"
        in table
    )
    assert imread(out / "compare.png").shape[0] > 300
    assert "4 runs of 20 steps in" in capsys.readouterr().out


def test_a_killed_comparison_runs_only_what_is_unfinished(tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    write_run(out, "grpo", 7, 4, lambda s: 0.25, {4: 0.5})  # finished
    write_run(out, "srpo", 7, 2, lambda s: 0.25, {})  # killed after step 2 (no step-4 metrics)
    started = []

    def fake_train(args, variant, seed):
        started.append((variant, seed))
        write_run(out, variant, seed, 4, lambda s: 0.5, {4: 0.75})

    monkeypatch.setattr(compare, "train", fake_train)
    assert (
        compare.main(
            args_for(
                tmp_path, "--variants", "grpo", "srpo", "--seeds", "2", "--first-seed", "7", "--steps", "4"
            )
        )
        == 0
    )
    assert started == [("grpo", 8), ("srpo", 7), ("srpo", 8)]
    printed = capsys.readouterr().out
    assert "4 runs of 4 steps" in printed and "1 done already" in printed
    assert "srpo seed 7, continued (2 steps logged)" in printed


def test_bad_arguments_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        compare.main(args_for(tmp_path, "--seeds", "0"))
    assert "--seeds must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main(args_for(tmp_path, "--variants", "srpo", "srpo"))
    assert "names one twice" in capsys.readouterr().err


def test_real_runs_are_started_then_continued(tiny_run_inputs, tmp_path, capsys):
    """One tiny run of 2 steps through torchrun, then the same command with --steps 3 continues it
    from its step-2 checkpoint."""
    root = tiny_run_inputs
    overrides = [
        f"model.hf_dir={root / 'model'}",
        f"data.train_files=[{root / 'train.parquet'}]",
        f"data.test_files=[{root / 'test.parquet'}]",
        "eval.n_samples=2",
        "rollout.max_new_tokens=6",
        "log.tensorboard=false",
        "ckpt.export_hf=false",
    ]
    base = [
        "--out",
        str(tmp_path / "cmp"),
        "--variants",
        "grpo",
        "--seeds",
        "1",
        "--eval-every",
        "1",
        "--save-every",
        "2",
    ]
    assert compare.main([*base, "--steps", "2", *overrides]) == 0
    assert compare.main([*base, "--steps", "3", *overrides]) == 0
    printed = capsys.readouterr().out
    assert "grpo seed 1234, continued (2 steps logged)" in printed
    run = tmp_path / "cmp" / "grpo_s1234"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all("eval/avg@2" in r for r in records)  # eval.n_samples=2, every step
    assert "start: resumes after step 2" in (run / "train.log").read_text()
    assert "| `grpo` |" in (tmp_path / "cmp" / "compare.md").read_text()
