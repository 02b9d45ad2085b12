"""
Several processes (torchrun), on torch's own engines. A reader of the method can skip this file:
with one process every function here is the identity or a plain call.

    DistributedDataParallel  every process holds the whole model; gradients are averaged in
                             buckets, overlapped with the backward pass (the default)
    FSDP2 (--fsdp=True)      torch.distributed.fsdp.fully_shard: weights, gradients and AdamW's
                             state are split across the processes, each decoder layer all-gathered
                             when it runs; what no layer holds (embeddings, final norm, lm_head, of
                             student and teacher) belongs to the Distiller, the root

Both see the loss because it is computed inside the wrapped module's forward (caopd.Distiller):
through `.module` or a submodule, DDP would leave each process with its own gradient, and FSDP2's
root parameters would still be sharded. Every collective of ours runs on the model's device (nccl
has no CPU tensors), and no process waits alone: evaluation is split across all of them.
"""
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # torchrun sets these
LOCAL_RANK = int(os.environ.get("LOCAL_RANK", 0))

def init(device):
    """Join the process group (torchrun): nccl on CUDA, gloo on the CPU. Returns this process's device."""
    if WORLD == 1:
        return device
    if device == "cuda":
        device = f"cuda:{LOCAL_RANK}"
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=torch.device(device))
    else:
        dist.init_process_group("gloo")
    return device

def close():
    if WORLD > 1:
        dist.destroy_process_group()

def all_mean(stats, device):
    """The mean over the processes of {name: float}, reduced as one float64 tensor on `device`."""
    if WORLD == 1:
        return dict(stats)
    t = torch.tensor(list(stats.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(stats, (t / WORLD).tolist()))

def gather(items):
    """Each process's list -> their concatenation in rank order, on rank 0 (None elsewhere)."""
    if WORLD == 1:
        return items
    out = [None] * WORLD if RANK == 0 else None
    dist.gather_object(items, out, dst=0)
    return None if RANK != 0 else [x for part in out for x in part]

def my_slice(n):
    """This process's contiguous share of n items: rank r takes [r n / W, (r + 1) n / W)."""
    return slice(RANK * n // WORLD, (RANK + 1) * n // WORLD)

# -----------------------------------------------------------------------------
# FSDP2: which modules are sharded, sampling with every layer gathered, whole state dicts

def decoder_layers(model):
    """The repeated blocks of a Hugging Face causal LM, found by the class names the model itself
    declares unsplittable (_no_split_modules: Qwen3DecoderLayer, LlamaDecoderLayer, ...)."""
    names = set(getattr(model, "_no_split_modules", None) or [])  # (fully_shard subclasses them: the MRO)
    return [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]

def shard_layers(model):
    """fully_shard each decoder layer; what is left joins the root (caopd.Distiller) later."""
    from torch.distributed.fsdp import fully_shard
    for layer in decoder_layers(model):
        fully_shard(layer)

def wrap(distiller, fsdp, device):
    """The module a step calls: DDP or FSDP2 around the Distiller, or the Distiller itself."""
    if WORLD == 1 and not fsdp:
        return distiller
    if fsdp:
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
        fully_shard(distiller)  # the root: the student's and teacher's embeddings, norms and output layers
        register_fsdp_forward_method(distiller, "sample")  # sampling gathers the root's weights like forward
        return distiller
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [torch.device(device).index] if "cuda" in str(device) else None
    # broadcast_buffers=False: the only buffers are rotary tables and position ids, equal everywhere
    return DDP(distiller, device_ids=ids, broadcast_buffers=False)

def inner(net):
    """The Distiller inside a DDP wrapper (FSDP2 modifies the module in place)."""
    return getattr(net, "module", net)

def is_sharded(model):
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters())

@contextmanager
def gathered(net):
    """Sampling under FSDP2 with every student layer all-gathered once for the whole call and
    resharded after: unsharding the root alone would all-gather every layer at every token, and
    processes whose rows finish at different tokens would then wait on each other forever."""
    from torch.distributed.fsdp import FSDPModule
    d = inner(net)
    sharded = isinstance(d, FSDPModule)
    layers = [m for m in d.student.modules() if isinstance(m, FSDPModule)] if sharded else []
    if layers:
        d.unshard()  # the root's own weights (lm_head, embeddings)
    for m in layers:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in layers:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)

