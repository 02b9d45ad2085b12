"""
Reading the paper's two tasks from our JSONL (written by data/science/prepare.py and
data/tooluse/prepare.py; data/*/fixture.jsonl are small hand-made examples), one row a line:

  {"id": str, "messages": [{"role": "system"|"user", "content": str}, ...], "answer": ..., "reference": str}

answer: science, the option letter ("C"); tool use, {"action": name, "action_input": {...}} (the
first golden call). reference: the demonstration the `demo` teacher is shown. Every problem with
a file is a ValueError naming file and line; train_small.py prints it as one line.
"""
import json
import os

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
    if task == "tooluse" and not (isinstance(a, dict) and isinstance(a.get("action"), str) and a["action"]
                                  and isinstance(a.get("action_input"), dict)):
        return "'answer' must be {'action': non-empty str, 'action_input': dict}"
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
