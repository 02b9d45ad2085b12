"""
Reading the paper's two tasks from our JSONL (written by data/science/prepare.py and
data/tooluse/prepare.py; data/*/fixture.jsonl are small hand-made examples), one row a line:

  {"id": str, "messages": [{"role": "system"|"user", "content": str}, ...], "answer": ..., "reference": str}

answer: science, the option letter ("C"); tool use, {"action": name, "action_input": {...}, "calls":
[{"action": name, "action_input": {...}}, ...]}: the first golden call (what training checks), and
every golden call in order, the first one among them (what evaluation also checks).
reference: the demonstration the `demo` teacher is shown. Every problem with a file is a
ValueError naming file and line; train_small.py prints it as one line.
"""
import json
import os
import re
import sys
import tempfile
import urllib.request
from collections import Counter

def row_problem(row, task):
    """What is wrong with one parsed row, or None."""
    if not isinstance(row, dict):
        return "a row must be a JSON object"
    for key in ("id", "messages", "answer", "reference"):
        if key not in row:
            return f"missing field {key!r}"
    if not isinstance(row["id"], str) or not row["id"]:
        return "'id' must be a non-empty string"
    msgs = row["messages"]
    if not isinstance(msgs, list) or not msgs:
        return "'messages' must be a non-empty list"
    for i, m in enumerate(msgs):
        if not (isinstance(m, dict) and m.get("role") in ("system", "user") and isinstance(m.get("content"), str)):
            return f"messages[{i}] must be {{'role': 'system' or 'user', 'content': str}}"
    if not any(m["role"] == "user" for m in msgs):
        return "'messages' has no user message"
    a = row["answer"]
    if task == "science" and not (isinstance(a, str) and len(a) == 1 and "A" <= a <= "Z"):
        return "'answer' must be one uppercase letter"
    if task == "tooluse":
        call = lambda c: isinstance(c, dict) and isinstance(c.get("action"), str) and c["action"] \
            and isinstance(c.get("action_input"), dict)
        if isinstance(a, dict) and call(a) and "calls" not in a:
            return ("'answer' has no 'calls' (a file written before every golden call was kept: delete it and run "
                    "data/tooluse/prepare.py again)")
        if not (isinstance(a, dict) and call(a) and isinstance(a["calls"], list) and a["calls"]
                and all(call(c) and set(c) == {"action", "action_input"} for c in a["calls"])):
            return "'answer' must be {'action': non-empty str, 'action_input': dict, 'calls': a non-empty list of such calls}"
        if a["calls"][0] != {"action": a["action"], "action_input": a["action_input"]}:
            return "'answer': its 'action' and 'action_input' must be its first call, 'calls'[0]"
    if not isinstance(row["reference"], str):
        return "'reference' must be a string"
    return None

def load_rows(path, task):
    """Read and check a task's JSONL file; every problem is a ValueError naming file:line."""
    assert task in ("science", "tooluse"), f"unknown task {task!r}: use science or tooluse"
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    rows, first_line = [], {}
    with open(path, encoding="utf-8", errors="replace") as f:  # bad bytes then fail as malformed JSON
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: malformed JSON ({e})") from None
            problem = row_problem(row, task)
            if problem:
                raise ValueError(f"{path}:{n}: {problem}")
            if row["id"] in first_line:
                raise ValueError(f"{path}:{n}: duplicate id {row['id']!r} (first on line {first_line[row['id']]})")
            first_line[row["id"]] = n
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: empty file (no rows)")
    return rows

# -----------------------------------------------------------------------------
# verifiers: is a completion right? (pure functions, never raise; training's P_acc and evaluation
# call the same ones)

# Science: a multiple-choice letter in the LAST <answer>...</answer> tag, case and whitespace
# ignored. Tool use is scored two ways, as in the authors' release:
#   first call (verify_tooluse; their training verifier, so P_acc here): the first `Action: name`
#     and the JSON object after the `Action Input:` that follows it, equal to the first golden call;
#   all calls (verify_tooluse_all_calls; their eval_tooluse.py): the names of every `Action:` line,
#     as a multiset (calls in any order, each counted), equal to the golden calls' names, and the
#     JSON objects after every `Action Input:`, merged into one dict (a later call's key overwrites
#     an earlier one's), equal to the golden calls' inputs merged the same way. Which input goes with
#     which call is not checked, and an input that is not a JSON object is left out of the merge.
# Both read calls the same way (a whole balanced object, a ```json fence tolerated) and compare
# JSON with key order ignored and value types not (3 is not "3", nor 3.0). eval_tooluse.py's own
# reading cuts an input at its first "}" and a name at its first non-word character, so the
# release's golden calls, written out, score 95 of its 97 eval rows there (a nested object; an
# "[Optional]updateUserProfile") and 97 here.
ANSWER_TAG = re.compile(r"<answer>([^<]*)</answer>", re.IGNORECASE)
ACTION = re.compile(r"Action:[ \t]*([^\n]*)")
ACTION_INPUT = re.compile(r"Action[ _]Input:\s*(?:```(?:json)?\s*)?")  # a ```json fence is tolerated

