"""The SSB / SSB++ U-Net: shapes per preset, conditioning on time and expert label, config round trip,
errors, cost counters, and the torch.compile / channels_last / autocast contracts."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _helpers import assert_close_report
from torch import nn

from ssb_fast.model import (
    PRESETS,
    AttentionBlock,
    Downsample,
    ResBlock,
    UNet,
    UNetConfig,
    Upsample,
    count_flops,
    count_parameters,
    timestep_embedding,
)


def _inputs(cfg: UNetConfig, batch: int, size: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size = size or cfg.image_size
    x = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    t = torch.rand(batch, generator=g) * 999 + 0.1
    label = torch.randint(0, cfg.n_labels + 1, (batch,), generator=g)
    return x, t, label


def _perturbed(cfg: UNetConfig, seed: int = 0) -> UNet:
    """A model whose zero-initialised layers got small random weights, so every path reaches the output."""
    torch.manual_seed(seed)
    model = UNet(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.fixture(scope="module")
def tiny32() -> UNet:
    return _perturbed(UNetConfig.preset("tiny", image_size=32))


# ---- shapes per preset -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny", "ssb", "ssb++"])
def test_preset_forward_shape_and_zero_start(name):
    cfg = UNetConfig.preset(name, image_size=32)
    assert cfg.preset == name
    model = UNet(cfg).eval()
    x, t, label = _inputs(cfg, batch=3)
    with torch.no_grad():
        out = model(x, t, label)
    assert out.shape == (3, cfg.mask_channels, 32, 32)
    assert out.dtype == torch.float32
    # ADM's zero-initialised output conv: the untrained network predicts exactly zero.
    assert torch.count_nonzero(out) == 0


def test_channel_counts_and_non_square_input():
    cfg = UNetConfig.preset("tiny", image_size=32, mask_channels=2, scan_channels=3, n_labels=1)
    model = _perturbed(cfg)
    x = torch.randn(2, 5, 16, 24)
    with torch.no_grad():
        out = model(x, torch.tensor([1.0, 900.0]), torch.tensor([0, 1]))
    assert out.shape == (2, 2, 16, 24)
    assert torch.isfinite(out).all()


def test_presets_set_their_flags():
    ssb, ssbpp = UNetConfig.preset("ssb"), UNetConfig.preset("ssb++")
    assert (ssb.resblock_updown, ssb.use_scale_shift_norm, ssb.rescale_residual) == (False, False, False)
    assert ssb.attention_resolutions == (16,) and ssb.num_head_channels == -1
    assert (ssbpp.resblock_updown, ssbpp.use_scale_shift_norm, ssbpp.rescale_residual) == (True, True, True)
    assert ssbpp.attention_resolutions == (32, 16, 8) and ssbpp.image_size == 128
    with torch.device("meta"):
        m_ssb, m_pp = UNet(ssb), UNet(ssbpp)
    kinds = lambda m: {type(mod) for mod in m.modules()}  # noqa: E731
    assert {Downsample, Upsample} <= kinds(m_ssb)
    assert not {Downsample, Upsample} & kinds(m_pp)
    resamplers = [m for m in m_pp.modules() if isinstance(m, ResBlock) and m.resample != "none"]
    assert len(resamplers) == 2 * (len(ssbpp.channel_mult) - 1)
    # scale-shift norm: the embedding projection emits (scale, shift), twice the block's width
    blk = next(m for m in m_pp.modules() if isinstance(m, ResBlock))
    assert blk.emb_proj.out_features == 2 * blk.out_conv.out_channels
    blk = next(m for m in m_ssb.modules() if isinstance(m, ResBlock))
    assert blk.emb_proj.out_features == blk.out_conv.out_channels
    # attention heads: one head in ssb (DDPM); 64-channel heads in ssb++
    assert {a.num_heads for a in m_ssb.modules() if isinstance(a, AttentionBlock)} == {1}
    assert {a.num_heads for a in m_pp.modules() if isinstance(a, AttentionBlock)} == {2, 3, 4}
    # tiny: attention at the lowest level only, whatever the image size
    assert UNetConfig.preset("tiny", image_size=32).attention_resolutions == (8,)
    assert UNetConfig.preset("tiny", image_size=128).attention_resolutions == (32,)


@pytest.mark.parametrize("rescale", [False, True])
def test_resblock_starts_as_its_skip_path(rescale):
    block = ResBlock(8, 12, 8, dropout=0.0, use_scale_shift_norm=True, rescale_residual=rescale)
    x = torch.randn(2, 8, 6, 6)
    out = block(x, torch.randn(2, 12))
    assert_close_report(out, x / math.sqrt(2.0) if rescale else x, 1e-6, 1e-6, "zero-init ResBlock")


# ---- cost counters ------------------------------------------------------------------------------
def test_parameter_counts_at_128_on_meta():
    counts = {}
    for name in PRESETS:
        with torch.device("meta"):
            model = UNet(UNetConfig.preset(name, image_size=128))
        counts[name] = count_parameters(model)
        assert all(p.device.type == "meta" for p in model.parameters())
    assert 25e6 < counts["ssb++"] < 31e6  # the ~28M-parameter SSB++ network of the performance model
    assert counts["tiny"] < 1e6 < counts["ssb"] < counts["ssb++"]
    # a meta build has exactly the parameters of a real one
    assert counts["tiny"] == count_parameters(UNet(UNetConfig.preset("tiny", image_size=128)))


def _flops_by_hooks(model: UNet, x, t, label) -> int:
    """Independent count: 2*MACs of every conv and linear from their real output shapes, plus 4*B*L²*C
    per attention block (QKᵀ and AV)."""
    total = [0]

    def hook(mod, inputs, out):
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            total[0] += 2 * out.numel() * k
        elif isinstance(mod, nn.Linear):
            total[0] += 2 * out.numel() * mod.in_features
        elif isinstance(mod, AttentionBlock):
            b, c, h, w = inputs[0].shape
            total[0] += 4 * b * (h * w) ** 2 * c

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear, AttentionBlock))]
    with torch.no_grad():
        model(x, t, label)
    for h in handles:
        h.remove()
    return total[0]


@pytest.mark.parametrize("name", ["tiny", "ssb++"])
def test_count_flops_matches_layer_arithmetic(name):
    cfg = UNetConfig.preset(name, image_size=32)
    model = UNet(cfg).eval()
    expected = _flops_by_hooks(model, *_inputs(cfg, batch=2))
    assert count_flops(model, batch=2) == expected
    assert count_flops(model, batch=1) * 2 == expected
    # another input size: convolutions grow with the pixels, attention with their square
    assert count_flops(model, batch=1, image_size=64) == _flops_by_hooks(model, *_inputs(cfg, 1, size=64))


# ---- conditioning ---------------------------------------------------------------------------------
def test_label_embedding_changes_the_output(tiny32):
    cfg = tiny32.config
    assert tiny32.null_label == cfg.n_labels
    assert tiny32.label_embed.num_embeddings == cfg.n_labels + 1  # the experts plus the null row
    x, t, _ = _inputs(cfg, batch=1)
    with torch.no_grad():
        outs = [tiny32(x, t, torch.tensor([a])) for a in range(cfg.n_labels + 1)]
        again = tiny32(x, t, torch.tensor([0]))
    assert torch.equal(outs[0], again)
    for a in range(cfg.n_labels + 1):
        for b in range(a):
            assert (outs[a] - outs[b]).abs().max() > 1e-4, f"labels {a} and {b} give the same output"
    # the label acts only through its embedding row: equal rows give equal outputs
    model = _perturbed(cfg)
    with torch.no_grad():
        model.label_embed.weight[1] = model.label_embed.weight[cfg.n_labels]
        assert torch.equal(model(x, t, torch.tensor([1])), model(x, t, torch.tensor([cfg.n_labels])))


def test_time_conditioning_changes_the_output(tiny32):
    x, _, label = _inputs(tiny32.config, batch=1)
    with torch.no_grad():
        early = tiny32(x, torch.tensor([1.0]), label)
        late = tiny32(x, torch.tensor([900.0]), label)
        near = tiny32(x, torch.tensor([1.5]), label)
    assert (early - late).abs().max() > 1e-4
    assert (early - near).abs().max() > 1e-6  # fractional time inputs (I2SB's noise levels) are seen


def test_timestep_embedding_is_fp32_sinusoid():
    t = torch.tensor([0.1, 3.0, 999.9], dtype=torch.bfloat16)
    emb = timestep_embedding(t, 16)
    assert emb.dtype == torch.float32 and emb.shape == (3, 16)
    tf = t.float()
    # frequency index 0 is 1: columns 0 and 8 are cos(t) and sin(t); the last pair uses 10000**(-7/8)
    assert_close_report(emb[:, 0], torch.cos(tf), 1e-5, 1e-5, "cos column")
    assert_close_report(emb[:, 8], torch.sin(tf), 1e-5, 1e-5, "sin column")
    assert_close_report(emb[:, 15], torch.sin(tf * 10000 ** (-7 / 8)), 1e-5, 1e-5, "slowest sin column")
    assert timestep_embedding(tf, 7).shape == (3, 7)


def test_each_sample_is_independent_of_its_batch(tiny32):
    x, t, label = _inputs(tiny32.config, batch=5)
    with torch.no_grad():
        batched = tiny32(x, t, label)
        alone = torch.cat([tiny32(x[i : i + 1], t[i : i + 1], label[i : i + 1]) for i in range(5)])
    assert_close_report(batched, alone, 1e-5, 1e-4, "batch of 5 vs one at a time")


def test_dropout_acts_in_training_mode_only():
    model = _perturbed(UNetConfig.preset("tiny", image_size=32, dropout=0.3))
    x, t, label = _inputs(model.config, batch=2)
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(x, t, label), model(x, t, label))
        model.eval()
        assert torch.equal(model(x, t, label), model(x, t, label))


# ---- config round trip and errors ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny", "ssb", "ssb++"])
def test_config_round_trip_through_json(name):
    cfg = UNetConfig.preset(name, n_labels=6)
    d = cfg.to_dict()
    assert isinstance(d["channel_mult"], list) and isinstance(d["attention_resolutions"], list)
    back = UNetConfig.from_dict(json.loads(json.dumps(d)))
    assert back == cfg and back.preset == name and back.n_labels == 6
    assert UNetConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with torch.device("meta"):
        a, b = UNet(cfg), UNet(back)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


def test_default_config_is_the_ssbpp_network():
    default = UNetConfig()
    assert default.preset == "custom"
    assert dict(default.to_dict(), preset="ssb++") == UNetConfig.preset("ssb++").to_dict()


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(image_size=100), r"image_size must be divisible by .* = 16 \(5 levels\); got 100"),
        (dict(attention_resolutions=(12,)), r"never reaches.*\[128, 64, 32, 16, 8\]"),
        (dict(num_head_channels=48), r"num_head_channels=48 must divide the 128 channels"),
        (dict(num_head_channels=0), r"num_head_channels must be -1"),
        (dict(dropout=1.0), r"dropout must be a number in \[0, 1\)"),
        (dict(base_channels=True), r"base_channels must be an int >= 1"),
        (dict(n_labels=0), r"n_labels must be an int >= 1"),
        (dict(channel_mult=()), r"channel_mult must name at least one level"),
        (dict(channel_mult=(1, 0)), r"channel_mult must be a tuple of ints >= 1"),
        (dict(resblock_updown="yes"), r"resblock_updown must be true or false"),
    ],
)
def test_bad_config_is_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        UNetConfig.preset("ssb++", **overrides)


def test_bad_preset_and_dict_are_refused():
    with pytest.raises(ValueError, match=r"unknown UNet preset 'ssb\+'.*\['small', 'ssb', 'ssb\+\+', 'tiny'\]"):
        UNetConfig.preset("ssb+")
    with pytest.raises(ValueError, match=r"unknown UNetConfig field\(s\) \['base'\]"):
        UNetConfig.preset("tiny", base=8)
    d = UNetConfig.preset("tiny").to_dict()
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['heads'\]"):
        UNetConfig.from_dict({**d, "heads": 4})
    d.pop("dropout")
    with pytest.raises(ValueError, match=r"missing key\(s\) \['dropout'\]"):
        UNetConfig.from_dict(d)
    with pytest.raises(ValueError, match=r"must be a dict; got list"):
        UNetConfig.from_dict([1, 2])
    with pytest.raises(ValueError, match=r"needs a UNetConfig; got dict"):
        UNet(UNetConfig.preset("tiny").to_dict())


def test_bad_inputs_are_refused(tiny32):
    x, t, label = _inputs(tiny32.config, batch=2)
    cases = [
        ((x[:, :1], t, label), r"x must be \(B, 2, H, W\).*got shape \(2, 1, 32, 32\)"),
        ((x[0], t, label), r"x must be \(B, 2, H, W\)"),
        ((x[..., :30, :], t, label), r"divisible by 4.*got 30x32"),
        ((x.long(), t, label), r"x must be a floating-point tensor"),
        ((x, t[:1], label), r"t must be a 1-D tensor of 2 time inputs; got shape \(1,\)"),
        ((x, t, label[:, None]), r"label must be a 1-D tensor of 2 labels"),
        ((x, t, label.float()), r"label must be int64"),
        ((x, t, torch.tensor([0, 5])), r"label values must lie in \[0, 4\].*got values in \[0, 5\]"),
        ((x, t, torch.tensor([-1, 2])), r"label values must lie in \[0, 4\]"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            tiny32(*args)
    tiny32.check_label(torch.tensor([0, 4]))  # the null label itself is valid


# ---- compile, memory format, autocast -------------------------------------------------------------
def test_tiny_forward_has_no_graph_break(tiny32):
    explanation = torch._dynamo.explain(tiny32)(*_inputs(tiny32.config, batch=3))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_channels_last_matches_contiguous():
    cfg = UNetConfig.preset("ssb++", image_size=32, channel_mult=(1, 2), base_channels=32,
                            attention_resolutions=(16,))
    model = _perturbed(cfg)
    x, t, label = _inputs(model.config, batch=3)
    with torch.no_grad():
        ref = model(x, t, label)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last), t, label)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close_report(out, ref, 1e-5, 1e-4, "channels_last vs contiguous")


def test_cpu_bf16_autocast_runs(tiny32):
    x, t, label = _inputs(tiny32.config, batch=3)
    with torch.no_grad():
        ref = tiny32(x, t, label)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = tiny32(x.contiguous(memory_format=torch.channels_last), t, label)
    assert out.dtype == torch.bfloat16
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.05, f"bf16 output is {rel:.3f} (relative L2) away from fp32"


@pytest.mark.slow
def test_compiled_matches_eager_on_cpu(tiny32):
    compiled = torch.compile(tiny32, fullgraph=True, dynamic=True)
    for batch in (3, 5):
        x, t, label = _inputs(tiny32.config, batch=batch, seed=batch)
        with torch.no_grad():
            out, ref = compiled(x, t, label), tiny32(x, t, label)
            assert_close_report(out, ref, 1e-4, 1e-3, f"compiled, batch {batch}")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["tiny", "ssb++"])
def test_cuda_bf16_channels_last_compiled(name):
    cfg = UNetConfig.preset(name, image_size=64 if name == "tiny" else 128)
    model = _perturbed(cfg).cuda().to(memory_format=torch.channels_last)
    compiled = torch.compile(model, fullgraph=True)
    for batch in (1, 7):
        x, t, label = (a.cuda() for a in _inputs(cfg, batch=batch))
        x = x.contiguous(memory_format=torch.channels_last)
        model.check_label(label)
        with torch.no_grad():
            ref = model(x, t, label)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = compiled(x, t, label)
        assert out.dtype == torch.bfloat16 and out.shape == (batch, 1, cfg.image_size, cfg.image_size)
        rel = (out.float() - ref).norm() / ref.norm()
        assert rel < 0.05, f"{name}, batch {batch}: bf16 compiled output is {rel:.3f} (relative L2) from fp32"
