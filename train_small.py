"""
Watch on-policy distillation become overconfident, and CaOPD stay calibrated, on a laptop.

Stage 0 trains a small GPT from scratch on a toy arithmetic task (the "base" model). Stage 1
distills it on-policy toward an EMA teacher that sees a worked demonstration: once as plain
OPD, once as CaOPD, from the same base with the same seed. Then all three answer the same
held-out questions (greedy) and we compare accuracy and calibration.

    python train_small.py                          # everything: about 9 minutes on one CPU core
    python train_small.py --method=caopd --seed=1  # one method, another seed
    python train_small.py --smoke=True             # the whole pipeline in seconds (machinery only)
    python train_small.py --init_from=resume       # continue an interrupted run from out_dir/ckpt.pt
    python train_small.py --init_from=Qwen/Qwen3-0.6B --task=science   # a Hugging Face model
    torchrun --standalone --nproc_per_node=4 train_small.py ...        # several processes / GPUs

Every global below is a setting: override it as --key=value (the type must match).
"""
import copy
import hashlib
import inspect
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict

import tiktoken
import torch
import torch.distributed as dist
from tqdm import tqdm

import caopd
from data import arith, tasks

# -----------------------------------------------------------------------------
# settings
# I/O
out_dir = "out"            # results.json, reliability.png, completions.jsonl, ckpt.pt, the cached base model
init_from = "scratch"      # "scratch" (the toy GPT, trained here in stage 0), "resume" (continue the run
                           # in out_dir from its checkpoint), or a Hugging Face model id or local directory
seed = 0                   # training seed (base model, rollouts); OPD and CaOPD share it
method = "both"            # "opd", "caopd", or "both" (OPD then CaOPD from the same base)
smoke = False              # shrink every stage to check the machinery in seconds (not the science)
ckpt_every = 50            # steps between checkpoints; every stage also ends with one
max_bad_steps = 5          # non-finite losses or gradients in a row before the run stops
# task
task = "arith"             # "arith" (generated in code), "science" or "tooluse" (data/<task>/prepare.py)
data = ""                  # science / tooluse: training JSONL ("" = data/<task>/train.jsonl)
eval_data = ""             # science / tooluse: held-out JSONL ("" = data/<task>/eval.jsonl)
data_seed = 0              # arith: fixes the held-out questions, so every run is scored on the same ones
n_eval = 1000              # held-out questions (science / tooluse: the first n_eval of eval_data)
# model (trained from scratch in stage 0)
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128           # the longest toy teacher prompt + completion is ~90 tokens
# stage 0: supervised base model (the toy curriculum; a pretrained model skips it unless base_steps is given)
base_steps = 500
base_batch = 64
base_lr = 2e-3
base_warmup = 100          # linear warm-up steps, then cosine decay to 0.1 x base_lr
base_conf_sigma = 0.15     # the teacher's stated confidence is trained toward a Gaussian of this standard
base_conf_shape = 0.1      # deviation around the value it is shown, with this weight on the shape of its
                           # log-probabilities (a parabola): see soft_confidence_loss
# rollouts
steps = 260                # distillation steps, per method
prompts_per_step = 16      # over all processes (torchrun): each takes an equal share
K = 8                      # rollouts per prompt; P_acc = correct / K
smooth_p_acc = False       # P_acc = (correct + 1) / (K + 2) instead (never 0 or 1 from few rollouts)
temperature = 0.3          # of the rollouts. Evaluation is greedy; at 1.0 rollouts are right far less often
                           # than greedy answers (0.24 vs 0.38 for a base model), so P_acc would undershoot
top_k = 0                  # 0 = sample from the full vocabulary
max_new_tokens = 12        # "Answer: 6887\nConfidence: 0.7<|endoftext|>" is 11 tokens
eval_batch = 500           # questions per greedy evaluation call
# teacher
teacher_context = "demo"   # "demo" (reference answer) or "correct_solution" (a verified rollout)
ema_rate = 0.0             # teacher <- (1 - a) teacher + a student after every step; 0 = frozen.
                           # The paper's 0.01 let teacher and student drift together here until the
                           # student wrote "Answer:" where "Confidence:" belongs (format rate 0.08
                           # after 300 CaOPD steps); a frozen teacher keeps the format (1.00)
# loss
loss = "reverse"           # "reverse" KL(student||teacher), "forward" KL(teacher||student), or "jsd"
jsd_beta = 0.5             # the generalized JSD's mixing weight (loss="jsd" only)
skip_tokens = 0            # completion tokens left out of the loss; the toy's answer starts at token 2,
                           # so skipping 3 (the reference code's default) would drop its first digit
estimator = "full"         # how the reverse KL is estimated: "full" (every vocabulary entry, the fused loss),
                           # "topk" (the student's estimator_topk tokens + a tail bucket), "sampled" (the
                           # sampled token, policy gradient), "sampled_baseline" (the same minus the closed-form
                           # value -KL, vOPD's control variate); see caopd.py after fused_linear_kl
