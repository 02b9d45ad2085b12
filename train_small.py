"""
Watch on-policy distillation become overconfident, and CaOPD stay calibrated, on a laptop.

Stage 0 trains a small GPT from scratch on a toy arithmetic task (the "base" model). Stage 1
distills it on-policy toward an EMA teacher that sees a worked demonstration: once as plain
OPD, once as CaOPD, from the same base with the same seed. Then all three answer the same
held-out questions (greedy) and we compare accuracy and calibration.

    python train_small.py                          # everything, a few minutes on 2 CPU cores
    python train_small.py --method=caopd --seed=1  # one method, another seed
    python train_small.py --smoke=True             # the whole pipeline in seconds (machinery only)

Every global below is a setting: override it as --key=value (the type must match).
"""
import copy
import hashlib
import inspect
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict

import torch
from tqdm import tqdm

import caopd
from data import arith

# -----------------------------------------------------------------------------
# settings
# I/O
out_dir = "out"            # results.json, reliability.png, completions.jsonl, the cached base model
seed = 0                   # training seed (base model, rollouts); OPD and CaOPD share it
method = "both"            # "opd", "caopd", or "both" (OPD then CaOPD from the same base)
smoke = False              # shrink every stage to check the machinery in seconds (not the science)
# task
data_seed = 0              # fixes the held-out questions, so every run is scored on the same ones
n_eval = 1000              # held-out questions
# model (trained from scratch in stage 0)
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128           # the longest toy teacher prompt + completion is ~90 tokens
# stage 0: supervised base model
base_steps = 500
base_batch = 64
base_lr = 2e-3
base_warmup = 100          # linear warm-up steps, then cosine decay to 0.1 x base_lr
# rollouts
steps = 300                # distillation steps, per method
prompts_per_step = 16
K = 8                      # rollouts per prompt; P_acc = correct / K
temperature = 1.0
top_k = 0                  # 0 = sample from the full vocabulary
max_new_tokens = 12        # "Answer: 6887\nConfidence: 0.7<|endoftext|>" is 11 tokens
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
lr = 3e-4                   # 1e-4 left seed 1 stuck underconfident after 300 CaOPD steps (mean conf 0.10 at acc 0.38)
grad_clip = 1.0
# system
device = "auto"            # "auto" (cuda, then mps, then cpu), "cpu", "cuda", "mps"
threads = 1                # torch CPU threads; 1 is steady on a shared 2-core machine
log_every = 25             # steps between printed lines
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (bool, int, float, str))]
SMOKE = dict(base_steps=40, base_batch=16, base_warmup=10, steps=4, prompts_per_step=4, K=4, n_eval=64, log_every=2)
# -----------------------------------------------------------------------------

