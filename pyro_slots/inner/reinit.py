"""Re-initialize dead and duplicate slots inside the inner loop (DIAS, MetaSlot)."""

from __future__ import annotations

import torch

from ..validation import CapabilityError, check_positive_float, check_positive_int, check_seed
from .base import InnerProblem, InnerRule, InnerState
from .safeguard import Safeguarded

__all__ = ["Reinitialize", "decoder_masks", "duplicate_mask", "masks_of", "posterior_masks"]

#: Rows per block of :meth:`Reinitialize.draw`: a subset of a batch's rows costs the blocks of
#: the batch it touches, so chunks or ranks of many datapoints draw their own rows only.
DRAW_BLOCK = 1024
_MASK64 = 2**64 - 1


def _block_seed(seed: int, step: int, block: int) -> int:
    """The seed of block ``block`` of the draw at step ``step`` of a rule seeded with ``seed``:
    SplitMix64's finalizer of a combination of the three, as a non-negative 63-bit int."""
    z = seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + block * 0x94D049BB133111EB
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def posterior_masks(problem: InnerProblem, slots: torch.Tensor) -> torch.Tensor:
    """What every slot explains, ``(batch, K, M)``: the posterior of the model's assignment
    site (its responsibilities) at ``slots``, from the Pyro program."""
    return problem.elbo_and_responsibilities(slots)[1]


def masks_of(model):
    """What a slot explains for ``model``: :func:`decoder_masks` where the model decodes images
    (``model.decode``), else :func:`posterior_masks` (re-initialization and the inner-loop
    health diagnostics judge dead and duplicate slots by it)."""
    return decoder_masks if callable(getattr(model, "decode", None)) else posterior_masks


def decoder_masks(problem: InnerProblem, slots: torch.Tensor) -> torch.Tensor:
    """What every slot explains, ``(batch, K, H W)``: the masks of the model's decoder
    (``model.decode(slots)`` returns ``(recon, rgb, masks)``), the segmentation an image model
    is scored on. For a slot autoencoder the assignment posterior of the inner mixture over
    the encoder's features can be much flatter than the decoder's masks (with slot attention
    the rule never reads it)."""
    decode = getattr(problem.model, "decode", None)
    if decode is None:
        raise CapabilityError(
            f"decoder_masks: {type(problem.model).__name__} has no decode(slots) returning "
            "masks; use posterior_masks"
        )
    return decode(slots)[2].flatten(2)


def duplicate_mask(
    features: torch.Tensor, threshold: float = 0.95, dead: torch.Tensor | None = None
) -> torch.Tensor:
    """Which slots duplicate an earlier slot of the same datapoint, ``(batch, num_slots)`` bool.

    Slot ``k`` is a duplicate when the cosine similarity of its feature vector with that of a
    slot ``j < k`` exceeds ``threshold`` (the first of a group of duplicates is kept). With
    ``dead`` ``(batch, num_slots)``, only slots that are not dead count as ``j``: a live slot
    is not the duplicate of a dead one with the same (scaled) responsibilities.

    :param torch.Tensor features: ``(batch, num_slots, F)``: masks (responsibilities) or slots.
    """
    f = torch.nn.functional.normalize(features, dim=-1)
    cos = f @ f.transpose(-1, -2)  # (batch, K, K)
    earlier = torch.ones_like(cos, dtype=torch.bool).tril(-1)  # [k, j] with j < k
    if dead is not None:
        earlier = earlier & ~dead.unsqueeze(-2)
    return ((cos > threshold) & earlier).any(-1)


