"""Checks at the public boundary of refine() and NestedSVI (issue 19, case 5): no silent K, no
raw torch dtype errors, no NaN slots for datapoints with a single measurement."""

import pyro
import pytest
import torch

import pyro_slots as ps
from pyro_slots.inner import EM
from pyro_slots.models import GaussianMixture
from pyro_slots.objectives import NegativeELBO
from pyro_slots.validation import NonFiniteError, check_finite
from tests.conftest import make_point_sets, tiny_autoencoder


def _svi(model):
    return ps.NestedSVI(
        model,
        EM(2),
        NegativeELBO(),
        pyro.optim.Adam({"lr": 0.01}),
        init=ps.init.GaussianInit(model.slot_dim, learnable=True),
        seed=0,
    )


def test_explicit_slots_must_have_the_requested_k():
    x, _ = make_point_sets(2, 20)
    gmm = GaussianMixture(3, 2)
    slots = gmm.init_slots(x, 5, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"slots: expected shape \(2, 3, 5\), got \(2, 5, 5\)"):
        ps.refine(gmm, x, EM(2), num_slots=3, slots=slots)
    # Without num_slots, K is the slots' own (nothing to disagree with): 5 slots refined.
    assert ps.refine(gmm, x, EM(2), slots=slots).slots.shape == (1, 2, 5, 5)


def test_slots_of_another_dtype_are_refused():
    x, _ = make_point_sets(2, 20)  # float32
    gmm = GaussianMixture(3, 2)
    slots = gmm.init_slots(x, 3, torch.Generator().manual_seed(0)).double()
    with pytest.raises(TypeError, match="slots: expected dtype torch.float32 .*got torch.float64"):
        ps.refine(gmm, x, EM(2), slots=slots)


def test_integer_images_are_refused_naming_the_dtype():
    model = tiny_autoencoder()
    images = torch.randint(0, 256, (2, 3, 12, 12), dtype=torch.uint8)
    match = r"x: expected a floating-point tensor \(torch.float32 or torch.float64\), got dtype "
    match += r"torch.uint8 \(images: x.float\(\) / 255\)"
    with pytest.raises(TypeError, match=match):
        ps.refine(model, images, EM(2), seed=0)
    with pytest.raises(TypeError, match=match):
        _svi(model).loss(images)
    # The same images as floats go through.
    assert ps.refine(model, images.float() / 255, EM(2), seed=0).slots.dtype == torch.float32


def test_data_of_another_dtype_than_the_weights_is_refused():
    model = tiny_autoencoder()  # float32 weights
    images = torch.rand(2, 3, 12, 12, dtype=torch.float64)
    match = r"x: expected dtype torch.float32 \(the dtype of the model's weights\), got "
    match += "torch.float64"
    with pytest.raises(TypeError, match=match):
        ps.refine(model, images, EM(2), seed=0)
    with pytest.raises(TypeError, match=match):
        _svi(model).loss(images)


def test_data_of_another_dtype_than_a_learned_rules_weights_is_refused():
    """A float32 learned rule on float64 data (a model without weights): refused up front,
    naming the rule, where the first matrix product used to fail deep inside torch."""
    from pyro_slots.inner import SlotAttention
    from pyro_slots.models import GaussianMixture

    gmm = GaussianMixture(3, 2)
    rule = SlotAttention(3, slot_dim=gmm.slot_dim, input_dim=2, hidden_dim=8)  # float32
    x = torch.randn(2, 20, 2, dtype=torch.float64)
    match = r"x: expected dtype torch.float32 \(the dtype of SlotAttention's weights\), got "
    match += r"torch.float64; convert the data \(x.to\(torch.float32\)\) or the rule"
    with pytest.raises(TypeError, match=match):
        ps.refine(gmm, x, rule, seed=0)
    with pytest.raises(TypeError, match=match):
        ps.NestedSVI(gmm, rule, NegativeELBO(), pyro.optim.Adam({"lr": 1e-3})).loss(x)
    # the same data in the rule's dtype, or the rule in the data's, go through
    assert ps.refine(gmm, x.float(), rule, seed=0).slots.dtype == torch.float32
    assert ps.refine(gmm, x, rule.double(), seed=0).slots.dtype == torch.float64


def test_one_measurement_per_datapoint_is_refused():
    x = torch.randn(3, 1, 2)
    gmm = GaussianMixture(2, 2)
    match = r"x: needs at least 2 measurements per datapoint for 2 slots, got 1"
    with pytest.raises(ValueError, match=match):
        ps.refine(gmm, x, EM(2), seed=0)
    with pytest.raises(ValueError, match=match):
        _svi(gmm).loss(x)
    # Two measurements are enough: a finite fit.
    assert torch.isfinite(ps.refine(gmm, torch.randn(3, 2, 2), EM(2), seed=0).slots).all()


