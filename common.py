"""
The plumbing that train_small.py, toy_base.py and experiments.py share, kept here so that those
files show their own logic only:

    settings     the commented globals of a script as --key=value settings, and --help
    errors       one line, exit code 2, nothing written
    out_dir      one run per folder (a lock), atomic writes, checkpoints
    tokens       the toy tokenizer or a Hugging Face tokenizer and its chat template
    tasks        held-out questions, training questions and a verifier for each task
    models       our GPT from scratch, or a Hugging Face model in, and back out
    training log out_dir/metrics.jsonl, and an experiment tracker (wandb) behind one setting
    report       the table and a few answers of each model, the reliability diagram, the curves
"""
import atexit
import copy
import io
import json
import math
import os
import shutil
import sys
import tempfile
import textwrap
import time
import tokenize
from contextlib import nullcontext

import tiktoken
import torch

import caopd
import parallel
from data import arith, tasks
from parallel import RANK, WORLD

# -----------------------------------------------------------------------------
# errors and settings

def die(msg, code=2):
    """A bad setting, path or file: one line on stderr, exit code 2 (1 for a run that failed)."""
    print(f"{os.path.basename(sys.argv[0]) or 'caopd'}: error: {msg}", file=sys.stderr)
    sys.exit(code)

def settings_block(module_globals, path):
    """The settings a script declares: the globals between its `# settings` rule and the next
    `# ---` rule, as {name: (default, help, group)} in file order. The comment beside a global is
    its help: --help prints it, so it is the one place a setting is described. A line `# <words>`
    alone starts a group."""
    lines = open(path, encoding="utf-8").read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# settings"))
    out, group = {}, ""
    for line in lines[start + 1:]:
        if line.startswith("# ---"):
            break
        comment = next((t.string[1:].strip() for t in tokenize.generate_tokens(io.StringIO(line).readline)
                        if t.type == tokenize.COMMENT), "")
        name = line.split("=", 1)[0].strip()
        if line.startswith("#"):
            group = comment
        elif name.isidentifier() and name in module_globals:
            out[name] = (module_globals[name], comment, group)
    return out

def print_help(settings, usage, about, also=None):
    """--help: every setting, its default and its help, grouped as in the source."""
    lines = [f"usage: {usage}\n\n{about}"]
    for title, block in [(None, settings)] + ([also] if also else []):
        if title:
            lines.append(f"\n{title}")
        group = None
        for name, (default, text, g) in block.items():
            if g != group:
                lines.append(f"\n{g}:")
                group = g
            key = f"  --{name}={default}"
            text = textwrap.fill(text, 110, initial_indent=" " * 31, subsequent_indent=" " * 31)
            lines.append(f"{key:<30s} {text[31:]}" if len(key) < 30 else f"{key}\n{text}")
    try:
        print("\n".join(lines), flush=True)
    except BrokenPipeError:  # `--help | head`: the reader has what it wanted; exit's own flush must write nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())

def parse_value(key, text, default):
    """The value of --key=text, of the type of the default; floats must be finite."""
    kind = type(default)
    try:
        if kind is bool:
            return {"true": True, "false": False}[text.lower()]
        value = kind(text)
    except (KeyError, ValueError):
        die(f"--{key} must be a {kind.__name__}, got {text!r}")
    if kind is float and not math.isfinite(value):
        die(f"--{key}={text}: must be a finite number")
    return value

def parse_overrides(argv, settings, show_help):
    """--key=value arguments -> {key: value}, each type checked against its default and printed.
    --help (or -h) calls show_help() and exits 0. The last of a repeated key wins."""
    given = {}
    for arg in argv:
        if arg in ("--help", "-h"):
            show_help()
            sys.exit(0)
        if not arg.startswith("--") or "=" not in arg:
            die(f"arguments look like --key=value, got {arg!r} (--help lists the settings)")
        key, text = arg[2:].split("=", 1)
        if key not in settings:
            die(f"unknown setting {key!r} (--help lists the settings)")
        given[key] = parse_value(key, text, settings[key][0])
        print(f"override: {key} = {given[key]!r}")
    return given

def check(checks, cfg):
    """checks: (ok, key, why) triples; the first that fails is a one-line error naming its key."""
    for ok, key, why in checks:
        if not ok:
            die(f"--{key}={getattr(cfg, key)!r}: {why}")