class Reinitialize(InnerRule):
    r"""Before each step of ``rule``, redraw the slots that explain (almost) nothing or what an
    earlier slot already explains.

    At ``λ_t`` (``t ≥ 1``, every ``every`` steps) the posterior of the model's assignment site
    ``γ^{n,k}_m`` is computed from the Pyro program; slot ``k`` of datapoint ``n`` is

    * **dead** when it explains less than ``dead_threshold`` of the measurements,
      ``(1/M) Σ_m γ^{n,k}_m < dead_threshold``;
    * a **duplicate** when its responsibilities have cosine similarity above
      ``duplicate_threshold`` with those of a slot ``j < k`` (:func:`duplicate_mask`),

    and is replaced by a fresh draw of ``init`` before ``rule`` takes its step, so the freed slot
    can pick up an object that two slots were sharing or none was explaining — the pruning and
    re-initialization of DIAS (Zhao et al. 2025) and MetaSlot (2025), with the inner-loop health
    diagnostics' own definitions (:func:`pyro_slots.diagnostics.inner_loop_health`). A
    datapoint's replacements are its row of a draw for the whole batch, made in blocks of
    :data:`DRAW_BLOCK` rows from generators seeded by ``seed``, the step and the block
    (:meth:`draw`), so a run is reproducible, and a datapoint gets the same replacements
    whether it runs alone or with others: the ranks of a data-parallel
    :class:`~pyro_slots.NestedSVI` (:meth:`shard_draws`), the chunks and ranks of
    :func:`~pyro_slots.refine` and the datapoints still active after others stopped keep their
    rows of the whole batch's draw (``InnerProblem(rows=...)``), and each draws the blocks of
    its own rows only. The decision is not differentiated; a replaced slot carries no gradient
    to its former value, and the rule's recurrent state (``aux``) is kept as it was. The ELBO a
    step reports (``RefineResult.history``) is that of the slots the rule stepped from, after
    the redraws (evaluating λ_t's too would cost a model evaluation per re-initialization).

    :param InnerRule rule: the rule that takes the steps (its weights are this rule's weights).
    :param init: a slot initializer ``init(batch, K, generator=, dtype=)`` (e.g.
        :class:`~pyro_slots.GaussianInit`); default the rule's own ``slot_init``.
    :param float dead_threshold: share of the measurements below which a slot is dead
        (``0`` turns dead slots off).
    :param float duplicate_threshold: cosine similarity above which a slot is a duplicate
        (``> 1`` turns duplicates off).
    :param int every: re-initialize before every ``every``-th step.
    :param int seed: seed of the replacement draws.
    :param int num_steps: default ``T`` (default ``rule.num_steps``).
    :param masks: what every slot explains, ``masks(problem, slots) -> (batch, K, N)``
        non-negative: :func:`posterior_masks` (default, the responsibilities above) or
        :func:`decoder_masks` (an image model's decoder masks; on a slot autoencoder with slot
        attention the feature mixture's posterior flagged 1.6-1.9 of 4 slots per tetrominoes
        image as duplicates at every step, where the decoder's masks flag none at the end).
    """

    def __init__(
        self,
        rule: InnerRule,
        init=None,
        *,
        dead_threshold: float = 0.01,
        duplicate_threshold: float = 0.95,
        every: int = 1,
        seed: int = 0,
        num_steps: int | None = None,
        masks=None,
    ):
        if not isinstance(rule, InnerRule):
            raise TypeError(f"rule: expected an InnerRule, got {type(rule).__name__}")
        super().__init__(rule.num_steps if num_steps is None else num_steps)
        self.rule = rule
        self.replacement = init if init is not None else getattr(rule, "slot_init", None)
        if self.replacement is None or not callable(self.replacement):
            raise ValueError(
                f"init: {type(rule).__name__} has no slot_init; pass the slot initializer to "
                "draw replacements from, e.g. GaussianInit(slot_dim)"
            )
        if getattr(self.replacement, "conditional", False):
            raise ValueError(
                f"init: replacements are drawn without the datapoints, and "
                f"{type(self.replacement).__name__} predicts slots from them; pass a random "
                "initializer to draw from, e.g. init=GaussianInit(slot_dim)"
            )
        if isinstance(rule, Safeguarded):
            raise ValueError(
                "rule: Safeguarded judges each step against the ELBO of the slots it last "
                "accepted, which a redraw makes stale; wrap the other way round, "
                "Safeguarded(Reinitialize(rule)), which also rejects a redraw that lowers the ELBO"
            )
        self.dead_threshold = check_positive_float(
            dead_threshold, "dead_threshold", allow_zero=True
        )
        if self.dead_threshold > 1:
            raise ValueError(
                f"dead_threshold: a share of the measurements in [0, 1], got {dead_threshold}"
            )
        self.duplicate_threshold = check_positive_float(duplicate_threshold, "duplicate_threshold")
        self.every = check_positive_int(every, "every")
        self.masks = posterior_masks if masks is None else masks
        if not callable(self.masks):
            raise TypeError(
                f"masks: expected a function masks(problem, slots), got {type(masks).__name__}"
            )
        self.seed = check_seed(seed)
        self.uses_elbo_gradient = rule.uses_elbo_gradient
        self.implicit_differentiable = rule.implicit_differentiable
        self._shard = (0, 1)

    def shard_draws(self, rank: int, world_size: int) -> None:
        """Draw the replacements of this rank's share of a global batch: every draw is made for
        ``world_size`` times the batch (the same numbers on every rank) and rows ``rank * batch``
        on are kept, so ``world_size`` data-parallel processes redraw the single process's slots.
        :class:`~pyro_slots.NestedSVI` calls it under ``torch.distributed``."""
        world_size = check_positive_int(world_size, "world_size")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < {world_size}, got {rank}")
        self._shard = (rank, world_size)

    @property
    def slot_init(self):
        return getattr(self.rule, "slot_init", None)

    def check_model(self, model):
        self.rule.check_model(model)
        if self.masks is decoder_masks and not callable(getattr(model, "decode", None)):
            raise CapabilityError(
                f"Reinitialize(masks=decoder_masks) needs the decoder's masks: "
                f"{type(model).__name__} has no decode(slots)"
            )
        if self.masks is posterior_masks and getattr(model, "assignment_site", None) is None:
            raise CapabilityError(
                f"Reinitialize needs the slots' responsibilities: {type(model).__name__} declares "
                "no assignment_site (the enumerated sample site of the slot assignments)"
            )

    def init(self, problem: InnerProblem, slots: torch.Tensor) -> InnerState:
        return self.rule.init(problem, slots)

    def draw(
        self, rows: torch.Tensor, num_rows: int, num_slots: int, step: int, dtype=None
    ) -> torch.Tensor:
        """The replacement slots of rows ``rows`` (int64 indices into a batch of ``num_rows``)
        at step ``step``, ``(len(rows), num_slots, slot_dim)``.

        The batch's draw is made in blocks of :data:`DRAW_BLOCK` rows (the last one shorter):
        block ``b`` is ``init(block rows, num_slots, generator=g, dtype=dtype)`` with ``g`` seeded
        by ``(seed, step, b)``. Only the blocks that ``rows`` touch are drawn.
        """
        blocks = torch.unique(rows // DRAW_BLOCK).tolist()
        generator, parts = torch.Generator(), []
        for b in blocks:
            generator.manual_seed(_block_seed(self.seed, step, b))
            size = min(DRAW_BLOCK, num_rows - b * DRAW_BLOCK)
            parts.append(self.replacement(size, num_slots, generator=generator, dtype=dtype))
        drawn = parts[0] if len(parts) == 1 else torch.cat(parts)
        # row r sits in block r // DRAW_BLOCK, the i-th drawn (only the last block is short)
        position = torch.searchsorted(torch.tensor(blocks), rows // DRAW_BLOCK)
        return drawn[(position * DRAW_BLOCK + rows % DRAW_BLOCK).to(drawn.device)]

    def replaced(self, problem: InnerProblem, slots: torch.Tensor) -> torch.Tensor:
        """The slots to redraw at ``slots``, ``(batch, num_slots)`` bool (no graph)."""
        with torch.no_grad():
            masks = self.masks(problem, slots.detach())  # (B, K, N)
            dead = masks.mean(-1) < self.dead_threshold
            # (a slot with a dead one's responsibilities, scaled up, is the group's live one)
            return dead | duplicate_mask(masks, self.duplicate_threshold, dead)

    def step(self, state: InnerState, problem: InnerProblem, create_graph: bool = False):
        slots = state.slots
        if state.step >= 1 and state.step % self.every == 0:
            replace = self.replaced(problem, slots)
            if bool(replace.any()):
                # A rank of a data-parallel run (shard_draws), a chunk or the still-active
                # datapoints (problem.rows) draw their rows of the single process's batch.
                rank, world_size = self._shard
                rows = rank * problem.num_rows + problem.row_index()
                fresh = self.draw(
                    rows, problem.num_rows * world_size, slots.shape[1], state.step, slots.dtype
                )
                slots = torch.where(replace.unsqueeze(-1), fresh.detach().to(slots.device), slots)
        # info.elbo is the ELBO at the slots the rule stepped from, the redrawn ones
        return self.rule.step(InnerState(slots, state.step, state.aux), problem, create_graph)

    def extra_repr(self):
        return (
            f"rule={type(self.rule).__name__}, dead_threshold={self.dead_threshold}, "
            f"duplicate_threshold={self.duplicate_threshold}, every={self.every}, "
            f"masks={getattr(self.masks, '__name__', type(self.masks).__name__)}"
        )
