"""torchvision ResNet backbones with taps after layer2, layer3 and layer4.

Weights: "none" (random init), "imagenet" (torchvision's own weights, downloaded through
torchvision's cache on first use) or a path to a local state dict file (a torchvision ResNet
`state_dict()`, optionally wrapped as {"state_dict": ...}; the `fc.*` keys are ignored).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision import models

from iagn.errors import IagnError

RESNETS = {
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (models.resnet34, models.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V2),
    "resnet101": (models.resnet101, models.ResNet101_Weights.IMAGENET1K_V2),
}


def _check_name(name: str) -> None:
    if name not in RESNETS:
        raise IagnError(f"unknown backbone {name!r}; choose one of: {', '.join(RESNETS)}")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise IagnError(
            f"weights file {path} does not exist; pass weights: none, imagenet or a path to a "
            "state dict saved with torch.save(model.state_dict(), PATH)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a corrupt or foreign file
        raise IagnError(f"weights file {path} is not a loadable torch state dict: {exc}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise IagnError(f"weights file {path} holds a {type(state).__name__}, not a state dict")
    return state


def build_resnet(name: str, weights: str = "none") -> nn.Module:
    """A torchvision ResNet without its classifier, with `weights` loaded."""
    _check_name(name)
    builder, imagenet = RESNETS[name]
    if weights == "imagenet":
        net = builder(weights=imagenet)
    else:
        net = builder(weights=None)
        if weights not in ("none", "", None):
            state = {
                k: v for k, v in load_state_dict_file(weights).items() if not k.startswith("fc.")
            }
            missing, unexpected = net.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith("fc.")]
            if missing or unexpected:
                raise IagnError(
                    f"weights file {weights} does not fit {name}: "
                    f"{len(missing)} missing keys (e.g. {missing[:3]}), "
                    f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]}); "
                    "use the state dict of the same torchvision architecture"
                )
    net.fc = nn.Identity()
    return net


def tap_channels(net: nn.Module) -> tuple[int, int, int]:
    """Output channels of layer2, layer3, layer4 (the three taps)."""

    def out_channels(layer: nn.Sequential) -> int:
        block = layer[-1]
        last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
        return last_bn.num_features

    return out_channels(net.layer2), out_channels(net.layer3), out_channels(net.layer4)
