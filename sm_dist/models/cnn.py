"""Convolutional networks: conv blocks (Conv2d, activation, pooling), then a linear head."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from sm_dist.models.build import ACTIVATIONS

POOLINGS: dict[str, type[nn.Module]] = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}


def cnn_shapes(input_shape: Sequence[int], channels: Sequence[int], kernel: int, padding: int,
               pool: int) -> list[tuple[int, int, int]]:
    """(channels, height, width) of one sample after each conv block, from the input's.

    Raises ValueError naming the first block whose feature map would vanish.
    """
    if len(input_shape) != 3:
        raise ValueError(f"the input must be (channels, height, width), got {list(input_shape)}")
    _, height, width = input_shape
    shapes = []
    for index, out_channels in enumerate(channels):
        conv_h, conv_w = height + 2 * padding - kernel + 1, width + 2 * padding - kernel + 1
        if conv_h < 1 or conv_w < 1:
            raise ValueError(f"block {index} gets a {height}x{width} map, smaller than its "
                             f"{kernel}x{kernel} kernel with padding {padding}")
        height, width = conv_h // pool, conv_w // pool
        if height < 1 or width < 1:
            raise ValueError(f"block {index}'s {conv_h}x{conv_w} map is smaller than its "
                             f"{pool}x{pool} pooling")
        shapes.append((out_channels, height, width))
    return shapes


def build_cnn(input_shape: Sequence[int], channels: Sequence[int], *, classes: int,
              kernel: int = 3, padding: int = 1, pool: int = 2, pooling: str = "max",
              activation: str = "relu", bias: bool = True) -> nn.Sequential:
    """A Sequential of layers: one per conv block, then Flatten + Linear logits as the last."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: choose one of "
                         f"{', '.join(ACTIVATIONS)}")
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}: choose one of {', '.join(POOLINGS)}")
    shapes = cnn_shapes(input_shape, channels, kernel, padding, pool)
    layers: list[nn.Module] = []
    in_channels = input_shape[0]
    for out_channels in channels:
        block: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel, padding=padding,
                                            bias=bias), ACTIVATIONS[activation]()]
        if pool > 1:
            block.append(POOLINGS[pooling](pool))
        # Each block is its own top-level child so that stages can be cut between any two.
        layers.append(nn.Sequential(*block))
        in_channels = out_channels
    c, h, w = shapes[-1] if shapes else tuple(input_shape)
    layers.append(nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, classes, bias=bias)))
    return nn.Sequential(*layers)
