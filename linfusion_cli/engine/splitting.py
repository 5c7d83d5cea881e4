"""One job's image split across the processes of a group (parallel/): what each stage does differently when it
runs on a band of the image rather than the whole.

- The UNet (and ControlNets beside it) run on this process's band of the latents; their convolutions,
  GroupNorms and LinFusion attention exchange what they need (parallel.split_image), so the result is the
  one-process result to fp32 reduction-order error. With a banded memory rung the UNet runs that band in row
  bands of its own (banded/share.py), sending the same messages.
- Noise is drawn whole from the seed on every process, which keeps its band: a seed gives the same image.
- The tiled VAE: each process runs the statistics pass and its share of the windows, every GroupNorm's
  statistics pooled over the processes as they are measured (so they are the whole image's), and holds the
  output rows of its rows of tiles (vae_tiles.WindowShare). From stage to stage nothing is put back together:
  the decoder fetches the latent rows under its tiles from the bands around it, the next stage's upscale makes on
  each process the rows its tiles encode and its band needs from the decoded rows they read, and the UNet fetches
  its band of the encoded latents (rows.py). Latents are gathered whole only for a stage that runs whole; the
  last stage's uint8 rows go to the first process.
- Everything every process must agree on (memory settings, VAE tiles, a request to stop) is agreed over the
  group before it is used, so the processes always run the same sequence of exchanges.
- A stage too small to split (a base image of 64 latent rows over 8 processes: fewer than one multiple of the
  UNet's downsampling each) runs whole on every process: the same work, the same result; its cost is small next
  to the stages that are split. A height that is not such a multiple splits too, the last band taking the rest.

With no group (or a group of one) every method is the identity: the one-process path is unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..base.errors import Interrupted, UsageError
from ..base.events import CancelToken
from ..models.tensors import upscale_rows, upscale_source_rows
from .banded import Alone, Share
from .host import Host
from .latent_ops import WHOLE_IMAGE, LatentOps
from .noise import NoiseSource
from .parallel import Bands, Comm, band_channel_stats, band_filter2d, downsampling, pooled_groups, regroup, split_image
from .parallel.comm import GATHER_ROOT
from .rows import Banded, RowStream, Span, fetch_rows
from .vae import LATENT_SCALE
from .vae_tiles import WindowShare

INTERRUPTS = {130: "SIGINT", 143: "SIGTERM"}


class ImageSplit:
    """This process's part of one job's split image (see the module docstring)."""

    def __init__(self, comm: Comm | None, unet_config: Any, host: Host | None = None) -> None:
        self.group = comm if comm is not None and comm.world > 1 else None  # the job's processes
        self.host = host or Host()  # copies into CPU memory go through it (engine/host.py)
        self.comm: Comm | None = None  # the group while this stage is split; None while it runs whole
        self.multiple = downsampling(list(unet_config["block_out_channels"]))
        self.whole_stages: list[int] = []  # latent heights of the stages that ran whole on every process

    @property
    def active(self) -> bool:
        """Whether this stage runs split (on bands)."""
        return self.comm is not None

    @property
    def grouped(self) -> bool:
        """Whether the job runs over a group of processes (whatever this stage does)."""
        return self.group is not None

    @property
    def writes(self) -> bool:
        """Whether this process writes the job's files (the first one)."""
        return self.group is None or self.group.writes

    def begin_stage(self, latent_height: int, latent_width: int) -> None:
        """This stage's bands: its latent rows split evenly on multiples of the UNet's downsampling (the last
        band taking any remainder), or none (the stage runs whole on every process) where the image is too
        short for a band each."""
        self.comm = None
        if self.group is None:
            return
        try:
            self.group.bands = Bands.split(latent_height, self.group.world, self.multiple, latent_width)
        except UsageError:
            self.whole_stages.append(latent_height)
            return
        self.comm = self.group

    def band_pixels(self) -> int:
        """The most image rows any process's band holds in this stage (what its memory is planned for)."""
        if self.comm is None or self.comm.bands is None:
            raise RuntimeError("band_pixels before begin_stage")
        return max(self.comm.bands.heights()) * LATENT_SCALE

    def band(self, whole: torch.Tensor) -> torch.Tensor:
        """This process's rows of a whole-image tensor at any scale (noise, latents, a control image)."""
        return whole if self.comm is None else self.comm.band(whole).contiguous()

    def pixel_rows(self) -> slice:
        """This process's rows of the stage's image, in px."""
        if self.comm is None:
            return slice(None)
        start, end = self.comm.geometry().rows(self.comm.rank)
        return slice(start * LATENT_SCALE, end * LATENT_SCALE)

    def held(self, latents: torch.Tensor) -> Banded:
        """A stage's denoised latents as rows of the whole: this process's band while the stage is split, the
        whole latents (on every process) otherwise."""
        if self.comm is None:
            return self.everywhere(latents)
        bands = self.comm.geometry()
        return Banded(latents, tuple(bands.rows(r) for r in range(bands.world)), self.comm.rank, bands.height)

    def everywhere(self, whole: torch.Tensor) -> Banded:
        """A tensor every process holds whole (an input image)."""
        return Banded.whole(whole, *((self.group.world, self.group.rank) if self.group else (1, 0)))

    def band_rows(self, rows: Banded) -> torch.Tensor:
        """This stage's band of latents held in any rows (what the UNet runs on): its band while the stage is
        split, the whole latents otherwise (gathered on every process: a stage too small to split)."""
        if self.group is None:
            return rows.tensor
        if self.comm is None:
            return self.fetch(rows, [(0, rows.height)] * self.group.world, "latents")
        bands = self.comm.geometry()
        return self.fetch(rows, [bands.rows(r) for r in range(self.group.world)], "latents").contiguous()

    def upscale(self, image: Banded, width: int, height: int, needs: list[Span]) -> Banded:
        """Rows needs[rank] of the image resized to width x height (models.tensors.upscale), on each process from
        the rows it reads (fetched from those that hold them)."""
        sources = [upscale_source_rows(rows, image.height, height) for rows in needs]
        slab = self.fetch(image, sources, "upscale")
        out = upscale_rows(slab, sources[image.rank][0], image.height, width, height, needs[image.rank])
        return Banded(out, tuple(needs), image.rank, height)

    def upscale_needs(self, encode_rows: list[Span]) -> list[Span]:
        """The rows of the upscaled image each process needs: those its VAE tiles encode, and while the stage is
        split its band's (a ControlNet conditions on it); the whole image while it runs whole."""
        if self.group is None or self.comm is None:
            return [(0, max(end for _, end in encode_rows))] * len(encode_rows)
        bands = self.comm.geometry()
        band = [(a * LATENT_SCALE, b * LATENT_SCALE) for a, b in (bands.rows(r) for r in range(self.group.world))]
        return [(min(a, c), max(b, d)) if b > a else (c, d) for (a, b), (c, d) in zip(encode_rows, band, strict=True)]

    def fetch(self, rows: Banded, needs: list[Span], kind: str) -> torch.Tensor:
        """Rows needs[rank] on every process, from the rows each holds (rows.fetch_rows over the group)."""
        group = self.group
        if group is None:
            return rows.tensor if needs[0] == rows.span else rows.rows(*needs[0])

        def exchange(sends: Mapping[int, torch.Tensor], receives: Mapping[int, torch.Tensor]) -> None:
            _exchange_on_device(group, sends, receives, kind)

        return fetch_rows(rows, needs, exchange)

    def gather(self, rows: Banded) -> torch.Tensor | None:
        """The whole tensor on the first process (None on the others), from the rows each holds."""
        if self.group is None:
            return rows.tensor
        needs = [(0, rows.height) if r == GATHER_ROOT else (0, 0) for r in range(self.group.world)]
        whole = self.fetch(rows, needs, "gather")
        return whole if self.writes else None

    def stream(self, rows: Banded) -> RowStream:
        """A split image's final uint8 rows, for the first process to write as they come (rows.RowStream)."""
        group = self.group
        assert group is not None

        def exchange(sends: Mapping[int, torch.Tensor], receives: Mapping[int, torch.Tensor]) -> None:
            _exchange_on_device(group, sends, receives, "image")

        return RowStream(rows, exchange, GATHER_ROOT)

    def all_finite(self, host: Host, tensor: torch.Tensor) -> bool:
        """Whether every process's tensor is finite (all processes get the same answer)."""
        return not self.agree_max(int(not host.all_finite(tensor)))

    @contextlib.contextmanager
    def models(self, *models: nn.Module) -> Iterator[None]:
        """The UNet (and what runs beside it) on this process's band, for the block."""
        if self.comm is None:
            yield
            return
        with split_image(self.comm, *models):
            yield

    def share(self) -> Alone:
        """What a UNet run in row bands needs to know of the rest of the image (banded/share.py): this stage's share
        of it while the stage is split, nothing otherwise."""
        return Alone() if self.comm is None else Share(self.comm)

    def noise(self, generator: torch.Generator) -> NoiseSource:
        """The stage's noise source for a sampler that draws noise at each step (Euler a): on a split stage
        drawn for the whole image, each process keeping its rows: the same draws as one process, the same image."""
        if self.comm is None:
            return NoiseSource(generator)
        return NoiseSource(generator, self.comm.geometry().height, self.band)

    def latent_ops(self) -> LatentOps:
        """The ops a refine method runs on this stage's latents: on this process's band while the stage is split,
        on the whole image otherwise (latent_ops.py)."""
        return WHOLE_IMAGE if self.comm is None else BandOps(self.comm)

    def vae_share(self) -> WindowShare | None:
        comm = self.group
        if comm is None:
            return None

        def pool(counts: list[float], mean: torch.Tensor, m2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return pooled_groups(comm, counts, mean, m2)

        def exchange(sends: Mapping[int, torch.Tensor], receives: Mapping[int, torch.Tensor], kind: str) -> None:
            _exchange_on_device(comm, sends, receives, kind)

        return WindowShare(comm.rank, comm.world, pool, comm.agree_all, exchange)

    def agree_max(self, value: int) -> int:
        """The largest of every process's `value` (memory settings: the most frugal any process needs)."""
        return self._agree(value, max)

    def agree_min(self, value: int) -> int:
        return self._agree(value, min)

    def _agree(self, value: int, pick: Callable[[list[int]], int]) -> int:
        return pick(self.agree_all(value))

    # --- one process out of memory: all step down together (parallel/regroup.py) -----------------------------
    def give_up_stage(self, why: str) -> bool:
        """This process cannot finish the stage: tell the others and leave the group. False where there is no group
        that can be rebuilt (one process; a group the caller made): the failure then ends the job as before."""
        if self.group is None or not regroup.can_regroup(self.group):
            return False
        regroup.give_up_stage(self.group, why)
        return True

    def stepping_down(self) -> str | None:
        """Why an exchange failed, when it is another process giving up the stage (None: a real failure)."""
        return None if self.group is None else regroup.stepping_down(self.group)

    def regroup(self) -> None:
        """Every process, after a step-down: a fresh group, to run the stage again."""
        if self.group is not None:
            regroup.regroup(self.group)

    def watched(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext() if self.group is None else regroup.watched(self.group)

    def check_cancel(self, cancel: CancelToken) -> None:
        """Stop at a safe point: with a group, all processes stop at the same one when any was asked to."""
        if self.group is None:
            cancel.check()
            return
        code = self.agree_max(cancel.reason[1] if cancel.reason else 0)
        if code:
            raise Interrupted(INTERRUPTS.get(code, "a signal"), code)

    def gather_peaks(self, peak: float | None) -> list[float | None]:
        """Every process's peak device memory (GiB), for the report."""
        if self.group is None:
            return [peak]
        mib = self.agree_all(round((peak or 0.0) * 1024))
        return [m / 1024 if peak is not None else None for m in mib]

    def sent_bytes(self) -> int:
        """What this process has sent to the others so far (0 alone)."""
        return 0 if self.group is None else sum(self.group.stats.sent.values())

    def agree_all(self, value: int) -> list[int]:
        """Every process's `value`, in rank order."""
        return [value] if self.group is None else self.group.agree_all(value)

    def report(self) -> dict[str, Any] | None:
        """The report's `parallel` section (None for one process): the group's record (Comm.report)."""
        if self.group is None:
            return None
        return self.group.report(split=self.comm is not None, stages_run_whole=len(self.whole_stages))


class BandOps(LatentOps):
    """LatentOps on this process's band of a split stage: the filter a halo conv, the statistics the whole
    image's (combined over the bands), so a refine method's result is the one-process result."""

    def __init__(self, comm: Comm) -> None:
        self.comm = comm

    def filter2d(self, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        return band_filter2d(self.comm, x, kernel)

    def channel_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return band_channel_stats(self.comm, x.float())


def _exchange_on_device(
    comm: Comm, sends: Mapping[int, torch.Tensor], receives: Mapping[int, torch.Tensor], kind: str
) -> None:
    """comm.exchange for tensors anywhere (uint8 rows in CPU memory, with NCCL on GPUs): moved to the group's
    device for the exchange, received ones copied back into their buffers."""
    device = comm.device
    buffers = {p: t if t.device == device else torch.empty_like(t, device=device) for p, t in receives.items()}
    comm.exchange({p: t.to(device) for p, t in sends.items()}, buffers, kind)
    for peer, target in receives.items():
        if buffers[peer] is not target:
            target.copy_(buffers[peer])
