"""Resumable checkpoints that hold only what training changes, without pickle.

Layout of ``<output>/checkpoints/step-00000120/``::

    trainable.safetensors     every parameter with requires_grad, by name, float32
    optimizer.safetensors     optimizer state tensors ("state.<i>.<key>")
    state.json                step, data position, scheduler state, optimizer param groups and
                              non-tensor state, parameter names, config fingerprint, python/numpy RNG
    rng-rank<r>.safetensors   torch CPU (and CUDA) RNG state of each rank

A checkpoint directory is written under ``.tmp-step-*`` and renamed when complete, so a crash never
leaves something that looks like a checkpoint. The frozen LM is never saved.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"


def _cpu_contig(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def trainable_tensors(model) -> dict[str, torch.Tensor]:
    """CPU float32 copies of every parameter with ``requires_grad`` (names as in ``named_parameters``)."""
    return {n: _cpu_contig(p).float().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into the trainable parameters; the name sets must match exactly."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the model's trainable parameters: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    with torch.no_grad():
        for n, p in params.items():
            if tuple(tensors[n].shape) != tuple(p.shape):
                raise ValueError(f"checkpoint tensor {n} has shape {tuple(tensors[n].shape)}, model has {tuple(p.shape)}")
            p.copy_(tensors[n].to(p.device, p.dtype))


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``opt.state_dict()`` into tensors (for safetensors) and a JSON-able rest."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = _cpu_contig(v)
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        _, idx, k = name.split(".", 2)
        state.setdefault(int(idx), {})[k] = t
    for name, v in meta["scalars"].items():
        idx, k = name.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, json) capturing torch CPU/CUDA, numpy and python RNG states of this process."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    np_state = np.random.get_state()
    js = {
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    return tensors, js


def set_rng_state(tensors: dict[str, torch.Tensor], js: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    n = js["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = js["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def save_checkpoint(
    ckpt_root: Path, step: int, *, model, optimizer, scheduler, state: dict, rank: int, is_main: bool, barrier
) -> Path | None:
    """Collective: every rank writes its RNG file, the main process writes the rest and publishes.

    ``state`` (JSON-able) should hold the step, data position and config fingerprint. ``barrier`` is a
    zero-argument callable synchronising ranks. Returns the final path on the main process.
    """
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / f"step-{step:08d}"
    tmp = ckpt_root / f".tmp-step-{step:08d}"
    if is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    rt, rj = rng_state()
    save_file(rt, str(tmp / f"rng-rank{rank}.safetensors"))
    (tmp / f"rng-rank{rank}.json").write_text(json.dumps(rj))
    if is_main:
        save_file(trainable_tensors(model), str(tmp / TRAINABLE))
        ot, om = optimizer_to_flat(optimizer)
        save_file(ot, str(tmp / OPTIMIZER))
        full = dict(state)
        full["step"] = step
        full["optimizer"] = om
        full["scheduler"] = scheduler.state_dict()
        full["trainable_names"] = [n for n, p in model.named_parameters() if p.requires_grad]
        (tmp / STATE).write_text(json.dumps(full, indent=1, default=_json_default))
    barrier()
    if is_main:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    barrier()
    return final if is_main else None


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if torch.is_tensor(o):
        return o.tolist()
    raise TypeError(f"cannot store {type(o).__name__} in a checkpoint's state.json")


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete ``step-*`` directory, or None."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return None
    done = sorted(p for p in ckpt_root.glob("step-*") if (p / STATE).is_file() and (p / TRAINABLE).is_file())
    return done[-1] if done else None


def load_checkpoint(path: Path, *, model, optimizer, scheduler, rank: int) -> dict:
    """Restore trainable tensors, optimizer, scheduler and this rank's RNG; return the state dict."""
    path = Path(path)
    state = json.loads((path / STATE).read_text())
    load_trainable(model, load_file(str(path / TRAINABLE)))
    optimizer_from_flat(optimizer, load_file(str(path / OPTIMIZER)), state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng_file = path / f"rng-rank{rank}.safetensors"
    if not rng_file.is_file():
        raise FileNotFoundError(
            f"{rng_file} is missing: the checkpoint was written with fewer processes; resume with the same world size"
        )
    set_rng_state(load_file(str(rng_file)), json.loads((path / f"rng-rank{rank}.json").read_text()))
    return state


def prune_checkpoints(ckpt_root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (keep <= 0 keeps everything)."""
    if keep <= 0:
        return
    done = sorted(p for p in Path(ckpt_root).glob("step-*") if (p / STATE).is_file())
    for p in done[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
