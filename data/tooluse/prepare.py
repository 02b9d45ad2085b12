"""
The paper's Tool-use task as our JSONL: given an API's documentation and a user's request,
make the right calls ("Action: <name>" + "Action Input: <JSON object>", one pair a call). It is the
ToolAlpaca-derived data of SDFT, as released with the authors' code.

The release (github SalesforceAIResearch/CaOPD, folder data/tooluse_data/) holds two HF
`datasets` saved with save_to_disk (an arrow file + dataset_info.json + state.json each), rows
  {"prompt": str, "name", "description", "nl_documentation", "instruction": str,
   "golden_answer": [{"Action": "getForecast", "Action_Input": "{\"city\": \"Paris\"}"}, ...],
   "golden_response": [str, ...]}                        (golden_response: train_data/ only)
The prompt is one user message: "Your task is to answer the user's question using available
tools. ..." then the tool's name, description and documentation, the format (Thought: /
Action: / Action Input: ...), "Begin!" and "Question: <instruction>". It does not ask for a
confidence: ASK_CONFIDENCE adds that line to the format block. Some requests need several calls
(getCurrentWeather, then getForecast): every golden call is kept. Training checks the first one, as
the reference's training-time verifier does (tasks.verify_tooluse); evaluation also reports every
call checked, as the reference's eval_tooluse.py does (tasks.verify_tooluse_all_calls).

We write one row per line, the same layout for every task:
  {"id": "train-3", "messages": [{"role": "user", "content": prompt}],
   "answer": {"action": "getForecast", "action_input": {"city": "Paris"},       (the first call)
              "calls": [{"action": "getForecast", "action_input": {"city": "Paris"}}, ...]},
   "reference": the golden response lines joined by "\\n" (as the reference code joins them)}
Eval rows have no golden response: their reference is "Action: ...\\nAction Input: ..." for each
golden call, in order.

    python data/tooluse/prepare.py                  # download the release (needs `datasets`)
    python data/tooluse/prepare.py path/to/CaOPD    # or read a local clone of it
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repo root
from data import tasks  # noqa: E402  (the shared download / write / convert loop)

RELEASE_DIR = "data/tooluse_data"  # inside the repo: train_data/, eval_data/
OUT_DIR = os.path.dirname(os.path.abspath(__file__))

# The release never asks for a confidence; the paper's student does. A line in the format block:
ASK_CONFIDENCE = "\nConfidence: your confidence, from 0.00 to 1.00, that this call is correct (a number only)."

def ask_confidence(prompt):
    i = prompt.rfind("\n\nBegin!")
    return prompt + ASK_CONFIDENCE if i < 0 else prompt[:i] + ASK_CONFIDENCE + prompt[i:]

# ----------------------------------------------------------------------------
# release row -> our row

def golden_call(call, where):
    """One release call {"Action": name, "Action_Input": JSON text} -> {"action": name, "action_input": dict}."""
    if not isinstance(call, dict):
        raise ValueError(f"{where} is not a call (an object with 'Action' and 'Action_Input')")
    action, raw_input = call.get("Action"), call.get("Action_Input")
    if not isinstance(action, str) or not action.strip():
        raise ValueError(f"{where} has no 'Action' name")
    try:
        action_input = json.loads(raw_input)
    except (TypeError, ValueError):
        raise ValueError(f"{where}['Action_Input'] is not JSON: {raw_input!r}") from None
    if not isinstance(action_input, dict):
        raise ValueError(f"{where}['Action_Input'] is not a JSON object: {raw_input!r}")
    return {"action": action.strip(), "action_input": action_input}

def convert_row(row, index, split):
    """A release row -> our row; split ("train" or "eval") names the id and says whether a
    golden response is required."""
    where = f"tooluse {split} row {index}"
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"{where}: missing or empty field 'prompt'")
    golden = row.get("golden_answer")
    if not isinstance(golden, list) or not golden:
        raise ValueError(f"{where}: field 'golden_answer' must be a non-empty list of calls")
    calls = [golden_call(c, f"{where}: golden_answer[{i}]") for i, c in enumerate(golden)]
    response = row.get("golden_response")
    if response is not None:
        if not (isinstance(response, list) and response and all(isinstance(s, str) for s in response)):
            raise ValueError(f"{where}: field 'golden_response' must be a non-empty list of strings")
        reference = "\n".join(response)
    elif split == "train":
        raise ValueError(f"{where}: missing field 'golden_response'")
    else:  # every call, in order, in the format the prompt asks for
        reference = "\n".join(f"Action: {c['action']}\nAction Input: {json.dumps(c['action_input'])}" for c in calls)
    return {"id": f"{split}-{index}", "messages": [{"role": "user", "content": ask_confidence(prompt)}],
            "answer": {**calls[0], "calls": calls}, "reference": reference}

if __name__ == "__main__":
    tasks.prepare("tooluse", RELEASE_DIR, convert_row, OUT_DIR, sys.argv[1:])

# Expected output (eval count: rows counted in the release's
# data/tooluse_data/eval_data/data-00000-of-00001.arrow at the pinned commit, read with pyarrow:
# 97 requests over 10 APIs; 62 have one golden call, 27 two, 6 three, 1 four and 1 five, so 35
# need more than one; every golden Action_Input there is a JSON object. Train count unknown:
# train_data/dataset_info.json lists no sizes and its arrow file could not be read when this was
# written):
# downloading https://raw.githubusercontent.com/SalesforceAIResearch/CaOPD/46624a0.../data/tooluse_data/train_data/data-00000-of-00001.arrow
# ... (6 files)
# tooluse train: <unknown> rows -> .../data/tooluse/train.jsonl
# tooluse eval: 97 rows -> .../data/tooluse/eval.jsonl