estimator_topk = 8         # k of estimator="topk"
lr = 3e-4                  # at the first step, then cosine to min_lr at the last
min_lr = 0.0               # 0: the final model averages the P_acc of its last stretch of steps (see distill)
grad_clip = 1.0
# system
device = "auto"            # "auto" (cuda, then mps, then cpu), "cpu", "cuda", "mps"
threads = 1                # torch CPU threads; 1 is steady on a shared 2-core machine
log_every = 25             # steps between printed lines
eval_every = 0             # steps between held-out evaluations during distillation (0 = only at the end)
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (bool, int, float, str))]
SMOKE = dict(base_steps=40, base_batch=16, base_warmup=10, steps=4, prompts_per_step=4, K=4, n_eval=64, log_every=2,
             ckpt_every=2)
# -----------------------------------------------------------------------------

def die(msg, code=2):
    """A bad setting, path or file: one line, exit code 2, nothing written."""
    print(f"train_small.py: error: {msg}", file=sys.stderr)
    sys.exit(code)

def parse_args(argv):
    """--key=value overrides of the globals above, type checked; returns the keys given."""
    given = set()
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            die(f"arguments look like --key=value, got {arg!r}")
        key, text = arg[2:].split("=", 1)
        if key not in config_keys:
            die(f"unknown setting {key!r} (settings: {', '.join(config_keys)})")
        kind = type(globals()[key])
        try:
            if kind is bool:
                value = {"true": True, "false": False}[text.lower()]
            elif kind is float:
                value = float(text)
            else:
                value = kind(text)
        except (KeyError, ValueError):
            die(f"--{key} must be a {kind.__name__}, got {text!r}")
        print(f"override: {key} = {value!r}")
        globals()[key] = value
        given.add(key)
    if init_from == "resume":
        if given - {"init_from", "out_dir", "device", "threads"}:
            die(f"--init_from=resume continues the run in out_dir with its own settings; "
                f"drop {', '.join('--' + k for k in sorted(given - {'init_from', 'out_dir', 'device', 'threads'}))}")
        return given
    if smoke:
        globals().update({k: v for k, v in SMOKE.items() if k not in given})
    if init_from != "scratch" and "base_steps" not in given:
        globals()["base_steps"] = 0  # a pretrained model is the base; stage 0 only when asked for
    check_settings()
    return given

def check_settings():
    checks = [
        (method in ("opd", "caopd", "both"), "method", "must be 'opd', 'caopd' or 'both'"),
        (task in ("arith", "science", "tooluse"), "task", "must be 'arith', 'science' or 'tooluse'"),
        (task == "arith" or init_from != "scratch", "task",
         "needs a pretrained model: add --init_from=<Hugging Face model id or directory>"),
        (task == "arith" or base_steps == 0, "base_steps", "stage 0 is the toy curriculum: --task=arith only"),
        (teacher_context in caopd.TEMPLATES, "teacher_context", f"must be one of {list(caopd.TEMPLATES)}"),
        (loss in ("reverse", "forward", "jsd"), "loss", "must be 'reverse', 'forward' or 'jsd'"),
        (0 <= jsd_beta <= 1, "jsd_beta", "must be in [0, 1]"),
        (estimator in ("full", "topk", "sampled", "sampled_baseline"), "estimator",
         "must be 'full', 'topk', 'sampled' or 'sampled_baseline'"),
        (estimator == "full" or loss == "reverse", "estimator", "the other estimators are of the reverse KL: --loss=reverse"),
        (estimator_topk >= 1, "estimator_topk", "must be >= 1"),
        (K >= 1, "K", "must be >= 1"),
        (temperature >= 0, "temperature", "must be >= 0 (0 is greedy)"),
        (0 <= ema_rate <= 1, "ema_rate", "must be in [0, 1]"),
        (top_k >= 0, "top_k", "must be >= 0"),
        (min(steps, base_steps, skip_tokens) >= 0, "steps", "step counts and skip_tokens must be >= 0"),
        (min(prompts_per_step, base_batch, n_eval, max_new_tokens, threads, log_every, ckpt_every, max_bad_steps,
             eval_batch) >= 1, "prompts_per_step",
         "batch sizes, n_eval, max_new_tokens, threads, log_every, ckpt_every and max_bad_steps must be >= 1"),
        (n_embd % n_head == 0, "n_head", f"must divide n_embd ({n_embd})"),
        (lr > 0 and base_lr > 0, "lr", "learning rates must be > 0"),
        (0 <= min_lr <= lr, "min_lr", f"must be in [0, lr] (lr = {lr})"),
        (eval_every >= 0, "eval_every", "must be >= 0 (0 = only at the end)"),
        (base_conf_sigma > 0, "base_conf_sigma", "must be > 0"),
        (base_conf_shape >= 0, "base_conf_shape", "must be >= 0"),
        (device in ("auto", "cpu", "cuda", "mps"), "device", "must be 'auto', 'cpu', 'cuda' or 'mps'"),
        (prompts_per_step % world == 0, "prompts_per_step", f"must be divisible by the {world} processes"),
    ]
    for ok, key, why in checks:
        if not ok:
            die(f"--{key}={globals()[key]!r}: {why}")

def prepare_out_dir():
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        die(f"--out_dir={out_dir!r} is a file, not a directory")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        die(f"--out_dir={out_dir!r} cannot be created: {e.strerror}")
    try:  # a real write, not os.access: root passes access checks even on a read-only mount
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        die(f"--out_dir={out_dir!r} is not writable: {e.strerror}")

