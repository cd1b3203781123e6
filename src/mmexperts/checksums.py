"""sha256 checksums of files and tensors, as recorded in manifests and metadata and checked when they are read."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tensor_sha256(tensor: torch.Tensor) -> str:
    """Hex sha256 of a (CPU) tensor's raw bytes."""
    return hashlib.sha256(tensor.contiguous().numpy().reshape(-1).view(np.uint8)).hexdigest()