def resolve_device(device):
    """'auto' -> cuda, then mps, then cpu; a device that is not there is an error naming it."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        why = "was built without CUDA" if torch.version.cuda is None else "finds no CUDA device"
        die(f"--device='cuda': CUDA is not available (this torch {torch.__version__} {why}); use --device=cpu or auto")
    if device == "mps" and not torch.backends.mps.is_available():
        die("--device='mps': Apple's MPS is not available on this machine; use --device=cpu or auto")
    return device

def resolve_dtype(dtype, device):
    """The compute dtype: 'auto' -> bfloat16 on a CUDA device that has it, float32 elsewhere.
    bfloat16 is also allowed on the CPU (slow, but it runs the GPU's code path for tests)."""
    if dtype == "auto":
        return "bfloat16" if "cuda" in device and torch.cuda.is_bf16_supported() else "float32"
    if dtype == "bfloat16" and "cuda" in device and not torch.cuda.is_bf16_supported():
        die(f"--dtype='bfloat16': this GPU ({torch.cuda.get_device_name()}) has no bfloat16; use --dtype=float32")
    if dtype == "bfloat16" and device == "mps":
        die("--dtype='bfloat16': not supported on mps here; use --dtype=float32")
    return dtype

def autocast(cfg):
    """The forward passes' precision. The weights stay float32 (the optimizer's updates at real
    learning rates are below half a bfloat16 ulp of most weights, so bfloat16 weights would not
    move); autocast runs the matrix products in bfloat16 when cfg.dtype says so."""
    if cfg.dtype == "bfloat16":
        return torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16)
    return nullcontext()

# -----------------------------------------------------------------------------
# memory: how many rows a sampling call can take on this device

EVAL_CAP = 500  # eval_batch = 0: at most this many questions a call (fewer where they do not fit)

def free_memory(device):
    """Bytes this process can still allocate on device: CUDA's free memory plus what torch's
    allocator holds unused; on the CPU Linux's MemAvailable; None where neither is known."""
    device = torch.device(device)
    if device.type == "cuda":
        return caopd.cuda_free(device)
    if device.type == "mps":
        return torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None

def model_shape(model):
    """(layers, key/value heads, head size, hidden size, MLP size, vocabulary) of our GPT or of a
    Hugging Face model's config."""
    if isinstance(model, caopd.GPT):
        c = model.cfg
        return c.n_layer, c.n_head, c.n_embd // c.n_head, c.n_embd, 4 * c.n_embd, c.vocab_size
    c = model.config.get_text_config()
    heads = c.num_attention_heads
    head = getattr(c, "head_dim", None) or c.hidden_size // heads
    return (c.num_hidden_layers, getattr(c, "num_key_value_heads", None) or heads, head, c.hidden_size,
            c.intermediate_size, c.vocab_size)

