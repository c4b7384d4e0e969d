"""Neural EM as a Pyro program: a spatial mixture whose components are decoded from the slots.

Greff, van Steenkiste & Schmidhuber (2017), "Neural Expectation Maximization": every pixel of an
image is explained by one of ``K`` components, and component ``k`` predicts *every* pixel's mean
``ψ^k = f_φ(θ^k)`` from its slot ``θ^k`` through a shared decoder. The inner problem is the
parameter estimation of §3.2 of the seed paper: the slots are per-image mixture parameters, the
assignments are enumerated. Its fixed rule is generalized EM (E-step: responsibilities, M-step:
a gradient step on the expected complete log-likelihood, ``GeneralizedEM(ascent_steps=1,
safeguarded=False)``); its learned rule is RNN-EM (:class:`~pyro_slots.inner.RNNEM`).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from pyro_slots.init import GaussianInit
from pyro_slots.inner.base import InnerProblem
from pyro_slots.model import SlotModel, SlotSpec, select_component
from pyro_slots.validation import check_positive_float, check_positive_int, check_slots

from .blocks import SpatialBroadcastDecoder, _int_tuple, _pair

__all__ = ["NeuralEM"]


class NeuralEM(SlotModel):
    r"""Neural EM's spatial mixture (Greff et al. 2017) with Gaussian pixels.

    **Measurements** (:meth:`encode`): the pixels themselves, images ``(batch, C, H, W)`` to
    ``(batch, M = H · W, C)``; nothing is learned before the inner loop.

    **Model** (:meth:`model`), for every image ``n`` and pixel ``m``::

        z^{n,m} ~ Categorical(1/K, ..., 1/K)                # enumerated
        x^{n,m} ~ Normal(ψ^{n, z^{n,m}}_m, σ I_C),   ψ^{n,k} = f_φ(θ^{n,k})

    with ``f_φ`` a :class:`~pyro_slots.models.blocks.SpatialBroadcastDecoder` from a slot to a
    ``(C, H, W)`` image of means (:meth:`component_means`) and ``σ`` the fixed pixel scale. The
    ELBO is the exact log-likelihood; its posterior is the segmentation (:meth:`segment`).

    :param int image_size: height and width ``H = W`` (or a pair).
    :param int num_slots: default ``K``.
    :param int slot_dim: size of a slot ``θ^k``.
    :param int channels: ``C``.
    :param float pixel_scale: ``σ``, > 0.
    :param decoder_channels: channels of the decoder's convolutions.
    :param broadcast_resolution: the grid a slot is tiled onto (default: the smallest that the
        upsampling takes to the image's size, ``ceil(size / 2^num_upsample)``).
    :param int num_upsample: stride-2 transposed convolutions after the broadcast.
    :param int kernel_size: kernel of the decoder's convolutions.
    """

    def __init__(
        self,
        image_size,
        num_slots: int = 4,
        slot_dim: int = 32,
        channels: int = 3,
        pixel_scale: float = 0.25,
        decoder_channels=(32, 32),
        broadcast_resolution=None,
        num_upsample: int = 0,
        kernel_size: int = 3,
    ):
        self.resolution = _pair(image_size, "image_size")
        self.channels = check_positive_int(channels, "channels")
        slot_dim = check_positive_int(slot_dim, "slot_dim")
        super().__init__(SlotSpec({"theta": (slot_dim,)}), feature_dim=self.channels)
        self.assignment_site = "assignment"
        self.num_slots = check_positive_int(num_slots, "num_slots")
        self.pixel_scale = check_positive_float(pixel_scale, "pixel_scale")
        self.decoder = SpatialBroadcastDecoder(
            slot_dim,
            self.resolution,
            out_channels=self.channels,
            channels=_int_tuple(decoder_channels, "decoder_channels"),
            broadcast_resolution=broadcast_resolution,
            num_upsample=num_upsample,
            kernel_size=kernel_size,
        )
        self.slot_init = GaussianInit(slot_dim)

    @property
    def num_pixels(self) -> int:
        return self.resolution[0] * self.resolution[1]

    # ------------------------------------------------------------------ Pyro program
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(batch, C, H, W)`` to pixels ``(batch, H · W, C)``."""
        expected = (self.channels, *self.resolution)
        if not torch.is_tensor(images) or images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images: expected shape (batch, {expected[0]}, {expected[1]}, {expected[2]}), "
                f"got {tuple(getattr(images, 'shape', ()))}"
            )
        return images.flatten(2).transpose(1, 2)

    def component_means(self, slots: torch.Tensor) -> torch.Tensor:
        """``ψ = f_φ(θ)`` of every slot, ``(batch, K, M, C)``."""
        if slots.dim() != 3 or slots.shape[-1] != self.slot_dim:
            raise ValueError(
                f"slots: expected shape (batch, num_slots, {self.slot_dim}), "
                f"got {tuple(slots.shape)}"
            )
        batch, num_slots, _ = slots.shape
        out = self.decoder(slots.reshape(batch * num_slots, -1))  # (B K, C, H, W)
        return out.reshape(batch, num_slots, self.channels, -1).transpose(-1, -2)

    def model(self, x: torch.Tensor, slots: torch.Tensor):
        batch, num_pixels, _ = x.shape
        check_slots(slots, "slots", batch, self.slot_dim, finite=dist.is_validation_enabled())
        means = self.component_means(slots)  # (B, K, M, C)
        num_slots = means.shape[1]
        if means.shape[2] != num_pixels:
            raise ValueError(
                f"x: expected {means.shape[2]} pixels per image, got shape {tuple(x.shape)}"
            )
        logits = means.new_zeros(batch, 1, num_slots)  # uniform mixing weights
        with pyro.plate(self.batch_plate, batch, dim=-2, device=x.device):
            with pyro.plate("measurements", num_pixels, dim=-1, device=x.device):
                z = pyro.sample(
                    "assignment", dist.Categorical(logits=logits), infer={"enumerate": "parallel"}
                )
                pyro.sample(
                    "obs",
                    dist.Normal(select_component(means, z, dim=1), self.pixel_scale).to_event(1),
                    obs=x,
                )

    # ------------------------------------------------------------- what comes out of it
    def segment(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """The posterior of every pixel's component, ``(batch, K, H, W)`` (from the program)."""
        resp = InnerProblem(self, x).elbo_and_responsibilities(slots)[1]
        return resp.reshape(*resp.shape[:2], *self.resolution)

    def reconstruct(self, x: torch.Tensor, slots: torch.Tensor, x_raw=None) -> torch.Tensor:
        """``Σ_k γ_k ψ_k``, the posterior-weighted image ``(batch, C, H, W)``."""
        resp = InnerProblem(self, x).elbo_and_responsibilities(slots)[1]  # (B, K, M)
        recon = torch.einsum("bkm,bkmc->bcm", resp, self.component_means(slots))
        return recon.reshape(recon.shape[0], self.channels, *self.resolution)
