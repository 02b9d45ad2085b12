"""
The command line of train_small.py and the scripts beside it: the settings a script declares
(its commented globals) as --key=value, --help, the checks of train_small's settings, and the one
kind of error a user sees: one line that says what and where, exit code 2, nothing written.
"""
import io
import math
import os
import signal
import sys
import textwrap
import tokenize
from contextlib import nullcontext

import torch

import caopd
from parallel import WORLD

def die(msg, code=2):
    """A bad setting, path or file: one line on stderr, exit code 2 (1 for a run that failed)."""
    print(f"{os.path.basename(sys.argv[0]) or 'caopd'}: error: {msg}", file=sys.stderr)
    sys.exit(code)

def stop_at(place):
    """A test's hook, to stop a run at a named place rather than at a moment: CAOPD_STOP_AT=<place>
    SIGKILLs the process there (as a crash would), <place>!int raises Ctrl-C's KeyboardInterrupt.
    A place is words ("checkpoint opd 8"); the variable may give its first words ("checkpoint opd")."""
    want = os.environ.get("CAOPD_STOP_AT")
    where, _, how = (want or "").partition("!")
    if want and (place == where or place.startswith(where + " ")):
        if how == "int":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGKILL)

def cannot_write(path, e):
    """A file the run could not write (a full disk, a read-only folder): one line, exit code 1."""
    why = getattr(e, "strerror", None) or first_line(e)
    die(f"{path} cannot be written ({why}); --init_from=resume goes on from the last checkpoint", code=1)

def first_line(e):
    """An exception's message, cut to one line (an error or a warning is one line)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]

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
# train_small's settings, checked

def check_settings(cfg):
    """train_small's settings (experiments.py's too), checked together: the first that fails is one line."""
    c = cfg
    check([
        (c.method in ("opd", "caopd", "both"), "method", "must be 'opd', 'caopd' or 'both'"),
        (c.task in ("arith", "science", "tooluse"), "task", "must be 'arith', 'science' or 'tooluse'"),
        (c.task == "arith" or c.init_from != "scratch", "task",
         "needs a pretrained model: add --init_from=<Hugging Face model id or directory>"),
        (c.task == "arith" or c.base_steps == 0, "base_steps",
         "stage 0 is the toy curriculum: --task=arith only"),
        (c.teacher_context in caopd.TEMPLATES, "teacher_context", f"must be one of {list(caopd.TEMPLATES)}"),
        (set(c.caopd_parts) <= set("abc") and len(c.caopd_parts) == len(set(c.caopd_parts)), "caopd_parts",
         "must be letters of 'abc', each at most once ('' trains like OPD)"),
        (c.arith_ops and set(c.arith_ops) <= set("+*-"), "arith_ops", "must be one or more of '+', '*', '-'"),
        (c.arith_digits >= 0, "arith_digits", "must be >= 0 (0: 3 for sums, 2 for products)"),
        (c.enable_thinking in ("default", "true", "false"), "enable_thinking",
         "must be 'default', 'true' or 'false'"),
        (c.loss in caopd.DIVERGENCES, "loss", f"must be one of {list(caopd.DIVERGENCES)}"),
        (not c.fused or c.loss in caopd.FUSED, "loss",
         "has no fused kernel (its gradients are derived for reverse, forward, jsd): add --fused=False"),
        (0 <= c.jsd_beta <= 1, "jsd_beta", "must be in [0, 1]"),
        (c.K >= 1, "K", "must be >= 1"),
        (c.temperature >= 0, "temperature", "must be >= 0 (0 is greedy)"),
        (0 <= c.ema_rate <= 1, "ema_rate", "must be in [0, 1]"),
        (c.top_k >= 0, "top_k", "must be >= 0"),
        *((0 <= getattr(c, k) < 2 ** 40, k, "must be in [0, 2^40)") for k in ("seed", "data_seed")),
        (c.steps >= 0, "steps", "must be >= 0"),
        (c.base_steps >= 0, "base_steps", "must be >= 0"),
        (c.skip_tokens >= 0, "skip_tokens", "must be >= 0"),
        *((getattr(c, k) >= 1, k, "must be >= 1") for k in (
            "prompts_per_step", "base_batch", "n_eval", "max_new_tokens", "threads", "log_every",
            "ckpt_every", "max_bad_steps", "n_layer", "n_head", "n_embd", "block_size")),
        (c.eval_batch >= 0, "eval_batch", "must be >= 0 (0 = 500, or fewer if memory holds fewer)"),
        (c.compile_decode in ("auto", "true", "false"), "compile_decode",
         "must be 'auto', 'true' or 'false'"),
        (c.compile_decode != "true" or not c.fsdp, "compile_decode",
         "captures an unsharded model's step: not with --fsdp (drop one)"),
        (c.n_embd % c.n_head == 0, "n_head", f"must divide n_embd ({c.n_embd})"),
        (c.lr > 0, "lr", "must be > 0"),
        (c.base_lr > 0, "base_lr", "must be > 0"),
        (0 <= c.min_lr <= c.lr, "min_lr", f"must be in [0, lr] (lr = {c.lr})"),
        (c.grad_clip > 0, "grad_clip", "must be > 0"),
        (c.eval_every >= 0, "eval_every", "must be >= 0 (0 = only at the end)"),
        (c.base_conf_sigma > 0, "base_conf_sigma", "must be > 0"),
        (c.base_conf_shape >= 0, "base_conf_shape", "must be >= 0"),
        (c.base_warmup >= 1, "base_warmup", "must be >= 1"),
        (c.device in ("auto", "cpu", "cuda", "mps"), "device", "must be 'auto', 'cpu', 'cuda' or 'mps'"),
        (c.dtype in ("auto", "float32", "bfloat16"), "dtype", "must be 'auto', 'float32' or 'bfloat16'"),
        (c.export_dtype in ("auto", "float32", "bfloat16"), "export_dtype",
         "must be 'auto', 'float32' or 'bfloat16'"),
        (c.micro_batch >= 0, "micro_batch", "must be >= 0 (0 = every sequence of a step at once)"),
        (c.rollout_batch >= 0, "rollout_batch", "must be >= 0 (0 = every rollout of a step at once)"),
        (c.prompts_per_step % WORLD == 0, "prompts_per_step", f"must be divisible by the {WORLD} processes"),
        (not c.fsdp or WORLD > 1, "fsdp",
         "shards a model across processes: run under torchrun --nproc_per_node=N"),
        (c.workers in (0, 1, 2), "workers", "must be 0 (2 where it pays), 1 or 2"),
        (c.workers != 2 or (c.method == "both" and c.init_from == "scratch" and WORLD == 1), "workers",
         "distills OPD and CaOPD side by side: --method=both, the toy, one process (no torchrun)"),
        (c.workers != 2 or sys.platform == "linux", "workers",
         f"forks a process per method, which {sys.platform} does not support safely: use --workers=1"),
        (not c.fsdp or c.init_from != "scratch", "fsdp",
         "shards a Hugging Face model's decoder layers; the toy GPT runs under DDP (drop --fsdp)"),
    ], cfg)
