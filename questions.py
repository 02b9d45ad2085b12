"""
A run's questions: the held-out ones (scored), a sampler of training questions, a verifier for
each task, and the length checks that stop settings too short for them before anything runs.
"""
import json
import os

import caopd
import cli
import tokenizer
from data import arith, tasks

def read_task_files(cfg):
    """science / tooluse: the training and held-out rows, checked line by line (before any model loads)."""
    rows = {}
    for split, path in (("train", cfg.data), ("eval", cfg.eval_data)):
        path = path or os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", cfg.task, f"{split}.jsonl")
        try:
            rows[split] = (path, tasks.load_rows(path, cfg.task))
        except ValueError as e:
            hint = f" (python data/{cfg.task}/prepare.py writes it)" if not os.path.exists(path) else ""
            cli.die(f"{e}{hint}")
    return rows

def shortest_answer(task, ex):
    """The shortest text the verifier accepts for ex, before its confidence line."""
    if task == "arith":
        return ex["reference"]
    if task == "science":
        return f"<answer>{ex['answer']}</answer>"
    return f"Action: {ex['answer']['action']}\nAction Input: {json.dumps(ex['answer']['action_input'])}"

def verify_example(ex, text):
    """A toy example's verdict: caopd.verify_arith on its answer."""
    return caopd.verify_arith(ex["answer"], text)

def arith_task(data_seed, n_eval, ops="+*", digits=None, setting=None):
    """(held-out questions, sample_train(rng, n), verify(example, text)) of a toy question mix (arith.split);
    asking for more distinct held-out questions than the mix holds is a one-line error, led by `setting`
    where n_eval comes from another setting."""
    try:
        held, sample_train = arith.split(data_seed, n_eval, ops, digits)
    except ValueError as e:
        cli.die(f"{setting}: {e}" if setting else str(e))
    return held, sample_train, verify_example

def load_task(cfg, tok, files, context):
    """(held-out examples, sample_train(rng, n), verify(example, text)). Examples too long for the
    model's context (teacher prompt + max_new_tokens) are skipped and counted."""
    if cfg.task == "arith":
        return arith_task(cfg.data_seed, cfg.n_eval, cfg.arith_ops, cfg.arith_digits or None)
    rows = {}
    for split, (path, examples) in files.items():
        fits = [ex for ex in examples if len(tokenizer.teacher_tokens(tok, ex, longest_context(cfg.teacher_context, ex),
                                                            cfg.enable_thinking)) + cfg.max_new_tokens <= context]
        if len(fits) < len(examples):
            first = next(ex["id"] for ex in examples if ex not in fits)
            print(f"{path}: skipped {len(examples) - len(fits)} of {len(examples)} questions longer than the context "
                  f"({context} tokens, with max_new_tokens={cfg.max_new_tokens}); the first: {first}")
        if not fits:
            cli.die(f"{path}: no question fits the model's context of {context} tokens")
        rows[split] = fits
    train, verifier = rows["train"], tasks.VERIFIERS[cfg.task]
    return rows["eval"][:cfg.n_eval], lambda rng, n: [rng.choice(train) for _ in range(n)], \
        lambda ex, text: verifier(ex["answer"], text)

def longest_context(template, ex):
    """The teacher context of template for ex with its longest fields (for the length checks): the
    reference and a Note, as distillation_targets makes it for one rollout that is the reference."""
    return caopd.distillation_targets("caopd", [ex["reference"]], [True], ex["reference"], template, 2)[1]

def answer_tokens(cfg, tok, held):
    """(tokens, question id): the longest of the held-out questions' shortest complete answers
    (answer, 'Confidence:' line, end token), the least max_new_tokens must hold."""
    places = tokenizer.decimals(tok)
    return max((len(tokenizer.encode(tok, caopd.set_confidence(shortest_answer(cfg.task, ex), 1.0, places))) + 1,
                ex["id"]) for ex in held)

def check_lengths(cfg, tok, held, context):
    """Settings too short for the task, found before anything runs: max_new_tokens must hold the
    shortest complete answer of every held-out question (answer_tokens); the toy GPT's block_size
    its longest sequence, the teacher prompt of the chosen template and a completion."""
    need, qid = answer_tokens(cfg, tok, held)
    if cfg.max_new_tokens < need:
        cli.die(f"--max_new_tokens={cfg.max_new_tokens}: too short for the answer format: the shortest complete "
                f"answer to held-out question {qid} (answer, 'Confidence:' line, end token) takes {need} tokens")
    if cfg.init_from == "scratch":
        ex = held[0]  # the toy's questions of one mix have one length
        conf = len(tokenizer.encode(tok, caopd.set_confidence("", 1.0, tokenizer.decimals(tok)))) + 1  # + END
        prompt = len(tokenizer.teacher_tokens(tok, ex, longest_context(cfg.teacher_context, ex), cfg.enable_thinking))
        longest = prompt + cfg.max_new_tokens + conf  # a CaOPD completion: the rollout's body + its new confidence line
        if longest > context:
            cli.die(f"--block_size={cfg.block_size}: shorter than the toy's longest sequence, {longest} tokens "
                    f"(a teacher prompt of {prompt} + up to {cfg.max_new_tokens + conf} completion tokens)")
