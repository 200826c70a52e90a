"""reward.tool_use_parser reaches the tool-use verifier in training (rollouts.compute_rewards) and in
evaluation. The response's input holds a nested object: the balanced parser reads it whole (1.0),
SDPO's reference parser stops at the first `}` (0.0)."""

import json

import pytest
import torch
from tiny_training import evaluate_in_rank

from srpo_megatron.data.rows import PromptRow
from srpo_megatron.data.templating import TokenizedPrompt
from srpo_megatron.data.tokenizer import load_tokenizer
from srpo_megatron.rollout.engine import RolloutBatch
from srpo_megatron.runtime.launch import run_distributed
from srpo_megatron.trainer.rollouts import compute_rewards

GOLD = json.dumps([{"Action": "createEvent", "Action_Input": json.dumps({"e": {"d": 1}})}])
RESPONSE = 'Action: createEvent\nAction Input: {"e": {"d": 1}}'
EXPECTED = {"balanced": 1.0, "reference": 0.0}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def tool_prompt() -> TokenizedPrompt:
    return TokenizedPrompt(PromptRow("tooluse", [{"role": "user", "content": "make it"}], GOLD), [1, 2, 3])


@pytest.mark.parametrize("parser", ["balanced", "reference"])
def test_training_rewards_use_the_configured_parser(tokenizer, parser):
    response = tokenizer.encode(RESPONSE, add_special_tokens=False)
    batch = RolloutBatch([0], [[1, 2, 3]], [response], [torch.zeros(len(response))], ["stop"])
    rewards, parsed = compute_rewards(batch, [tool_prompt()], tokenizer, parser)
    assert rewards.tolist() == [EXPECTED[parser]] and parsed.tolist() == [True]


def test_evaluation_uses_the_configured_parser(tokenizer):
    response = tokenizer.encode(RESPONSE, add_special_tokens=False)
    overrides = ["model.hf_dir=unused", "eval.n_samples=2"]
    (metrics,) = run_distributed(
        evaluate_in_rank,
        world_size=1,
        megatron=False,
        args=(overrides, list(EXPECTED), [tool_prompt()], response),
    )
    for parser, expected in EXPECTED.items():
        assert metrics[parser]["eval/tooluse/avg@2"] == metrics[parser]["eval/avg@2"] == expected, parser