def kv_bytes(model, dtype):
    """Bytes of KV cache per row and position: keys and values of every layer, in dtype."""
    layers, kv_heads, head, *_ = model_shape(model)
    return 2 * layers * kv_heads * head * (torch.finfo(dtype).bits // 8)

def sampling_bytes(model, prompt, new, dtype):
    """An upper bound on the bytes one row of a sampling call (caopd.sample) holds at once, for a
    prompt of `prompt` tokens and `new` new ones, activations in dtype: its static KV cache, during
    the prefill the prompt's own cache and activations (the residual stream, the MLP, one layer's
    attention scores), and at every step the float32 logits, their softmax and CDF."""
    _, kv_heads, _, hidden, mlp, vocab = model_shape(model)
    size = torch.finfo(dtype).bits // 8
    length = caopd.cache_length(prompt, new)  # as caopd._hf_decoder allocates it
    kv = kv_bytes(model, dtype)
    prefill = prompt * (kv + (4 * hidden + 3 * mlp) * size + 4 * kv_heads * prompt)
    return kv * length + prefill + 4 * 4 * vocab

def fit_batches(cfg, model, tok, held):
    """cfg.eval_batch and cfg.rollout_batch in rows that fit in the device's free memory, before
    anything is trained or written. 0 (the default) becomes the most that is asked (EVAL_CAP
    questions, all of a step's rollouts), lowered with a note where fewer fit; a number that does
    not fit is an error that says the largest that does. What stage 1 still allocates is set aside
    first: the teacher (a copy of the student) and the student's float32 gradient and AdamW's two
    moments. Fewer rows a call change no rollout: each row's random numbers are its own
    (caopd.sample). The prompts are sized by the held-out questions' longest."""
    free = free_memory(cfg.device)
    want = {"eval_batch": min(EVAL_CAP, -(-len(held) // WORLD)),
            "rollout_batch": cfg.prompts_per_step // WORLD * cfg.K}
    fits, where = math.inf, ""
    if free is None:
        print(f"note: the free memory of {cfg.device} is unknown here: eval_batch and rollout_batch are not "
              f"checked against it")
    else:
        params = sum(p.numel() for p in model.parameters())
        teacher = 2 if teacher_in_bfloat16(cfg) else 4  # bytes a parameter
        reserved = (12 + teacher) * params // (WORLD if cfg.fsdp else 1)
        if cfg.fsdp:  # sampling gathers the student's layers: its whole float32 weights on every process
            reserved += 4 * params * (WORLD - 1) // WORLD
        budget = 0.9 * (free - reserved)
        prompt = max(len(student_tokens(tok, ex, cfg.enable_thinking)) for ex in held)
        dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
        per_row = sampling_bytes(model, prompt, cfg.max_new_tokens, dtype)
        fits = int(budget // per_row)
        size = lambda b: f"{b / 2**30:.1f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"
        where = (f"{size(per_row)} per row for a prompt of up to {prompt} + {cfg.max_new_tokens} tokens, "
                 f"{size(max(budget, 0))} of {cfg.device}'s memory free for it")
        if fits < 1:
            die(f"a sampling call of one row does not fit: {where}; lower --max_new_tokens or use a larger "
                f"device")
    for k, n in want.items():
        given = getattr(cfg, k)
        if given > fits:
            die(f"--{k}={given}: does not fit in memory ({where}): the largest that fits is {fits}")
        if not given and n > fits:
            print(f"note: {k} lowered to {fits} rows a call, the most that fit ({where})")
        setattr(cfg, k, given or min(n, fits))

def teacher_in_bfloat16(cfg):
    """Whether stage 1's teacher is a bfloat16 copy (train_small.distiller): a frozen teacher under
    bfloat16 compute needs no float32 master weights; an EMA one does, and FSDP2's shards it like the
    student, in float32."""
    return cfg.dtype == "bfloat16" and cfg.ema_rate == 0 and not cfg.fsdp

def frozen_copy(model, dtype):
    """A copy of model without gradients, its parameters in dtype: a frozen teacher needs no float32
    master weights. Made parameter by parameter (no second float32 copy); tied weights stay tied."""
    memo = {id(p): torch.nn.Parameter(p.detach().to(dtype, copy=True), requires_grad=False) for p in model.parameters()}
    return copy.deepcopy(model, memo).requires_grad_(False)

# -----------------------------------------------------------------------------
# out_dir: one run at a time, files that are whole or absent, checkpoints

_lock = None  # the open lock file of this process: the lock lasts as long as it does

def _try_lock(f):
    """An exclusive lock on an open file, released by the kernel when the process ends however it
    ends (so a crashed run never leaves a lock that holds). False if another process has it."""
    try:
        if os.name == "nt":
            import msvcrt
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False

def _lock_error(out_dir, f):
    f.seek(0)
    holder = f.read().strip() or "(unknown)"
    die(f"--out_dir={out_dir!r} is in use by the run of process {holder} (its lock: {os.path.join(out_dir, 'lock')}); "
        f"wait for it to finish or use another --out_dir")

def check_not_locked(out_dir):
    """Fail early, before loading anything, when a live run holds out_dir; writes nothing."""
    path = os.path.join(out_dir, "lock")
    if os.path.isfile(path):
        with open(path, "r+") as f:
            if not _try_lock(f):
                _lock_error(out_dir, f)

def take_out_dir(out_dir):
    """Create out_dir and take its lock (rank 0) before anything is written in it. The lock file
    holds the process id of the run; a run that ended without emptying it (killed, crashed) is
    named when the next run takes the folder over."""
    global _lock
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        die(f"--out_dir={out_dir!r} is a file, not a directory")
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):  # a real write: root passes access checks on a read-only mount
            pass
    except OSError as e:
        die(f"--out_dir={out_dir!r} cannot be created or written: {e.strerror}")
    if RANK != 0:
        return
    f = open(os.path.join(out_dir, "lock"), "a+")
    if not _try_lock(f):
        _lock_error(out_dir, f)
    f.seek(0)
    old = f.read().strip()
    if old:
        print(f"note: {out_dir}/lock: the run of process {old} ended without releasing it (killed?); taking it over")
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _lock = f
    atexit.register(release_out_dir)

def release_out_dir():
    global _lock
    if _lock is not None:
        _lock.seek(0)
        _lock.truncate()  # empty: the run ended; the kernel drops the lock itself with the file
        _lock.close()
        _lock = None

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
    clear error for a missing, truncated or corrupt file. Memory-mapped: the processes of a node
    share one copy of the file in memory, and each takes what it needs from it."""
    if not os.path.exists(path):
        die(f"{path}: no checkpoint to resume from")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a truncated zip, a pickle that is not ours, ...: all mean the same here
        die(f"{path}: the checkpoint is truncated or corrupt ({type(e).__name__}); delete it to start over")

def checkpoint_path(cfg, stage):
    """out_dir/ckpt.pt; a method distilled beside the other (--workers=2) keeps its own, ckpt-<method>.pt."""
    side_by_side = getattr(cfg, "workers", 1) == 2 and stage in ("opd", "caopd")
    return os.path.join(cfg.out_dir, f"ckpt-{stage}.pt" if side_by_side else "ckpt.pt")

def save_checkpoint(cfg, tok, stage, step, model, teacher, opt, rng, bad, skipped, quiet=False):
    """checkpoint_path: everything a resumed run needs to continue bit for bit, whole (under FSDP2
    every process takes part in gathering the shards; rank 0 writes). A Hugging Face model is also
    exported, whole, to out_dir/hf."""
    state = {"model": parallel.full_state(model), "teacher": None if teacher is None else parallel.full_state(teacher),
             "optimizer": parallel.full_optimizer_state(model, opt)}
    if RANK != 0:
        return
    path = checkpoint_path(cfg, stage)
    write_atomic(path, {
        "stage": stage, "step": step, "config": vars(cfg), **state,
        "rng": {"python": rng.getstate(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "bad_steps": bad, "skipped": skipped}, "wb")
    if cfg.init_from != "scratch":
        export_hf(model, tok, os.path.join(cfg.out_dir, "hf"), cfg.export_dtype, state["model"])
    if not quiet:
        from tqdm import tqdm
        tqdm.write(f"checkpoint: {stage} step {step} -> {path}")

def restore(ck, model, teacher, opt, rng):
    """The state save_checkpoint wrote, back in place. Returns (step, bad steps in a row, skipped)."""
    parallel.load_full_state(model, ck["model"])
    if teacher is not None:
        parallel.load_full_state(teacher, ck["teacher"])
    parallel.load_optimizer_state(model, opt, ck["optimizer"])
    rng.setstate(ck["rng"]["python"])
    torch.set_rng_state(ck["rng"]["torch"])
    if ck["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
    return ck["step"], ck["bad_steps"], ck["skipped"]

# -----------------------------------------------------------------------------
# tokens: the toy tiktoken encoding, or a Hugging Face tokenizer and its chat template

def is_toy(tok):
    return isinstance(tok, tiktoken.Encoding)

def end_id(tok):
    return tok.eot_token if is_toy(tok) else tok.eos_token_id

def decimals(tok):
    """Digits of a stated confidence: the toy's one token per value (0.0 ... 1.0), else the paper's X.XX."""
    return arith.DECIMALS if is_toy(tok) else 2

def encode(tok, text):
    return tok.encode(text) if is_toy(tok) else tok(text, add_special_tokens=False)["input_ids"]

def decode(tok, ids):
    end = end_id(tok)
    return tok.decode([t for t in ids if t != end])

def template_reads(tok, name):
    """Whether tok's chat template uses the variable `name`: a look at its Jinja source (the text of
    all its templates when it has several). The toy tokenizer has no template."""
    return name in str(getattr(tok, "chat_template", None) or "")

def render(tok, messages, enable_thinking):
    """A chat -> prompt tokens: the tokenizer's chat template where it has one, else each
    message's text on its own lines (the toy: "question\n"). enable_thinking ("default", "true",
    "false", the setting) goes to the template as its variable of that name, unless "default";
    a template that never reads it is unchanged by it."""
    if getattr(tok, "chat_template", None):
        options = {} if enable_thinking == "default" else {"enable_thinking": enable_thinking == "true"}
        return encode(tok, tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **options))
    return encode(tok, "".join(m["content"].rstrip("\n") + "\n" for m in messages))

def student_tokens(tok, ex, enable_thinking):
    return render(tok, ex["messages"], enable_thinking)

def teacher_tokens(tok, ex, context, enable_thinking):
    """The student's chat with the privileged context (caopd.teacher_prompt's fields: template,
    solution, confidence, note) around the question of its last user turn. A system message stays
    as it is: rebuilding the teacher prompt from the system turn would lose the question (a bug of
    the authors' release)."""
    messages = [dict(m) for m in ex["messages"]]
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[last]["content"] = caopd.teacher_prompt(messages[last]["content"], decimals(tok), **context)
    return render(tok, messages, enable_thinking)

def longest_context(template, ex):
    """The teacher context of template for ex with its longest fields (for the length checks): the
    reference and a Note, as distillation_targets makes it for one rollout that is the reference."""
    return caopd.distillation_targets("caopd", [ex["reference"]], [True], ex["reference"], template, 2)[1]

def confidence_value_ids(tok):
    """The toy's stated confidences 0.0, 0.1, ..., 1.0: one token each (see caopd.toy_tokenizer)."""
    return [t for v in range(11) for t in encode(tok, f" {v / 10:.1f}")]

# -----------------------------------------------------------------------------
# tasks: held-out questions, a sampler of training questions, a verifier

def read_task_files(cfg):
    """science / tooluse: the training and held-out rows, checked line by line (before any model loads)."""
    rows = {}
    for split, path in (("train", cfg.data), ("eval", cfg.eval_data)):
        path = path or os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", cfg.task, f"{split}.jsonl")
        try:
            rows[split] = (path, tasks.load_rows(path, cfg.task))
        except ValueError as e:
            hint = f" (python data/{cfg.task}/prepare.py writes it)" if not os.path.exists(path) else ""
            die(f"{e}{hint}")
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
        die(f"{setting}: {e}" if setting else str(e))
    return held, sample_train, verify_example

def load_task(cfg, tok, files, context):
    """(held-out examples, sample_train(rng, n), verify(example, text)). Examples too long for the
    model's context (teacher prompt + max_new_tokens) are skipped and counted."""
    if cfg.task == "arith":
        return arith_task(cfg.data_seed, cfg.n_eval, cfg.arith_ops, cfg.arith_digits or None)
    rows = {}
    for split, (path, examples) in files.items():
        fits = [ex for ex in examples if len(teacher_tokens(tok, ex, longest_context(cfg.teacher_context, ex),
                                                            cfg.enable_thinking)) + cfg.max_new_tokens <= context]
        if len(fits) < len(examples):
            first = next(ex["id"] for ex in examples if ex not in fits)
            print(f"{path}: skipped {len(examples) - len(fits)} of {len(examples)} questions longer than the context "
                  f"({context} tokens, with max_new_tokens={cfg.max_new_tokens}); the first: {first}")
        if not fits:
            die(f"{path}: no question fits the model's context of {context} tokens")
        rows[split] = fits
    train, verifier = rows["train"], tasks.VERIFIERS[cfg.task]
    return rows["eval"][:cfg.n_eval], lambda rng, n: [rng.choice(train) for _ in range(n)], \
        lambda ex, text: verifier(ex["answer"], text)

def check_lengths(cfg, tok, held, context):
    """Settings too short for the task, found before anything runs: the toy GPT's block_size must
    hold its longest teacher prompt and completion; max_new_tokens must hold the shortest complete
    answer (answer, confidence line, end token) of every held-out question."""
    conf = len(encode(tok, caopd.set_confidence("", 1.0, decimals(tok)))) + 1  # + the end token
    need, ex = max((len(encode(tok, caopd.set_confidence(shortest_answer(cfg.task, ex), 1.0,
                                                                    decimals(tok)))) + 1, ex["id"])
                   for ex in held), None
    if cfg.max_new_tokens < need[0]:
        die(f"--max_new_tokens={cfg.max_new_tokens}: too short for the answer format: the shortest complete "
                   f"answer to held-out question {need[1]} (answer, 'Confidence:' line, end token) takes {need[0]} tokens")
    if cfg.init_from == "scratch":
        ex = held[0]  # the toy's questions of one mix have one length
        prompt = max(len(teacher_tokens(tok, ex, longest_context(t, ex), cfg.enable_thinking)) for t in caopd.TEMPLATES)
        longest = prompt + cfg.max_new_tokens + conf  # a CaOPD completion: the rollout's body + its new confidence line
        if longest > context:
            die(f"--block_size={cfg.block_size}: shorter than the toy's longest sequence, {longest} tokens "
                       f"(a teacher prompt of {prompt} + up to {cfg.max_new_tokens + conf} completion tokens)")

# -----------------------------------------------------------------------------
# models: our GPT from scratch, or a Hugging Face causal LM and its tokenizer

def load_model(cfg, dtype=torch.float32):
    """(model, tokenizer, context length, dtype of the model's files): our GPT and the toy
    tokenizer, or a Hugging Face causal LM (float32 weights; tests ask for float64) and its
    tokenizer. Under FSDP2 (cfg.fsdp) only rank 0 reads the weights; the other processes build the
    model on the meta device (no memory), every decoder layer is sharded, and each process
    receives its part from rank 0: a node holds one model in host memory, not one per process."""
    if cfg.init_from == "scratch":
        enc = caopd.toy_tokenizer(arith.VOCAB_TEXT)
        gpt = caopd.GPTConfig(vocab_size=enc.n_vocab, block_size=cfg.block_size, n_layer=cfg.n_layer,
                              n_head=cfg.n_head, n_embd=cfg.n_embd)
        torch.manual_seed(cfg.seed)
        return caopd.GPT(gpt).to(cfg.device), enc, cfg.block_size, "float32"
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging
    logging.disable_progress_bar()  # keep stderr for errors
    try:
        tok = AutoTokenizer.from_pretrained(cfg.init_from)
        # float32 master weights whatever the files hold (Qwen3's are bfloat16): see autocast()
        model = AutoModelForCausalLM.from_pretrained(cfg.init_from, dtype=dtype) if RANK == 0 or not cfg.fsdp else None
        config = AutoConfig.from_pretrained(cfg.init_from)
    except (OSError, ValueError) as e:
        die(f"--init_from={cfg.init_from!r} is neither 'scratch', 'resume' nor a loadable Hugging Face model "
            f"({str(e).strip().splitlines()[0][:200]})")
    if tok.eos_token_id is None:
        die(f"--init_from={cfg.init_from!r}: the tokenizer has no eos token to end completions with")
    if cfg.fsdp:
        source, model = model, empty_like_model(cfg, config, dtype)
        if not parallel.decoder_layers(model):
            die(f"--fsdp=True: {type(model).__name__} ({cfg.init_from}) names no decoder layers to shard "
                f"(_no_split_modules); run it without --fsdp")
        parallel.load_full_state(model, source.state_dict() if RANK == 0 else {}, broadcast=True)
        parallel.broadcast_buffers(model, source)  # rotary tables: not in a state dict
        del source
    if cfg.grad_checkpoint and not model.supports_gradient_checkpointing:
        die(f"--grad_checkpoint=True: {type(model).__name__} ({cfg.init_from}) does not support gradient checkpointing")
    if not getattr(tok, "chat_template", None):
        print(f"{cfg.init_from}: no chat template, prompts are plain text")
    context = getattr(config, "max_position_embeddings", None) or 1 << 30
    files = config.dtype or torch.float32  # what the files hold
    return model.to(cfg.device), tok, context, str(files).removeprefix("torch.")

def empty_like_model(cfg, model_or_config, dtype=None):
    """A Hugging Face model of the same config, decoder layers sharded (FSDP2), memory on cfg.device
    left uninitialized: built on the meta device, so no process ever holds a whole unsharded copy."""
    from transformers import AutoModelForCausalLM
    config = getattr(model_or_config, "config", model_or_config)
    dtype = dtype or next(model_or_config.parameters()).dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config).to(dtype)
    parallel.shard_layers(model)
    model.to_empty(device=cfg.device)  # new tensors, one per module: a tied output layer is untied ...
    model.tie_weights()  # ... and tied again
    return model

def set_grad_checkpoint(model, on):
    """Gradient checkpointing on or off: per block for our GPT, the model's own for Hugging Face's."""
    if isinstance(model, caopd.GPT):
        model.grad_checkpoint = on
    elif hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        if on:
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()

def export_hf(model, tok, path, dtype, state=None):
    """save_pretrained (safetensors) of a Hugging Face student and its tokenizer in dtype (the
    float32 master weights cast on the way out), swapped in whole: `path` always holds a complete
    model. state: the model's whole state dict where it is not model.state_dict() (FSDP2's shards,
    gathered)."""
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    cast = {}  # tensor -> its cast copy: tied weights stay one tensor
    state = {k: cast.setdefault(id(v), v.detach().to(getattr(torch, dtype)))
             for k, v in (model.state_dict() if state is None else state).items()}
    model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    config = json.load(open(os.path.join(tmp, "config.json")))
    config["dtype"] = dtype  # save_pretrained writes the dtype of the model in memory
    write_atomic(os.path.join(tmp, "config.json"), json.dumps(config, indent=2) + "\n")
    tok.save_pretrained(tmp)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)

