"""A UNet run in row bands on one device (engine.banded) equals the UNet run whole, to fp32 reduction order: on the
tiny SD-1.x-, SD-2.x- and SDXL-shaped UNets, for band heights down to one row and a latent height whose levels
round up (22 -> 11 -> 6), with skips parked, under demofusion's dilated convolutions, with a ControlNet's
residuals; and on each process's share of a split image. What it cannot reproduce is refused, and the UNet is
exactly as before afterwards."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from parallel_harness import launch, ok_results

from linfusion_cli.base.errors import UsageError
from linfusion_cli.engine.banded import Banding, Share, banded_unet
from linfusion_cli.engine.banded import unet as banded_module
from linfusion_cli.engine.host import Host
from linfusion_cli.engine.parallel import Bands, Comm, CommStats, split_image
from linfusion_cli.engine.refine.demofusion_ops import dilated
from linfusion_cli.linfusion.patching import apply_linfusion
from linfusion_cli.models.archs import ARCHS

T = torch.tensor(500)
HEIGHT, WIDTH = 22, 20  # latent rows and columns: 22 rows are no multiple of the tiny UNets' downsampling (4)
TOLERANCE = 2e-5  # fp32 reduction order, relative to the output's largest value


def build(name: str, linfusion: bool = True) -> UNet2DConditionModel:
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(ARCHS[name].unet).eval()
    if linfusion:
        apply_linfusion(unet, "random")
    return unet


def inputs(unet: UNet2DConditionModel, batch: int = 1) -> dict[str, Any]:
    config = unet.config
    generator = torch.Generator().manual_seed(1)
    kwargs: dict[str, Any] = {
        "sample": torch.randn(batch, 4, HEIGHT, WIDTH, generator=generator),
        "timestep": T,
        "encoder_hidden_states": torch.randn(batch, 7, config.cross_attention_dim, generator=generator),
    }
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=generator),
            "time_ids": torch.tensor([[HEIGHT * 8, WIDTH * 8, 0, 0, HEIGHT * 8, WIDTH * 8]] * batch, dtype=torch.float),
        }
    return kwargs


@pytest.fixture(scope="module")
def unets() -> dict[str, UNet2DConditionModel]:
    return {name: build(name) for name in ("tiny", "tiny-sd2", "tiny-sdxl")}


def banded(unet: UNet2DConditionModel, banding: Banding, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad(), banded_unet(unet, banding):
        out: torch.Tensor = unet(**kwargs).sample
    return out


def assert_same(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape
    error = float((out - ref).abs().max())
    assert error <= TOLERANCE * float(ref.abs().max()), error


@pytest.mark.parametrize(
    ("name", "rows", "park"),
    [("tiny", 3, False), ("tiny-sd2", 5, True), ("tiny-sdxl", 3, True), ("tiny-sdxl", 4, False)],
)
def test_banded_equals_whole(unets: dict[str, UNet2DConditionModel], name: str, rows: int, park: bool) -> None:
    unet = unets[name]
    kwargs = inputs(unet, batch=2)
    with torch.no_grad():
        ref = unet(**kwargs).sample
    assert_same(banded(unet, Banding(Host(), rows=rows, park=park), **kwargs), ref)


def test_every_level_runs_banded(unets: dict[str, UNet2DConditionModel], monkeypatch: pytest.MonkeyPatch) -> None:
    """With 3-row bands every level of the tiny UNet is taller than a band: every resnet and transformer, and
    both upsamplers, take the banded path (the comparisons above then test the banded code, not diffusers')."""
    calls: dict[str, int] = {}
    for name in ("resnet_forward", "transformer_forward", "Upsampled"):
        real = getattr(banded_module, name)

        def counting(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(banded_module, name, counting)
    unet = unets["tiny"]
    banded(unet, Banding(Host(), rows=3), **inputs(unet))
    resnets = sum(len(b.resnets) for b in (*unet.down_blocks, unet.mid_block, *unet.up_blocks))
    transformers = sum(
        len(getattr(b, "attentions", None) or []) for b in (*unet.down_blocks, unet.mid_block, *unet.up_blocks)
    )
    assert calls == {"resnet_forward": resnets, "transformer_forward": transformers, "Upsampled": 2}


@pytest.mark.parametrize("park", [False, True])
def test_cheap_skips_are_made_again(
    unets: dict[str, UNet2DConditionModel], monkeypatch: pytest.MonkeyPatch, park: bool
) -> None:
    """On a banded top level conv_in's output is never kept (made per band from the input where it is read), and
    unless skips are parked, neither are the outputs of the attention-free resnets after it (SDXL's first block):
    they are made again when the up path takes them. The output is the whole UNet's either way."""
    from linfusion_cli.engine.banded import skips as skips_module

    kinds: list[str] = []
    real = skips_module.SkipStore.push

    def recorded(store: Any, skip: Any) -> None:
        real(store, skip)
        kinds.append(type(store._skips[-1]).__name__)

    monkeypatch.setattr(skips_module.SkipStore, "push", recorded)
    unet = unets["tiny-sdxl"]  # its first block: one resnet, no attention
    kwargs = inputs(unet)
    with torch.no_grad():
        ref = unet(**kwargs).sample
    assert_same(banded(unet, Banding(Host(), rows=3, park=park), **kwargs), ref)
    kept = "Parked" if park else "Whole"
    assert kinds[:3] == ["Convolved", kept if park else "Remade", kept]  # the downsampler's output is kept


def test_dilated_global_pass(unets: dict[str, UNet2DConditionModel]) -> None:
    """Demofusion's global pass dilates every conv (halo rows times the dilation): bands of one row read rows kept
    from several bands above."""
    unet = unets["tiny"]
    kwargs = inputs(unet)
    with dilated(unet, 2), torch.no_grad():
        ref = unet(**kwargs).sample
        out = banded(unet, Banding(Host(), rows=1, park=True), **kwargs)
    assert_same(out, ref)


def test_controlnet_residuals() -> None:
    """A ControlNet's residuals are added to the skips band by band, parked or not: diffusers' whole sums."""
    unet = build("tiny", linfusion=False)
    torch.manual_seed(2)
    controlnet = ControlNetModel.from_unet(unet).eval()  # output convs seeded non-zero (trained ones start at 0)
    with torch.no_grad():
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.normal_(std=0.2)
    apply_linfusion(unet, "random")
    kwargs = inputs(unet)
    image = torch.rand(1, 3, HEIGHT * 8, WIDTH * 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        down, mid = controlnet(
            kwargs["sample"], T, kwargs["encoder_hidden_states"], controlnet_cond=image, return_dict=False
        )
        control = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        ref = unet(**kwargs, **control).sample
    for park in (False, True):
        assert_same(banded(unet, Banding(Host(), rows=4, park=park), **kwargs, **control), ref)


# A split image's shares banded: (UNet, band rows, skips parked, demofusion's dilation); shares of 12 and 10 latent
# rows (22: ragged at every level), bands of one row (dilated halos from several bands and across the share) and of
# 3 rows, ragged.
SPLIT_CASES = [("tiny", 1, True, 2), ("tiny-sdxl", 3, False, 1)]
SHARES = [12, 10]


def _shares_banded(comm: Comm, unets: dict[str, UNet2DConditionModel], refs: list[torch.Tensor]) -> list[Any]:
    """Each case on this process's share (parallel_harness): banded, then as the split alone runs it. Per case the
    banded output's error against the whole UNet's rows, how many resnets ran banded, and whether the messages
    sent (calls and bytes per kind) were the split's own."""
    calls: list[int] = []
    real = banded_module.resnet_forward

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs)

    results = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(banded_module, "resnet_forward", counted)
        for (name, rows, park, dilation), ref in zip(SPLIT_CASES, refs, strict=True):
            calls.clear()
            out, messages = _on_share(
                comm, unets[name], Banding(Host(), rows=rows, park=park, share=Share(comm)), dilation
            )
            resnets = len(calls)
            _, split_messages = _on_share(comm, unets[name], None, dilation)
            error = float((out - comm.band(ref)).abs().max()) / float(ref.abs().max())
            results.append((name, park, error, resnets, messages, split_messages))
    return results


def _on_share(comm: Comm, unet: UNet2DConditionModel, banding: Banding | None, dilation: int) -> tuple[Any, ...]:
    """The UNet on this process's share of `inputs`, split (and banded), and the messages it sent."""
    kwargs = inputs(unet, batch=2)
    comm.bands, comm.stats = Bands.of_heights(SHARES, 4, WIDTH), CommStats()
    with torch.no_grad(), split_image(comm, unet), dilated(unet, dilation), banded_unet(unet, banding):
        out = unet(**{**kwargs, "sample": comm.band(kwargs["sample"])}).sample
    return out, (dict(comm.stats.calls), dict(comm.stats.sent))


def test_a_split_images_shares_banded(unets: dict[str, UNet2DConditionModel]) -> None:
    """Two processes split the image and each runs its share in bands: the whole UNet's rows, to fp32 reduction
    order; halos across the share's edges come with the split's own messages, pooled statistics and summaries
    too: with skips parked the same calls and bytes as the split without bands (parallel/plan.py's count holds);
    unparked, SDXL's top-level skips made again (skips.py) send their resnets' messages once more."""
    refs = []
    for name, _, _, dilation in SPLIT_CASES:
        with torch.no_grad(), dilated(unets[name], dilation):
            refs.append(unets[name](**inputs(unets[name], batch=2)).sample)
    for rank in ok_results(launch(2, _shares_banded, unets, refs, deadline_s=120)):
        for name, park, error, resnets, (calls, sent), (split_calls, split_sent) in rank:
            assert error <= TOLERANCE and resnets > 0, (name, error, resnets)
            if park:
                assert (calls, sent) == (split_calls, split_sent), name
            else:
                assert all(sent[kind] >= split_sent[kind] for kind in split_sent), name
                assert sum(sent.values()) > sum(split_sent.values()), name


def test_parked_rows_come_back() -> None:
    """Host.park lays a tensor out rows first; fetch gives any band of rows back as it was."""
    host = Host()
    x = torch.randn(2, 3, 9, 5)
    parked = host.park(x)
    assert parked.shape == (9, 2, 3, 5)
    for lo, hi in [(0, 9), (2, 5), (8, 9)]:
        assert torch.equal(host.fetch(parked, lo, hi, x.device), x[:, :, lo:hi])


def test_refused_and_undone(unets: dict[str, UNet2DConditionModel]) -> None:
    unet = unets["tiny"]
    before = dict(vars(unet))
    kwargs = inputs(unet)
    with pytest.raises(UsageError, match="FreeU"):
        unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
        try:
            banded(unet, Banding(Host(), rows=3), **kwargs)
        finally:
            unet.disable_freeu()
    with pytest.raises(UsageError, match="attention masks"):
        banded(unet, Banding(Host(), rows=3), **kwargs, encoder_attention_mask=torch.ones(1, 7))
    assert "forward" not in vars(unet) and vars(unet).keys() == before.keys()
