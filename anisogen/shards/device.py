"""The storage-dtype cast of ``emb.npy`` / ``src.npy`` on the encoder's device (torch).

:func:`encode_embedding_torch` is the device twin of :func:`anisogen.shards.schema.encode_embedding`: the
same float32 input gives the same bits (both round to nearest even; bfloat16 NaN is ``0x7FC0``; tested).
The generator casts on the device so that only the stored bytes cross to the host.
"""

from __future__ import annotations

import numpy as np
import torch

from .schema import EMB_DTYPES

#: storage dtype name -> (torch dtype on the device, numpy dtype the host bytes are viewed as)
_TORCH: dict[str, tuple[torch.dtype, np.dtype]] = {
    "fp16": (torch.float16, EMB_DTYPES["fp16"]),
    "bf16": (torch.bfloat16, EMB_DTYPES["bf16"]),
    "fp32": (torch.float32, EMB_DTYPES["fp32"]),
}


def encode_embedding_torch(x: torch.Tensor, dtype: str = "fp16") -> torch.Tensor:
    """float32 tensor (any shape, any device) -> its storage-dtype tensor on the same device.

    ``bf16`` is returned as int16 bit patterns (torch has no general uint16); :func:`host_view` turns the
    host copy into the uint16 array the shard format stores.
    """
    if dtype not in _TORCH:
        raise ValueError(f"unknown embedding dtype {dtype!r}; choose one of {sorted(_TORCH)}")
    x = x.to(torch.float32)
    if dtype == "bf16":  # NaN -> the canonical 0x7FC0 of the NumPy path (torch may keep the payload)
        return x.to(torch.bfloat16).view(torch.int16).masked_fill(torch.isnan(x), 0x7FC0)
    return x.to(_TORCH[dtype][0])


def host_view(host: torch.Tensor, dtype: str) -> np.ndarray:
    """The numpy array (storage dtype of the format) over a CPU tensor made by :func:`encode_embedding_torch`."""
    arr = host.numpy()
    return arr.view(_TORCH[dtype][1]) if dtype == "bf16" else arr