def test_non_finite_error_is_both_a_value_and_a_floating_point_error():
    bad = torch.tensor([1.0, float("nan"), float("inf")])
    for kind in (ValueError, FloatingPointError, NonFiniteError):
        with pytest.raises(kind, match="w: contains 2 NaN or infinite values"):
            check_finite(bad, "w")


def test_check_finite_counts_in_pieces_and_passes_finite_values_whose_sum_overflows(
    monkeypatch,
):
    """The count over pieces of rows equals the count over the whole tensor (numpy); finite
    float32 values whose sum overflows to infinity are finite; a 0-d tensor is checked too."""
    import numpy as np

    from pyro_slots import validation

    monkeypatch.setattr(validation, "FINITE_CHECK_CHUNK", 10)  # pieces of 2 rows of 5
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    x[0, 1], x[3, 4], x[6, 0], x[6, 2] = float("nan"), float("inf"), -float("inf"), float("nan")
    expected = int((~np.isfinite(x.numpy())).sum())
    with pytest.raises(NonFiniteError, match=f"w: contains {expected} NaN or infinite values"):
        check_finite(x, "w")
    big = torch.full((4, 3), 3e38)  # finite in float32, the sum is not
    assert not torch.isfinite(big.sum()) and check_finite(big, "w") is big
    with pytest.raises(NonFiniteError, match="w: contains 1 NaN or infinite values"):
        check_finite(torch.tensor(float("nan")), "w")


