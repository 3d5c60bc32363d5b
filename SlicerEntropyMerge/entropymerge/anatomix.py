"""The published anatomix network: a frozen 3D U-Net whose 16 output channels are the
``anatomix`` stable-feature extractor of ``features``. Only the architecture lives here, built to match
the published state-dict layout key for key; ``features.Anatomix`` loads the real weights into it."""

from __future__ import annotations

import torch


class AnatomixNetwork(torch.nn.Module):
    """The published anatomix 3D U-Net (1 -> 16 channels), layer for layer as its state dict lists them.

    One ``nn.Sequential`` named ``model``: per level two or three (conv 3x3x3 reflect, no bias;
    BatchNorm; ReLU) blocks, max-pooling down and nearest x2 upsampling up. The outputs after
    layers 8, 15, 22, 29 are kept and concatenated in front of the upsampled tensor after layers
    37, 44, 51, 58.
    """

    SKIP_PUSH = (8, 15, 22, 29)
    SKIP_POP = (37, 44, 51, 58)

    def __init__(self):
        super().__init__()
        layers: list[torch.nn.Module] = []

        def block(in_channels: int, out_channels: int):
            layers.extend([
                torch.nn.Conv3d(in_channels, out_channels, 3, padding="same", padding_mode="reflect", bias=False),
                torch.nn.BatchNorm3d(out_channels, eps=1e-5, momentum=0.1),
                torch.nn.ReLU(),
            ])

        block(1, 16), block(16, 16), block(16, 16)
        for in_channels, out_channels in ((16, 32), (32, 64), (64, 128), (128, 256)):
            layers.append(torch.nn.MaxPool3d(2, 2))
            block(in_channels, out_channels), block(out_channels, out_channels)
        for in_channels, out_channels in ((256 + 128, 128), (128 + 64, 64), (64 + 32, 32), (32 + 16, 16)):
            layers.append(torch.nn.Upsample(scale_factor=2.0, mode="nearest"))
            block(in_channels, out_channels), block(out_channels, out_channels)
        layers.append(torch.nn.Conv3d(16, 16, 3, padding="same", padding_mode="reflect", bias=False))
        self.model = torch.nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, X, Y, Z) normalised image, each size a multiple of 16 -> (N, 16, X, Y, Z) raw features."""
        skips = []
        for index, layer in enumerate(self.model):
            x = layer(x)
            if index in self.SKIP_PUSH:
                skips.append(x)
            elif index in self.SKIP_POP:
                x = torch.cat([skips.pop(), x], dim=1)
        return x
