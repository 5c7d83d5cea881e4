"""Split ops (engine.parallel) equal the whole-image op on every band: halo convs, GroupNorm, LinFusion attention.

Each multi-process test is one launch of gloo processes running a battery of cases (a launch costs more than all
its cases); the processes compare their band with a whole-image reference built before they were forked.
"""

from __future__ import annotations

import itertools
import os
import time
from fractions import Fraction
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from parallel_harness import band_of, compare, launch, ok_results
from torch import nn

from linfusion_cli.base.errors import UsageError
from linfusion_cli.engine.parallel import (
    AttentionReduce,
    Bands,
    Comm,
    ConvRows,
    ConvSpec,
    LaunchEnv,
    ParallelError,
    band_conv2d,
    band_group_norm,
    combine_moments,
    gather_bands,
    halo_transfers,
    joined,
    local_moments,
    pooled_groups,
)
from linfusion_cli.linfusion.attention import LinFusionAttention

WIDTH = 10
KERNELS = (1, 3, 5, 7)
# equal, unequal and ragged bands (latent rows; ragged: the height is no multiple of 2, the last band has the rest)
HEIGHTS = {2: ([8, 8], [4, 12], [4, 9]), 3: ([4, 4, 4], [2, 6, 4], [2, 6, 3])}
BIG_DILATION = 9  # reach 18+ rows: more than any band here, and more than two bands of the 3-way splits


def conv_cases() -> list[tuple[int, int, int, str]]:
    """(kernel, stride, dilation, padding) for every combination the brief names, plus asymmetric paddings."""
    cases = []
    for k, s, d in itertools.product(KERNELS, (1, 2), (1, 2, 4, BIG_DILATION)):
        cases.append((k, s, d, "given"))
        if s == 1:
            cases.append((k, s, d, "same"))
    return [*cases, (4, 1, 1, "same"), (4, 1, 3, "same"), (3, 2, 1, "pad0-bottom")]


