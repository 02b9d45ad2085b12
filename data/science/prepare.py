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
import json
import os
import re
import sys
import tempfile
import urllib.request

# the release, pinned to the commit this converter was written against
REPO, COMMIT = "SalesforceAIResearch/CaOPD", "46624a0111d5697df0089ec66c1da249ce59f84c"
RELEASE_DIR = "data/science_data"  # inside the repo: train_data/, eval_data/
FILES = ("data-00000-of-00001.arrow", "dataset_info.json", "state.json")
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
    assert len(sys.argv) <= 2, "usage: python data/science/prepare.py [path/to/CaOPD clone]"
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
            src = os.path.join(tmp, "science_data")
            download_release(src)
        for split, convert in (("train", convert_train_row), ("eval", convert_eval_row)):
            release = load_from_disk(os.path.join(src, f"{split}_data"))
            rows = [convert(row, i) for i, row in enumerate(release)]
            write_jsonl_atomic(outputs[split], rows)
            print(f"science {split}: {len(rows)} rows -> {outputs[split]}")

# Expected output (eval count: rows counted in the release's
# data/science_data/eval_data/data-00000-of-00001.arrow at the pinned commit; that folder's
# dataset_info.json says 20640, the size of SciKnowEval's whole Chemistry test split before the
# authors' selection. Train count unknown: train_data/dataset_info.json lists no sizes and its
# arrow file could not be read when this was written):
# downloading https://raw.githubusercontent.com/SalesforceAIResearch/CaOPD/46624a0.../data/science_data/train_data/data-00000-of-00001.arrow
# ... (6 files)
# science train: <unknown> rows -> .../data/science/train.jsonl
# science eval: 507 rows -> .../data/science/eval.jsonl