def die(msg):
    """A bad setting or path: one line, exit code 2, nothing written."""
    print(f"train_small.py: error: {msg}", file=sys.stderr)
    sys.exit(2)

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
    if smoke:
        globals().update({k: v for k, v in SMOKE.items() if k not in given})
    checks = [
        (method in ("opd", "caopd", "both"), "method", "must be 'opd', 'caopd' or 'both'"),
        (teacher_context in caopd.TEMPLATES, "teacher_context", f"must be one of {list(caopd.TEMPLATES)}"),
        (loss in ("reverse", "forward", "jsd"), "loss", "must be 'reverse', 'forward' or 'jsd'"),
        (0 <= jsd_beta <= 1, "jsd_beta", "must be in [0, 1]"),
        (K >= 1, "K", "must be >= 1"),
        (temperature >= 0, "temperature", "must be >= 0 (0 is greedy)"),
        (0 <= ema_rate <= 1, "ema_rate", "must be in [0, 1]"),
        (top_k >= 0, "top_k", "must be >= 0"),
        (min(steps, base_steps, skip_tokens) >= 0, "steps", "step counts and skip_tokens must be >= 0"),
        (min(prompts_per_step, base_batch, n_eval, max_new_tokens, threads, log_every) >= 1,
         "prompts_per_step", "batch sizes, n_eval, max_new_tokens, threads and log_every must be >= 1"),
        (n_embd % n_head == 0, "n_head", f"must divide n_embd ({n_embd})"),
        (lr > 0 and base_lr > 0, "lr", "learning rates must be > 0"),
        (device in ("auto", "cpu", "cuda", "mps"), "device", "must be 'auto', 'cpu', 'cuda' or 'mps'"),
    ]
    for ok, key, why in checks:
        if not ok:
            die(f"--{key}={globals()[key]!r}: {why}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        die(f"--out_dir={out_dir!r} is a file, not a directory")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        die(f"--out_dir={out_dir!r} cannot be created: {e.strerror}")
    if not os.access(out_dir, os.W_OK):
        die(f"--out_dir={out_dir!r} is not writable")

def write_atomic(path, data, mode="w"):
    """Write to a temporary file, then rename: a reader never sees half a file."""
    tmp = path + ".tmp"
    with open(tmp, mode) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

# -----------------------------------------------------------------------------
# stage 0: a base model that knows the format, hedges its confidence, and reads teacher contexts

def base_batch_rows(rng, sample_train):
    """Rows (prompt tokens, completion tokens, targets: completion tokens with -1 where not trained).
    Half student format with a broad confidence prior, N(0.6, 0.3) on [0, 1], so reverse KL has
    probability mass to move (its gradient scales with the student's own probabilities). Half
    teacher format, three ways: shown confidence 1.0 and target 1.0 (else the teacher never says
    1.0); shown c ~ U[0,1] and target c + N(0, 0.07) (the noise keeps the teacher soft); the same
    plus the Note line. Both teacher templates appear, with the reference answer as solution.
    In half of the Note rows the completion's answer is a wrong one (context only, not trained):
    the teacher must state the Note's value after a wrong rollout too. Otherwise it learns to grade
    each rollout against the demonstration (1.0 if it matches, 0.0 if not), information the
    student never has, and CaOPD's student learns to say 1.0 or 0.0 instead of P_acc."""
    rows = []
    for ex in sample_train(rng, base_batch):
        answer, way = ex["reference"], None
        if rng.random() < 0.5:
            prompt, target = caopd.student_prompt(ex["question"]), -1.0
            while not 0.0 <= target <= 1.0:  # a truncated normal: clipping would pile mass on 0.0 and 1.0
                target = rng.gauss(0.6, 0.3)
        else:
            way = rng.randrange(3)
            shown = 1.0 if way == 0 else rng.random()
            target = 1.0 if way == 0 else min(1.0, max(0.0, shown + rng.gauss(0, 0.07)))
            prompt = caopd.teacher_prompt(rng.choice(list(caopd.TEMPLATES)), ex["question"], ex["reference"],
                                          shown, shown if way == 2 else None, arith.DECIMALS)
        skip = 0
        if way == 2 and rng.random() < 0.5:  # a near miss: one digit off
            answer = f"Answer: {(ex['answer'] + rng.choice((-1, 1)) * 10 ** rng.randrange(4)) % 10000:04d}"
            skip = len(enc.encode(answer + "\n"))
        tokens = enc.encode(caopd.set_confidence(answer, target, arith.DECIMALS)) + [end_id]
        rows.append((enc.encode(prompt), tokens, [-1] * skip + tokens[skip:]))
    return rows

def train_base(model, sample_train):
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=base_lr, betas=(0.9, 0.99), weight_decay=0.0)
    for step in tqdm(range(base_steps), desc="base (SFT)", mininterval=2):
        frac = max(0.0, (step - base_warmup) / max(1, base_steps - base_warmup))
        for g in opt.param_groups:  # linear warm-up, then cosine to 0.1 x base_lr
            g["lr"] = base_lr * min((step + 1) / base_warmup, 0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        rows = sorted(base_batch_rows(rng, sample_train), key=lambda r: len(r[0]) + len(r[1]))  # by length
        n_tokens, total = sum(sum(t >= 0 for t in r[2]) for r in rows), 0.0
        opt.zero_grad(set_to_none=True)
        for half in (rows[:len(rows) // 2], rows[len(rows) // 2:]):  # short and long rows apart: less padding
            prompts, completions, targets = zip(*half)
            h, _ = caopd.completion_hidden(model, prompts, completions)  # (B, L, C)
            targets = torch.tensor([t + [-1] * (h.shape[1] - len(t)) for t in targets], device=h.device)
            # cross-entropy on completion tokens only (the vocabulary is tiny, so full logits are fine here)
            ce = torch.nn.functional.cross_entropy((h @ model.lm_head.T).flatten(0, 1), targets.flatten(),
                                                   ignore_index=-1, reduction="sum") / n_tokens
            ce.backward()
            total += ce.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % (log_every * 4) == 0 or step == base_steps - 1:
            tqdm.write(f"base step {step:4d} | cross-entropy {total:.4f}")

# -----------------------------------------------------------------------------
# stage 1: on-policy distillation, OPD or CaOPD

def distill(model, method, sample_train):
    torch.manual_seed(seed)  # OPD and CaOPD see the same questions and the same random stream
    rng = random.Random(seed + 1)
    teacher = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    t0 = time.time()
    for step in tqdm(range(steps), desc=method, mininterval=2):
        # 1. K rollouts per prompt, all in one batched call
        exs = sample_train(rng, prompts_per_step)
        prompts = [enc.encode(caopd.student_prompt(ex["question"])) for ex in exs for _ in range(K)]
        rollouts = caopd.sample(model, prompts, max_new_tokens, end_id, temperature, top_k)
        texts = [enc.decode([t for t in r if t != end_id]) for r in rollouts]
        # 2. verify them; P_acc per prompt
        correct = [caopd.verify(exs[i // K], t) for i, t in enumerate(texts)]
        p_acc = caopd.empirical_confidence(correct, K)
        # 3. the training completions and the teacher's prompts
        completions, teacher_prompts = [], []
        for i, text in enumerate(texts):
            ex, g = exs[i // K], i // K
            solution = ex["reference"]
            if teacher_context == "correct_solution":  # first verified rollout of this prompt, else the reference
                solution = next((texts[j] for j in range(g * K, g * K + K) if correct[j]), solution)
            tokens, shown, note = rollouts[i], 1.0, None  # plain OPD: the teacher is shown certainty
            if method == "caopd":  # the one change: P_acc in the completion, the solution and a Note
                text, shown, note = caopd.with_empirical_confidence(text, p_acc[g], arith.DECIMALS)
                tokens = enc.encode(text) + [end_id]
            completions.append(tokens)
            teacher_prompts.append(enc.encode(caopd.teacher_prompt(teacher_context, ex["question"], solution,
                                                                   shown, note, arith.DECIMALS)))
        # 4. per-token divergence to the teacher on the same completion tokens
        hs, lens = caopd.completion_hidden(model, prompts, completions)  # (BK, L, C)
        with torch.no_grad():
            ht, _ = caopd.completion_hidden(teacher, teacher_prompts, completions)
        j = torch.arange(hs.shape[1], device=hs.device)
        counted = (j[None] < torch.tensor(lens, device=hs.device)[:, None]) & (j[None] >= skip_tokens)  # (BK, L)
        weight = counted / counted.sum(1, keepdim=True).clamp(min=1)  # mean over a sequence's tokens, then over sequences
        kl = caopd.fused_linear_kl(hs.flatten(0, 1), model.lm_head, ht.flatten(0, 1), teacher.lm_head,
                                   weight.flatten(), kind=loss, beta=jsd_beta)
        opt.zero_grad(set_to_none=True)
        kl.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        caopd.ema_update(teacher, model, ema_rate)
        if step % log_every == 0 or step == steps - 1:
            stated = [c for c in map(caopd.parse_confidence, texts) if c is not None]
            tqdm.write(f"{method:5s} step {step:4d} | {loss} KL {kl.item():.4f} | rollout acc {sum(correct) / len(correct):.3f}"
                       f" | P_acc {sum(p_acc) / len(p_acc):.3f} | stated conf {sum(stated) / max(1, len(stated)):.3f}"
                       f" | format {len(stated) / len(texts):.2f} | {time.time() - t0:.1f}s")

# -----------------------------------------------------------------------------
# evaluation: greedy answers to the held-out questions, student prompt only

@torch.no_grad()
def evaluate(model, name, held):
    records = []
    for i in range(0, len(held), 500):
        exs = held[i:i + 500]
        prompts = [enc.encode(caopd.student_prompt(ex["question"])) for ex in exs]
        for ex, r in zip(exs, caopd.sample(model, prompts, max_new_tokens, end_id, temperature=0)):
            text = enc.decode([t for t in r if t != end_id])
            records.append({"model": name, "id": ex["id"], "kind": ex["kind"], "answer": ex["answer"],
                            "completion": text, "correct": caopd.verify(ex, text),
                            "confidence": caopd.parse_confidence(text)})
    metrics = caopd.calibration_metrics([r["correct"] for r in records], [r["confidence"] or 0.0 for r in records])
    metrics["format_rate"] = sum(r["confidence"] is not None for r in records) / len(records)
    return metrics, records

def reliability_diagram(results, path):
    """Accuracy per confidence bin for each model, bin counts written on the bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4.2), squeeze=False)
    for ax, (name, (m, records)) in zip(axes[0], results.items()):
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

if __name__ == "__main__":
    parse_args(sys.argv[1:])
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    torch.set_num_threads(threads)
    config = {k: globals()[k] for k in config_keys}
    t_start = time.time()
    seconds = {}
    held, sample_train = arith.split(data_seed, n_eval)
    enc = caopd.toy_tokenizer(arith.VOCAB_TEXT)
    end_id = enc.eot_token
    cfg = caopd.GPTConfig(vocab_size=enc.n_vocab, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    print(f"device {device}, {threads} thread(s), vocabulary {enc.n_vocab} tokens, {len(held)} held-out questions")

    # stage 0, cached: the same settings give the same base, so it is trained once and reused
    base_settings = {k: config[k] for k in ("seed", "data_seed", "n_layer", "n_head", "n_embd", "block_size",
                                            "base_steps", "base_batch", "base_lr", "base_warmup")}
    curriculum = inspect.getsource(base_batch_rows)  # editing the curriculum must not reuse a stale base
    key = hashlib.sha256(json.dumps([base_settings, enc.n_vocab, caopd.TEMPLATES, curriculum]).encode()).hexdigest()[:12]
    base_path = os.path.join(out_dir, f"base-{key}.pt")
    torch.manual_seed(seed)
    base = caopd.GPT(cfg).to(device)
    print(f"model: {sum(p.numel() for p in base.parameters()) / 1e6:.2f}M parameters")
    t0 = time.time()
    if os.path.exists(base_path):
        base.load_state_dict(torch.load(base_path, map_location=device, weights_only=True)["model"])
        print(f"reusing base model {base_path}")
    else:
        train_base(base, sample_train)
        tmp = base_path + ".tmp"
        torch.save({"model": base.state_dict(), "model_args": asdict(cfg), "settings": base_settings}, tmp)
        os.replace(tmp, base_path)
    seconds["base"] = time.time() - t0
    models = {"base": base}

    for m in (["opd", "caopd"] if method == "both" else [method]):
        t0 = time.time()
        models[m] = copy.deepcopy(base)
        distill(models[m], m, sample_train)
        seconds[m] = time.time() - t0
        torch.save({"model": models[m].state_dict(), "model_args": asdict(cfg), "config": config},
                   os.path.join(out_dir, f"{m}.pt.tmp"))
        os.replace(os.path.join(out_dir, f"{m}.pt.tmp"), os.path.join(out_dir, f"{m}.pt"))

    t0 = time.time()
    results = {name: evaluate(model, name, held) for name, model in models.items()}
    seconds["eval"] = time.time() - t0

    print(f"\n{'model':6s} {'acc':>6s} {'conf':>6s} {'ECE':>6s} {'Brier':>6s} {'OCG':>7s} {'SPR':>6s} {'AUROC':>6s} {'format':>6s}")
    for name, (m, _) in results.items():
        print(f"{name:6s} {m['accuracy']:6.3f} {m['mean_confidence']:6.3f} {m['ece']:6.3f} {m['brier']:6.3f} "
              f"{m['ocg']:+7.3f} {m['spr']:6.3f} {m['auroc']:6.3f} {m['format_rate']:6.3f}")
    for name, (_, records) in results.items():
        right = [r for r in records if r["correct"]][:2]
        wrong = [r for r in records if not r["correct"]][:2]
        for r in right + wrong:
            print(f"  {name:5s} {'right' if r['correct'] else 'wrong'}  {r['id']} = {r['answer']:<5d} -> "
                  + r["completion"].replace("\n", " | "))

    write_atomic(os.path.join(out_dir, "completions.jsonl"),
                 "".join(json.dumps(r) + "\n" for _, records in results.values() for r in records))
    reliability_diagram(results, os.path.join(out_dir, "reliability.png"))
    seconds["total"] = time.time() - t_start
    write_atomic(os.path.join(out_dir, "results.json"), json.dumps(
        {"config": config, "seconds": seconds, "models": {n: m for n, (m, _) in results.items()}}, indent=2) + "\n")
    print(f"\nwrote {out_dir}/results.json, reliability.png, completions.jsonl in {seconds['total']:.0f}s")
