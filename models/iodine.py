"""IODINE as a Pyro program: meta-learned posterior inference on images.

Greff et al. (2019, "Multi-Object Representation Learning with Iterative Variational
Inference") model an image as a spatial mixture of ``K`` components, each decoded from its own
latent ``z^k``, and refine the per-slot posterior parameters ``λ^k = (μ^k, log σ^k)`` with a
learned update network fed the ELBO's gradient. In the reading of §3.2 of the seed paper the
outer objective is the negative ELBO itself and the decoder weights are the part of ``w_d`` that
computes ``p(x | z)``.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyro_slots.init import GaussianInit
from pyro_slots.model import SlotCategorical, SlotModel, SlotSpec, select_component
from pyro_slots.validation import check_positive_float, check_positive_int, check_slots

from .blocks import SpatialBroadcastDecoder, _int_tuple, _pair

__all__ = ["IODINE", "RefinementInputs"]


class IODINE(SlotModel):
    r"""IODINE's generative model and variational family (Greff et al. 2019).

    Model, for image ``n``, slot ``k`` and pixel ``m``::

        z^{n,k} ~ Normal(0, I_latent)                          # plates batch, slots
        (rgb^{n,k}, logit^{n,k}) = decoder(z^{n,k})            # spatial broadcast
        a^{n,m} ~ Categorical(softmax_k logit^{n,k}_m)          # enumerated
        x^{n,m} ~ Normal(rgb^{n, a^{n,m}}_m, σ_x I_3)

    Guide: ``z^{n,k} ~ Normal(μ^{n,k}, exp(log σ^{n,k}))`` with slots ``λ^{n,k} = (μ, log σ)``
    (``slot_spec`` fields ``loc`` and ``log_scale``).

    The per-pixel assignment ``a`` is enumerated in the model only (no guide site), so Pyro's
    ``TraceEnum_ELBO`` sums it out exactly: the per-datapoint ELBO is
    ``E_q[log p(z) - log q(z) + Σ_m log Σ_k π_mk N(x_m | rgb_mk, σ_x² I)]`` with the mixing
    weights ``π`` the decoded masks -- IODINE's spatial-mixture likelihood, estimated with one
    reparameterized sample of ``z`` per particle. The test suite checks this against a loop over
    pixels and slots in float64.

    :meth:`encode` returns the pixels as measurements ``(batch, H·W, C)`` (no learned encoder:
    IODINE's refinement network sees the image through the ELBO's gradient).

    Training note: the mixture likelihood does not by itself prefer one object per slot. From
    scratch, with J = :class:`~pyro_slots.objectives.NegativeELBO`, short CPU runs of the
    default configuration (σ_x = 0.1) settle where every slot paints one colour over the whole
    image under soft masks (FG-ARI about 0.01 after 10^3-10^4 updates), which the decoder
    reaches from its biases alone; started from weights that segment, the same J moves them
    within a few hundred updates to decoders whose slots split the objects between them, at an
    ELBO about 1,000 nats per image higher even when the slots are optimized to convergence.
    The likelihood's scale is the knob: at σ_x = 0.1 the ELBO is nearly all reconstruction
    (about 5,000 nats per image against a KL of about 300), and σ_x = 0.5 (``pixel_scale``)
    makes the same J segment from scratch (FG-ARI 0.72 after 10^3 updates on Tetrominoes),
    σ_x = 0.7 to 0.87 and 0.8 to 0.885 in 45 CPU minutes (0.8 segments later and splits fewer
    objects), while 0.3 does so slowly and 0.9 and 1.0 too late for that budget. J =
    :class:`~pyro_slots.objectives.Reconstruction` (the error of the mean image
    ``Σ_k m_k μ_k``, while the inner rule still climbs this ELBO) segments at σ_x = 0.1 too.
    Numbers: ``examples/results/objects.md``; ``examples/iodine_elbo_probe.py`` splits a
    checkpoint's ELBO into its parts.

    :param image_size: ``H`` or ``(H, W)``.
    :param int num_slots: default ``K``.
    :param int latent_dim: size of ``z^{n,k}``.
    :param float pixel_scale: σ_x, > 0.
    :param decoder_channels: channels of the decoder's hidden convolutions.
    :param decoder_broadcast: broadcast resolution; default
        ``ceil(decoder_resolution / 2^decoder_upsample)``.
    :param int decoder_upsample: number of stride-2 upsampling layers.
    :param int kernel_size: kernel size of the decoder's hidden convolutions.
    :param int in_channels: image channels.
    :param decoder_resolution: ``(h, w)`` the decoder's convolutions produce before a bilinear
        resize to the image size (masks and RGB alike); default the image size (no resize).
    """

    def __init__(
        self,
        image_size=35,
        num_slots: int = 4,
        latent_dim: int = 16,
        pixel_scale: float = 0.1,
        decoder_channels=(32, 32, 16),
        decoder_broadcast=None,
        decoder_upsample: int = 2,
        kernel_size: int = 5,
        in_channels: int = 3,
        decoder_resolution=None,
    ):
        latent_dim = check_positive_int(latent_dim, "latent_dim")
        in_channels = check_positive_int(in_channels, "in_channels")
        spec = SlotSpec({"loc": (latent_dim,), "log_scale": (latent_dim,)})
        super().__init__(spec, in_channels)
        #: The enumerated per-pixel assignment (its posterior: the segmentation given z).
        self.assignment_site = "assignment"
        self.image_size = _pair(image_size, "image_size")
        self.num_slots = check_positive_int(num_slots, "num_slots")
        self.latent_dim = latent_dim
        self.in_channels = in_channels
        self.pixel_scale = check_positive_float(pixel_scale, "pixel_scale")
        decoder_upsample = check_positive_int(decoder_upsample, "decoder_upsample", minimum=0)
        self.decoder = SpatialBroadcastDecoder(
            latent_dim,
            self.image_size,
            out_channels=in_channels + 1,
            channels=_int_tuple(decoder_channels, "decoder_channels"),
            broadcast_resolution=None
            if decoder_broadcast is None
            else _pair(decoder_broadcast, "decoder_broadcast"),
            num_upsample=decoder_upsample,
            kernel_size=kernel_size,
            decode_resolution=None
            if decoder_resolution is None
            else _pair(decoder_resolution, "decoder_resolution"),
        )
        # λ_0: a learned initial posterior shared by all slots, symmetry broken by the noise.
        self.slot_init = GaussianInit(spec.dim, scale=0.1)

    @classmethod
    def paper_size(cls, image_size=35, num_slots: int = 4, **kwargs) -> IODINE:
        """A full-resolution decoder in the style of IODINE's Tetrominoes model.

        Four ``5 x 5`` convolutions with 32 channels at full resolution and 32-dimensional
        latents (Greff et al. 2019, appendix; their refinement network is not part of the
        model here but of the inner rule).
        """
        config = dict(
            latent_dim=32,
            decoder_channels=(32, 32, 32, 32),
            decoder_upsample=0,  # broadcast at the decoded resolution (the image's by default)
            kernel_size=5,
        )
        config.update(kwargs)
        return cls(image_size=image_size, num_slots=num_slots, **config)

    @property
    def num_measurements(self) -> int:
        return self.image_size[0] * self.image_size[1]

    # ------------------------------------------------------------------ measurements
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(batch, C, H, W)`` to pixels ``(batch, H·W, C)`` (row-major)."""
        expected = (self.in_channels, *self.image_size)
        if not torch.is_tensor(x):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"x: expected images of shape (batch, {expected[0]}, {expected[1]}, "
                f"{expected[2]}), got {tuple(x.shape)}"
            )
        return x.flatten(2).transpose(1, 2)

    def to_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`encode`: ``(..., H·W, C)`` to ``(..., C, H, W)``."""
        return pixels.transpose(-1, -2).reshape(*pixels.shape[:-2], -1, *self.image_size)

    # ---------------------------------------------------------------------- decoder
    def decode_latents(self, z: torch.Tensor):
        """Latents ``(..., K, latent_dim)`` to ``rgb (..., K, C, H, W)`` and mask logits
        ``(..., K, H, W)``."""
        if z.shape[-1] != self.latent_dim or z.dim() < 2:
            raise ValueError(
                f"z: expected shape (..., num_slots, {self.latent_dim}), got {tuple(z.shape)}"
            )
        out = self.decoder(z.reshape(-1, self.latent_dim))
        out = out.reshape(*z.shape[:-1], *out.shape[1:])
        return out[..., : self.in_channels, :, :], out[..., self.in_channels, :, :]

    def decode(self, slots: torch.Tensor):
        """Decode the posterior means of slots ``(batch, K, slot_dim)``.

        :returns: ``(recon (batch, C, H, W), rgb (batch, K, C, H, W), masks (batch, K, H, W))``,
            masks a softmax over slots and ``recon = Σ_k masks_k · rgb_k``.
        """
        if slots.dim() != 3 or slots.shape[-1] != self.slot_dim:
            raise ValueError(
                f"slots: expected shape (batch, num_slots, {self.slot_dim}), "
                f"got {tuple(slots.shape)}"
            )
        rgb, logits = self.decode_latents(self.slot_spec.split(slots)["loc"])
        masks = torch.softmax(logits, dim=1)
        return (masks.unsqueeze(2) * rgb).sum(1), rgb, masks

    def reconstruct(self, x_enc: torch.Tensor, slots: torch.Tensor, x_raw=None) -> torch.Tensor:
        """Image ``(batch, C, H, W)`` decoded from the posterior means."""
        return self.decode(slots)[0]

    # ------------------------------------------------------------------ Pyro program
    def pixel_components(self, z: torch.Tensor):
        """Per-pixel mixture of latents ``(..., K, latent_dim)``: ``means (..., M, K, C)`` and
        ``logits (..., M, K)``."""
        rgb, logits = self.decode_latents(z)  # (..., K, C, H, W), (..., K, H, W)
        # (..., K, C, M) -> (..., M, K, C)
        means = rgb.flatten(-2).permute(*range(rgb.dim() - 4), -1, -3, -2)
        return means, logits.flatten(-2).transpose(-1, -2)

    def model(self, x: torch.Tensor, slots: torch.Tensor):
        batch, num_pixels, _ = x.shape
        check_slots(slots, "slots", batch, self.slot_dim, finite=dist.is_validation_enabled())
        num_slots = slots.shape[1]
        zeros = x.new_zeros(batch, num_slots, self.latent_dim)
        with pyro.plate(self.batch_plate, batch, dim=-2, device=x.device):
            with pyro.plate("slots", num_slots, dim=-1, device=x.device):
                z = pyro.sample("z", dist.Normal(zeros, 1.0).to_event(1))
            means, logits = self.pixel_components(z)  # (..., B, M, K, C), (..., B, M, K)
            with pyro.plate("measurements", num_pixels, dim=-1, device=x.device):
                # Normalized over the slots where the decoder put them, (..., B, K, M).
                a = pyro.sample(
                    "assignment",
                    SlotCategorical(logits.transpose(-1, -2), dim=-2),
                    infer={"enumerate": "parallel"},
                )
                # The means' batch dims (..., B, M) line up with the plates; under enumeration
                # the pick is a view of the means with the slot axis moved (no gather).
                pyro.sample(
                    "obs",
                    dist.Normal(select_component(means, a, dim=-2), self.pixel_scale).to_event(1),
                    obs=x,
                )

    def guide(self, x: torch.Tensor, slots: torch.Tensor):
        batch = x.shape[0]
        check_slots(slots, "slots", batch, self.slot_dim, finite=dist.is_validation_enabled())
        parts = self.slot_spec.split(slots)
        with pyro.plate(self.batch_plate, batch, dim=-2, device=x.device):
            with pyro.plate("slots", slots.shape[1], dim=-1, device=x.device):
                pyro.sample("z", dist.Normal(parts["loc"], parts["log_scale"].exp()).to_event(1))


class RefinementInputs(nn.Module):
    r"""IODINE's auxiliary inputs to the refinement network, encoded per slot.

    Greff et al. (2019, §2.3) feed the refinement network, besides the posterior parameters and
    their gradient, image-sized inputs of every slot: the image, the slot's decoded means and
    mask, its posterior mask (the pixel's responsibility) and coordinate channels. This module
    builds them from the posterior means of the current slots,

        x, μ_k, m_k, p(a_m = k | x, λ), x - μ_k, (i, j)          # 3 + 3 + 1 + 1 + 3 + 2 channels

    and encodes each slot's stack with a small CNN (shared by the slots, so the rule stays
    permutation-equivariant) and a pooling over positions into ``out_dim`` numbers: the mean
    (``pooling="mean"``) or, with ``pooling="posterior"``, the mean next to the average weighted
    by the slot's posterior mask ``p(a_m = k | x, λ)`` (average-pooled to the CNN's output grid)
    -- what the slot explains, in the way Slot Attention's update reads its attention-weighted
    mean, where IODINE flattens the feature map into an MLP. Pass it to
    :class:`~pyro_slots.inner.LearnedGradient` as ``features=RefinementInputs(...)`` with
    ``extra_dim=out_dim``. It reads the model from the inner problem (``problem.model``, an
    :class:`IODINE`), so the decoder is not registered twice; as in IODINE, no gradient flows
    back through the decoded inputs (they are computed without a graph).

    :param int in_channels: image channels (3).
    :param int out_dim: features per slot.
    :param int channels: width of the CNN.
    :param str pooling: ``"mean"`` or ``"posterior"`` (see above).
    """

    POOLINGS = ("mean", "posterior")

    def __init__(
        self, in_channels: int = 3, out_dim: int = 32, channels: int = 32, pooling: str = "mean"
    ):
        super().__init__()
        self.in_channels = check_positive_int(in_channels, "in_channels")
        self.out_dim = check_positive_int(out_dim, "out_dim")
        channels = check_positive_int(channels, "channels")
        if pooling not in self.POOLINGS:
            raise ValueError(f"pooling: expected one of {self.POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        stack = 3 * self.in_channels + 4
        self.net = nn.Sequential(
            nn.Conv2d(stack, channels, 3, stride=2, padding=1),
            nn.ELU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1),
            nn.ELU(),
        )
        self.out = nn.Linear(channels * (1 if pooling == "mean" else 2), self.out_dim)

    def inputs(self, model: IODINE, pixels: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """The per-slot input stack ``(batch, K, 3 C + 4, H, W)``, without a graph."""
        with torch.no_grad():
            image = model.to_image(pixels)  # (B, C, H, W)
            loc = model.slot_spec.split(slots.detach())["loc"]
            rgb, logits = model.decode_latents(loc)  # (B, K, C, H, W), (B, K, H, W)
            log_masks = torch.log_softmax(logits, dim=1)
            masks = log_masks.exp()
            sq = (image.unsqueeze(1) - rgb).pow(2).sum(2)  # (B, K, H, W)
            log_lik = -0.5 * sq / model.pixel_scale**2
            posterior = torch.softmax(log_masks + log_lik, dim=1)
            batch, num_slots, _, height, width = rgb.shape
            rows = torch.linspace(-1, 1, height, dtype=image.dtype, device=image.device)
            cols = torch.linspace(-1, 1, width, dtype=image.dtype, device=image.device)
            grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"))  # (2, H, W)
            parts = [
                image.unsqueeze(1).expand_as(rgb),
                rgb,
                masks.unsqueeze(2),
                posterior.unsqueeze(2),
                image.unsqueeze(1) - rgb,
                grid.expand(batch, num_slots, 2, height, width),
            ]
            return torch.cat(parts, dim=2)

    def forward(self, problem, slots: torch.Tensor) -> torch.Tensor:
        model = problem.model
        if not isinstance(model, IODINE):
            raise TypeError(f"problem.model: expected an IODINE, got {type(model).__name__}")
        if model.in_channels != self.in_channels:
            raise ValueError(
                f"in_channels: {self.in_channels} differs from the model's {model.in_channels}"
            )
        stack = self.inputs(model, problem.x, slots)
        batch, num_slots = stack.shape[:2]
        maps = self.net(stack.flatten(0, 1))  # (B K, channels, h, w)
        h = maps.mean((-2, -1))
        if self.pooling == "posterior":
            # the posterior mask (channel 2 C + 1 of the stack) on the feature grid, normalized
            post = stack[:, :, 2 * self.in_channels + 1].flatten(0, 1).unsqueeze(1)
            weights = nn.functional.adaptive_avg_pool2d(post, maps.shape[-2:])
            weights = weights / weights.sum((-2, -1), keepdim=True).clamp_min(1e-6)
            h = torch.cat([h, (maps * weights).sum((-2, -1))], dim=-1)
        return self.out(h).reshape(batch, num_slots, self.out_dim)
