"""
The paper's Tool-use task as our JSONL: given an API's documentation and a user's request,
make the right first call ("Action: <name>" + "Action Input: <JSON object>"). It is the
ToolAlpaca-derived data of SDFT, as released with the authors' code.

The release (github SalesforceAIResearch/CaOPD, folder data/tooluse_data/) holds two HF
`datasets` saved with save_to_disk (an arrow file + dataset_info.json + state.json each), rows
  {"prompt": str, "name", "description", "nl_documentation", "instruction": str,
   "golden_answer": [{"Action": "getForecast", "Action_Input": "{\"city\": \"Paris\"}"}, ...],
   "golden_response": [str, ...]}                        (golden_response: train_data/ only)
The prompt is one user message: "Your task is to answer the user's question using available
tools. ..." then the tool's name, description and documentation, the format (Thought: /
Action: / Action Input: ...), "Begin!" and "Question: <instruction>". It does not ask for a
confidence: ASK_CONFIDENCE adds that line to the format block. Some requests need several calls; as in the
reference's training-time verifier, only the first one is checked.

We write one row per line, the same layout for every task:
  {"id": "train-3", "messages": [{"role": "user", "content": prompt}],
   "answer": {"action": "getForecast", "action_input": {"city": "Paris"}},
   "reference": the golden response lines joined by "\\n" (as the reference code joins them)}
Eval rows have no golden response: their reference is "Action: ...\\nAction Input: ..." built
from the first golden call.

    python data/tooluse/prepare.py                  # download the release (needs `datasets`)
    python data/tooluse/prepare.py path/to/CaOPD    # or read a local clone of it
"""
import json
import os
import sys
import tempfile
import urllib.request

# the release, pinned to the commit this converter was written against
REPO, COMMIT = "SalesforceAIResearch/CaOPD", "46624a0111d5697df0089ec66c1da249ce59f84c"
RELEASE_DIR = "data/tooluse_data"  # inside the repo: train_data/, eval_data/
FILES = ("data-00000-of-00001.arrow", "dataset_info.json", "state.json")
OUT_DIR = os.path.dirname(os.path.abspath(__file__))

# The release never asks for a confidence; the paper's student does. A line in the format block:
ASK_CONFIDENCE = "\nConfidence: your confidence, from 0.00 to 1.00, that this call is correct (a number only)."

def ask_confidence(prompt):
    i = prompt.rfind("\n\nBegin!")
    return prompt + ASK_CONFIDENCE if i < 0 else prompt[:i] + ASK_CONFIDENCE + prompt[i:]

# ----------------------------------------------------------------------------
# release row -> our row

def convert_row(row, index, split):
    """A release row -> our row; split ("train" or "eval") names the id and says whether a
    golden response is required."""
    where = f"tooluse {split} row {index}"
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"{where}: missing or empty field 'prompt'")
    calls = row.get("golden_answer")
    if not isinstance(calls, list) or not calls or not isinstance(calls[0], dict):
        raise ValueError(f"{where}: field 'golden_answer' must be a non-empty list of calls")
    action, raw_input = calls[0].get("Action"), calls[0].get("Action_Input")
    if not isinstance(action, str) or not action.strip():
        raise ValueError(f"{where}: golden_answer[0] has no 'Action' name")
    try:
        action_input = json.loads(raw_input)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: golden_answer[0]['Action_Input'] is not JSON: {raw_input!r}") from None
    if not isinstance(action_input, dict):
        raise ValueError(f"{where}: golden_answer[0]['Action_Input'] is not a JSON object: {raw_input!r}")
    response = row.get("golden_response")
    if response is not None:
        if not (isinstance(response, list) and response and all(isinstance(s, str) for s in response)):
            raise ValueError(f"{where}: field 'golden_response' must be a non-empty list of strings")
        reference = "\n".join(response)
    elif split == "train":
        raise ValueError(f"{where}: missing field 'golden_response'")
    else:
        reference = f"Action: {action.strip()}\nAction Input: {raw_input}"
    return {"id": f"{split}-{index}", "messages": [{"role": "user", "content": ask_confidence(prompt)}],
            "answer": {"action": action.strip(), "action_input": action_input}, "reference": reference}

# ----------------------------------------------------------------------------
# files

def write_jsonl_atomic(path, rows):
    """Write all rows or nothing: a temp file in the same folder, then os.replace."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)

def download_release(dst):
    """Fetch the two saved datasets of the pinned release into dst/{train,eval}_data/."""
    for split in ("train", "eval"):
        os.makedirs(os.path.join(dst, f"{split}_data"))
        for name in FILES:
            url = f"https://raw.githubusercontent.com/{REPO}/{COMMIT}/{RELEASE_DIR}/{split}_data/{name}"
            print(f"downloading {url}")
            urllib.request.urlretrieve(url, os.path.join(dst, f"{split}_data", name))

if __name__ == "__main__":
    assert len(sys.argv) <= 2, "usage: python data/tooluse/prepare.py [path/to/CaOPD clone]"
    outputs = {split: os.path.join(OUT_DIR, f"{split}.jsonl") for split in ("train", "eval")}
    if all(os.path.exists(p) for p in outputs.values()):  # written atomically, so existing = complete
        print(f"{outputs['train']} and {outputs['eval']} exist; delete them to rebuild")
        sys.exit(0)
    try:
        from datasets import load_from_disk
    except ImportError:
        sys.exit("this script reads the release's saved datasets: pip install datasets")
    with tempfile.TemporaryDirectory() as tmp:
        if len(sys.argv) == 2:
            src = os.path.join(sys.argv[1], RELEASE_DIR)
        else:
            src = os.path.join(tmp, "tooluse_data")
            download_release(src)
        for split in ("train", "eval"):
            release = load_from_disk(os.path.join(src, f"{split}_data"))
            rows = [convert_row(row, i, split) for i, row in enumerate(release)]
            write_jsonl_atomic(outputs[split], rows)
            print(f"tooluse {split}: {len(rows)} rows -> {outputs[split]}")

# Expected output (eval count: rows counted in the release's
# data/tooluse_data/eval_data/data-00000-of-00001.arrow at the pinned commit, 97 requests over 10
# APIs, 35 of them needing more than one call; train count unknown: train_data/dataset_info.json
# lists no sizes and its arrow file could not be read when this was written):
# downloading https://raw.githubusercontent.com/SalesforceAIResearch/CaOPD/46624a0.../data/tooluse_data/train_data/data-00000-of-00001.arrow
# ... (6 files)
# tooluse train: <unknown> rows -> .../data/tooluse/train.jsonl
# tooluse eval: 97 rows -> .../data/tooluse/eval.jsonl
