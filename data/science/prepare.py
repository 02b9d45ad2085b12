"""
The paper's Science task as our JSONL: chemistry multiple choice (4 options, A-D), from
SciKnowEval's Chemistry test split, as released with the authors' code.

The release (github SalesforceAIResearch/CaOPD, folder data/science_data/) holds two HF
`datasets` saved with save_to_disk (an arrow file + dataset_info.json + state.json each):
  train_data/  rows {"messages": [system, user], "output_text": "<reasoning>...</reasoning>
               <answer>...</answer>"}: a demonstration, and no separate answer field
  eval_data/   rows {"prompt": [system, user], "answer": "A"}
The system message asks for "<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>" and
only the letter inside <answer>; the user message is the question and its options
("A: ...\nB: ..."). Neither asks for a confidence: ASK_CONFIDENCE is added to the user turn.

We write one row per line, the same layout for every task:
  {"id": "train-17", "messages": [{"role": "system", ...}, {"role": "user", ...}],
   "answer": "C", "reference": "<reasoning>...</reasoning>\n<answer>\nC\n</answer>"}
answer is the letter (for train rows, read from the demonstration's last <answer> tag);
reference is the demonstration, or "<answer>C</answer>" for eval rows, which have none.

    python data/science/prepare.py                  # download the release (needs `datasets`)
    python data/science/prepare.py path/to/CaOPD    # or read a local clone of it
"""
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repo root
from data import tasks  # noqa: E402  (the shared download / write / convert loop)

RELEASE_DIR = "data/science_data"  # inside the repo: train_data/, eval_data/
OUT_DIR = os.path.dirname(os.path.abspath(__file__))

ANSWER_TAG = re.compile(r"<answer>([^<]*)</answer>", re.IGNORECASE)
# The release never asks for a confidence; the paper's student does. Added to the user turn:
ASK_CONFIDENCE = ("\n\nAfter </answer>, end with one line 'Confidence: X.XX': your confidence, "
                  "from 0.00 to 1.00, that your answer is correct.")

def ask_confidence(messages):
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[last]["content"] += ASK_CONFIDENCE
    return messages

# ----------------------------------------------------------------------------
# release row -> our row

def chat(messages, where):
    """The system and user turns of a release chat, checked; assistant turns are dropped
    (in a train row the demonstration lives in output_text)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"{where}[{i}]: must be {{'role': str, 'content': str}}")
        if m["role"] in ("system", "user"):
            out.append({"role": m["role"], "content": m["content"]})
        elif m["role"] != "assistant":
            raise ValueError(f"{where}[{i}]: unknown role {m['role']!r}")
    if not any(m["role"] == "user" for m in out):
        raise ValueError(f"{where}: no user message")
    return out

def convert_train_row(row, index):
    """{"messages", "output_text"} -> our row; the letter comes from the demonstration."""
    where = f"science train row {index}"
    if "messages" not in row:
        raise ValueError(f"{where}: missing field 'messages'")
    demo = row.get("output_text")
    if not isinstance(demo, str):
        raise ValueError(f"{where}: missing or non-string field 'output_text'")
    tags = ANSWER_TAG.findall(demo)
    letter = tags[-1].strip().upper() if tags else ""
    if not (len(letter) == 1 and "A" <= letter <= "J"):
        raise ValueError(f"{where}: no <answer>X</answer> letter (A-J) in output_text")
    return {"id": f"train-{index}", "messages": ask_confidence(chat(row["messages"], f"{where}: 'messages'")),
            "answer": letter, "reference": demo}

def convert_eval_row(row, index):
    """{"prompt", "answer"} -> our row; an eval row has no demonstration, so the reference is
    the bare answer tag."""
    where = f"science eval row {index}"
    if "prompt" not in row:
        raise ValueError(f"{where}: missing field 'prompt'")
    letter = row.get("answer")
    if not (isinstance(letter, str) and len(letter.strip()) == 1 and "A" <= letter.strip().upper() <= "J"):
        raise ValueError(f"{where}: field 'answer' must be one letter A-J, got {letter!r}")
    letter = letter.strip().upper()
    return {"id": f"eval-{index}", "messages": ask_confidence(chat(row["prompt"], f"{where}: 'prompt'")),
            "answer": letter, "reference": f"<answer>{letter}</answer>"}

if __name__ == "__main__":
    tasks.prepare("science", RELEASE_DIR, lambda row, i, split: (convert_train_row if split == "train" else convert_eval_row)(row, i),
                  OUT_DIR, sys.argv[1:])

# Expected output (eval count: rows counted in the release's
# data/science_data/eval_data/data-00000-of-00001.arrow at the pinned commit; that folder's
# dataset_info.json says 20640, the size of SciKnowEval's whole Chemistry test split before the
# authors' selection. Train count unknown: train_data/dataset_info.json lists no sizes and its
# arrow file could not be read when this was written):
# downloading https://raw.githubusercontent.com/SalesforceAIResearch/CaOPD/46624a0.../data/science_data/train_data/data-00000-of-00001.arrow
# ... (6 files)
# science train: <unknown> rows -> .../data/science/train.jsonl
# science eval: 507 rows -> .../data/science/eval.jsonl