# -----------------------------------------------------------------------------
# training log: out_dir/metrics.jsonl, one JSON line per logged step and per evaluation, and the
# same records in an experiment tracker (wandb) when --wandb_project names a project

def first_line(e):
    """An exception's message, cut to one line (an error or a warning is one line)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]

def import_tracker(project):
    """wandb, imported only when --wandb_project names a project (None otherwise); checked before
    anything loads, so a missing package is one line, not a traceback after the base is trained."""
    if not project:
        return None
    try:
        import wandb
    except ImportError:
        die(f"--wandb_project={project!r}: the wandb package is not installed (pip install wandb)")
    return wandb

def peak_memory_mib(device):
    """This process's peak memory so far: the device's allocations on a GPU, resident memory elsewhere."""
    if "cuda" in str(device):
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    if os.name == "nt":  # no getrusage
        return None
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)

# the fields a record needs to be drawn (training_curves); the base trains on no rollouts
METRICS_NEED = {"train": ("stage", "step", "stated_confidence", "rollout_accuracy", "p_acc"),
                "eval": ("stage", "step", "ece"), "base train": ("stage", "step")}

def read_metrics(path, interrupted=False):
    """The records of a metrics.jsonl. A missing file, or a line that is not a record, is a one-line
    error naming the file and line. interrupted: the file of a run being resumed, which may be missing
    (older code wrote none) or end in half a line (killed while writing it): both are left out."""
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except FileNotFoundError:
        if interrupted:
            return []
        die(f"{path}: no such file")
    except (OSError, UnicodeDecodeError) as e:
        die(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e})")
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            if interrupted and i == len(lines):
                break
            die(f"{path}:{i}: not a JSON line ({e.msg})")
        if not isinstance(r, dict) or r.get("kind") not in ("train", "eval"):
            die(f"{path}:{i}: not a metrics.jsonl record (a JSON object whose kind is 'train' or 'eval')")
        kind = "base train" if r["kind"] == "train" and r.get("stage") == "base" else r["kind"]
        missing = [k for k in METRICS_NEED[kind] if k not in r]
        if missing:
            die(f"{path}:{i}: a {r['kind']} record without {', '.join(missing)}")
        records.append(r)
    return records

def metrics_log(cfg, tracker, kept=()):
    """Rank 0's training log. Returns (log, finish). log(record) appends the record, with "time"
    (seconds of the run so far) and "peak_memory_mib", to out_dir/metrics.jsonl as one JSON line,
    flushed (a killed run keeps every line before the kill), and to the tracker's run (started
    here) as row n of its history, n = the line's number in the file. kept: the records a resumed
    run keeps, written (atomically) before the new ones; a new run starts an empty file.
    finish(images) logs {name: png path} to the tracker and ends its run. Other ranks log nothing.
    Side by side (--workers=2), the two methods' processes append their lines to the same file (one
    write a line, in append mode: lines interleave whole), and this process sends them to the
    tracker in file order with its own next line."""
    if RANK != 0:
        return (lambda record: None), (lambda images: None)
    run = None
    if tracker:
        try:
            run = tracker.init(project=cfg.wandb_project, config=vars(cfg), dir=cfg.out_dir)
        except (tracker.Error, ValueError, OSError) as e:  # its own errors; ValueError: its settings' checks
            die(f"--wandb_project={cfg.wandb_project!r}: wandb failed to start: {first_line(e)}")
    path = os.path.join(cfg.out_dir, "metrics.jsonl")
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
    f = open(path, "a", encoding="utf-8")
    start = time.time() - (kept[-1]["time"] if kept else 0.0)  # a resumed run's clock goes on
    state = {"run": run, "n": len(kept), "pid": os.getpid(), "size": os.path.getsize(path)}

    def track(call):
        """A tracker that fails in the middle of a run warns once and is dropped: the run and
        metrics.jsonl go on without it."""
        if state["run"] is None or os.getpid() != state["pid"]:  # a forked process: the run is its parent's
            return
        try:
            call(state["run"])
        except Exception as e:  # whatever it raises (network, disk, its own errors), the run is worth more
            from tqdm import tqdm
            tqdm.write(f"warning: wandb failed ({type(e).__name__}: {first_line(e)}); the run goes on "
                       f"without it, {path} has every line")
            state["run"] = None

    def catch_up():  # lines the methods' own processes wrote since this one last logged
        with open(path, "rb") as r:
            r.seek(state["size"])
            new = r.read()
        state["size"] += len(new)
        for line in new.decode("utf-8").splitlines():
            send(json.loads(line))

    def send(record):
        # the tracker's keys: kind/stage/name, so that OPD's and CaOPD's steps do not collide; numbers only
        row = {f"{record['kind']}/{record['stage']}/{k}": v for k, v in record.items()
               if v is not None and not isinstance(v, str)}
        track(lambda run: run.log(row, step=state["n"]))
        state["n"] += 1

    def log(record):
        if os.getpid() == state["pid"]:
            catch_up()
        # JSON has no NaN: a non-finite loss or gradient norm (a skipped update) is null
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        record.update(time=round(time.time() - start, 3), peak_memory_mib=peak_memory_mib(cfg.device))
        f.write(json.dumps(record) + "\n")
        f.flush()
        if os.getpid() == state["pid"]:
            send(record)
            state["size"] = f.tell()

    def finish(images):
        catch_up()
        f.close()
        track(lambda run: run.log({name: tracker.Image(p) for name, p in images.items()}, step=state["n"]))
        track(lambda run: run.finish())
    return log, finish

# -----------------------------------------------------------------------------
# report and plots

def ece_floor(confidence, reps=200):
    """ECE from sampling alone: (mean, sd) over reps draws of a perfectly calibrated model that
    states these confidences, each answer right with the probability it states. An ECE near this
    is as good as the number of questions can tell."""
    c = torch.as_tensor(confidence, dtype=torch.float64)
    y = torch.rand(reps, len(c), generator=torch.Generator().manual_seed(0), dtype=torch.float64) < c  # (reps, n)
    per_bin = torch.zeros(reps, 10, dtype=torch.float64).index_add_(1, caopd.confidence_bin(c), c - y.double())
    ece = per_bin.abs().sum(1) / len(c)  # sum over bins of share x |mean conf - acc| = |sum(conf - correct)| / n
    return ece.mean().item(), ece.std().item()

def report(results):
    """The table (tool use: a second one, every golden call checked), and two right and two wrong
    answers of each model."""
    tables = [("", None)]  # (title, key of the metrics it shows: None = the top level)
    if any("all_calls" in m for m, _ in results.values()):
        tables.append(("\nevery golden call checked (the authors' eval_tooluse.py); above, the first call (training's P_acc)",
                       "all_calls"))
    for title, key in tables:
        print(f"{title}\n{'model':6s} {'acc':>6s} {'conf':>6s} {'ECE':>6s} {'Brier':>6s} {'OCG':>7s} {'SPR':>6s} {'AUROC':>6s} "
              f"{'format':>6s}  ECE of a calibrated model with these confidences")
        for name, (metrics, records) in results.items():
            m = metrics[key] if key else metrics
            floor = ece_floor([r["confidence"] or 0.0 for r in records])
            print(f"{name:6s} {m['accuracy']:6.3f} {m['mean_confidence']:6.3f} {m['ece']:6.3f} {m['brier']:6.3f} "
                  f"{m['ocg']:+7.3f} {m['spr']:6.3f} {m['auroc']:6.3f} {metrics['format_rate']:6.3f}  "
                  f"{floor[0]:.3f} +- {floor[1]:.3f}")
    for name, (_, records) in results.items():
        right = [r for r in records if r["correct"]][:2]
        wrong = [r for r in records if not r["correct"]][:2]
        for r in right + wrong:
            print(f"  {name:5s} {'right' if r['correct'] else 'wrong'}  {r['id']} = {str(r['answer'])[:40]:<5s} -> "
                  + r["completion"].replace("\n", " | ")[:300])

def reliability_diagram(results, path, columns=None):
    """Accuracy per confidence bin for each model, bin counts written on the bars; panels in rows
    of `columns` (default: one row). results: {name: (metrics, records)}."""
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

NAMES = {"opd": "OPD", "caopd": "CaOPD"}

def training_curves(runs, path):
    """The illusion forming, from metrics.jsonl records: runs is [(title, records)], one column
    each. A row per method: the stated confidence against the rollouts' accuracy and their mean
    P_acc over the steps (the shaded gap is the overconfidence); a last row: each method's held-out
    ECE where it was evaluated, the base's at step 0."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods = [m for m in ("opd", "caopd") if any(r["stage"] == m for _, records in runs for r in records)]
    fig, axes = plt.subplots(len(methods) + 1, len(runs), figsize=(5.5 * len(runs), 3.2 * (len(methods) + 1)),
                             squeeze=False)
    for col, (title, records) in enumerate(runs):
        for ax, m in zip(axes[:-1, col], methods):
            train = [r for r in records if r["kind"] == "train" and r["stage"] == m]
            steps = [r["step"] for r in train]
            stated, acc = [r["stated_confidence"] for r in train], [r["rollout_accuracy"] for r in train]
            ax.plot(steps, stated, color="tab:red", label="stated confidence")
            ax.plot(steps, acc, color="tab:blue", label="rollout accuracy")
            ax.plot(steps, [r["p_acc"] for r in train], ":", color="black", label="mean P_acc")
            ax.fill_between(steps, acc, stated, color="tab:red", alpha=0.12)
            ax.set(ylim=(0, 1.05), xlabel="step", ylabel="mean over the step's rollouts",
                   title=f"{title}: {NAMES[m]}")
            ax.legend(fontsize=7)
        ax = axes[-1, col]
        base = [r["ece"] for r in records if r["kind"] == "eval" and r["stage"] == "base"]
        for m, color in zip(methods, ("tab:orange", "tab:purple")):
            # by step: the last evaluation during the stage and the final one are the same model
            at = {r["step"]: r["ece"] for r in records if r["kind"] == "eval" and r["stage"] == m}
            if base:
                at = {0: base[-1], **at}
            if at:
                ax.plot(list(at), list(at.values()), "o-", color=color, label=NAMES[m])
        ax.set(ylim=(0, None), xlabel="step", ylabel="held-out ECE",
               title=f"{title}: held-out ECE (the base's at 0)")
        if methods:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)

def write_json(path, obj):
    write_atomic(path, json.dumps(obj, indent=2) + "\n")
