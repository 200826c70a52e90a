"""Fixed prompt texts of the benchmarks and of the synthetic CPU task.

Science: the system prompt and user-message layout of SDPO's released SciKnowEval splits
(lasgroup/SDPO `data/format/sciknoweval.py`), which the SRPO paper (App. B.3) says it uses
without modification. Tool use: the user-message layout of SDPO's released ToolAlpaca splits
(the ToolAlpaca ReAct format). Those splits carry no system message for tool use; the SRPO paper
names a tool-use system prompt in App. B.3, but its text is not in our copy of the paper, so
TOOL_USE_SYSTEM_PROMPT below is ours [choice] and `tools/prepare_data.py` can replace or drop it.
"""

SCIENCE_SYSTEM_PROMPT = """
Given a question and four options, please select the right answer. Respond in the following format:
<reasoning>
...
</reasoning>
<answer>
...
</answer>

For the answer, only output the letter corresponding to the correct option (A, B, C, or D), and nothing else. Do not restate the answer text. For example, if the answer is "A", just output:
<answer>
A
</answer>
"""

# user message = question + "\n\n" + "A: ..." lines + SCIENCE_USER_SUFFIX
SCIENCE_USER_SUFFIX = "\nPlease reason step by step."

TOOL_USE_SYSTEM_PROMPT = (
    "You are a helpful assistant that answers the user's question by calling the tools described "
    "in the user message. For each tool call write a line 'Thought: ...', then a line "
    "'Action: <tool name>', then a line 'Action Input: <the arguments as one JSON object>'."
)

# {name}, {description}, {documentation}, {question}: one ToolAlpaca tool and one user request.
TOOL_USE_USER_TEMPLATE = (
    "Your task is to answer the user's question using available tools. \n"
    "You have access to the following tools:\n"
    "Name: {name}\n"
    "Description: {description}\n"
    "Documentation:\n"
    "{documentation}\n\n"
    "Use the following format:\n"
    "Thought: you should always think about what to do\n"
    "Action: the action to take, should be one of the tool names.\n"
    "Action Input: the input to the action, must be in JSON format. "
    "All of the action input must be realistic and from the user.\n\n"
    "Begin!\n"
    "Question: {question}"
)

# The synthetic task wants 7-token answers (`<answer>X</answer>` + end of turn), no reasoning.
SYNTHETIC_SYSTEM_PROMPT = (
    "Pick the option marked with *. Reply with only <answer>X</answer>, where X is its letter."
)
