"""Network blocks shared by the image models: a CNN encoder and a spatial-broadcast decoder.

Both follow Locatello et al. (2020, "Object-Centric Learning with Slot Attention", appendix E):
the encoder is a stack of ``5 x 5`` convolutions, a *soft positional embedding* (a linear map of
the four-channel coordinate grid ``(y, x, 1 - y, 1 - x)`` added to the features), a per-position
MLP and layer normalization; the decoder broadcasts every slot onto a grid (Watters et al. 2019,
"Spatial Broadcast Decoder"), adds the positional embedding and runs convolutions to RGB and a
mask logit per pixel. For the CPU the decoder can broadcast at a lower resolution and upsample
with stride-2 transposed convolutions (as Slot Attention's CLEVR decoder does).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from pyro_slots.validation import check_bool, check_positive_int

__all__ = ["CNNEncoder", "SoftPositionEmbed", "SpatialBroadcastDecoder", "build_grid"]


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int | torch.SymInt) and not isinstance(value, bool):
        value = (value, value)
    if not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(f"{name}: expected an integer or a (height, width) pair, got {value!r}")
    return (check_positive_int(value[0], name), check_positive_int(value[1], name))


def _int_tuple(values, name: str, minimum: int = 1) -> tuple[int, ...]:
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise TypeError(f"{name}: expected a sequence of integers, got {values!r}")
    return tuple(check_positive_int(v, name, minimum=minimum) for v in values)


def build_grid(height: int, width: int, dtype=None, device=None) -> torch.Tensor:
    """Coordinate grid ``(height, width, 4)`` with channels ``(y, x, 1 - y, 1 - x)`` in [0, 1].

    As in the Slot Attention reference implementation: ``linspace(0, 1)`` over pixel indices.
    """
    ys = torch.linspace(0.0, 1.0, height, dtype=dtype, device=device)
    xs = torch.linspace(0.0, 1.0, width, dtype=dtype, device=device)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([y, x, 1.0 - y, 1.0 - x], dim=-1)


class SoftPositionEmbed(nn.Module):
    """Adds ``Linear(4, channels)(grid)`` to a feature map ``(batch, channels, height, width)``.

    :param int channels: number of feature channels.
    :param resolution: ``(height, width)`` of the feature maps it is applied to.
    """

    def __init__(self, channels: int, resolution):
        super().__init__()
        self.channels = check_positive_int(channels, "channels")
        self.resolution = _pair(resolution, "resolution")
        self.register_buffer("grid", build_grid(*self.resolution), persistent=False)
        self.proj = nn.Linear(4, self.channels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        expected = (self.channels, *self.resolution)
        if features.dim() != 4 or tuple(features.shape[1:]) != expected:
            raise ValueError(
                f"features: expected shape (batch, {expected[0]}, {expected[1]}, {expected[2]}), "
                f"got {tuple(features.shape)}"
            )
        return features + self.embedding(features.dtype)

    def embedding(self, dtype=None) -> torch.Tensor:
        """The added map ``Linear(4, channels)(grid)`` of shape ``(channels, height, width)``."""
        return self.proj(self.grid.to(dtype or self.proj.weight.dtype)).permute(2, 0, 1)


def _conv_output_size(size: int, kernel_size: int, stride: int) -> int:
    padding = kernel_size // 2
    return (size + 2 * padding - kernel_size) // stride + 1


class CNNEncoder(nn.Module):
    """Images ``(batch, in_channels, H, W)`` to measurements ``(batch, M, feature_dim)``.

    ``convolutions (ReLU) -> soft positional embedding -> flatten to M = h · w positions ->
    LayerNorm -> MLP (feature_dim, ReLU, feature_dim) -> LayerNorm``. The last layer norm fixes
    the scale of the measurements, so that a mixture over them with a fixed variance (the inner
    ELBO of :class:`~pyro_slots.models.SlotAutoencoder`) keeps a meaningful temperature.

    :param resolution: ``(H, W)`` of the input images.
    :param int in_channels: input channels (3 for RGB).
    :param channels: output channels of every convolution.
    :param strides: stride of every convolution (same length as ``channels``); stride 2 halves
        the resolution and the number of measurements by four.
    :param int kernel_size: odd kernel size of the convolutions ("same" padding).
    :param int feature_dim: size of a measurement.
    """

    def __init__(
        self,
        resolution,
        in_channels: int = 3,
        channels: Sequence[int] = (32, 32, 32, 32),
        strides: Sequence[int] | None = None,
        kernel_size: int = 5,
        feature_dim: int = 64,
    ):
        super().__init__()
        self.resolution = _pair(resolution, "resolution")
        self.in_channels = check_positive_int(in_channels, "in_channels")
        channels = _int_tuple(channels, "channels")
        strides = (1,) * len(channels) if strides is None else _int_tuple(strides, "strides")
        if len(strides) != len(channels) or not channels:
            raise ValueError(
                f"strides: expected {len(channels)} strides (one per convolution, at least one), "
                f"got {strides}"
            )
        self.kernel_size = check_positive_int(kernel_size, "kernel_size")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: expected an odd integer, got {kernel_size}")
        self.feature_dim = check_positive_int(feature_dim, "feature_dim")
        layers, c_in = [], self.in_channels
        h, w = self.resolution
        for c_out, stride in zip(channels, strides):
            layers += [
                nn.Conv2d(c_in, c_out, self.kernel_size, stride, padding=self.kernel_size // 2),
                nn.ReLU(),
            ]
            c_in = c_out
            h = _conv_output_size(h, self.kernel_size, stride)
            w = _conv_output_size(w, self.kernel_size, stride)
        self.convs = nn.Sequential(*layers)
        self.output_resolution = (h, w)
        self.num_measurements = h * w
        self.position = SoftPositionEmbed(c_in, (h, w))
        self.mlp = nn.Sequential(
            nn.LayerNorm(c_in),
            nn.Linear(c_in, self.feature_dim),
            nn.ReLU(),
            nn.Linear(self.feature_dim, self.feature_dim),
        )
        self.norm = nn.LayerNorm(self.feature_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """:param images: ``(batch, in_channels, H, W)``; :returns: ``(batch, M, feature_dim)``."""
        expected = (self.in_channels, *self.resolution)
        if not torch.is_tensor(images):
            raise TypeError(f"images: expected a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images: expected shape (batch, {expected[0]}, {expected[1]}, {expected[2]}), "
                f"got {tuple(images.shape)}"
            )
        features = self.position(self.convs(images))  # (B, C, h, w)
        features = features.flatten(2).transpose(1, 2)  # (B, h w, C)
        return self.norm(self.mlp(features))


class SpatialBroadcastDecoder(nn.Module):
    """Vectors ``(N, input_dim)`` to images ``(N, out_channels, H, W)`` by spatial broadcast.

    Every vector is tiled onto a ``broadcast_resolution`` grid, the soft positional embedding is
    added, then ``len(channels)`` convolutions with ReLU follow, the last ``num_upsample`` of
    them stride-2 transposed convolutions (each doubles the resolution), and a final ``3 x 3``
    convolution to ``out_channels``. The result is cropped to ``resolution`` (top-left), which
    must be reachable: ``broadcast · 2^num_upsample >= resolution``. With
    ``broadcast_resolution == resolution`` and ``num_upsample = 0`` this is the decoder of Slot
    Attention's Tetrominoes / Multi-dSprites experiments.

    :param int input_dim: size of the decoded vector (a slot).
    :param resolution: ``(H, W)`` of the output.
    :param int out_channels: output channels (RGB + mask logit: 4).
    :param channels: channels of the hidden convolutions.
    :param broadcast_resolution: ``(h, w)`` of the broadcast grid; default
        ``ceil(decode_resolution / 2^num_upsample)``, the smallest grid that covers it.
    :param int num_upsample: how many of the hidden layers (the last ones) upsample by two.
    :param int kernel_size: odd kernel size of the hidden convolutions.
    :param decode_resolution: ``(h, w)`` the convolutions produce (cropped top-left), then
        resized bilinearly to ``resolution``; default ``resolution`` (no resize). Decoding at
        half the resolution costs about a quarter of the decoder's arithmetic.
    :param bool fold_broadcast: compute the first convolution on the broadcast grid in closed
        form (see *Cost*); ``False`` convolves the tiled grid (the same result up to rounding).

    **Cost.** The first layer convolves ``v ⊗ 1 + P`` (the vector tiled, plus the position
    map). Convolution is linear, and over a constant map a kernel only sums its taps that fall
    inside the image: ``conv(v ⊗ 1)[c, i, j] = Σ_d v_d S[d, c, i, j]`` with
    ``S = Σ_{taps in bounds} W``, the same for every vector. So the layer is one matrix product
    ``v S`` plus ``conv(P)`` computed once per call, ``kernel_size²`` times fewer multiply-adds
    than convolving every tiled vector (about 14 % of the CPU-size decoder's arithmetic, forward
    and backward). Used when the first layer is a stride-1 zero-padded convolution.
    """

    def __init__(
        self,
        input_dim: int,
        resolution,
        out_channels: int = 4,
        channels: Sequence[int] = (32, 32, 32),
        broadcast_resolution=None,
        num_upsample: int = 0,
        kernel_size: int = 5,
        decode_resolution=None,
        fold_broadcast: bool = True,
    ):
        super().__init__()
        self.fold_broadcast = check_bool(fold_broadcast, "fold_broadcast")
        self.input_dim = check_positive_int(input_dim, "input_dim")
        self.resolution = _pair(resolution, "resolution")
        self.decode_resolution = (
            self.resolution
            if decode_resolution is None
            else _pair(decode_resolution, "decode_resolution")
        )
        if any(d > r for d, r in zip(self.decode_resolution, self.resolution)):
            raise ValueError(
                f"decode_resolution: expected at most resolution {self.resolution}, "
                f"got {self.decode_resolution}"
            )
        self.out_channels = check_positive_int(out_channels, "out_channels")
        channels = _int_tuple(channels, "channels")
        self.num_upsample = check_positive_int(num_upsample, "num_upsample", minimum=0)
        self.broadcast_resolution = (
            tuple(-(-s // 2**self.num_upsample) for s in self.decode_resolution)
            if broadcast_resolution is None
            else _pair(broadcast_resolution, "broadcast_resolution")
        )
        if self.num_upsample > len(channels):
            raise ValueError(
                f"num_upsample: at most len(channels) = {len(channels)}, got {num_upsample}"
            )
        scale = 2**self.num_upsample
        bh, bw = self.broadcast_resolution
        if bh * scale < self.decode_resolution[0] or bw * scale < self.decode_resolution[1]:
            raise ValueError(
                f"broadcast_resolution: {self.broadcast_resolution} upsampled {scale}x does not "
                f"cover the decoded resolution {self.decode_resolution}; raise it or num_upsample"
            )
        self.kernel_size = check_positive_int(kernel_size, "kernel_size")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: expected an odd integer, got {kernel_size}")
        self.position = SoftPositionEmbed(self.input_dim, self.broadcast_resolution)
        pad = self.kernel_size // 2
        layers, c_in = [], self.input_dim
        first_up = len(channels) - self.num_upsample
        for i, c_out in enumerate(channels):
            if i >= first_up:
                conv = nn.ConvTranspose2d(
                    c_in, c_out, self.kernel_size, 2, padding=pad, output_padding=1
                )
            else:
                conv = nn.Conv2d(c_in, c_out, self.kernel_size, 1, padding=pad)
            layers += [conv, nn.ReLU()]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, self.out_channels, 3, 1, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        """:param vectors: ``(N, input_dim)``; :returns: ``(N, out_channels, H, W)``."""
        if vectors.dim() != 2 or vectors.shape[1] != self.input_dim:
            raise ValueError(
                f"vectors: expected shape (N, {self.input_dim}), got {tuple(vectors.shape)}"
            )
        bh, bw = self.broadcast_resolution
        first = self.net[0]
        if self.fold_broadcast and _is_plain_conv(first):
            out = self._broadcast_conv(vectors, first)
            for layer in itertools.islice(self.net, 1, None):  # no Sequential built per call
                out = layer(out)
        else:  # the tiled grid (stride 0 over the pixels): the sum comes out channels-last
            grid = vectors[:, :, None, None].expand(-1, -1, bh, bw)
            out = self.net(self.position(grid))
        h, w = self.decode_resolution
        out = out[:, :, :h, :w]
        if self.decode_resolution != self.resolution:
            out = nn.functional.interpolate(
                out, size=self.resolution, mode="bilinear", align_corners=False
            )
        return out

    def _broadcast_conv(self, vectors: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        """``conv(v ⊗ 1 + P)`` of every vector as ``v S + conv(P)`` (see *Cost*)."""
        bh, bw = self.broadcast_resolution
        weight = conv.weight  # (C_out, C_in, kh, kw)
        taps = _taps_in_bounds(weight.shape[-2:], conv.padding, (bh, bw), weight)
        summed = torch.einsum("cdab,abij->dijc", weight, taps)  # (C_in, h, w, C_out)
        position = self.position.embedding(vectors.dtype).unsqueeze(0)
        shared = nn.functional.conv2d(position, weight, conv.bias, padding=conv.padding)
        out = torch.mm(vectors, summed.reshape(weight.shape[1], -1)).view(
            -1, bh, bw, shared.shape[1]
        )
        # Channels-last (NHWC) like the tiled grid the convolutions would otherwise see (a
        # vector per pixel, the channels innermost): oneDNN's convolutions that follow are
        # fastest on it.
        return (out + shared.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _is_plain_conv(layer) -> bool:
    """A stride-1, undilated, ungrouped, zero-padded ``Conv2d`` with numeric padding."""
    return (
        type(layer) is nn.Conv2d
        and layer.stride == (1, 1)
        and layer.dilation == (1, 1)
        and layer.groups == 1
        and layer.padding_mode == "zeros"
        and not isinstance(layer.padding, str)
    )


def _taps_in_bounds(kernel, padding, size, like: torch.Tensor) -> torch.Tensor:
    """``M[a, b, i, j] = 1`` where kernel tap ``(a, b)`` reads inside a ``size`` map at output
    ``(i, j)`` (zero padding ``padding``), else 0: ``(kh, kw, h, w)``."""
    masks = []
    for k, pad, n in zip(kernel, padding, size):
        tap = torch.arange(k, device=like.device).unsqueeze(1)
        pos = torch.arange(n, device=like.device).unsqueeze(0) + tap - pad  # (k, n)
        masks.append(((pos >= 0) & (pos < n)).to(like.dtype))
    return masks[0][:, None, :, None] * masks[1][None, :, None, :]
