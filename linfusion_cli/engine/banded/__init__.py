"""A UNet's high-resolution levels run in row bands on one device, so that no whole-resolution temporary beyond a
block's input and output exists at once; skip tensors optionally parked in CPU memory.

The arithmetic is the split image's (engine/parallel: convolution rows and halos, GroupNorm statistics combined
from bands, LinFusion's K^T V summed over bands), run over time instead of over processes; and both at once, a
split image's process running its share in bands (share.py). `banded_unet` installs it on a UNet for a block and
takes it off exactly.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

from torch import nn

from .banding import BAND_BYTES, Banding
from .share import Alone, Share
from .unet import banded_forward

__all__ = ["BAND_BYTES", "Alone", "Banding", "Share", "banded_forward", "banded_unet"]


@contextlib.contextmanager
def banded_unet(unet: nn.Module, banding: Banding | None) -> Iterator[None]:
    """`unet` runs `banded_forward` inside the block (nothing changes with `banding` None); its own forward is
    back on leaving, whatever happened."""
    if banding is None:
        yield
        return
    saved = vars(unet).get("forward")  # a forward set on the instance (a patch), put back as it was
    unet.forward = functools.partial(banded_forward, unet, banding)
    try:
        yield
    finally:
        if saved is not None:
            unet.forward = saved
        else:
            del unet.forward
