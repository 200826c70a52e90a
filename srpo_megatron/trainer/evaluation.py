"""Evaluation: avg@16 on the test split of each data source (ALGORITHM.md sec. 9), the format rate
beside it, and the best score so far within the wall-clock budgets the paper reports (1h / 5h / 10h
of training, on the ``RunClock``).

avg@n of a prompt = the fraction of its n samples (temperature 0.6, top-p 0.95, thinking off) that
the verifier scores correct; a source's avg@n is the mean over its prompts; ``eval/avg@16`` is the
mean over sources (each source counts once, whatever its size). The format rate is the share of
samples whose answer the verifier could read (``RewardResult.parsed``), per source and averaged
the same way: a policy that loses the answer format shows it there first, whatever its training
reward does.
"""

from collections import defaultdict

from srpo_megatron.config import Config
from srpo_megatron.data.rows import load_rows
from srpo_megatron.data.templating import tokenize_and_filter
from srpo_megatron.rewards.registry import check_reward_fn, get_reward_fn
from srpo_megatron.rewards.result import RewardResult
from srpo_megatron.rollout.engine import SamplingParams
from srpo_megatron.runtime.distributed import from_rank_0
from srpo_megatron.runtime.progress import progress_bar

BUDGET_HOURS = (1, 5, 10)


def load_eval_prompts(cfg: Config, tokenizer) -> list:
    limit = cfg.eval.max_prompts or None
    rows = [row for path in cfg.data.test_files for row in load_rows(path, check=check_reward_fn)[:limit]]
    prompts, _ = tokenize_and_filter(rows, tokenizer, cfg.data.max_prompt_length)
    return prompts


def evaluate(engine, cfg: Config, tokenizer, prompts, stop_token_ids, *, seed: int) -> dict[str, float]:
    """Rank 0 samples and scores; every rank gets the same metrics dict."""

    def sample_and_score() -> dict[str, float]:
        n = cfg.eval.n_samples
        params = SamplingParams(
            n=n,
            temperature=cfg.eval.temperature,
            top_p=cfg.eval.top_p,
            max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
            stop_token_ids=tuple(stop_token_ids),
            seed=seed,
        )
        with progress_bar() as bar:
            task = bar.add_task(f"evaluation, avg@{n} on {len(prompts)} prompts", total=len(prompts) * n)
            batch = engine.generate(
                [p.prompt_ids for p in prompts], params, on_done=lambda k: bar.advance(task, k)
            )
        per_source: dict[str, list[RewardResult]] = defaultdict(list)
        for i, response in enumerate(batch.response_ids):
            row = prompts[batch.prompt_index[i]].row
            text = tokenizer.decode(response, skip_special_tokens=True)
            reward_fn = get_reward_fn(row.data_source, tool_use_parser=cfg.reward.tool_use_parser)
            per_source[row.data_source].append(reward_fn(text, row.ground_truth))
        metrics = {}
        for source, results in sorted(per_source.items()):
            metrics[f"eval/{source}/avg@{n}"] = sum(r.score for r in results) / len(results)
            metrics[f"eval/{source}/format_rate"] = sum(r.parsed for r in results) / len(results)
        for name in (f"avg@{n}", "format_rate"):  # each source counts once
            metrics[f"eval/{name}"] = sum(metrics[f"eval/{s}/{name}"] for s in per_source) / len(per_source)
        return metrics

    return from_rank_0(sample_and_score, "evaluation")


def summarize_eval(metrics: dict[str, float], n: int) -> str:
    """An evaluation's result in one line, from ``evaluate``'s metrics and ``BestWithinBudget``'s:
    avg@n, the format rate and the best avg@n within each budget so far (per source: metrics.jsonl)."""
    shown = [f"avg@{n} {metrics[f'eval/avg@{n}']:.3f}", f"format_rate {metrics['eval/format_rate']:.3f}"]
    shown += [
        f"best within {b}h {metrics[f'eval/best_within_{b}h']:.3f}"
        for b in BUDGET_HOURS
        if f"eval/best_within_{b}h" in metrics
    ]
    return ", ".join(shown)


class RunClock:
    """Hours of training wall clock so far (the budgets of ``BestWithinBudget``), kept across resumes."""

    def __init__(self) -> None:
        self.hours = 0.0

    def add(self, seconds: float) -> None:
        self.hours += seconds / 3600

    def state_dict(self) -> dict:
        return {"hours": self.hours}

    def load_state_dict(self, state: dict) -> None:
        self.hours = state["hours"]


class BestWithinBudget:
    """The best eval score reached within each wall-clock budget of training time."""

    def __init__(self) -> None:
        self.best: dict[int, float] = {}

    def update(self, score: float, hours: float) -> dict[str, float]:
        for budget in BUDGET_HOURS:
            if hours <= budget:
                self.best[budget] = max(self.best.get(budget, score), score)
        return {f"eval/best_within_{b}h": v for b, v in sorted(self.best.items())}

    def state_dict(self) -> dict:
        return {str(k): v for k, v in self.best.items()}

    def load_state_dict(self, state: dict) -> None:
        self.best = {int(k): v for k, v in state.items()}
