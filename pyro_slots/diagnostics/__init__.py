"""Did inference work, per datapoint? Posterior diagnostics on ArviZ.

* :func:`to_inference_data`: a refine result as :class:`arviz.InferenceData` (restarts are
  chains, aligned by Hungarian matching, :mod:`~pyro_slots.diagnostics.alignment`);
* :func:`psis_diagnostic`: Pareto k̂ and the PSIS evidence of the guide (Yao et al. 2018);
* :func:`amortization_gap`: ELBO left to further refinement (Cremer et al. 2018);
* :func:`inner_loop_health`: ELBO decreases, residuals, Jacobian spectral norm, entropy,
  duplicate and dead slots; :func:`trajectory_dataset` exports the inner loop's path;
* :func:`summary`: one row per datapoint; the figures live in :mod:`pyro_slots.plots` (the
  diagnostic ones are re-exported here);
* :func:`write_report`: all of it into a folder (markdown, PNG, netCDF).

:mod:`pyro_slots.diagnostics.clustering` compares mixture-fitting methods (a learned rule, EM,
gradient ascent, scikit-learn) on point sets: log-likelihood per point and time per set.
"""

# The diagnostic figures live in pyro_slots.plots; re-exported for compatibility.
from ..plots.diagnostics import plot_elbo_trajectories, plot_khat, plot_rhat
from ..plots.slots import plot_slot_masks
from .alignment import align_slots, apply_permutation, invert_permutation, match_slots
from .amortization import AmortizationGap, amortization_gap, default_refiner, refinement_gap
from .health import (
    InnerLoopHealth,
    assignment_entropy,
    duplicate_slots,
    elbo_decreases,
    inner_loop_health,
    jacobian_spectral_norm,
    model_responsibilities,
    slot_mass,
    trajectory_dataset,
)
from .inference_data import (
    DRAWS,
    DrawsError,
    RhatWarning,
    check_draws,
    laplace_draws,
    pointwise_log_likelihood,
    resolve_draws,
    to_inference_data,
)
from .psis import PSISResult, PSISWarning, khat_reliability, khat_threshold, psis_diagnostic
from .report import write_report
from .summary import (
    aligned_posterior,
    centre_rhat_per_datapoint,
    rhat_per_datapoint,
    summary,
    unaligned_posterior,
)

__all__ = [
    "DRAWS",
    "DrawsError",
    "AmortizationGap",
    "InnerLoopHealth",
    "PSISResult",
    "PSISWarning",
    "RhatWarning",
    "align_slots",
    "aligned_posterior",
    "amortization_gap",
    "apply_permutation",
    "assignment_entropy",
    "check_draws",
    "centre_rhat_per_datapoint",
    "default_refiner",
    "duplicate_slots",
    "elbo_decreases",
    "inner_loop_health",
    "invert_permutation",
    "jacobian_spectral_norm",
    "khat_reliability",
    "khat_threshold",
    "laplace_draws",
    "match_slots",
    "model_responsibilities",
    "plot_elbo_trajectories",
    "plot_khat",
    "plot_rhat",
    "plot_slot_masks",
    "pointwise_log_likelihood",
    "psis_diagnostic",
    "refinement_gap",
    "resolve_draws",
    "rhat_per_datapoint",
    "slot_mass",
    "summary",
    "to_inference_data",
    "trajectory_dataset",
    "unaligned_posterior",
    "write_report",
]
