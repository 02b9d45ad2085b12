"""
Stage 0 of the toy: train the small GPT from scratch into a base model that CaOPD can start from.

Distillation needs a student that already answers in the format ("Answer: 0322\nConfidence: 0.7"),
states a confidence it is not yet sure of (so reverse KL has probability mass to move), and a
teacher (the same network) that reads the privileged contexts and states the confidence it is
shown. A pretrained model brings all that; ours learns it here, supervised, in one curriculum:

    base_batch_rows()       the rows: student format, and teacher format three ways
    soft_confidence_loss()  why the teacher's stated confidence is trained toward a parabola
    train_base()            the loop (AdamW, warm-up then cosine, cross-entropy on completions)
    cached_base()           train once per set of settings, reuse the file after that

train_small.py calls cached_base() before distilling; nothing here is needed for a real model.
"""
import hashlib
import inspect
import json
import math
import os
import random
import time
from types import SimpleNamespace

import torch
from tqdm import tqdm

import caopd
import cli
import parallel
import run_dir
import tokenizer
from data import arith
from tokenizer import encode, student_tokens, teacher_tokens

# The teacher contexts the base learns to read: the paper's two. A template added to caopd.TEMPLATES
# later is not among them, so it changes neither the base nor its cache key (and the toy's teacher
# meets it for the first time when distilling).
BASE_TEMPLATES = ("demo", "correct_solution")

def base_batch_rows(cfg, tok, rng, sample_train):
    """Rows (prompt tokens, completion tokens, targets, soft): targets are the completion tokens with
    -1 where not trained; soft is None, or the shown confidence c whose neighbourhood the stated
    confidence (the token before END) is trained toward: a discretized Gaussian over 0.0 ... 1.0
    with standard deviation base_conf_sigma (see soft_confidence_loss).
    Two thirds of the rows are student format, where the arithmetic is learned, with a broad
    confidence prior, N(0.6, 0.3) on [0, 1], so reverse KL has probability mass to move (its
    gradient scales with the student's own probabilities). Teacher rows are 3x longer, and fewer
    of them leave more of the budget to the arithmetic (docs/notebook.md has the measurements).
    One third are teacher format, three ways, each with the soft target around the confidence c
    it is shown: c = 1.0 (plain OPD's context: else the teacher never says 1.0); c ~ U[0,1]; the
    same plus the Note line. The target is soft for c = 1.0 too: a teacher far sharper there than
    the parabola would pull a student to 1.0 where its success rate is lower. Both teacher
    templates appear (BASE_TEMPLATES), with the reference answer as solution.
    In half of the Note rows the completion's answer is a wrong one (context only, not trained):
    the teacher must state the Note's value after a wrong rollout too. Otherwise it learns to grade
    each rollout against the demonstration (1.0 if it matches, 0.0 if not), information the
    student never has, and CaOPD's student learns to say 1.0 or 0.0 instead of P_acc."""
    rows, places = [], tokenizer.decimals(tok)
    for ex in sample_train(rng, cfg.base_batch):
        answer, way, soft = ex["reference"], None, None
        if rng.random() < 2 / 3:
            prompt, target = student_tokens(tok, ex, cfg.enable_thinking), -1.0
            while not 0.0 <= target <= 1.0:  # a truncated normal: clipping would pile mass on 0.0 and 1.0
                target = rng.gauss(0.6, 0.3)
        else:
            way = rng.randrange(3)
            target = soft = shown = 1.0 if way == 0 else round(rng.random(), places)
            context = dict(template=rng.choice(BASE_TEMPLATES), solution=ex["reference"], confidence=shown,
                           note=shown if way == 2 else None)
            prompt = teacher_tokens(tok, ex, context, cfg.enable_thinking)
        skip = 0
        if way == 2 and rng.random() < 0.5:  # a near miss: one digit off
            answer = f"Answer: {(ex['answer'] + rng.choice((-1, 1)) * 10 ** rng.randrange(4)) % 10000:04d}"
            skip = len(encode(tok, answer + "\n"))
        tokens = encode(tok, caopd.set_confidence(answer, target, places)) + [tokenizer.end_id(tok)]
        targets = [-1] * skip + tokens[skip:]
        if soft is not None:
            targets[-2] = -1  # the confidence token: trained toward the soft target instead
        rows.append((prompt, tokens, targets, soft))
    return rows

def soft_confidence_loss(logq, shown, sigma, shape):
    """The teacher's stated confidence, trained soft: logq (n, 11) are the log-probabilities of the
    values 0.0 ... 1.0 at the confidence token, shown (n,) the value c in each row's context.
    Why a parabola: the student states the mean P_acc of the questions it cannot tell apart when
    each teacher's log t_c(v) is -(v - c)^2 / (2 sigma^2) + const over the whole range (the geometric
    mean of such teachers peaks at the mean of their c: caopd.py, above distillation_targets). A
    teacher with flat tails (hard targets plus a little noise) pulls it to whichever end is more
    common instead, and the student says only 0.0-0.1 or 0.9-1.0. So: cross-entropy toward
    w(v) ~ exp(-(v - c)^2 / (2 sigma^2)), plus `shape` x the squared error of the centred
    log-probabilities against that parabola (cross-entropy alone hardly trains the far tails, whose
    weights are tiny). Returns the sum over rows."""
    values = torch.linspace(0, 1, logq.shape[1], dtype=logq.dtype, device=logq.device)
    parabola = -(values[None] - shown[:, None]) ** 2 / (2 * sigma ** 2)  # (n, 11): log w + const
    error = (logq - logq.mean(1, keepdim=True)) - (parabola - parabola.mean(1, keepdim=True))
    return -(parabola.softmax(-1) * logq).sum() + shape * error.pow(2).mean(1).sum()

