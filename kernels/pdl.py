"""Programmatic dependent launch (PDL, sm90+): the helpers every kernel of a PDL decode chain uses.

A kernel launched with `launch_pdl=True` may start while its producer still runs; it must call
`gdc_wait()` (griddepcontrol.wait) before its first access to the producer's output, and
`gdc_launch_dependents()` (griddepcontrol.launch_dependents) lets the next launch begin. Kernels in this
project wait first and trigger after the wait, so at most one grid waits behind a running one.
"""
from __future__ import annotations

import torch

try:  # grid dependency control (PDL); absent in old Triton
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover
    gdc_launch_dependents = gdc_wait = None

__all__ = ["gdc_launch_dependents", "gdc_wait", "pdl_supported"]


def pdl_supported(device) -> bool:
    """Programmatic dependent launch: CUDA sm90+ and a Triton with griddepcontrol."""
    device = torch.device(device)
    return (gdc_wait is not None and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)
