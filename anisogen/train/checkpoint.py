"""Resumable checkpoints that hold only what training changes, without pickle.

Layout of ``<output>/checkpoints/step-00000120/``::

    trainable.safetensors     every parameter with requires_grad, by fully qualified name, float32
    optimizer.safetensors     optimizer state tensors, keyed ``<parameter name>::<state key>``
    state.json                format version, step, data position, optimizer param groups (parameter
                              names instead of indices) and non-tensor state, config, python/numpy RNG
    rng-rank<r>.safetensors   torch CPU (and CUDA) RNG state of each rank (+ rng-rank<r>.json)

Tensors are stored *gathered*, by parameter name, whatever the parallelism: under FSDP the shards are
collected on rank 0 (``torch.distributed.checkpoint.state_dict`` with ``full_state_dict``) and
scattered back on resume. So a checkpoint resumes exactly under the layout that wrote it, and also
under another world size or another data-parallel scheme (DDP <-> FSDP).

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
FORMAT_VERSION = 2


def _cpu_contig(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def trainable_names(model) -> list[str]:
    """Names of the parameters with ``requires_grad`` (canonical: no DDP/FSDP prefixes)."""
    return [n for n, p in _unwrap(model).named_parameters() if p.requires_grad]


def _unwrap(model):
    return getattr(model, "module", model) if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _is_fsdp(model) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - old torch
        return False
    return any(isinstance(m, FSDPModule) for m in _unwrap(model).modules())


def trainable_tensors(model) -> dict[str, torch.Tensor]:
    """CPU float32 copies of every parameter with ``requires_grad`` of an *unsharded* model."""
    return {n: _cpu_contig(p).float().clone() for n, p in _unwrap(model).named_parameters() if p.requires_grad}


def gather_trainable(model) -> dict[str, torch.Tensor]:
    """Collective under FSDP: the full trainable tensors on rank 0 ({} elsewhere); else a local copy."""
    if not _is_fsdp(model):
        return trainable_tensors(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    names = set(trainable_names(model))
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                              ignore_frozen_params=True))
    return {n: _cpu_contig(t).float() for n, t in sd.items() if n in names}


def load_trainable(model, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into the trainable parameters (sharding them under FSDP); names must match."""
    names = trainable_names(model)
    missing = sorted(set(names) - set(tensors))
    unexpected = sorted(set(tensors) - set(names))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the model's trainable parameters: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    params = dict(_unwrap(model).named_parameters())
    for n in names:
        if tuple(tensors[n].shape) != tuple(params[n].shape):
            raise ValueError(
                f"checkpoint tensor {n} has shape {tuple(tensors[n].shape)}, model has {tuple(params[n].shape)}"
            )
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, {n: tensors[n] for n in names},
                             options=StateDictOptions(full_state_dict=True, strict=False))
        return
    with torch.no_grad():
        for n in names:
            params[n].copy_(tensors[n].to(params[n].device, params[n].dtype))


# -------------------------------------------------------------------------------------- optimizer


def _index_names(model, opt: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's flat index order (groups concatenated)."""
    by_id = {id(p): n for n, p in _unwrap(model).named_parameters()}
    return [by_id[id(p)] for g in opt.param_groups for p in g["params"]]


def gather_optimizer(model, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Collective under FSDP. ``(tensors, meta)`` keyed by parameter name: tensors ``name::key``,
    meta ``{"param_groups": [... "params": [names]], "scalars": {"name::key": value}}``."""
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        osd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        state, groups = osd.get("state", {}), osd.get("param_groups", [])
    else:
        sd = opt.state_dict()
        names = _index_names(model, opt)
        state = {names[i]: st for i, st in sd["state"].items()}
        groups = [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]
    tensors, scalars = {}, {}
    for name, st in state.items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{name}::{k}"] = _cpu_contig(v)
            else:
                scalars[f"{name}::{k}"] = v
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer(model, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Restore the state written by :func:`gather_optimizer` (re-sharded under FSDP)."""
    state: dict[str, dict] = {}
    for key, t in tensors.items():
        name, k = key.rsplit("::", 1)
        state.setdefault(name, {})[k] = t
    for key, v in meta["scalars"].items():
        name, k = key.rsplit("::", 1)
        state.setdefault(name, {})[k] = v
    groups = meta["param_groups"]
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, opt, {"state": state, "param_groups": groups},
                                 options=StateDictOptions(full_state_dict=True))
        return
    names = _index_names(model, opt)
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted({n for g in groups for n in g["params"]} - set(index))
    if unknown:
        raise ValueError(f"checkpoint optimizer holds parameters this run does not train: {unknown[:5]}")
    opt.load_state_dict({
        "state": {index[n]: st for n, st in state.items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in groups],
    })


# -------------------------------------------------------------------------------------- RNG


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


# -------------------------------------------------------------------------------------- save / load


def save_checkpoint(ckpt_root: Path, step: int, *, model, optimizer, state: dict, rank: int, is_main: bool,
                    barrier) -> Path | None:
    """Collective: every rank takes part in gathering and writes its RNG file; the main process writes
    the rest and publishes the directory. Returns the final path on the main process."""
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / f"step-{step:08d}"
    tmp = ckpt_root / f".tmp-step-{step:08d}"
    trainable = gather_trainable(model)
    ot, om = gather_optimizer(model, optimizer)
    if is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    rt, rj = rng_state()
    save_file(rt, str(tmp / f"rng-rank{rank}.safetensors"))
    (tmp / f"rng-rank{rank}.json").write_text(json.dumps(rj))
    if is_main:
        save_file(trainable, str(tmp / TRAINABLE))
        save_file(ot, str(tmp / OPTIMIZER))
        full = {**state, "format_version": FORMAT_VERSION, "step": step, "optimizer": om,
                "trainable_names": trainable_names(model)}
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


def read_state(path: Path) -> dict:
    """``state.json`` of a checkpoint; refuses checkpoints of an older format in one line."""
    state = json.loads((Path(path) / STATE).read_text())
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {state.get('format_version', 1)} is not {FORMAT_VERSION} "
                         f"(written by an older anisogen); resume it with that version or start with --no-resume")
    return state


def load_checkpoint(path: Path, *, model, optimizer, rank: int) -> dict:
    """Collective under FSDP. Restore trainable tensors, optimizer state and this rank's RNG (a rank
    the checkpoint has no RNG file for -- a larger world than the one that wrote it -- keeps its
    seeded RNG); return the state dict."""
    path = Path(path)
    state = read_state(path)
    load_trainable(model, load_file(str(path / TRAINABLE)))
    load_optimizer(model, optimizer, load_file(str(path / OPTIMIZER)), state["optimizer"])
    rng_file = path / f"rng-rank{rank}.safetensors"
    if rng_file.is_file():
        set_rng_state(load_file(str(rng_file)), json.loads((path / f"rng-rank{rank}.json").read_text()))
    return state


def prune_checkpoints(ckpt_root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (keep <= 0 keeps everything)."""
    if keep <= 0:
        return
    done = sorted(p for p in Path(ckpt_root).glob("step-*") if (p / STATE).is_file())
    for p in done[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