def write_atomic(path, data, mode="w"):
    """Write to a temporary file, flush it to disk, then rename: a reader (or a resumed run after a
    crash) sees the old file or the new one, never half of one."""
    tmp = path + ".tmp"
    with open(tmp, mode) as f:
        f.write(data) if isinstance(data, (str, bytes)) else torch.save(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

def load_checkpoint(path):
    """torch.load with weights_only=True (tensors and plain containers, no pickled code), and a
    clear error for a missing, truncated or corrupt file."""
    if not os.path.exists(path):
        die(f"{path}: no checkpoint to resume from")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a pickle that is not ours, ...: all mean the same here
        die(f"{path}: the checkpoint is truncated or corrupt ({type(e).__name__}); delete it to start over")

# -----------------------------------------------------------------------------
# tokens: the toy tiktoken encoding, or a Hugging Face tokenizer and its chat template

def encode(text):
    return tok.encode(text) if isinstance(tok, tiktoken.Encoding) else tok(text, add_special_tokens=False)["input_ids"]

def decode(ids):
    return tok.decode([t for t in ids if t != end_id])

def render(messages):
    """A chat -> prompt tokens: the tokenizer's chat template where it has one, else each
    message's text on its own lines (the toy: "question\n")."""
    if getattr(tok, "chat_template", None):
        return encode(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return encode("".join(m["content"].rstrip("\n") + "\n" for m in messages))

def confidence_value_ids():
    """The toy's stated confidences 0.0, 0.1, ..., 1.0: one token each (see caopd.toy_tokenizer)."""
    return [t for v in range(11) for t in encode(f" {v / 10:.1f}")]

def student_tokens(ex):
    return render(ex["messages"])

def teacher_tokens(ex, context, solution, shown, note):
    """The student's chat with the privileged context (template `context`) added to its last user
    turn; a system message stays as it is (the reference code once rebuilt the teacher prompt from
    the system turn and lost the question: see METHOD.md)."""
    messages = [dict(m) for m in ex["messages"]]
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[last]["content"] = caopd.teacher_prompt(context, messages[last]["content"], solution,
                                                     shown, note, decimals)
    return render(messages)

# -----------------------------------------------------------------------------
# tasks: held-out questions, a sampler of training questions, a verifier

def read_task_files():
    """science / tooluse: the training and held-out rows, checked line by line (before any model loads)."""
    rows = {}
    for split, path in (("train", data), ("eval", eval_data)):
        path = path or os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", task, f"{split}.jsonl")
        try:
            rows[split] = (path, tasks.load_rows(path, task))
        except ValueError as e:
            hint = f" (python data/{task}/prepare.py writes it)" if not os.path.exists(path) else ""
            die(f"{e}{hint}")
    return rows

def load_task(files, context):
    """(held-out examples, sample_train(rng, n), verify(example, text)). Examples too long for the
    model's context (teacher prompt + max_new_tokens) are skipped and counted."""
    if task == "arith":
        held, sample_train = arith.split(data_seed, n_eval)
        return held, sample_train, lambda ex, text: caopd.verify_arith(ex["answer"], text)
    rows = {}
    for split, (path, examples) in files.items():
        fits = [ex for ex in examples if len(teacher_tokens(ex, teacher_context, ex["reference"], 1.0, 1.0))
                + max_new_tokens <= context]
        if len(fits) < len(examples):
            first = next(ex["id"] for ex in examples if ex not in fits)
            print(f"{path}: skipped {len(examples) - len(fits)} of {len(examples)} questions longer than the context "
                  f"({context} tokens, with max_new_tokens={max_new_tokens}); the first: {first}")
        if not fits:
            die(f"{path}: no question fits the model's context of {context} tokens")
        rows[split] = fits
    train, verifier = rows["train"], caopd.VERIFIERS[task]
    return rows["eval"][:n_eval], lambda rng, n: [rng.choice(train) for _ in range(n)], \
        lambda ex, text: verifier(ex["answer"], text)

# -----------------------------------------------------------------------------
# checkpoints: one file per run, everything a resumed run needs to continue bit for bit

def save_checkpoint(stage, step, model, teacher, opt, rng, bad, skipped):
    """Called by rank 0 every ckpt_every steps and at the end of each stage."""
    if rank != 0:
        return
    t0 = time.time()
    write_atomic(ckpt_path, {
        "stage": stage, "step": step, "config": config, "model": model.state_dict(),
        "teacher": None if teacher is None else teacher.state_dict(), "optimizer": opt.state_dict(),
        "rng": {"python": rng.getstate(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "bad_steps": bad, "skipped": skipped}, "wb")
    if init_from != "scratch":  # a Hugging Face model is also exported with each checkpoint
        export_hf(model, os.path.join(out_dir, "hf"))
    tqdm.write(f"checkpoint: {stage} step {step} -> {ckpt_path} ({time.time() - t0:.1f}s)")

def restore(ck, model, teacher, opt, rng):
    model.load_state_dict(ck["model"])
    if teacher is not None:
        teacher.load_state_dict(ck["teacher"])
    opt.load_state_dict(ck["optimizer"])
    rng.setstate(ck["rng"]["python"])
    torch.set_rng_state(ck["rng"]["torch"])
    if ck["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
    return ck["step"], ck["bad_steps"], ck["skipped"]

def export_hf(model, path):
    """save_pretrained (safetensors) of a Hugging Face student and its tokenizer, swapped in whole:
    `path` always holds a complete model."""
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)

# -----------------------------------------------------------------------------
# stage 0: a base model that knows the format, hedges its confidence, and reads teacher contexts

def base_batch_rows(rng, sample_train):
    """Rows (prompt tokens, completion tokens, targets, soft): targets are the completion tokens with
    -1 where not trained; soft is None, or the shown confidence c whose neighbourhood the stated
    confidence (the token before END) is trained toward: a discretized Gaussian over 0.0 ... 1.0
    with standard deviation base_conf_sigma (see soft_confidence_loss).
    Two thirds of the rows are student format, where the arithmetic is learned, with a broad
    confidence prior, N(0.6, 0.3) on [0, 1], so reverse KL has probability mass to move (its
    gradient scales with the student's own probabilities). (Half and half gave a base right 0.30
    instead of 0.46 of the time in a development run on seed 1, and costs more: teacher rows are
    3x longer.)
    One third are teacher format, three ways, each with the soft target around the confidence c
    it is shown: c = 1.0 (plain OPD's context: else the teacher never says 1.0); c ~ U[0,1]; the
    same plus the Note line. (In a development run, a hard target for c = 1.0 made the teacher
    shown 1.0 far sharper than the parabola, and CaOPD's student said 1.0 to additions it got
    right 88% of the time.) Both teacher templates appear, with the reference answer as solution.
    In half of the Note rows the completion's answer is a wrong one (context only, not trained):
    the teacher must state the Note's value after a wrong rollout too. Otherwise it learns to grade
    each rollout against the demonstration (1.0 if it matches, 0.0 if not), information the
    student never has, and CaOPD's student learns to say 1.0 or 0.0 instead of P_acc."""
    rows = []
    for ex in sample_train(rng, base_batch):
        answer, way, soft = ex["reference"], None, None
        if rng.random() < 2 / 3:
            prompt, target = student_tokens(ex), -1.0
            while not 0.0 <= target <= 1.0:  # a truncated normal: clipping would pile mass on 0.0 and 1.0
                target = rng.gauss(0.6, 0.3)
        else:
            way = rng.randrange(3)
            target = soft = shown = 1.0 if way == 0 else round(rng.random(), decimals)
            prompt = teacher_tokens(ex, rng.choice(list(caopd.TEMPLATES)), ex["reference"], shown,
                                    shown if way == 2 else None)
        skip = 0
        if way == 2 and rng.random() < 0.5:  # a near miss: one digit off
            answer = f"Answer: {(ex['answer'] + rng.choice((-1, 1)) * 10 ** rng.randrange(4)) % 10000:04d}"
            skip = len(encode(answer + "\n"))
        tokens = encode(caopd.set_confidence(answer, target, decimals)) + [end_id]
        targets = [-1] * skip + tokens[skip:]
        if soft is not None:
            targets[-2] = -1  # the confidence token: trained toward the soft target instead
        rows.append((prompt, tokens, targets, soft))
    return rows

def soft_confidence_loss(logq, shown):
    """The teacher's stated confidence, trained soft: logq (n, 11) are the log-probabilities of the
    values 0.0 ... 1.0 at the confidence token, shown (n,) the value c in each row's context.
    Why: reverse KL toward the teachers of many questions makes the student their geometric mean,
    log s(v) = mean over questions of log t_c(v) + const, c being each question's P_acc. When
    log t_c(v) = -(v - c)^2 / (2 sigma^2) + const over the whole range, that mean peaks at the mean of
    the c: the student's most likely (greedy) value is the mean P_acc of the questions it cannot tell
    apart. A teacher with flat tails (hard targets plus a little noise) pulls it to whichever end is
    more common instead, and the student says only 0.0-0.1 or 0.9-1.0. So: cross-entropy toward
    w(v) ~ exp(-(v - c)^2 / (2 sigma^2)), plus base_conf_shape x the squared error of the centred
    log-probabilities against that parabola (cross-entropy alone hardly trains the far tails, whose
    weights are tiny). Returns the sum over rows."""
    values = torch.linspace(0, 1, logq.shape[1], dtype=logq.dtype, device=logq.device)
    parabola = -(values[None] - shown[:, None]) ** 2 / (2 * base_conf_sigma ** 2)  # (n, 11): log w + const
    error = (logq - logq.mean(1, keepdim=True)) - (parabola - parabola.mean(1, keepdim=True))
    return -(parabola.softmax(-1) * logq).sum() + base_conf_shape * error.pow(2).mean(1).sum()

def train_base(model, sample_train, ck=None):
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=base_lr, betas=(0.9, 0.99), weight_decay=0.0)
    start = restore(ck, model, None, opt, rng)[0] if ck else 0
    value_ids = confidence_value_ids()
    for step in tqdm(range(start, base_steps), desc="base (SFT)", mininterval=2, disable=rank != 0):
        frac = max(0.0, (step - base_warmup) / max(1, base_steps - base_warmup))
        for g in opt.param_groups:  # linear warm-up, then cosine to 0.1 x base_lr
            g["lr"] = base_lr * min((step + 1) / base_warmup, 0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        rows = sorted(base_batch_rows(rng, sample_train), key=lambda r: len(r[0]) + len(r[1]))  # by length
        # two passes, short rows and long rows, split where padding each to its longest row costs least
        # (the toy: student rows ~25 tokens, teacher rows ~85; halves would pad a third of the student rows)
        lens = [len(r[0]) + len(r[1]) for r in rows]
        k = min(range(1, len(rows) + 1), key=lambda k: k * lens[k - 1] + (len(rows) - k) * lens[-1])
        n_tokens, total = sum(sum(t >= 0 for t in r[2]) + (r[3] is not None) for r in rows), 0.0
        opt.zero_grad(set_to_none=True)
        for part in [p for p in (rows[:k], rows[k:]) if p]:
            prompts, completions, targets, soft = zip(*part)
            with autocast:
                h, _ = caopd.completion_hidden(model, prompts, completions)  # (B, L, C)
                targets = torch.tensor([t + [-1] * (h.shape[1] - len(t)) for t in targets], device=h.device)
                # cross-entropy on completion tokens only (the vocabulary is tiny, so full logits are fine here)
                logp = (h @ caopd.output_weight(model).T).float().log_softmax(-1)  # (B, L, V)
                ce = torch.nn.functional.nll_loss(logp.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="sum")
                i = [r for r, c in enumerate(soft) if c is not None]  # rows whose stated confidence is soft
                if i:
                    at = torch.tensor([len(completions[r]) - 2 for r in i])  # the confidence token, before END
                    ce = ce + soft_confidence_loss(logp[i, at][:, value_ids], torch.tensor([soft[r] for r in i],
                                                                                            device=logp.device))
                ce = ce / n_tokens
            ce.backward()
            total += ce.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % (log_every * 4) == 0 or step == base_steps - 1:
            tqdm.write(f"base step {step:4d} | cross-entropy {total:.4f}")
        if (step + 1) % ckpt_every == 0 and step + 1 < base_steps:
            save_checkpoint("base", step + 1, model, None, opt, rng, 0, 0)

# -----------------------------------------------------------------------------
# stage 1: on-policy distillation, OPD or CaOPD

def all_mean(t):
    """The mean of a tensor over the data-parallel processes (itself with one process)."""
    if world > 1:
        dist.all_reduce(t)
        t /= world
    return t

def rollout_batch(model, method, exs, verify, step, rows):
    """Steps 1-3 of a distillation step for this process's questions exs: K rollouts each, their
    verdicts and P_acc, then the training completions and the teacher's prompts.
    Returns (prompts, completions, teacher_prompts, rollout texts, verdicts, P_acc)."""
    # 1. K rollouts per prompt, all in one batched call. The random numbers of step s come from
    # a generator seeded by s: the same rollouts after a resume, and for any number of processes
    prompts = [p for p in map(student_tokens, exs) for _ in range(K)]  # each question rendered once
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    with autocast:
        rollouts = caopd.sample(model, prompts, max_new_tokens, end_id, temperature, top_k, gen, rows=rows)
    texts = [decode(r) for r in rollouts]
    # 2. verify them; P_acc per prompt
    correct = [verify(exs[i // K], t) for i, t in enumerate(texts)]
    p_acc = caopd.empirical_confidence(correct, K, smooth_p_acc)
    # 3. the training completions and the teacher's prompts
    completions, teacher_prompts = [], []
    for g, ex in enumerate(exs):
        group = range(g * K, g * K + K)  # this question's K rollouts
        solution = ex["reference"]
        if teacher_context == "correct_solution":  # first verified rollout of this prompt, else the reference
            solution = next((texts[j] for j in group if correct[j]), solution)
        for i in group:
            text = texts[i]
            tokens, shown, note = rollouts[i], 1.0, None  # plain OPD: the teacher is shown certainty
            if method == "caopd":  # the one change: P_acc in the completion, the solution and a Note
                text, shown, note = caopd.with_empirical_confidence(text, p_acc[g], decimals)
                # re-encoded: the body keeps at most the rollout's own budget of tokens (a rollout of
                # stray bytes decodes to U+FFFD, 3 bytes each, and would come back 3x longer)
                body, value = text.rsplit("Confidence:", 1)
                tokens = encode(body)[:max_new_tokens] + encode("Confidence:" + value) + [end_id]
            completions.append(tokens)
        # one teacher prompt per question: the K rollouts share solution, shown confidence and Note
        teacher_prompts += [teacher_tokens(ex, teacher_context, solution, shown, note)] * K
    return prompts, completions, teacher_prompts, texts, correct, p_acc

def kl_loss(model, teacher, prompts, completions, teacher_prompts):
    """Step 4: the per-token divergence to the teacher on the same completion tokens, averaged over
    a sequence's tokens, then over sequences. Returns (loss, student hidden states (B, L, C),
    teacher hidden states, counted positions (B, L))."""
    with autocast:
        hs, lens = caopd.completion_hidden(model, prompts, completions)  # (BK, L, C)
        with torch.no_grad():
            ht, _ = caopd.completion_hidden(teacher, teacher_prompts, completions)
        j = torch.arange(hs.shape[1], device=hs.device)
        counted = (j[None] < torch.tensor(lens, device=hs.device)[:, None]) & (j[None] >= skip_tokens)  # (BK, L)
        weight = counted / counted.sum(1, keepdim=True).clamp(min=1)  # mean over a sequence's tokens, then over sequences
        args = (hs.flatten(0, 1), caopd.output_weight(model), ht.flatten(0, 1), caopd.output_weight(teacher),
                weight.flatten())
        if estimator == "full":
            kl = caopd.fused_linear_kl(*args, kind=loss, beta=jsd_beta)
        elif estimator == "topk":
            kl = caopd.topk_tail_kl(*args, estimator_topk)
        else:  # the sampled token: the completion token each position predicts
            tokens = torch.tensor([c + [0] * (hs.shape[1] - len(c)) for c in completions], device=hs.device)  # (BK, L)
            kl = caopd.sampled_kl(*args, tokens.flatten(), baseline=estimator == "sampled_baseline")
    return kl, hs, ht, counted

@torch.no_grad()
def entropy_stats(step, model, teacher, prompts, completions, hs, ht, counted):
    """Mean per-token entropy (nats) of the student, of the teacher with its privileged context,
    and of the teacher on the student's prompt (no context), on the completion tokens: answer
    digits, the confidence value, and all counted tokens. For experiments.py entropy."""
    h0, _ = caopd.completion_hidden(teacher, prompts, completions)  # the teacher without its context
    tokens = torch.tensor([c + [-1] * (hs.shape[1] - len(c)) for c in completions])  # (B, L)
    digit_ids = [t for d in "0123456789" for t in encode(d)]
    parts = {"answer": torch.isin(tokens, torch.tensor(digit_ids)) & counted.cpu(),
             "confidence": torch.isin(tokens, torch.tensor(confidence_value_ids())) & counted.cpu(), "all": counted.cpu()}
    row = {"step": step}
    for who, h, w in (("student", hs, caopd.output_weight(model)), ("teacher", ht, caopd.output_weight(teacher)),
                      ("teacher_no_context", h0, caopd.output_weight(teacher))):
        ent = caopd.entropy(h.flatten(0, 1).detach(), w).view(h.shape[:2]).cpu()  # (B, L)
        for part, sel in parts.items():
            row[f"{who}_{part}"] = ent[sel].mean().item() if sel.any() else float("nan")
    return row

def distill(model, method, sample_train, verify, ck=None, entropy_log=None, held=None):
    """Stage 1 on model, in place. entropy_log: a list to append entropy_stats() to every log_every
    steps; held: the held-out questions, evaluated every eval_every steps."""
    rng = random.Random(seed + 1)  # OPD and CaOPD see the same questions
    teacher = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    start, bad, skipped = restore(ck, model, teacher, opt, rng) if ck else (0, 0, 0)
    n = prompts_per_step // world  # this process's prompts: rank n .. rank n + n - 1 of each step's batch
    t0 = time.time()
    for step in tqdm(range(start, steps), desc=method, mininterval=2, disable=rank != 0):
        # cosine from lr to min_lr. The stated confidence follows the P_acc of the last few batches:
        # with min_lr = 0.1 x lr it still swung by up to 0.1 between evaluations 10 steps apart
        # (--eval_every=10); decayed to 0, the final model averages over its last stretch of steps
        for g in opt.param_groups:
            g["lr"] = min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * step / steps))
        exs = sample_train(rng, prompts_per_step)[rank * n:rank * n + n]
        prompts, completions, teacher_prompts, texts, correct, p_acc = rollout_batch(
            model, method, exs, verify, step, (rank * n * K, prompts_per_step * K))
        kl, hs, ht, counted = kl_loss(model, teacher, prompts, completions, teacher_prompts)
        if entropy_log is not None and step % log_every == 0:
            entropy_log.append(entropy_stats(step, model, teacher, prompts, completions, hs, ht, counted))
        opt.zero_grad(set_to_none=True)
        kl.backward()
        for p in model.parameters():  # what DistributedDataParallel does: average the gradients
            if world > 1 and p.grad is not None:
                all_mean(p.grad)
        stated = [c for c in map(caopd.parse_confidence, texts) if c is not None]
        stats = all_mean(torch.tensor([kl.item(), sum(correct) / len(correct), sum(p_acc) / len(p_acc),
                                       sum(stated) / max(1, len(stated)), len(stated) / len(texts)], dtype=torch.float64))
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if not (math.isfinite(stats[0]) and torch.isfinite(norm)):  # skip the update, keep the last good state
            bad, skipped = bad + 1, skipped + 1
            tqdm.write(f"warning: {method} step {step}: non-finite {'loss' if not math.isfinite(stats[0]) else 'gradient'}"
                       f", update skipped ({bad} in a row, {skipped} in this stage)")
            if bad >= max_bad_steps:
                die(f"{method} step {step}: {bad} non-finite steps in a row (--max_bad_steps={max_bad_steps}); "
                    f"the last good checkpoint is {ckpt_path} (--init_from=resume continues from it)", code=1)
        else:
            bad = 0
            opt.step()
            caopd.ema_update(teacher, model, ema_rate)
        if step % log_every == 0 or step == steps - 1:
            tqdm.write(f"{method:5s} step {step:4d} | {loss} KL {stats[0]:.4f} | rollout acc {stats[1]:.3f}"
                       f" | P_acc {stats[2]:.3f} | stated conf {stats[3]:.3f} | format {stats[4]:.2f} | {time.time() - t0:.1f}s")
        if held and eval_every and (step + 1) % eval_every == 0 and rank == 0:
            m, _ = evaluate(model, method, held, verify)
            tqdm.write(f"{method:5s} step {step + 1:4d} | held-out acc {m['accuracy']:.3f} | conf {m['mean_confidence']:.3f}"
                       f" | ECE {m['ece']:.3f} | OCG {m['ocg']:+.3f} | SPR {m['spr']:.3f} | AUROC {m['auroc']:.3f}")
        if (step + 1) % ckpt_every == 0 and step + 1 < steps:
            save_checkpoint(method, step + 1, model, teacher, opt, rng, bad, skipped)
    save_checkpoint(method, steps, model, teacher, opt, rng, bad, skipped)
    return skipped

# -----------------------------------------------------------------------------
# evaluation: greedy answers to the held-out questions, student prompt only

@torch.no_grad()
def evaluate(model, name, held, verify):
    records = []
    for i in range(0, len(held), eval_batch):
        exs = held[i:i + eval_batch]
        with autocast:
            completions = caopd.sample(model, [student_tokens(ex) for ex in exs], max_new_tokens, end_id, temperature=0)
        for ex, r in zip(exs, completions):
            text = decode(r)
            records.append({"model": name, "id": ex["id"], "answer": ex["answer"], "completion": text,
                            "correct": verify(ex, text), "confidence": caopd.parse_confidence(text)})
            if "kind" in ex:
                records[-1]["kind"] = ex["kind"]
    metrics = caopd.calibration_metrics([r["correct"] for r in records], [r["confidence"] or 0.0 for r in records])
    metrics["format_rate"] = sum(r["confidence"] is not None for r in records) / len(records)
    raw = [caopd.parse_confidence(r["completion"], clip=False) for r in records]
    metrics["clipped_rate"] = sum(c is not None and not 0 <= c <= 1 for c in raw) / len(records)  # stated outside [0, 1]
    return metrics, records

def reliability_diagram(results, path, columns=None):
    """Accuracy per confidence bin for each model, bin counts written on the bars; panels in rows
    of `columns` (default: one row)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = columns or len(results)
    rows = math.ceil(len(results) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(results):]:
        ax.axis("off")
    for ax, (name, (m, records)) in zip(axes.flat, results.items()):
        conf = torch.tensor([r["confidence"] or 0.0 for r in records], dtype=torch.float64)
        corr = torch.tensor([float(r["correct"]) for r in records], dtype=torch.float64)
        bins = caopd.confidence_bin(conf)  # the bins of ECE
        for b in range(10):
            sel = bins == b
            if sel.any():
                acc = corr[sel].mean().item()
                ax.bar(b / 10 + 0.05, acc, width=0.09, color="tab:blue", edgecolor="black")
                ax.text(b / 10 + 0.05, acc + 0.02, str(int(sel.sum())), ha="center", fontsize=7)
        ax.plot([0, 1], [0, 1], "--", color="gray")
        ax.set(xlim=(0, 1), ylim=(0, 1.08), xlabel="stated confidence", ylabel="accuracy",
               title=f"{name}: acc {m['accuracy']:.2f}, conf {m['mean_confidence']:.2f}, ECE {m['ece']:.3f}")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)

# -----------------------------------------------------------------------------

def cached_base(base, sample_train, cache_dir, ck=None):
    """Stage 0 into `base`, cached in cache_dir as base-<hash of its settings>.pt: the same settings
    give the same base, so it is trained once and reused. Returns the file's path."""
    # n_eval too: the held-out questions are left out of training, so they change the training stream
    base_settings = {k: config[k] for k in ("init_from", "seed", "data_seed", "n_eval", "n_layer", "n_head", "n_embd",
                                            "block_size", "base_steps", "base_batch", "base_lr", "base_warmup",
                                            "base_conf_sigma", "base_conf_shape")}
    # editing the curriculum or its loss must not reuse a stale base
    curriculum = [inspect.getsource(f) for f in (base_batch_rows, soft_confidence_loss, train_base)]
    key = hashlib.sha256(json.dumps([base_settings, caopd.output_weight(base).shape[0], caopd.TEMPLATES,
                                     curriculum]).encode()).hexdigest()[:12]
    base_path = os.path.join(cache_dir, f"base-{key}.pt")
    if os.path.exists(base_path):
        base.load_state_dict(load_checkpoint(base_path)["model"])
        print(f"reusing base model {base_path}")
    elif rank == 0:
        train_base(base, sample_train, ck)
        write_atomic(base_path, {"model": base.state_dict(), "settings": base_settings}, "wb")
    if world > 1:  # rank 0 trained it; the others read it
        dist.barrier()
        base.load_state_dict(load_checkpoint(base_path)["model"])
    return base_path

def load_model():
    """(model, tokenizer, context length): our GPT and the toy tokenizer, or a Hugging Face causal LM
    (bfloat16 on CUDA, float32 elsewhere) and its tokenizer."""
    if init_from == "scratch":
        enc = caopd.toy_tokenizer(arith.VOCAB_TEXT)
        cfg = caopd.GPTConfig(vocab_size=enc.n_vocab, block_size=block_size, n_layer=n_layer, n_head=n_head,
                              n_embd=n_embd)
        torch.manual_seed(seed)
        return caopd.GPT(cfg).to(device), enc, enc.eot_token, block_size
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging
    logging.disable_progress_bar()  # keep stderr for errors
    try:
        hf_tok = AutoTokenizer.from_pretrained(init_from)
        model = AutoModelForCausalLM.from_pretrained(init_from, dtype=torch.bfloat16 if "cuda" in device else torch.float32)
    except (OSError, ValueError) as e:
        die(f"--init_from={init_from!r} is neither 'scratch', 'resume' nor a loadable Hugging Face model "
            f"({str(e).strip().splitlines()[0][:200]})")
    if hf_tok.eos_token_id is None:
        die(f"--init_from={init_from!r}: the tokenizer has no eos token to end completions with")
    if not getattr(hf_tok, "chat_template", None):
        print(f"{init_from}: no chat template, prompts are plain text")
    context = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    return model.to(device), hf_tok, hf_tok.eos_token_id, context

def main(argv):
    global tok, end_id, decimals, config, ckpt_path, rank, world, autocast, device
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    given = parse_args(argv)
    prepare_out_dir()
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    ck = None
    if init_from == "resume":  # the run's own settings, then on from its stage and step
        ck = load_checkpoint(ckpt_path)
        globals().update({k: v for k, v in ck["config"].items() if k not in given - {"init_from"}})
        print(f"resuming {ck['stage']} at step {ck['step']} from {ckpt_path}")
        check_settings()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if world > 1:  # torchrun: nccl on CUDA, gloo on CPU
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
        if device == "cuda":
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
    torch.set_num_threads(threads)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if "cuda" in device else nullcontext()
    config = {k: globals()[k] for k in config_keys}
    t_start, seconds, skipped = time.time(), {}, {}

    files = None if task == "arith" else read_task_files()
    base, tok, end_id, context = load_model()
    decimals = arith.DECIMALS if init_from == "scratch" else 2  # the paper's "Confidence: X.XX" for real tokenizers
    held, sample_train, verify = load_task(files, context)
    print(f"device {device}, {world} process(es), {threads} thread(s), vocabulary {caopd.output_weight(base).shape[0]} "
          f"tokens, {len(held)} held-out questions, model {sum(p.numel() for p in base.parameters()) / 1e6:.2f}M parameters")
    methods = ["opd", "caopd"] if method == "both" else [method]
    stages = (["base"] if base_steps else []) + methods
    at = stages.index(ck["stage"]) if ck else -1  # stages before it are finished; it continues from ck

    # stage 0, cached: the same settings give the same base, so it is trained once and reused
    t0 = time.time()
    if base_steps:
        cached_base(base, sample_train, out_dir, ck if at == 0 else None)
    seconds["base"] = time.time() - t0
    models = {"base": base}

    for m in methods:
        t0 = time.time()
        i, path = stages.index(m), os.path.join(out_dir, f"{m}.pt")
        models[m] = copy.deepcopy(base)
        if i < at:  # finished before the interruption
            saved = load_checkpoint(path)
            models[m].load_state_dict(saved["model"])
            skipped[m] = saved["skipped"]
        else:
            skipped[m] = distill(models[m], m, sample_train, verify, ck if i == at else None, held=held)
            if rank == 0:
                write_atomic(path, {"model": models[m].state_dict(), "config": config, "skipped": skipped[m]}, "wb")
                if init_from != "scratch":
                    export_hf(models[m], os.path.join(out_dir, "hf" if m == stages[-1] else f"hf-{m}"))
        seconds[m] = time.time() - t0
    if rank != 0:
        dist.destroy_process_group()
        return

    t0 = time.time()
    results = {name: evaluate(model, name, held, verify) for name, model in models.items()}
    seconds["eval"] = time.time() - t0

    print(f"\n{'model':6s} {'acc':>6s} {'conf':>6s} {'ECE':>6s} {'Brier':>6s} {'OCG':>7s} {'SPR':>6s} {'AUROC':>6s} {'format':>6s}")
    for name, (m, _) in results.items():
        print(f"{name:6s} {m['accuracy']:6.3f} {m['mean_confidence']:6.3f} {m['ece']:6.3f} {m['brier']:6.3f} "
              f"{m['ocg']:+7.3f} {m['spr']:6.3f} {m['auroc']:6.3f} {m['format_rate']:6.3f}")
    for name, (_, records) in results.items():
        right = [r for r in records if r["correct"]][:2]
        wrong = [r for r in records if not r["correct"]][:2]
        for r in right + wrong:
            print(f"  {name:5s} {'right' if r['correct'] else 'wrong'}  {r['id']} = {str(r['answer'])[:40]:<5s} -> "
                  + r["completion"].replace("\n", " | ")[:300])

    write_atomic(os.path.join(out_dir, "completions.jsonl"),
                 "".join(json.dumps(r) + "\n" for _, records in results.values() for r in records))
    reliability_diagram(results, os.path.join(out_dir, "reliability.png"))
    seconds["total"] = time.time() - t_start
    write_atomic(os.path.join(out_dir, "results.json"), json.dumps(
        {"config": config, "models": {n: m for n, (m, _) in results.items()}, "skipped_updates": skipped,
         "seconds": seconds}, indent=2) + "\n")
    print(f"\nwrote {out_dir}/results.json, reliability.png, completions.jsonl in {seconds['total']:.0f}s")
    if world > 1:
        dist.destroy_process_group()

if __name__ == "__main__":
    main(sys.argv[1:])
