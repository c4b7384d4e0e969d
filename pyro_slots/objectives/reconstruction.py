"""Reconstruction error as the task objective (Slot Attention's autoencoding task)."""

from __future__ import annotations

from .base import Objective

__all__ = ["Reconstruction"]


class Reconstruction(Objective):
    """``J = mean squared error between x and model.reconstruct(x̃, λ*)`` per datapoint.

    The model decodes the slots (``model.reconstruct(x_enc, slots, x_raw=x)``) into something of
    the shape of ``x``; the error is averaged over every non-batch element.
    """

    def forward(self, model, x, x_enc, slots, *targets):
        recon = model.reconstruct(x_enc, slots, x_raw=x)
        if recon.shape != x.shape:
            raise ValueError(
                f"{type(model).__name__}.reconstruct returned shape {tuple(recon.shape)}, "
                f"expected the shape of x {tuple(x.shape)}"
            )
        return (recon - x).pow(2).flatten(1).mean(1)
