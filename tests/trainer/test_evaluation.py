"""The evaluation's metrics beside avg@n: the format rate (the share of samples with an answer the
verifier could read), per source and over sources, and the one-line summary the run prints."""

import json

from tiny_training import evaluate_in_rank

from srpo_megatron.data.rows import PromptRow
from srpo_megatron.data.templating import TokenizedPrompt
from srpo_megatron.data.tokenizer import load_tokenizer
from srpo_megatron.runtime.launch import run_distributed
from srpo_megatron.trainer.evaluation import summarize_eval


def test_format_rate_per_source_and_over_sources():
    calls = json.dumps([{"Action": "getThing", "Action_Input": '{"id": 1}'}])
    prompts = [
        TokenizedPrompt(PromptRow("synthetic_mcq", [{"role": "user", "content": "pick"}], "B"), [1, 2]),
        TokenizedPrompt(PromptRow("synthetic_mcq", [{"role": "user", "content": "pick"}], "C"), [3, 4]),
        TokenizedPrompt(PromptRow("tooluse", [{"role": "user", "content": "get it"}], calls), [5, 6]),
    ]
    # every sample answers B: right, wrong but in the format, and no tool call at all
    response = load_tokenizer().encode("<answer>B</answer>", add_special_tokens=False)
    overrides = ["model.hf_dir=unused", "eval.n_samples=2"]
    (by_parser,) = run_distributed(
        evaluate_in_rank, world_size=1, megatron=False, args=(overrides, ["balanced"], prompts, response)
    )
    assert by_parser["balanced"] == {
        "eval/synthetic_mcq/avg@2": 0.5,
        "eval/synthetic_mcq/format_rate": 1.0,
        "eval/tooluse/avg@2": 0.0,
        "eval/tooluse/format_rate": 0.0,
        "eval/avg@2": 0.25,  # each source counts once
        "eval/format_rate": 0.5,
    }


def test_the_summary_line():
    metrics = {
        "eval/avg@16": 0.8131,
        "eval/format_rate": 0.9688,
        "eval/tooluse/avg@16": 0.8131,
        "eval/best_within_1h": 0.8131,
        "eval/best_within_5h": 0.8131,
        "time/eval": 3.0,
    }
    assert summarize_eval(metrics, 16) == (
        "avg@16 0.813, format_rate 0.969, best within 1h 0.813, best within 5h 0.813"
    )