@contextmanager
def no_sync(net, last):
    """Accumulate a micro-batch's gradients locally; only the last one of a step synchronizes."""
    from torch.distributed.fsdp import FSDPModule
    if isinstance(net, FSDPModule):
        net.set_requires_gradient_sync(last)
        yield
        net.set_requires_gradient_sync(True)
    elif hasattr(net, "no_sync") and not last:
        with net.no_sync():
            yield
    else:
        yield

def local_norm(norm):
    """clip_grad_norm_'s total norm as a plain tensor (a replicated DTensor under FSDP2)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

def full_state(model):
    """model.state_dict() with every shard gathered, on rank 0 (a collective under FSDP2; {} elsewhere)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

def load_full_state(model, state, broadcast=False):
    """Load a whole state dict into model, sharded or not. broadcast: only rank 0 has it (the others
    pass {}), and each process receives its part from there."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast)
    set_model_state_dict(model, state, options=options)

def full_optimizer_state(model, opt):
    """The optimizer's state, gathered on rank 0 under FSDP2 (keyed by parameter name there)."""
    if not is_sharded(model):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, opt, options=options)

def load_optimizer_state(model, opt, state):
    if not is_sharded(model):
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))

def snapshot(model):
    """A copy of model's weights on the CPU, to load back with restore(): this process's shards
    under FSDP2, the whole state otherwise."""
    local = lambda v: v.to_local() if hasattr(v, "to_local") else v
    return {k: local(v).to("cpu", copy=True) for k, v in model.state_dict().items()}

@torch.no_grad()
def restore(model, snap):
    if not is_sharded(model):
        model.load_state_dict(snap)
        return
    for k, v in model.state_dict().items():  # FSDP2's state dict: the parameters themselves, sharded
        (v.to_local() if hasattr(v, "to_local") else v).copy_(snap[k])

def broadcast_buffers(model, source):
    """Buffers a state dict leaves out (rotary tables are not saved): rank 0's values, from `source`
    (its real model; None elsewhere), to every process."""
    for name, buf in model.named_buffers():
        if RANK == 0:
            buf.copy_(source.get_buffer(name))
        dist.broadcast(buf, src=0)

# -----------------------------------------------------------------------------
# side by side: the two methods of one run at the same time, in two processes on one machine

def side_by_side(run, names):
    """run(name) for each name, each in a forked process of its own, at the same time; returns
    when all have finished: None, or (name, exit code) of the first that failed (the others are
    then stopped). Ctrl-C stops them all (each keeps its last checkpoint) and raises
    KeyboardInterrupt here. Forked, the processes start with the parent's model and data, and
    compute exactly what the parent would: the same numbers as one after the other."""
    import multiprocessing
    import sys
    sys.stdout.flush(), sys.stderr.flush()  # else each child would print the parent's pending output again
    fork = multiprocessing.get_context("fork")
    procs = {name: fork.Process(target=_child, args=(run, name)) for name in names}
    for p in procs.values():
        p.start()
    try:
        while procs:  # a failure is seen as it happens, not after the other finishes
            for name, p in list(procs.items()):
                p.join(timeout=0.2)
                if p.exitcode is not None:
                    del procs[name]
                    if p.exitcode != 0:
                        return name, p.exitcode
        return None
    finally:
        for p in procs.values():  # left running after a failure or Ctrl-C
            p.terminate()
            p.join()

def _child(run, name):
    import ctypes
    import signal
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the parent, even a SIGKILLed one
    if os.getppid() == 1:  # it died before that line
        raise SystemExit(1)
    try:
        run(name)
    except KeyboardInterrupt:  # Ctrl-C reaches every process of the terminal: one line from the parent
        raise SystemExit(130)