def train_base(cfg, model, tok, sample_train, ck=None, log=None):
    """The loop. log(record): the training log (metrics_log.metrics_log), given each printed step."""
    rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.base_lr, betas=(0.9, 0.99), weight_decay=0.0)
    start = run_dir.restore(ck, model, None, opt, rng)[0] if ck else 0
    value_ids = tokenizer.confidence_value_ids(tok)
    autocast = cli.autocast(cfg)
    trained = seconds = 0.0  # trained tokens and seconds since the last logged step: its throughput
    for step in tqdm(range(start, cfg.base_steps), desc="base (SFT)", mininterval=2, disable=parallel.RANK != 0):
        t = time.perf_counter()
        frac = max(0.0, (step - cfg.base_warmup) / max(1, cfg.base_steps - cfg.base_warmup))
        for g in opt.param_groups:  # linear warm-up, then cosine to 0.1 x base_lr
            g["lr"] = cfg.base_lr * min((step + 1) / cfg.base_warmup, 0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        rows = sorted(base_batch_rows(cfg, tok, rng, sample_train), key=lambda r: len(r[0]) + len(r[1]))  # by length
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
                    shown = torch.tensor([soft[r] for r in i], device=logp.device)
                    ce = ce + soft_confidence_loss(logp[i, at][:, value_ids], shown, cfg.base_conf_sigma,
                                                   cfg.base_conf_shape)
                ce = ce / n_tokens
            ce.backward()
            total += ce.item()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        trained, seconds = trained + n_tokens, seconds + time.perf_counter() - t
        if step % cfg.log_every == 0 or step == cfg.base_steps - 1:
            if log:  # logged first: a printed step is in metrics.jsonl
                log({"kind": "train", "stage": "base", "method": None, "step": step, "loss": total,
                     "lr": opt.param_groups[0]["lr"], "grad_norm": norm.item(),
                     "train_tokens_per_s": trained / seconds})
            tqdm.write(f"base step {step:4d} | cross-entropy {total:.4f}")
            trained = seconds = 0.0
        if (step + 1) % cfg.ckpt_every == 0 and step + 1 < cfg.base_steps:
            run_dir.save_checkpoint(cfg, tok, "base", step + 1, model, None, opt, rng, 0, 0, quiet=True)

def _settings(cfg):
    return {k: getattr(cfg, k) for k in ("init_from", "seed", "data_seed", "n_layer", "n_head", "n_embd",
                                         "block_size", "base_steps", "base_batch", "base_lr", "base_warmup",
                                         "base_conf_sigma", "base_conf_shape", "arith_ops", "arith_digits", "grad_clip")}

def cache_path(cfg, base, cache_dir):
    """cache_dir/base-<hash of the settings and code that make the base>.pt."""
    # editing the curriculum, its loss or the held-out rule must not reuse a stale base
    curriculum = [inspect.getsource(f) for f in (base_batch_rows, soft_confidence_loss, train_base, arith.is_held,
                                                 arith.make_example)] + [arith.HELD_FRACTION, arith.QUESTION]
    templates = [{t: caopd.TEMPLATES[t] for t in BASE_TEMPLATES}, caopd.NOTE]
    key = hashlib.sha256(json.dumps([_settings(cfg), caopd.output_weight(base).shape[0], templates,
                                     curriculum]).encode()).hexdigest()[:12]
    return os.path.join(cache_dir, f"base-{key}.pt")

def check_cache(cfg, base, path):
    """Whether the cached base at path is there; one that is not these settings' base (its
    settings, names, shapes, dtypes) is one line. Read before anything is written."""
    if not os.path.exists(path):
        return False
    cache = run_dir.check_file(path, run_dir.load_checkpoint(path), ("model", "settings"), base, run=False,
                               then="delete it: the next run trains the base again")
    if cache["settings"] != _settings(cfg):
        cli.die(f"{path}: the base of other settings; delete it: the next run trains the base again")
    return True

def cached_base(cfg, base, tok, sample_train, cache_dir, ck=None, log=None, again=False):
    """Stage 0 into `base`, cached in cache_dir (cache_path): the same settings give the same base,
    so it is trained once and reused. log: see train_base. again: a resumed run whose stage 0 was
    over when its cache went missing trains it again quietly (no line logged twice, no checkpoint
    over its later one). Returns the file's path."""
    path = cache_path(cfg, base, cache_dir)
    if check_cache(cfg, base, path):
        base.load_state_dict(run_dir.load_checkpoint(path)["model"])
        print(f"reusing base model {path}")
    elif parallel.RANK == 0:
        if again:  # no line (they are in metrics.jsonl) and no checkpoint (ckpt.pt holds a later stage)
            print(f"training the base again: {path} is missing (the run's stage 0 was over)")
            cfg, log = SimpleNamespace(**{**vars(cfg), "ckpt_every": cfg.base_steps}), None
        train_base(cfg, base, tok, sample_train, ck, log)
        run_dir.write_atomic(path, {"model": base.state_dict(), "settings": _settings(cfg)}, "wb")
    if parallel.WORLD > 1:  # rank 0 trained it; the others read it
        import torch.distributed as dist
        dist.barrier()
        base.load_state_dict(run_dir.load_checkpoint(path)["model"])
    return path
