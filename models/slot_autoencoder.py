"""Slot Attention autoencoder as a Pyro program: meta-learned parameter estimation on images.

Locatello et al. (2020) encode an image into a set of feature vectors, refine ``K`` slots over
them with an iterated attention update, and decode every slot into an RGB image and a mask. In
the reading of §3.2-3.3 of the seed paper the slots ``λ^{n,k}`` are the component means of a
per-image mixture model over the encoded measurements ``x̃^{n,m}``, fitted by an inner rule that
improves that mixture's ELBO; soft k-means is the exact fixed rule (Bottou & Bengio 1995) and the
``SlotAttention`` rule its learned generalization. The decoder and the reconstruction task
objective J live outside the inner problem.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.ops.indexing import Vindex
from torch import nn

from pyro_slots.init import GaussianInit
from pyro_slots.model import SlotModel, SlotSpec
from pyro_slots.validation import check_positive_float, check_positive_int, check_slots

from .blocks import CNNEncoder, SpatialBroadcastDecoder, _int_tuple, _pair
from .gmm import GaussianMixture
from .slot_selection import SlotSelector, masked_softmax

__all__ = ["SlotAutoencoder"]

#: The inner mixtures of :class:`SlotAutoencoder` (``mixture``).
MIXTURES = ("isotropic", "diagonal")


class SlotAutoencoder(SlotModel):
    r"""Slot Attention autoencoder (Locatello et al. 2020) with an explicit inner mixture model.

    **Encoder** ``w_e`` (:meth:`encode`): :class:`~pyro_slots.models.blocks.CNNEncoder`, images
    ``(batch, 3, H, W)`` to measurements ``x̃`` of shape ``(batch, M, feature_dim)``.

    **Inner ELBO** (:meth:`model`): every image is a mixture of ``K`` isotropic Gaussians over its
    measurements, with uniform weights, a fixed variance σ² (:attr:`variance`) and component
    means ``μ_k = A λ_k`` (``A`` the identity when ``slot_dim == feature_dim``, else a shared
    linear map without bias)::

        z^{n,m} ~ Categorical(1/K, ..., 1/K)                  # enumerated
        x̃^{n,m} ~ Normal(A λ^{n, z^{n,m}}, σ I)

    Assignments are enumerated, so the ELBO is the exact log-likelihood. Its coordinate ascent
    is soft k-means with temperature σ²: the :class:`~pyro_slots.inner.EM` and
    :class:`~pyro_slots.inner.SoftKMeans` rules read the E-step from this program
    (:attr:`assignment_site`) and call :meth:`m_step`; the
    default σ² = √feature_dim makes the responsibilities ``softmax_k(x̃·μ_k/σ² - |μ_k|²/2σ²)``
    match the scaled dot-product attention of Slot Attention.

    **Decoder** ``w_d`` (:meth:`decode`): every slot goes through a
    :class:`~pyro_slots.models.blocks.SpatialBroadcastDecoder` to RGB and a mask logit per pixel;
    masks are a softmax over slots and the image is ``Σ_k mask_k · rgb_k`` (:meth:`reconstruct`,
    used by :class:`~pyro_slots.objectives.Reconstruction`).

    **Active slots** (``active_slots=True``, AdaSlot, Fan et al. 2024): a
    :class:`~pyro_slots.models.SlotSelector` (:attr:`slot_selector`) keeps a per-image subset of
    the ``K`` final slots -- a hard straight-through Gumbel-softmax mask in training, ``π_k > 1/2``
    in evaluation (``model.eval()``), the most probable slot whenever none is kept -- and the
    masks are the softmax over the kept slots only (:func:`~pyro_slots.models.masked_softmax`):
    a dropped slot's mask is 0 and the image is explained by the others. The inner loop is
    unchanged. Train with :class:`~pyro_slots.NestedSVI`'s ``slot_sparsity`` penalty on the keep
    probabilities; ``slot_selector(slots).num_kept`` counts the kept slots.

    The default sizes suit a CPU (a stride-2 encoder, decoding at quarter resolution and two
    upsampling layers); :meth:`paper_size` builds the architecture of the paper's Tetrominoes /
    Multi-dSprites experiments.

    Example::

        model = SlotAutoencoder(image_size=35, num_slots=4)
        svi = NestedSVI(model, SlotAttention(...), Reconstruction(), pyro.optim.Adam({"lr": 4e-4}))
        svi.step(images)  # images (batch, 3, 35, 35)

    :param image_size: ``H`` or ``(H, W)`` of the images.
    :param int num_slots: default ``K``.
    :param int feature_dim: size of a measurement ``x̃^{n,m}``.
    :param int slot_dim: size of a slot ``λ^{n,k}``; default ``feature_dim`` (then ``A = I``).
    :param float variance: σ² of the inner mixture, > 0; default ``√feature_dim``.
    :param encoder_channels: channels of the encoder's convolutions.
    :param encoder_strides: their strides (default: 1, 2, 1, 1 -- a quarter of the positions).
    :param decoder_channels: channels of the decoder's hidden convolutions.
    :param decoder_broadcast: broadcast resolution of the decoder; default
        ``ceil(decoder_resolution / 2^decoder_upsample)``.
    :param int decoder_upsample: number of stride-2 upsampling layers of the decoder.
    :param int kernel_size: kernel size of the hidden convolutions.
    :param int in_channels: image channels.
    :param decoder_resolution: ``(h, w)`` the decoder's convolutions produce before a bilinear
        resize to the image size (masks and RGB alike); default the image size (no resize).
    :param str mixture: the inner mixture over the measurements: ``"isotropic"`` (above) or
        ``"diagonal"``, a :class:`~pyro_slots.models.GaussianMixture` over the encoder's features
        with every slot's own mean, diagonal variances and mixing weight (the slot is
        ``(loc, log_scale, logit)``, ``slot_dim == feature_dim``; the decoder reads ``loc``):
        its EM is the Gaussian-mixture slot update of Probabilistic Slot Attention (Kori et
        al. 2024) and the Slot Mixture Module (Kirilenko et al. 2024), a *fixed* rule inside the
        learned encoder and decoder.
    :param bool active_slots: keep a per-image number of slots in the decoder's mixture
        (AdaSlot, above), with a :class:`~pyro_slots.models.SlotSelector` reading the whole slot.
    """

    def __init__(
        self,
        image_size=35,
        num_slots: int = 4,
        feature_dim: int = 64,
        slot_dim: int | None = None,
        variance: float | None = None,
        encoder_channels=(32, 32, 32, 32),
        encoder_strides=(1, 2, 1, 1),
        decoder_channels=(32, 32, 16),
        decoder_broadcast=None,
        decoder_upsample: int = 2,
        kernel_size: int = 5,
        in_channels: int = 3,
        decoder_resolution=None,
        mixture: str = "isotropic",
        active_slots: bool = False,
    ):
        feature_dim = check_positive_int(feature_dim, "feature_dim")
        slot_dim = feature_dim if slot_dim is None else check_positive_int(slot_dim, "slot_dim")
        if mixture not in MIXTURES:
            raise ValueError(f"mixture: expected one of {MIXTURES}, got {mixture!r}")
        if not isinstance(active_slots, bool):
            raise TypeError(f"active_slots: expected True or False, got {active_slots!r}")
        # The diagonal mixture is the library's GaussianMixture over the encoded measurements.
        gmm = None
        if mixture == "diagonal":
            if slot_dim != feature_dim:
                raise ValueError(
                    f"slot_dim: mixture='diagonal' keeps the means in feature space, so slot_dim "
                    f"must equal feature_dim {feature_dim}, got {slot_dim}"
                )
            gmm = GaussianMixture(num_slots, feature_dim)
        super().__init__(gmm.slot_spec if gmm is not None else SlotSpec({"loc": (slot_dim,)}),
                         feature_dim)  # fmt: skip
        self.mixture = mixture
        self.gaussian_mixture = gmm
        #: The enumerated site whose posterior EM / soft k-means read from the Pyro program.
        self.assignment_site = "assignment"
        self.image_size = _pair(image_size, "image_size")
        self.num_slots = check_positive_int(num_slots, "num_slots")
        self.variance = (
            math.sqrt(feature_dim)
            if variance is None
            else check_positive_float(variance, "variance")
        )
        self.in_channels = check_positive_int(in_channels, "in_channels")
        decoder_upsample = check_positive_int(decoder_upsample, "decoder_upsample", minimum=0)
        self.encoder = CNNEncoder(
            self.image_size,
            in_channels=self.in_channels,
            channels=_int_tuple(encoder_channels, "encoder_channels"),
            strides=_int_tuple(encoder_strides, "encoder_strides"),
            kernel_size=kernel_size,
            feature_dim=feature_dim,
        )
        self.decoder = SpatialBroadcastDecoder(
            slot_dim,
            self.image_size,
            out_channels=self.in_channels + 1,
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
        # A = I when slots live in feature space; otherwise a shared linear map (no bias, so the
        # M-step stays a least-squares projection).
        self.slot_to_feature = (
            None if slot_dim == feature_dim else nn.Linear(slot_dim, feature_dim, bias=False)
        )
        self.slot_init = GaussianInit(self.slot_dim)
        #: The :class:`~pyro_slots.models.SlotSelector` of ``active_slots=True``, else ``None``.
        self.slot_selector = SlotSelector(self.slot_dim) if active_slots else None

    @classmethod
    def paper_size(cls, image_size=35, num_slots: int = 4, **kwargs) -> SlotAutoencoder:
        """The Tetrominoes / Multi-dSprites architecture of Locatello et al. (2020, appendix E).

        Four ``5 x 5`` convolutions with 32 channels at full resolution, 64-dimensional
        measurements and slots, and a decoder broadcasting at full resolution with three
        ``5 x 5`` convolutions of 32 channels.
        """
        config = dict(
            feature_dim=64,
            encoder_channels=(32, 32, 32, 32),
            encoder_strides=(1, 1, 1, 1),
            decoder_channels=(32, 32, 32),
            decoder_upsample=0,  # broadcast at the decoded resolution (the image's by default)
            kernel_size=5,
        )
        config.update(kwargs)
        return cls(image_size=image_size, num_slots=num_slots, **config)

    @property
    def num_measurements(self) -> int:
        return self.encoder.num_measurements

    # ---------------------------------------------------------------------- encoder
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(batch, C, H, W)`` to measurements ``(batch, M, feature_dim)``."""
        return self.encoder(x)

    # ------------------------------------------------------------------ Pyro program
    def component_means(self, slots: torch.Tensor) -> torch.Tensor:
        """``μ = A λ`` of shape ``(batch, K, feature_dim)`` from slots ``(batch, K, slot_dim)``."""
        loc = self.slot_spec.split(slots)["loc"]
        return loc if self.slot_to_feature is None else self.slot_to_feature(loc)

    def model(self, x: torch.Tensor, slots: torch.Tensor):
        batch, num_measurements, _ = x.shape
        check_slots(slots, "slots", batch, self.slot_dim, finite=dist.is_validation_enabled())
        if self.gaussian_mixture is not None:
            return self.gaussian_mixture.model(x, slots)
        means = self.component_means(slots)
        num_slots = means.shape[1]
        logits = means.new_zeros(batch, 1, num_slots)  # uniform mixing weights
        scale = math.sqrt(self.variance)
        with pyro.plate(self.batch_plate, batch, dim=-2, device=x.device) as n:
            with pyro.plate("measurements", num_measurements, dim=-1, device=x.device):
                z = pyro.sample(
                    "assignment", dist.Categorical(logits=logits), infer={"enumerate": "parallel"}
                )
                pyro.sample(
                    "obs",
                    dist.Normal(Vindex(means)[n.unsqueeze(-1), z], scale).to_event(1),
                    obs=x,
                )

    # ---------------------------------------------------------- the documented M-step
    def m_step(
        self,
        x: torch.Tensor,
        resp: torch.Tensor,
        slots: torch.Tensor | None = None,
        fixed_variance: float | None = None,
        fixed_weights: bool | None = None,
    ) -> torch.Tensor:
        """Closed-form maximizer over λ of the expected complete log-likelihood.

        ``λ_k = A⁺ x̄_k`` with ``x̄_k = Σ_m r_km x̃_m / Σ_m r_km`` (``A⁺`` the pseudo-inverse:
        least squares when ``A`` is tall, the minimum-norm solution when it is wide). Variance and
        weights are constants of the model, so ``fixed_variance`` (checked against
        :attr:`variance`) and ``fixed_weights`` change nothing: EM and soft k-means coincide.

        :param x: ``(batch, M, feature_dim)``; :param resp: ``(batch, K, M)``.
        :param slots: the current slots (unused: the update does not depend on them).
        :returns: slots ``(batch, K, slot_dim)``.

        With ``mixture="diagonal"`` it is :meth:`GaussianMixture.m_step
        <pyro_slots.models.GaussianMixture.m_step>`: means, diagonal variances and weights (and
        ``fixed_variance`` / ``fixed_weights`` hold those at soft k-means' values).
        """
        if self.gaussian_mixture is not None:
            return self.gaussian_mixture.m_step(
                x, resp, slots, fixed_variance, fixed_weights=bool(fixed_weights)
            )
        if fixed_variance is not None:
            self._check_temperature(fixed_variance)
        if resp.dim() != 3 or resp.shape[0] != x.shape[0] or resp.shape[2] != x.shape[1]:
            raise ValueError(
                f"resp: expected shape ({x.shape[0]}, num_slots, {x.shape[1]}), "
                f"got {tuple(resp.shape)}"
            )
        eps = 10 * torch.finfo(x.dtype).eps
        weights = resp / (resp.sum(-1, keepdim=True) + eps)
        means = torch.einsum("bkm,bmf->bkf", weights, x)
        if self.slot_to_feature is not None:
            pinv = torch.linalg.pinv(self.slot_to_feature.weight.to(x.dtype))  # (slot_dim, F)
            means = means @ pinv.transpose(0, 1)
        return self.slot_spec.pack({"loc": means})

    def _check_temperature(self, temperature: float) -> None:
        temperature = check_positive_float(temperature, "temperature")
        if not math.isclose(temperature, self.variance, rel_tol=1e-9):
            raise ValueError(
                f"temperature: the inner mixture of {type(self).__name__} has the fixed variance "
                f"{self.variance}, got temperature {temperature}; build the rule with "
                "temperature=model.variance (or the model with variance=temperature)"
            )

    def isotropic(self, slots: torch.Tensor, variance: float) -> torch.Tensor:
        """Slots are means only: the soft k-means family is the model itself (identity). With
        ``mixture="diagonal"`` the slots' variances and weights are set to soft k-means' values.

        :raises ValueError: if ``variance`` differs from the model's :attr:`variance` (isotropic
            mixture) -- soft k-means at another temperature would improve another mixture's ELBO.
        """
        if self.gaussian_mixture is not None:
            return self.gaussian_mixture.isotropic(slots, variance)
        self._check_temperature(variance)
        return slots

    # ---------------------------------------------------------------------- decoder
    def decode(self, slots: torch.Tensor):
        """Decode slots ``(batch, K, slot_dim)`` into images.

        :returns: ``(recon (batch, C, H, W), rgb (batch, K, C, H, W), masks (batch, K, H, W))``
            with masks a softmax over slots (over the kept slots with ``active_slots``, 0 for
            the dropped ones) and ``recon = Σ_k masks_k · rgb_k``.
        """
        if slots.dim() != 3 or slots.shape[-1] != self.slot_dim:
            raise ValueError(
                f"slots: expected shape (batch, num_slots, {self.slot_dim}), "
                f"got {tuple(slots.shape)}"
            )
        batch, num_slots, _ = slots.shape
        loc = self.slot_spec.split(slots)["loc"]
        out = self.decoder(loc.reshape(batch * num_slots, -1))
        out = out.reshape(batch, num_slots, *out.shape[1:])  # (B, K, C + 1, H, W)
        rgb = out[:, :, : self.in_channels]
        logits = out[:, :, self.in_channels]
        if self.slot_selector is None:
            masks = torch.softmax(logits, dim=1)
        else:
            masks = masked_softmax(logits, self.slot_selector(slots).keep)
        recon = (masks.unsqueeze(2) * rgb).sum(1)
        return recon, rgb, masks

    def reconstruct(self, x_enc: torch.Tensor, slots: torch.Tensor, x_raw=None) -> torch.Tensor:
        """The decoded image ``(batch, C, H, W)`` (``x_enc`` and ``x_raw`` are not needed)."""
        return self.decode(slots)[0]