def make_conv(kernel: int, stride: int, dilation: int, padding: str, seed: int) -> tuple[nn.Conv2d, int]:
    """The conv, and the extra zero rows diffusers' VAE Downsample2D pads below the image (F.pad (0, 1, 0, 1))."""
    torch.manual_seed(seed)
    if padding == "pad0-bottom":
        conv = nn.Conv2d(3, 5, kernel, stride, padding=0, dilation=dilation)
    elif padding == "same":
        conv = nn.Conv2d(3, 5, kernel, stride, padding="same", dilation=dilation)
    else:
        conv = nn.Conv2d(3, 5, kernel, stride, padding=dilation * (kernel // 2), dilation=dilation)
    return conv, int(padding == "pad0-bottom")


def conv_battery(comm: Comm, whole: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    out = []
    for heights in HEIGHTS[comm.world]:
        comm.bands = Bands.of_heights(heights, multiple=2)
        x = whole[str(heights)]
        for i, case in enumerate(conv_cases()):
            conv, extra = make_conv(*case, seed=i)
            with torch.no_grad():
                if extra and sum(heights) % 2:  # the VAE's pad-below conv floors an odd height: not splittable
                    with pytest.raises(UsageError, match="grid-keeping"):
                        band_conv2d(comm, ConvSpec.of(conv, extra_bottom=1), F.pad(band_of(comm, x), (0, 1)))
                    out.append({"case": (*case, tuple(heights)), "equal": True, "refused": True})
                    continue
                if extra:
                    ref = conv(F.pad(x, (0, 1, 0, 1)))  # diffusers' Downsample2D(padding=0): a row and a column
                    spec = ConvSpec.of(conv, extra_bottom=1)  # the band pads the column; the row is the image's
                    band = band_conv2d(comm, spec, F.pad(band_of(comm, x), (0, 1)))
                else:
                    ref = conv(x)
                    band = band_conv2d(comm, ConvSpec.of(conv), band_of(comm, x))
            out.append({"case": (*case, tuple(heights)), **compare(band, band_of(comm, ref))})
    return out


def whole_inputs(world: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(world)
    return {str(h): torch.randn(2, 3, sum(h), WIDTH) for h in HEIGHTS[world]}


@pytest.mark.parametrize("world", [2, 3])
def test_halo_conv_equals_whole_conv_bit_for_bit(world: int) -> None:
    """Same arithmetic per output row, so equal bits (fp32, CPU), for every kernel, stride, dilation, padding and
    band shape, including halos reaching past a neighbour's whole band (ragged heights: to reduction order)."""
    results = ok_results(launch(world, conv_battery, whole_inputs(world)))
    for rank, cases in enumerate(results):
        assert len(cases) == len(conv_cases()) * len(HEIGHTS[world])
        for case in cases:
            # a ragged image's whole-height 1x1 strided conv may take another CPU kernel: reduction-order error
            ragged = sum(case["case"][-1]) % 2 == 1
            assert case["equal"] or (ragged and case["rel"] <= 1e-6), f"rank {rank} {case}"


def test_conv_rows_agree_with_brute_force() -> None:
    """The halo plan: each band receives the rows its outputs read that another band holds; exactly those when
    the conv is not dilated, else the contiguous range spanning them (a dilated kernel's gaps come along)."""
    for (k, s, d, padding), heights in itertools.product(
        conv_cases(), [[4, 12], [2, 6, 4], [6, 2, 2, 6], [4, 9], [2, 6, 3]]
    ):
        conv, extra = make_conv(k, s, d, padding, seed=0)
        rows = ConvSpec.of(conv, extra).rows
        edges = Bands.of_heights(heights, 2).edges
        if extra and edges[-1] % 2:
            continue  # refused (conv_battery)
        transfers = halo_transfers(rows, edges)
        out = rows.out_edges(edges)
        for dst in range(len(heights)):
            taps = {o * s - rows.pad_top + j * d for o in range(out[dst], out[dst + 1]) for j in range(k)}
            own = range(edges[dst], edges[dst + 1])
            foreign = {r for r in taps if 0 <= r < edges[-1] and r not in own}  # what the outputs really read
            got = {r for t in transfers if t.dst == dst for r in range(t.start, t.end)}
            hull = {r for r in range(max(0, min(taps)), min(edges[-1], max(taps) + 1)) if r not in own}
            assert foreign <= got <= hull, (k, s, d, padding, heights, dst)
            assert d > 1 or got == foreign


def test_bands_split_on_multiples_and_slice_any_scale() -> None:
    bands = Bands.split(72, 3, multiple=8)
    assert bands.edges == (0, 24, 48, 72)
    assert Bands.split(64, 3, 4).heights() == [20, 24, 20]
    image = torch.arange(64 * 8).view(64 * 8, 1)  # pixel rows: 8x the latent's
    assert bands.take(torch.zeros(1, 4, 72, 5), 1).shape[-2] == 24
    assert Bands.split(64, 2, 4).take(image, 1, dim=0)[0, 0].item() == 32 * 8
    ragged = Bands.split(68, 2, multiple=8, width=9)  # the last band takes the 4 rows over a multiple of 8
    assert ragged.edges == (0, 32, 68) and ragged.ragged and not bands.ragged
    assert ragged.at(Fraction(1, 8)) == (0, 4, 9)  # 68 -> 34 -> 17 -> 9 rows: each level rounds up
    assert ragged.scale_of(1, 5) == Fraction(1, 8) and ragged.scale_of(0, 4) == Fraction(1, 8)
    assert ragged.scale_of(1, 36 * 8) == 8 and ragged.scale_of_whole(17) == Fraction(1, 4)
    assert ragged.token_level(1, 9 * 3) == (Fraction(1, 4), 3)  # 9 rows of 17, 3 columns of ceil(9 / 4)
    assert ragged.take(torch.zeros(1, 4, 17, 3), 1).shape[-2] == 9
    with pytest.raises(UsageError, match="multiples of 8"):
        Bands.of_heights([36, 32], 8)  # only the last band may be ragged
    with pytest.raises(UsageError, match="fewer than the 4 processes"):
        Bands.split(24, 4, multiple=8)


def test_launch_environment_is_checked_and_one_process_needs_no_group() -> None:
    assert LaunchEnv.read({}) == LaunchEnv(0, 1, 0)
    with pytest.raises(UsageError, match="whole numbers"):
        LaunchEnv.read({"WORLD_SIZE": "two"})
    with pytest.raises(UsageError, match="not within"):
        LaunchEnv.read({"WORLD_SIZE": "2", "RANK": "2"})
    with pytest.raises(UsageError, match="MASTER_ADDR"):
        LaunchEnv.read({"WORLD_SIZE": "2", "RANK": "1"})
    with joined(5.0, torch.device("cpu")) as comm:  # no launcher: one process, nothing sent
        comm.bands = Bands.split(16, 1, 4)
        report = comm.report()
    assert (report["world_size"], report["backend"], report["comm_seconds"]) == (1, "local", 0.0)


def test_grid_changing_conv_is_refused() -> None:
    with pytest.raises(UsageError, match="grid-keeping"):
        ConvRows(3, 1, 1, 0, 0).out_edges((0, 8, 16))


# --- GroupNorm ------------------------------------------------------------------------------------------------------


NormCase = tuple[str, nn.GroupNorm, torch.Tensor, dict[str, torch.Tensor]]  # name, norm, x, reference by bands


def norm_battery(comm: Comm, cases: list[NormCase]) -> list[dict]:
    out = []
    for heights in HEIGHTS[comm.world]:
        comm.bands = Bands.of_heights(heights, multiple=2)
        for name, norm, x, refs in cases:
            band, ref = band_of(comm, x[..., : sum(heights), :]), band_of(comm, refs[str(heights)])
            if name == "tokens":  # (B, C, N), as the VAE attention's group_norm sees a band: whole rows of tokens
                band, ref = band.flatten(2), ref.flatten(2)
            with torch.no_grad():
                ours = band_group_norm(comm, norm, band)
            out.append({"case": (name, tuple(heights)), "dtype": str(ours.dtype), **compare(ours, ref)})
    return out


def norm_cases(world: int) -> list[NormCase]:
    torch.manual_seed(100 + world)
    norm = nn.GroupNorm(4, 16, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 16, max(sum(h) for h in HEIGHTS[world]), WIDTH) * 3 + 5
    cases = []
    for name, xs in (("fp32", x), ("fp16", x.half()), ("tokens", x)):
        refs = {}
        for h in HEIGHTS[world]:
            with torch.no_grad():  # half precision: the fp32 GroupNorm of the same values, rounded once
                refs[str(h)] = norm(xs[..., : sum(h), :].float()).to(xs.dtype)
        cases.append((name, norm, xs, refs))
    return cases


@pytest.mark.parametrize("world", [2, 3])
def test_group_norm_uses_whole_image_statistics(world: int) -> None:
    for rank, cases in enumerate(ok_results(launch(world, norm_battery, norm_cases(world)))):
        for case in cases:
            # fp32: statistics combined in another order than nn.GroupNorm's -> a few ulps; fp16: rounding once
            bound = 2e-6 if case["dtype"] == "torch.float32" else 2**-10
            assert case["rel"] < bound, f"rank {rank} {case}"


def test_moments_combined_exactly_at_large_n() -> None:
    """4M elements with |mean| >> std (a 16K top level): fp32 sums of x and x^2 lose the variance to
    cancellation; per-band (mean, M2) combined by Chan's formula keep it to ~1e-7 of the fp64 truth."""
    torch.manual_seed(0)
    x = torch.randn(1 << 22) * 0.5 + 300.0  # (N,) fp32
    truth = x.double().var(correction=0).item()
    parts = [x[:1_000_000], x[1_000_000:2_600_000], x[2_600_000:]]  # three unequal bands
    moments = [local_moments(p[None]) for p in parts]
    _, _, m2 = combine_moments([m[0] for m in moments], [m[1] for m in moments], [m[2] for m in moments])
    chan = m2.item() / x.numel()
    sums = sum(p.sum() for p in parts), sum(p.square().sum() for p in parts)  # fp32 all-reduce of sums
    naive = (sums[1] / x.numel() - (sums[0] / x.numel()) ** 2).item()
    assert abs(chan - truth) / truth < 1e-6
    assert abs(naive - truth) / truth > 1e-2  # the plain fp32 way is not even close


def test_local_moments_half_precision_in_chunks() -> None:
    x = (torch.randn(3, 5, 1000) * 4 + 2).half()
    count, mean, m2 = local_moments(x)
    var, ref_mean = torch.var_mean(x.double(), dim=-1, correction=0)
    assert count.item() == 1000
    assert torch.allclose(mean.double(), ref_mean, rtol=1e-6, atol=1e-6)
    assert torch.allclose(m2.double() / 1000, var, rtol=1e-5)


# --- LinFusion attention -----------------------------------------------------------------------------------------


def attention_battery(comm: Comm, layer: LinFusionAttention, x: torch.Tensor, ref: torch.Tensor) -> list[dict]:
    out = []
    heights = HEIGHTS[comm.world][1]
    comm.bands = Bands.of_heights(heights, multiple=2)
    rows = x.view(x.shape[0], sum(heights), WIDTH, -1)  # (B, H, W, C)
    for chunk in (None, 7):
        layer.token_chunk = chunk
        layer.reducer = AttentionReduce(comm, layer.heads)
        with torch.no_grad():
            band = layer(band_of(comm, rows, dim=1).flatten(1, 2))
        ref_band = band_of(comm, ref.view_as(rows), dim=1).flatten(1, 2)
        out.append({"chunk": chunk, **compare(band, ref_band)})
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_linfusion_attention_sums_summaries_over_bands(world: int) -> None:
    torch.manual_seed(7)
    layer = LinFusionAttention(32, 4, 8).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.5))
        x = torch.randn(2, sum(HEIGHTS[world][1]) * WIDTH, 32)
        ref = layer(x)
    for case in itertools.chain(*ok_results(launch(world, attention_battery, layer, x, ref))):
        assert case["rel"] < 1e-6, case  # K^T V summed in another order: fp32 rounding only


# --- gathering and failure ------------------------------------------------------------------------------------------


def gather_case(comm: Comm, image: torch.Tensor) -> bool:
    comm.bands = Bands.of_heights([2, 6, 4][: comm.world] if comm.world == 3 else [4, 12], multiple=2)
    whole = gather_bands(comm, band_of(comm, image, dim=0), dim=0)
    return whole is None if comm.rank else bool(torch.equal(whole, image))


def test_rank0_gathers_unequal_uint8_bands() -> None:
    image = torch.randint(0, 256, (16 * 8, 12, 3), dtype=torch.uint8)  # pixel rows: 8x the latent bands
    assert ok_results(launch(2, gather_case, image)) == [True, True]


def pooled(comm: Comm, data: dict[str, torch.Tensor]) -> dict[str, tuple[list[float], list[float]]]:
    comm.bands = Bands.of_heights([2, 6, 4], multiple=2)
    counts = [float(h * data["decoder.mid.norm"].shape[-1]) for h in comm.bands.heights()]
    out = {}
    for name, x in data.items():  # (G, rows, W): this band's rows of each group
        _, mean, m2 = local_moments(band_of(comm, x).flatten(1))
        mean, m2 = pooled_groups(comm, counts, mean, m2)
        out[name] = (mean.tolist(), m2.tolist())
    return out


def test_tiled_vae_statistics_pool_over_processes() -> None:
    torch.manual_seed(5)
    data = {"decoder.mid.norm": torch.randn(4, 12, 7) * 2 + 1, "decoder.up.norm": torch.randn(8, 12, 7) - 3}
    results = ok_results(launch(3, pooled, data))
    assert results[0] == results[1] == results[2]  # the same bits on every process
    for name, x in data.items():
        var, mean = torch.var_mean(x.flatten(1).double(), dim=1, correction=0)
        got_mean, got_m2 = results[0][name]
        assert torch.allclose(torch.tensor(got_mean, dtype=torch.float64), mean, atol=1e-6)
        assert torch.allclose(torch.tensor(got_m2, dtype=torch.float64) / x[0].numel(), var, rtol=1e-6)


def failing_rank(comm: Comm, how: str, timeout: float) -> float:
    """Rank 1 dies (os._exit, sockets closed) or stalls (alive, silent) before its halo exchange."""
    comm.bands = Bands.of_heights([8, 8], multiple=2)
    if comm.rank == 1:
        if how == "dies":
            os._exit(1)
        time.sleep(2 * timeout)
        return 0.0
    conv = nn.Conv2d(3, 3, 3, padding=1)
    start = time.monotonic()
    with torch.no_grad():
        band_conv2d(comm, ConvSpec.of(conv), torch.randn(1, 3, 8, WIDTH))
    return time.monotonic() - start


@pytest.mark.parametrize("how", ["dies", "stalls"])
def test_failed_rank_makes_the_others_fail_within_the_timeout(how: str) -> None:
    timeout = 3.0
    runs = launch(2, failing_rank, how, timeout, deadline_s=4 * timeout + 10, timeout_s=timeout)
    status, message, seconds = runs[0]
    assert status == ParallelError.__name__, message
    assert "conv exchange failed" in message
    assert seconds < timeout + 3
