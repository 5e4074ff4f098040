"""CNN trunks (the feature branch) of the Dynamic Perceiver (Han et al., ICCV 2023, Sec. 3.1).

A trunk is cut into a stem and four stages; the Perceiver branch reads the input of every stage. The released
models use three trunks, built here so that their parameter names match the released checkpoints:

- RegNetY-800MF and MobileNetV3-Large x0.75 come from torchvision's own classes (torchvision key names: the
  released code vendors torchvision 0.13's files, so its keys are torchvision's).
- ResNet-50 x0.375 is written here: neither timm nor torchvision can shrink the 64-channel stem, which the
  released ``channel_multiplier`` scales too. Names follow timm's ResNet (``conv1``, ``bn1``, ``downsample``).
- ``tiny`` is a four-conv trunk for fast tests (no released counterpart).

:class:`DynPerceiverConfig` names a trunk and the Perceiver branch's knobs; :data:`PRESETS` holds the released
configurations (the README's training commands).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor, nn

from eexit.errors import EexitTypeError, EexitValueError

__all__ = ["PRESETS", "TRUNKS", "DynPerceiverConfig", "TrunkSpec", "build_trunk", "with_overrides"]


@dataclass
class TrunkSpec:
    """What the Dynamic Perceiver body needs from a CNN trunk.

    Attributes:
        stem: Module mapping the image to the stage-1 input map.
        stages: The four stages, in order.
        stage_in_channels: Input width of each stage; the latent width at stage i equals it.
        out_channels: Width of the last stage's output (the final CNN map).
        classifier: The CNN's own head on the pooled final map (``classifier_cnn``).
        head_hidden: Hidden width of the MLP merge head (MobileNet); ``None`` for BatchNorm + Linear.
        body_layout: ``"cnn_body"`` (stages as ``cnn_body.block1..4``, RegNet) or ``"cnn_body_stage"``
            (stages as ``cnn_body_stage1..4``, ResNet and MobileNet), as in the released checkpoints.
        min_input_size: Smallest input side the trunk takes: its total stride.
        stage_reductions: Total stride of each stage's output map (timm's ``feature_info`` reductions).
        default_input_size: Side of the images the trunk is meant for (``pretrained_cfg["input_size"]``).
    """

    stem: nn.Module
    stages: tuple[nn.Module, nn.Module, nn.Module, nn.Module]
    stage_in_channels: tuple[int, int, int, int]
    out_channels: int
    classifier: nn.Module
    head_hidden: int | None = None
    body_layout: str = "cnn_body_stage"
    min_input_size: int = 32
    stage_reductions: tuple[int, int, int, int] = (4, 8, 16, 32)
    default_input_size: int = 224


def _regnet_y_800mf(num_classes: int, drop_path_rate: float) -> TrunkSpec:
    """RegNetY-800MF (widths 64/144/320/784, depths 1/3/8/2, group width 16, SE 0.25, stem 32)."""
    from torchvision.models import regnet_y_800mf  # lazy: torchvision is only needed for this trunk

    _no_drop_path("regnet_y_800mf", drop_path_rate)
    # The released code builds torchvision's default 1000-way fc whatever num_classes is; here the CNN head
    # follows num_classes (identical for the released 1000-class checkpoint).
    # torchvision computes the stage widths with tensors and reads them back (.tolist()), which a meta device
    # cannot do: build on the CPU, then move to the device the model is being built on (timm's device=).
    device = torch.get_default_device()
    with torch.device("cpu"):
        cnn = regnet_y_800mf(weights=None, num_classes=num_classes)
    cnn = cnn.to(device)
    stages = tuple(getattr(cnn.trunk_output, f"block{i}") for i in range(1, 5))
    widths = tuple(stage[0].proj[0].in_channels for stage in stages)  # type: ignore[index]
    return TrunkSpec(
        stem=cnn.stem,
        stages=stages,  # type: ignore[arg-type]
        stage_in_channels=widths,  # type: ignore[arg-type]
        out_channels=cnn.fc.in_features,
        classifier=cnn.fc,
        body_layout="cnn_body",
    )


def _mobilenet_v3_large_075(num_classes: int, drop_path_rate: float) -> TrunkSpec:
    """MobileNetV3-Large x0.75, cut as released: stem = features 0-2, stages = 3-4, 5-7, 8-13, 14-16."""
    from torchvision.models import mobilenet_v3_large  # lazy, as above

    _no_drop_path("mobilenet_v3_large_075", drop_path_rate)
    cnn = mobilenet_v3_large(weights=None, width_mult=0.75, num_classes=num_classes)
    f = cnn.features
    cuts = ((0, 3), (3, 5), (5, 8), (8, 14), (14, 17))
    stem, *stages = (nn.Sequential(*(f[i] for i in range(a, b))) for a, b in cuts)
    # The classifier_cnn of the released model is a fresh head of torchvision's shape (Linear 720->960,
    # Hardswish, Dropout 0.2, Linear 960->K); torchvision's own head is exactly that.
    hidden = cnn.classifier[0].out_features
    return TrunkSpec(
        stem=stem,
        stages=tuple(stages),  # type: ignore[arg-type]
        stage_in_channels=tuple(s[0].block[0][0].in_channels for s in stages),  # type: ignore[arg-type]
        out_channels=cnn.classifier[0].in_features,
        classifier=cnn.classifier,
        head_hidden=hidden,
        stage_reductions=(8, 16, 32, 32),  # the stem ends at stride 4, stage 4 keeps stride 32
    )


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1 -> 3x3 with stride -> 1x1 x4), stride on the 3x3 as in ResNet v1.5.

    Args:
        in_channels: Input width.
        planes: Bottleneck width; the output is ``4 * planes``.
        stride: Stride of the 3x3 conv (and of the projection shortcut).
        drop_path: Stochastic-depth rate of the residual branch (training only).
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, drop_path: float = 0.0) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )
        if drop_path > 0:
            from timm.layers import DropPath  # lazy: only the training-time regulariser needs timm here

            self.drop_path: nn.Module | None = DropPath(drop_path)
        else:
            self.drop_path = None

    def forward(self, x: Tensor) -> Tensor:
        """Residual bottleneck on [B, C_in, H, W] -> [B, 4*planes, H/stride, W/stride]."""
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.act1(self.bn1(self.conv1(x)))
        y = self.act2(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        if self.drop_path is not None:
            y = self.drop_path(y)
        return self.act3(y + shortcut)


def _resnet50_0375(num_classes: int, drop_path_rate: float) -> TrunkSpec:
    """ResNet-50 with every width (stem too) times 0.375: stem 24, planes 24/48/96/192, blocks 3/4/6/3."""
    mult, depths = 0.375, (3, 4, 6, 3)
    stem_width = int(64 * mult)
    stem = nn.Sequential(
        nn.Conv2d(3, stem_width, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(stem_width),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1),
    )
    stages, widths, in_ch, idx = [], [], stem_width, 0
    for s, (planes, depth) in enumerate(zip((int(p * mult) for p in (64, 128, 256, 512)), depths, strict=True)):
        widths.append(in_ch)
        blocks = []
        for b in range(depth):
            # Stochastic depth grows linearly with the block index over the whole net (timm's rule).
            dpr = drop_path_rate * idx / (sum(depths) - 1)
            blocks.append(Bottleneck(in_ch, planes, stride=2 if (b == 0 and s > 0) else 1, drop_path=dpr))
            in_ch, idx = planes * Bottleneck.expansion, idx + 1
        stages.append(nn.Sequential(*blocks))
    for m in (stem, *stages):
        _init_resnet(m)
    return TrunkSpec(
        stem=stem,
        stages=tuple(stages),  # type: ignore[arg-type]
        stage_in_channels=tuple(widths),  # type: ignore[arg-type]
        out_channels=in_ch,
        classifier=nn.Linear(in_ch, num_classes),
    )


def _init_resnet(module: nn.Module) -> None:
    """timm's ResNet init: He-normal convs, unit BN, a zero last BN per block (blocks start as identity)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        if isinstance(m, Bottleneck):
            nn.init.zeros_(m.bn3.weight)


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


