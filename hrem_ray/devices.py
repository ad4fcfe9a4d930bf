"""The torch device a command or a service runs its model on, checked once before any work.

A device that this machine lacks (``cuda`` without CUDA, ``cuda:7`` on a 1-GPU machine)
would otherwise fail deep inside the first forward pass, after minutes of loading; here it is
one line (a ``ValueError``) that the CLI prints as it is.
"""

from __future__ import annotations

import torch


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` that exists here: the CPU, or a visible CUDA device."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r}: give cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"device {device!r}: give cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r}: CUDA is not available here (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda or 'none'}): use --device cpu"
        )
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ValueError(
            f"device {device!r}: this machine shows {count} CUDA device(s), cuda:0 to "
            f"cuda:{count - 1}"
        )
    return dev
