"""The SSB / SSB++ denoiser: an ADM-style U-Net (Dhariwal & Nichol 2021; the I2SB backbone).

The network reads `cat(x_t, scan)` along channels (I2SB's `cond_x1`), the network time input and an
expert label, and predicts the I2SB target `(x_t - x0) / std_fwd[t]` for the mask channels. The label
is embedded and added to the time embedding; row `n_labels` of that embedding is the learned null label
used for classifier-free guidance. SSB and SSB++ are presets of this one class: the refinements
(BigGAN-style resampling residual blocks, scale-shift norm, 1/sqrt(2) residual scaling, attention at low
resolution) are flags of `UNetConfig`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["UNetConfig", "UNet", "PRESETS", "count_flops", "count_parameters", "timestep_embedding"]


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------
def _feature_sizes(image_size: int, n_levels: int) -> list[int]:
    """Feature-map side length at each U-Net level (level 0 is full resolution)."""
    return [image_size // 2**level for level in range(n_levels)]


@dataclass
class UNetConfig:
    """Every size and switch of the U-Net; `to_dict()` is what a checkpoint stores.

    attention_resolutions are feature-map sizes in pixels of an `image_size` input (ADM's convention):
    attention is applied at every level whose side length is listed, and in the middle block.
    num_head_channels is the width of one attention head; -1 means a single head over all channels
    (the DDPM layout). The defaults are the `ssb++` preset's values.
    """

    image_size: int = 128
    mask_channels: int = 1
    scan_channels: int = 1
    n_labels: int = 4
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2, 3, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    num_head_channels: int = 64
    dropout: float = 0.1
    resblock_updown: bool = True
    use_scale_shift_norm: bool = True
    rescale_residual: bool = True
    preset: str = "custom"

    def __post_init__(self):
        # Lists (from JSON) become tuples so that configs compare equal and hash-free code paths agree.
        for name in ("channel_mult", "attention_resolutions"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field that is out of range or inconsistent with the others."""
        def positive_int(name: str, minimum: int = 1):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"UNetConfig.{name} must be an int >= {minimum}; got {value!r}")

        for name in ("image_size", "mask_channels", "scan_channels", "n_labels", "base_channels"):
            positive_int(name)
        positive_int("num_res_blocks", 1)
        for name in ("channel_mult", "attention_resolutions"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value
            ):
                raise ValueError(f"UNetConfig.{name} must be a tuple of ints >= 1; got {value!r}")
        if not self.channel_mult:
            raise ValueError("UNetConfig.channel_mult must name at least one level; got ()")
        n_down = len(self.channel_mult) - 1
        if self.image_size % 2**n_down:
            raise ValueError(
                f"UNetConfig.image_size must be divisible by 2**(len(channel_mult)-1) = {2**n_down} "
                f"({len(self.channel_mult)} levels); got {self.image_size}"
            )
        sizes = _feature_sizes(self.image_size, len(self.channel_mult))
        unknown = [r for r in self.attention_resolutions if r not in sizes]
        if unknown:
            raise ValueError(
                f"UNetConfig.attention_resolutions {list(self.attention_resolutions)} name feature-map sizes "
                f"{unknown} that a {self.image_size}px input never reaches; its levels are {sizes}"
            )
        nhc = self.num_head_channels
        if isinstance(nhc, bool) or not isinstance(nhc, int) or not (nhc == -1 or nhc >= 1):
            raise ValueError(
                f"UNetConfig.num_head_channels must be -1 (one head) or an int >= 1; got {nhc!r}"
            )
        if nhc != -1:
            # Attention runs at the listed levels and always in the middle block (the deepest level).
            levels = {sizes.index(r) for r in self.attention_resolutions} | {n_down}
            for level in sorted(levels):
                ch = self.base_channels * self.channel_mult[level]
                if ch % nhc:
                    raise ValueError(
                        f"UNetConfig.num_head_channels={nhc} must divide the {ch} channels of the attention "
                        f"block at {sizes[level]}px"
                    )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not (
            0.0 <= self.dropout < 1.0
        ):
            raise ValueError(f"UNetConfig.dropout must be a number in [0, 1); got {self.dropout!r}")
        for name in ("resblock_updown", "use_scale_shift_norm", "rescale_residual"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"UNetConfig.{name} must be true or false; got {getattr(self, name)!r}")
        if not isinstance(self.preset, str):
            raise ValueError(f"UNetConfig.preset must be a string; got {self.preset!r}")

    @property
    def in_channels(self) -> int:
        """Channels of the network input `cat(x_t, scan)`."""
        return self.mask_channels + self.scan_channels

    def to_dict(self) -> dict:
        """JSON-safe dict of every field (tuples as lists); `from_dict` inverts it."""
        out = dataclasses.asdict(self)
        for name in ("channel_mult", "attention_resolutions"):
            out[name] = list(out[name])
        out["dropout"] = float(out["dropout"])
        return out

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        """Rebuild a config from `to_dict()` output (a checkpoint's JSON); unknown or missing keys fail."""
        if not isinstance(d, dict):
            raise ValueError(f"a UNet config must be a dict; got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        missing = [n for n in names if n not in d]
        if unknown or missing:
            parts = []
            if unknown:
                parts.append(f"unknown key(s) {unknown}")
            if missing:
                parts.append(f"missing key(s) {missing}")
            raise ValueError(f"bad UNet config: {'; '.join(parts)}; expected exactly {names}")
        return cls(**d)

    def to_json(self) -> str:
        """The config as one JSON string (what a checkpoint's metadata holds)."""
        return json.dumps(self.to_dict(), sort_keys=True)


def _preset(cls, name: str, **overrides) -> UNetConfig:
    """The named preset ("tiny", "ssb", "ssb++"), with any field overridden by keyword."""
    if name not in PRESETS:
        raise ValueError(f"unknown UNet preset {name!r}; choose one of {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown UNetConfig field(s) {unknown} for preset {name!r}; fields are {sorted(fields)}"
        )
    values = dict(PRESETS[name])
    values.update(overrides)
    if "attention_resolutions" not in values:
        # tiny, small: attention at the lowest level only, wherever the chosen image size puts it.
        n_levels = len(values.get("channel_mult", cls.channel_mult))
        values["attention_resolutions"] = (values.get("image_size", cls.image_size) // 2 ** (n_levels - 1),)
    values.setdefault("preset", name)
    return cls(**values)


# `preset` is both a field (the name a config was built from) and the class-level factory. The factory is
# attached after the dataclass is built: on an instance the field's value (in the instance dict) shadows
# it, on the class `UNetConfig.preset("ssb++")` reaches the classmethod.
UNetConfig.preset = classmethod(_preset)  # type: ignore[assignment,method-assign]


# Values at 128x128. `ssb`: the DDPM configuration (conv resampling, plain GroupNorm conditioning, single-head
# attention at 16px). `ssb++`: the ADM refinements (BigGAN resampling blocks, scale-shift norm, 1/sqrt(2)
# residual scaling, 64-channel heads at 32, 16 and 8px). `tiny`: tests and CPU demos, with the SSB++ flags;
# `small` (64 px) the same flags at about 8x tiny's compute.
PRESETS: dict[str, dict] = {
    "tiny": dict(
        image_size=64, base_channels=16, channel_mult=(1, 2, 4), num_res_blocks=1, num_head_channels=32,
        dropout=0.0, resblock_updown=True, use_scale_shift_norm=True, rescale_residual=True,
    ),
    # `small`: between tiny and ssb for CPU training at 64 px: twice tiny's width, two blocks per level,
    # attention at the lowest level as tiny.
    "small": dict(
        image_size=64, base_channels=32, channel_mult=(1, 2, 3), num_res_blocks=2, num_head_channels=32,
        dropout=0.0, resblock_updown=True, use_scale_shift_norm=True, rescale_residual=True,
    ),
    "ssb": dict(
        image_size=128, base_channels=64, channel_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
        attention_resolutions=(16,), num_head_channels=-1, dropout=0.1,
        resblock_updown=False, use_scale_shift_norm=False, rescale_residual=False,
    ),
    "ssb++": dict(
        image_size=128, base_channels=64, channel_mult=(1, 2, 2, 3, 4), num_res_blocks=2,
        attention_resolutions=(32, 16, 8), num_head_channels=64, dropout=0.1,
        resblock_updown=True, use_scale_shift_norm=True, rescale_residual=True,
    ),
}


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------
def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (B, dim) of a float time input, computed in float32 whatever the autocast."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _num_groups(channels: int) -> int:
    """GroupNorm groups: 32 as in ADM, fewer for narrow layers so that every group keeps >= 2 channels."""
    limit = min(32, max(1, channels // 2))
    return max(g for g in range(1, limit + 1) if channels % g == 0)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_num_groups(channels), channels)


def _zero(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters: residual branches and the output start as identity / zero (ADM)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 convolution (DDPM)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double the resolution by nearest-neighbour interpolation followed by a 3x3 convolution (DDPM)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, conditioned on the time+label embedding; optionally resamples (BigGAN).

    With scale-shift norm the embedding gives (scale, shift) applied as norm(h)*(1+scale)+shift (FiLM);
    otherwise it is added to h. The second conv starts at zero, so the block starts as its skip path.
    """

    def __init__(self, in_channels: int, emb_channels: int, out_channels: int, dropout: float,
                 use_scale_shift_norm: bool, rescale_residual: bool, resample: str = "none"):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.out_scale = 1.0 / math.sqrt(2.0) if rescale_residual else 1.0
        self.resample = resample
        self.in_norm = _norm(in_channels)
        self.in_conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        self.out_norm = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = F.silu(self.in_norm(x))
        # BigGAN order: resample after the first activation, on both the branch and the skip path.
        h = self.in_conv(self._resample(h))
        x = self._resample(x)
        e = self.emb_proj(F.silu(emb))[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + e)
        h = self.out_conv(self.dropout(F.silu(h)))
        out = self.skip(x) + h
        return out * self.out_scale if self.out_scale != 1.0 else out


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all pixels of a feature map, as a residual branch that starts at zero.

    Tokens are taken as (B, H*W, C), which is a free view of a channels_last tensor.
    """

    def __init__(self, channels: int, num_head_channels: int, rescale_residual: bool):
        super().__init__()
        self.num_heads = 1 if num_head_channels == -1 else channels // num_head_channels
        self.out_scale = 1.0 / math.sqrt(2.0) if rescale_residual else 1.0
        self.norm = _norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = _zero(nn.Linear(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        qkv = self.qkv(tokens).reshape(b, h * w, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, HW, head_dim)
        a = F.scaled_dot_product_attention(q, k, v)
        a = self.proj_out(a.transpose(1, 2).reshape(b, h * w, c))
        out = x + a.transpose(1, 2).reshape(b, c, h, w)
        return out * self.out_scale if self.out_scale != 1.0 else out


class _Level(nn.Module):
    """One U-Net stage: a ResBlock and optional attention, or a resampling layer."""

    def __init__(self, res: nn.Module | None = None, attn: nn.Module | None = None,
                 resample: nn.Module | None = None):
        super().__init__()
        self.res, self.attn, self.resample = res, attn, resample

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.res is not None:
            x = self.res(x, emb)
        if self.attn is not None:
            x = self.attn(x)
        if self.resample is not None:
            x = self.resample(x, emb) if isinstance(self.resample, ResBlock) else self.resample(x)
        return x


# --------------------------------------------------------------------------------------------------
# The U-Net
# --------------------------------------------------------------------------------------------------
class UNet(nn.Module):
    """ADM U-Net: `forward(cat(x_t, scan), t, label)` -> (B, mask_channels, H, W).

    `t` is the network time input (I2SB's noise level, ~[0.1, 1000]); `label` is an expert index in
    [0, n_labels), or `null_label` (= n_labels) for the unconditional model of classifier-free guidance.
    Any H, W divisible by 2**(len(channel_mult)-1) is accepted; attention sits at the levels chosen for
    `config.image_size`.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise ValueError(f"UNet needs a UNetConfig; got {type(config).__name__}")
        config.validate()
        self.config = config
        self.null_label = config.n_labels
        self.in_channels = config.in_channels
        self.size_multiple = 2 ** (len(config.channel_mult) - 1)

        base = config.base_channels
        emb_ch = 4 * base
        self.time_embed = nn.Sequential(nn.Linear(base, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        # n_labels experts plus the learned null label in the last row.
        self.label_embed = nn.Embedding(config.n_labels + 1, emb_ch)

        def res(cin: int, cout: int, resample: str = "none") -> ResBlock:
            return ResBlock(cin, emb_ch, cout, config.dropout, config.use_scale_shift_norm,
                            config.rescale_residual, resample)

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, config.num_head_channels, config.rescale_residual)

        sizes = _feature_sizes(config.image_size, len(config.channel_mult))
        attn_levels = {sizes.index(r) for r in config.attention_resolutions}
        last = len(config.channel_mult) - 1

        ch = base * config.channel_mult[0]
        self.input_conv = nn.Conv2d(self.in_channels, ch, 3, padding=1)
        skip_channels = [ch]
        self.down = nn.ModuleList()
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                out = base * mult
                self.down.append(_Level(res(ch, out), attn(out) if level in attn_levels else None))
                ch = out
                skip_channels.append(ch)
            if level != last:
                down = res(ch, ch, "down") if config.resblock_updown else Downsample(ch)
                self.down.append(_Level(resample=down))
                skip_channels.append(ch)

        self.middle = nn.ModuleList([_Level(res(ch, ch), attn(ch)), _Level(res(ch, ch))])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                out = base * mult
                up = None
                if level != 0 and i == config.num_res_blocks:
                    up = res(out, out, "up") if config.resblock_updown else Upsample(out)
                self.up.append(_Level(res(ch + skip_channels.pop(), out),
                                      attn(out) if level in attn_levels else None, up))
                ch = out

        self.out_norm = _norm(ch)
        self.out_conv = _zero(nn.Conv2d(ch, config.mask_channels, 3, padding=1))

    def check_label(self, label: Tensor) -> None:
        """Raise ValueError unless every label lies in [0, n_labels] (this reads the values: a host sync)."""
        if label.numel() and (int(label.min()) < 0 or int(label.max()) > self.null_label):
            raise ValueError(
                f"label values must lie in [0, {self.null_label}] ({self.null_label} is the null label); "
                f"got values in [{int(label.min())}, {int(label.max())}]"
            )

    def _check_inputs(self, x: Tensor, t: Tensor, label: Tensor) -> None:
        # Shape and dtype checks only: they resolve at trace time and cost no graph break under compile.
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must be (B, {self.in_channels}, H, W) = cat(x_t with {self.config.mask_channels} "
                f"channel(s), scan with {self.config.scan_channels}); got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor; got {x.dtype}")
        if x.shape[2] % self.size_multiple or x.shape[3] % self.size_multiple:
            raise ValueError(
                f"x's height and width must be divisible by {self.size_multiple} "
                f"({len(self.config.channel_mult)} levels); got {x.shape[2]}x{x.shape[3]}"
            )
        if t.dim() != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(
                f"t must be a 1-D tensor of {x.shape[0]} time inputs; got shape {tuple(t.shape)}"
            )
        if label.dim() != 1 or label.shape[0] != x.shape[0]:
            raise ValueError(
                f"label must be a 1-D tensor of {x.shape[0]} labels; got shape {tuple(label.shape)}"
            )
        if label.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"label must be int64 (or int32) expert indices; got {label.dtype}")

    def forward(self, x: Tensor, t: Tensor, label: Tensor) -> Tensor:
        self._check_inputs(x, t, label)
        if label.device.type == "cpu" and not torch.compiler.is_compiling():
            # Reading CPU values is free; on CUDA it would sync (and break CUDA-graph capture), so callers
            # there use check_label once per batch and an out-of-range index trips the embedding's assert.
            self.check_label(label)
        temb = timestep_embedding(t, self.config.base_channels).to(self.time_embed[0].weight.dtype)
        emb = self.time_embed(temb) + self.label_embed(label)

        h = self.input_conv(x)
        skips = [h]
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        for block in self.middle:
            h = block(h, emb)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out_conv(F.silu(self.out_norm(h)))


# --------------------------------------------------------------------------------------------------
# Cost
# --------------------------------------------------------------------------------------------------
def count_parameters(model: nn.Module) -> int:
    """Number of parameters (works for a model built on the meta device)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: UNet, batch: int = 1, image_size: int | None = None) -> int:
    """Forward FLOPs (2 per multiply-add) of convolutions, matmuls and attention, counted on the meta device.

    Norms and pointwise ops are not counted (the usual convention; they are memory-bound). A copy of the
    model is built on the meta device, so nothing is allocated or computed.
    """
    from torch.utils.flop_counter import FlopCounterMode

    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1; got {batch!r}")
    size = model.config.image_size if image_size is None else image_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"image_size must be an int >= 1; got {size!r}")
    with torch.device("meta"):
        meta = UNet(model.config)
    x = torch.zeros(batch, meta.in_channels, size, size, device="meta")
    t = torch.zeros(batch, device="meta")
    label = torch.zeros(batch, dtype=torch.int64, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta.eval()(x, t, label)
    return int(counter.get_total_flops())