def _tiny(num_classes: int, drop_path_rate: float) -> TrunkSpec:
    """Four single-conv stages, widths 8/16/32/64, total stride 16: a trunk for tests, not for accuracy."""
    _no_drop_path("tiny", drop_path_rate)
    widths = (8, 16, 32, 64)
    stages = tuple(
        nn.Sequential(_conv_bn_relu(c, c_next, 1 if i == 0 else 2))
        for i, (c, c_next) in enumerate(zip(widths, (*widths[1:], 64), strict=True))
    )
    return TrunkSpec(
        stem=_conv_bn_relu(3, widths[0], 2),
        stages=stages,  # type: ignore[arg-type]
        stage_in_channels=widths,
        out_channels=64,
        classifier=nn.Linear(64, num_classes),
        min_input_size=16,
        stage_reductions=(2, 4, 8, 16),
        default_input_size=32,
    )


def _no_drop_path(name: str, rate: float) -> None:
    if rate:
        raise EexitValueError(
            f"cnn_drop_path_rate={rate} is not supported by the {name!r} trunk (only 'resnet50_0375' has "
            "stochastic depth, as released). Set cnn_drop_path_rate=0.0."
        )


#: Trunk builders by name: ``builder(num_classes, drop_path_rate) -> TrunkSpec``.
TRUNKS: dict[str, Callable[[int, float], TrunkSpec]] = {
    "mobilenet_v3_large_075": _mobilenet_v3_large_075,
    "regnet_y_800mf": _regnet_y_800mf,
    "resnet50_0375": _resnet50_0375,
    "tiny": _tiny,
}