def verify_science(answer, text):
    tags = ANSWER_TAG.findall(text)
    return bool(tags) and len(tags[-1].strip()) == 1 and tags[-1].strip().upper() == answer.upper()

def balanced_object(text, start):
    """The {...} opening at text[start], braces counted outside JSON strings; None if it never closes."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:  # inside "...": only an unescaped quote ends it
            escaped, in_string = (False, True) if escaped else (c == "\\", c != '"')
        elif c == '"':
            in_string = True
        elif c in "{}":
            depth += 1 if c == "{" else -1
            if depth == 0:
                return text[start:i + 1]
    return None

def json_object_at(text, start):
    """The JSON object opening at text[start] as a dict; None if there is none, it never closes or is not JSON."""
    body = text.startswith("{", start) and balanced_object(text, start)
    if not body:
        return None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # not JSON; absurdly deep nesting
        return None

def same_json(a, b):
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)

def verify_tooluse(answer, text):
    action = ACTION.search(text)
    inp = action and ACTION_INPUT.search(text, action.end())
    call = json_object_at(text, inp.end()) if inp else None
    return call is not None and action.group(1).strip() == answer["action"] and same_json(call, answer["action_input"])

def verify_tooluse_all_calls(answer, text):
    """answer["calls"]: every golden call, {"action", "action_input"} each."""
    names = Counter(m.group(1).strip() for m in ACTION.finditer(text))
    merged, golden = {}, {}
    for m in ACTION_INPUT.finditer(text):
        merged.update(json_object_at(text, m.end()) or {})
    for call in answer["calls"]:
        golden.update(call["action_input"])
    return names == Counter(call["action"] for call in answer["calls"]) and same_json(merged, golden)

VERIFIERS = {"science": verify_science, "tooluse": verify_tooluse}

# -----------------------------------------------------------------------------
# data/<task>/prepare.py: the authors' release (HF `datasets` saved to disk, pinned to a commit) -> our JSONL

REPO, COMMIT = "SalesforceAIResearch/CaOPD", "46624a0111d5697df0089ec66c1da249ce59f84c"
FILES = ("data-00000-of-00001.arrow", "dataset_info.json", "state.json")  # one saved dataset

def write_jsonl_atomic(path, rows):
    """Write all rows or nothing: a temp file in the same folder, then os.replace."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)

def download_release(release_dir, dst):
    """Fetch the two saved datasets of the pinned release's release_dir into dst/{train,eval}_data/."""
    for split in ("train", "eval"):
        os.makedirs(os.path.join(dst, f"{split}_data"))
        for name in FILES:
            url = f"https://raw.githubusercontent.com/{REPO}/{COMMIT}/{release_dir}/{split}_data/{name}"
            print(f"downloading {url}")
            urllib.request.urlretrieve(url, os.path.join(dst, f"{split}_data", name))

def prepare(task, release_dir, convert, out_dir, argv):
    """The body of data/<task>/prepare.py: argv is [] (download the release) or [a local clone of
    it]; convert(row, index, split) -> our row. Idempotent: existing outputs are kept."""
    assert len(argv) <= 1, f"usage: python data/{task}/prepare.py [path/to/CaOPD clone]"
    outputs = {split: os.path.join(out_dir, f"{split}.jsonl") for split in ("train", "eval")}
    if all(os.path.exists(p) for p in outputs.values()):  # written atomically, so existing = complete
        print(f"{outputs['train']} and {outputs['eval']} exist; delete them to rebuild")
        return
    try:
        from datasets import load_from_disk
    except ImportError:
        sys.exit("this script reads the release's saved datasets: pip install datasets")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(argv[0], release_dir) if argv else os.path.join(tmp, "release")
        if not argv:
            download_release(release_dir, src)
        for split in ("train", "eval"):
            release = load_from_disk(os.path.join(src, f"{split}_data"))
            rows = [convert(row, i, split) for i, row in enumerate(release)]
            write_jsonl_atomic(outputs[split], rows)
            print(f"{task} {split}: {len(rows)} rows -> {outputs[split]}")
