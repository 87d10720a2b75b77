"""The training losses as declarations. Each loss is one field of `LossWeights`, declared with
`loss(...)`: its name (the field's), its default weight, the help of its `pvl-search train`
option (--NAME, dashes for underscores; a loss without help has no option) and whether the
curriculum's attribute-only first phase trains it. `LOSSES` reads them back, in field order;
the CLI's options, the curriculum and the option checks all follow from it.

Adding a loss: declare its field here, and compute it under the same name in
`losses.compute_losses`.

No torch here: the CLI builds the `train` options from these declarations at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any


@dataclass(frozen=True)
class LossSpec:
    """One declared loss, as read back from its LossWeights field."""

    name: str  # the LossWeights field; also the loss's key in LossOutput.parts and in log.jsonl
    default: float  # weight when a run gives none (0 = off)
    help: str | None  # help of the `train` option --NAME; None: no option, the weight stays at its default
    first_phase: bool  # also trained in the curriculum's attribute-only first phase (train --retrieval-from)
    nonnegative: bool  # the `train` option refuses weights below 0


def loss(default: float, help: str | None = None, *, first_phase: bool = False, nonnegative: bool = False) -> Any:
    """Declare a LossWeights field as a loss (see LossSpec). Typed Any, like dataclasses.field:
    the field's value is its float default."""
    return field(default=default, metadata={"loss": {"help": help, "first_phase": first_phase,
                                                     "nonnegative": nonnegative}})


@dataclass(frozen=True)
class LossWeights:
    """The weight of each training loss (0 = off). Every field but mlm_probability is a loss."""

    # Multi-stream video-text InfoNCE: what first-stage retrieval ranks by. No option.
    contrastive: float = loss(1.0)
    mixed_vtm: float = loss(1.0, "Weight of the mixed-stream VTM loss (hard negatives).")
    # Listwise mixed-stream loss: InfoNCE over the full B x B matrix of mixed-stream VTM
    # logits. The factorised decoder makes that matrix cheap (one MLP per pair), and it gives
    # the VTM head B - 1 negatives per query instead of one sampled pair.
    mixed_nce: float = loss(0.0, "Weight of the listwise mixed-stream loss (InfoNCE over all in-batch pairs).")
    # The joint encoder costs one more pass per pair.
    single_vtm: float = loss(0.0, "Weight of the single-stream VTM loss.")
    mlm: float = loss(0.0, "Weight of masked language modelling.")
    mlm_probability: float = 0.15  # not a loss: the share of words MLM hides
    # Listwise loss of the latent reranker (config.latent_reranker) over all in-batch pairs.
    latent_nce: float = loss(
        0.0, "Weight of the latent reranker's listwise loss (needs --latent-reranker).", nonnegative=True)
    # Auxiliary attribute heads on both embeddings (pvl_search.training.attribute_heads); needs scene labels.
    attributes: float = loss(
        0.0, "Weight of the auxiliary attribute loss: shared linear heads predict each event's colour, shape, size "
             "and motion, event order and binding from both embeddings (needs a synthetic benchmark's scene "
             "metadata).", first_phase=True, nonnegative=True)
    # Dense heads on the video input tokens: each patch's shape and motion; needs scene labels.
    token_attributes: float = loss(
        0.0, "Weight of the dense patch loss: a linear head on every video input token predicts the shape and the "
             "motion of the object covering it (needs scene metadata).", first_phase=True, nonnegative=True)
    # The attribute heads again, on the labels that need event order only (ORDER_LABELS).
    # Twins as in-batch negatives ask both encoders for order at once, and neither starts
    # with it: a saddle the contrastive losses did not leave in hours. Asked directly, each
    # encoder learns order in a few hundred steps.
    order_attributes: float = loss(
        0.0, "Extra weight on the attribute heads' labels that need event order (each event's attributes in time "
             "order, which event is first), on both embeddings (needs scene metadata).",
        first_phase=True, nonnegative=True)
    # The same again for the shape and motion labels (SHAPE_MOTION_LABELS): among all the
    # attribute labels their push was too weak for the video tower to keep shape.
    shape_motion_attributes: float = loss(
        0.0, "Extra weight on the attribute heads' shape and motion labels (per event, per actor, per colour), on "
             "both embeddings (needs scene metadata).", first_phase=True, nonnegative=True)
    # Shape from the video embedding alone, through a classifier of its own: the shared heads
    # move the text side's shape (0.56) but not the video's (0.41), while a fresh video-only
    # head took the video tower's shape to 0.86 in ten minutes (MODEL_CARD, "Where shape is lost").
    video_shape_attributes: float = loss(
        0.0, "Weight of a shape objective on the video embedding alone, with its own classifier (every shape "
             "label: per event, per actor, per colour; needs scene metadata).", first_phase=True, nonnegative=True)

    def weight(self, name: str) -> float:
        """The weight of the declared loss `name` (KeyError for a name that is not one)."""
        if name not in _LOSS_NAMES:
            raise KeyError(f"{name!r} is not a declared loss (pvl_search.training.loss_weights)")
        return getattr(self, name)

    def in_first_phase(self) -> LossWeights:
        """The weights of the curriculum's first phase: the losses declared first_phase keep
        theirs, every other loss is off."""
        return replace(self, **{spec.name: 0.0 for spec in LOSSES if not spec.first_phase})

    def weighted(self) -> list[str]:
        """The names of the losses with a weight (not 0), in declaration order."""
        return [spec.name for spec in LOSSES if getattr(self, spec.name)]


LOSSES: tuple[LossSpec, ...] = tuple(
    LossSpec(f.name, f.default, **f.metadata["loss"]) for f in fields(LossWeights) if "loss" in f.metadata
)
_LOSS_NAMES = frozenset(spec.name for spec in LOSSES)