def build_trunk(name: str, num_classes: int, drop_path_rate: float = 0.0) -> TrunkSpec:
    """Build the trunk called ``name`` (a key of :data:`TRUNKS`) with a ``num_classes`` CNN head."""
    if name not in TRUNKS:
        raise EexitValueError(f"Unknown Dynamic Perceiver trunk {name!r}; known trunks: {sorted(TRUNKS)}.")
    return TRUNKS[name](num_classes, drop_path_rate)


@dataclass(frozen=True)
class DynPerceiverConfig:
    """Architecture of a Dynamic Perceiver; validated on construction.

    Attributes:
        trunk: CNN trunk, a key of ``eexit.models._perceiver_trunks.TRUNKS``.
        num_classes: Classes of every exit.
        num_latents: Latent tokens at stage 1; halved before stages 2, 3 and 4 by the token mixers.
        num_sa_heads: Self-attention heads per stage.
        sa_base_layers: Self-attention layers per stage before ``depth_factor`` (released: 3/3/9/3, whatever
            the CNN depth).
        depth_factor: Multiplier of ``sa_base_layers`` per stage.
        sa_widening_factor: MLP widening of the self-attention layers.
        dropout: Attention and residual dropout of the Perceiver branch.
        cnn_drop_rate: Dropout on the pooled CNN features before ``classifier_cnn`` (training only).
        cnn_drop_path_rate: Stochastic depth of the CNN blocks (``resnet50_0375`` only).
        with_x2z: Cross-attention from the CNN map into the latent at stages 2-4 (stage 1 always has it).
        with_z2x: Cross-attention from the latent into the CNN map at stages 2-4.
        with_dwc: Residual depthwise 7x7 conv on the map before each x2z.
        with_last_ca: The final z2x cross-attention before the merged head.
        with_isc: Inter-stage connections ``isc3``/``isc4`` feeding earlier logits to later exits.
    """

    trunk: str = "regnet_y_800mf"
    num_classes: int = 1000
    num_latents: int = 128
    num_sa_heads: tuple[int, ...] = (1, 2, 4, 8)
    sa_base_layers: tuple[int, ...] = (3, 3, 9, 3)
    depth_factor: tuple[int, ...] = (1, 1, 1, 1)
    sa_widening_factor: int = 4
    dropout: float = 0.0
    cnn_drop_rate: float = 0.0
    cnn_drop_path_rate: float = 0.0
    with_x2z: bool = True
    with_z2x: bool = True
    with_dwc: bool = True
    with_last_ca: bool = True
    with_isc: bool = True

    def __post_init__(self) -> None:
        if self.trunk not in TRUNKS:
            raise EexitValueError(f"trunk={self.trunk!r} is unknown; choose one of {sorted(TRUNKS)}.")
        for name in ("num_sa_heads", "sa_base_layers", "depth_factor"):
            value = tuple(getattr(self, name))
            if len(value) != 4 or not all(isinstance(v, int) and v >= 1 for v in value):
                raise EexitValueError(f"{name}={value!r} must be four positive integers, one per stage.")
            object.__setattr__(self, name, value)  # lists (as from a CLI or JSON) become tuples
        for name in ("num_classes", "sa_widening_factor"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise EexitValueError(f"{name}={getattr(self, name)!r} must be a positive integer.")
        if not isinstance(self.num_latents, int) or self.num_latents < 8:
            raise EexitValueError(
                f"num_latents={self.num_latents!r} must be an integer >= 8: the token mixers halve it three "
                "times (released models use 128)."
            )
        for name in ("dropout", "cnn_drop_rate", "cnn_drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise EexitValueError(f"{name}={getattr(self, name)!r} must lie in [0, 1).")

    @property
    def sa_layers(self) -> tuple[int, ...]:
        """Self-attention layers per stage: ``sa_base_layers`` times ``depth_factor``."""
        return tuple(b * f for b, f in zip(self.sa_base_layers, self.depth_factor, strict=True))


#: The released ImageNet configurations (README training commands) and a tiny one for tests.
PRESETS: dict[str, DynPerceiverConfig] = {
    "reg800m_perceiver_t128": DynPerceiverConfig("regnet_y_800mf", depth_factor=(1, 1, 1, 2)),
    "resnet50_0375_perceiver_t128": DynPerceiverConfig("resnet50_0375", cnn_drop_rate=0.2, cnn_drop_path_rate=0.2),
    "mobilenetV3_0x75_perceiver_t128": DynPerceiverConfig("mobilenet_v3_large_075", depth_factor=(1, 1, 1, 3)),
    "dyn_perceiver_tiny": DynPerceiverConfig(
        "tiny", num_classes=5, num_latents=8, sa_base_layers=(1, 1, 1, 1), sa_widening_factor=2
    ),
}


# Names of the released command-line options and of timm's usual kwargs, mapped to config fields.
_ALIASES = {
    "SA_widening_factor": "sa_widening_factor",
    "num_SA_heads": "num_sa_heads",
    "with_last_CA": "with_last_ca",
    "drop_rate": "cnn_drop_rate",
    "drop_path_rate": "cnn_drop_path_rate",
}


def with_overrides(config: DynPerceiverConfig, overrides: dict[str, Any]) -> DynPerceiverConfig:
    """``config`` with ``overrides`` applied; the released option spellings are accepted too."""
    overrides = {_ALIASES.get(k, k): v for k, v in overrides.items()}
    if overrides.pop("spatial_reduction", True) is not True:
        raise EexitValueError(
            "spatial_reduction=False is not supported: every released model pools the x2z keys to 7x7, and "
            "the released code cannot run without it. Leave spatial_reduction at True."
        )
    known = {f.name for f in fields(DynPerceiverConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        # Python's own wording for an unknown keyword (what timm's models raise), then what is accepted.
        names = ", ".join(repr(k) for k in unknown)
        raise EexitTypeError(
            f"DynPerceiver() got unexpected keyword argument(s) {names}. Valid options: {sorted(known)}, the "
            f"released spellings {sorted(_ALIASES)}, and timm's in_chans, num_classes, global_pool, device, "
            "dtype. Check the spelling, or drop the option."
        )
    return replace(config, **overrides)
