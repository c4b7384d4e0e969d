"""Small exponential-family mixture slot models for the tests of the derived M-step."""

import pyro
import pyro.distributions as dist
import torch
from pyro.ops.indexing import Vindex

from pyro_slots.model import SlotModel, SlotSpec


class _Mixture(SlotModel):
    """``z ~ Categorical(softmax(weight_logit))``, ``x | z ~ component(λ_z)`` per measurement."""

    def __init__(self, num_slots, dim, fields):
        super().__init__(SlotSpec({**fields, "weight_logit": ()}), dim)
        self.assignment_site = "assignment"
        self.num_slots = num_slots

    def component(self, parts, n, z):
        raise NotImplementedError

    def model(self, x, slots):
        parts = self.slot_spec.split(slots)
        batch, num_points, _ = x.shape
        with pyro.plate(self.batch_plate, batch, dim=-2) as n:
            with pyro.plate("measurements", num_points, dim=-1):
                z = pyro.sample(
                    "assignment",
                    dist.Categorical(logits=parts["weight_logit"].unsqueeze(-2)),
                    infer={"enumerate": "parallel"},
                )
                pyro.sample("obs", self.component(parts, n.unsqueeze(-1), z).to_event(1), obs=x)


class BernoulliMixture(_Mixture):
    """Binary vectors; slots ``(logits (dim,), weight_logit ())``."""

    def __init__(self, num_slots, dim):
        super().__init__(num_slots, dim, {"logits": (dim,)})

    def component(self, parts, n, z):
        return dist.Bernoulli(logits=Vindex(parts["logits"])[n, z])


class PoissonMixture(_Mixture):
    """Count vectors; slots ``(log_rate (dim,), weight_logit ())``."""

    def __init__(self, num_slots, dim):
        super().__init__(num_slots, dim, {"log_rate": (dim,)})

    def component(self, parts, n, z):
        return dist.Poisson(Vindex(parts["log_rate"])[n, z].exp())


class GammaMixture(_Mixture):
    """Positive vectors; slots ``(log_shape (dim,), log_rate (dim,), weight_logit ())``."""

    def __init__(self, num_slots, dim):
        super().__init__(num_slots, dim, {"log_shape": (dim,), "log_rate": (dim,)})

    def component(self, parts, n, z):
        return dist.Gamma(
            Vindex(parts["log_shape"])[n, z].exp(), Vindex(parts["log_rate"])[n, z].exp()
        )


class BetaMixture(_Mixture):
    """Vectors in (0, 1); slots ``(a (dim,), b (dim,), weight_logit ())`` through softplus."""

    def __init__(self, num_slots, dim):
        super().__init__(num_slots, dim, {"a": (dim,), "b": (dim,)})

    def component(self, parts, n, z):
        softplus = torch.nn.functional.softplus
        return dist.Beta(softplus(Vindex(parts["a"])[n, z]), softplus(Vindex(parts["b"])[n, z]))


class CategoricalMixture(_Mixture):
    """Vectors of categories in ``range(num_values)``; slots ``(logits (dim, C), weight_logit)``."""

    def __init__(self, num_slots, dim, num_values):
        super().__init__(num_slots, dim, {"logits": (dim, num_values)})

    def component(self, parts, n, z):
        return dist.Categorical(logits=Vindex(parts["logits"])[n, z])


class ScaledMeanMixture(_Mixture):
    """A Normal whose mean is twice a slot part: no known bijection, refused."""

    def __init__(self, num_slots, dim):
        super().__init__(num_slots, dim, {"loc": (dim,)})

    def component(self, parts, n, z):
        return dist.Normal(2.0 * Vindex(parts["loc"])[n, z], 1.0)


class ScaleMixture(_Mixture):
    """Zero-mean Normals with a scale per slot and feature (the mean shared by every feature)."""

    def __init__(self, num_slots, dim):
        super().__init__(num_slots, dim, {"log_scale": (dim,)})

    def component(self, parts, n, z):
        return dist.Normal(0.0, Vindex(parts["log_scale"])[n, z].exp())


class PositiveMeanMixture(_Mixture):
    """Normals of unit scale whose mean is ``exp`` of a slot part (positive means)."""

    def __init__(self, num_slots, dim):
        super().__init__(num_slots, dim, {"log_loc": (dim,)})

    def component(self, parts, n, z):
        return dist.Normal(Vindex(parts["log_loc"])[n, z].exp(), 1.0)