def test_draws_come_from_the_generator_device_and_land_on_the_data_device():
    """A CPU generator gives the same numbers whatever the requested device (here the meta
    device stands in for a GPU: the values are drawn on the CPU, then moved)."""
    from pyro_slots.init import draw

    g = torch.Generator().manual_seed(3)
    out = draw(torch.randn, (2, 3), generator=g, dtype=torch.float64, device="meta")
    assert out.device.type == "meta" and out.shape == (2, 3)
    g.manual_seed(3)
    cpu = draw(torch.randn, (2, 3), generator=g, dtype=torch.float64, device="cpu")
    assert torch.equal(
        cpu, torch.randn(2, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    )


def test_pyro_programs_check_slot_values_while_pyro_validates():
    """IODINE's model and guide refuse NaN slots while Pyro validates (naming them); with
    validation off (the lean estimator's later calls) only their shape is checked and the NaN
    shows as a non-finite ELBO."""
    import pyro

    from pyro_slots.elbo import PerDatapointELBO
    from pyro_slots.models import IODINE

    model = IODINE(image_size=8, num_slots=3, latent_dim=4)
    x = model.encode(torch.rand(2, 3, 8, 8))
    slots = model.init_slots(x, 3, generator=torch.Generator().manual_seed(0)).detach()
    slots[1, 2, 0] = float("nan")
    for program in (model.model, model.guide):
        with pytest.raises(NonFiniteError, match="slots: contains 1 NaN"):
            program(x, slots)
    with pyro.validation_enabled(False):
        model.guide(x, slots)
        elbo = PerDatapointELBO(strategy="lean")(model, x, slots)
        with pytest.raises(ValueError, match="slots: expected shape"):
            model.model(x, slots[:, :, :-1])
    assert torch.isfinite(elbo[0]) and not torch.isfinite(elbo[1])


@pytest.mark.parametrize("shape", [(1, 2, 5), (2, 5)])
def test_gaussian_mixture_refuses_slots_of_another_batch(shape):
    """(1, K, D) or unbatched (K, D) slots broadcast one mixture over every datapoint of a
    batch of 3 (an ELBO and responsibilities came out); the other models refuse them."""
    from pyro_slots.elbo import per_datapoint_elbo

    gmm, (x, _) = GaussianMixture(2, 2), make_point_sets(3, 10, seed=0)
    with pytest.raises(ValueError, match=r"slots: expected shape \(3, num_slots, 5\)"):
        per_datapoint_elbo(gmm, x, torch.randn(shape))


def test_switches_and_seeds_are_refused_unless_bools_and_integers():
    """A switch given "no" or 1 is refused, not read through bool() ("no" was True), and a seed
    must be an integer >= 0 (1.5 was seed 1, True seed 1)."""
    from pyro_slots.inner import EM, GeneralizedEM, GradientAscent, Reinitialize, SlotAttention

    gmm, (x, _) = GaussianMixture(3, 2), make_point_sets(2, 20, seed=0)
    switches = [
        (lambda v: GeneralizedEM(2, safeguarded=v), "safeguarded"),
        (lambda v: GradientAscent(2, adam=v), "adam"),
        (lambda v: GradientAscent(2, per_measurement=v), "per_measurement"),
        (lambda v: SlotAttention(2, slot_dim=5, input_dim=2, moments=v), "moments"),
        (lambda v: ps.refine(gmm, x, EM(2), seed=0, record_history=v), "record_history"),
        (lambda v: ps.refine(gmm, x, EM(2), seed=0, keep_trajectory=v), "keep_trajectory"),
    ]
    for make, name in switches:
        for bad in ("no", 1, None):
            with pytest.raises(TypeError, match=f"{name}: expected True or False, got {bad!r}"):
                make(bad)
    assert GeneralizedEM(2, safeguarded=False).safeguarded is False
    import numpy as np  # NumPy's booleans are booleans

    assert GeneralizedEM(2, safeguarded=np.False_).safeguarded is False
    seeded = [
        lambda s: ps.refine(gmm, x, EM(2), seed=s),
        lambda s: Reinitialize(EM(2), init=ps.GaussianInit(5), seed=s),
    ]
    for make in seeded:
        for bad in (1.5, True, "3"):
            with pytest.raises(TypeError, match=r"seed: expected an integer >= 0"):
                make(bad)
        with pytest.raises(ValueError, match=r"seed: expected an integer >= 0, got -1"):
            make(-1)
    assert torch.equal(
        ps.refine(gmm, x, EM(2), seed=3).slots, ps.refine(gmm, x, EM(2), seed=3).slots
    )


def test_counts_data_and_switches_are_checked_at_every_public_entry_point():
    """NumPy / torch bools were counts (num_slots=np.True_ ran with one slot), inf escaped as
    a bare OverflowError; half-precision data passed (ELBOs off by tens of nats, k-means++
    overflowing); per_datapoint_elbo checked nothing (int data evaluated, an empty batch a
    ZeroDivisionError); metrics took uint8 images against [0, 1] reconstructions (MSE 22493
    for an exact one), NaN soft masks and empty batches; refine_video took a 0-frame clip,
    and carry / learnable / align read "no" as True. Each is refused, naming the argument."""
    import numpy as np

    from pyro_slots import GaussianInit, per_datapoint_elbo, refine, refine_video
    from pyro_slots.diagnostics import to_inference_data
    from pyro_slots.inner import EM
    from pyro_slots.metrics import ari, reconstruction_mse

    gmm, (x, _) = GaussianMixture(3, 2), make_point_sets(2, 10, seed=0)
    for bad in (np.True_, torch.tensor(True)):
        with pytest.raises(TypeError, match="num_slots: expected an integer >= 1"):
            refine(gmm, x, EM(2), num_slots=bad)
    with pytest.raises(TypeError, match="num_restarts: expected an integer"):
        refine(gmm, x, EM(2), num_restarts=float("inf"))
    for dtype in (torch.float16, torch.bfloat16):
        with pytest.raises(TypeError, match=r"x: expected a floating-point tensor \(torch.float32"):
            refine(gmm, x.to(dtype), EM(2))
    slots = gmm.init_slots(x, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="x: expected a floating-point tensor"):
        per_datapoint_elbo(gmm, x.long(), slots)
    with pytest.raises(ValueError, match="x: expected at least one datapoint and measurement"):
        per_datapoint_elbo(gmm, x[:, :0], slots)
    with pytest.raises(ValueError, match="x: contains 1 NaN or infinite"):
        per_datapoint_elbo(gmm, torch.where(x == x[0, 0, 0], torch.inf, x), slots)
    torch.testing.assert_close(per_datapoint_elbo(gmm, x, slots), refine(gmm, x, EM(1),
                               slots=slots, record_history=True).history[0, 0])  # fmt: skip
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    with pytest.raises(TypeError, match=r"x: expected a floating-point tensor.*x.float\(\) / 255"):
        reconstruction_mse(images, images.float() / 255)
    true = torch.tensor([[0, 1, 1, 2]])
    soft = torch.tensor([[[0.9, 0.1, 0.2, 0.1], [0.1, 0.9, 0.8, 0.9]]])
    with pytest.raises(ValueError, match="pred: soft masks must be finite"):
        ari(true, torch.where(soft == 0.2, torch.nan, soft))
    with pytest.raises(ValueError, match="true_mask: expected shape .* batch >= 1"):
        ari(true[:0], soft[:0])
    with pytest.raises(ValueError, match="pred: expected at least one datapoint and one slot"):
        ari(true, soft[:, :0])
    with pytest.raises(ValueError, match="video: expected a tensor .*frames >= 1"):
        refine_video(gmm, x.unsqueeze(1)[:, :0], EM(2))
    with pytest.raises(TypeError, match="carry: expected True or False"):
        refine_video(gmm, x.unsqueeze(1), EM(2), carry="no")
    with pytest.raises(TypeError, match="learnable: expected True or False"):
        GaussianInit(5, learnable="no")
    with pytest.raises(TypeError, match="align: expected True or False"):
        to_inference_data(refine(gmm, x, EM(2), num_restarts=2), gmm, draws="point", align="no")
