"""Settings of one masked pseudo-labelling step, without torch: training configs and model cards load them."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel

from models.postprocessing import LargestComponent


class MplConfig(BaseModel):
    """How the teacher labels global-local views and how the student learns them; the defaults are shipped.

    Test-time ``mpl`` (:class:`models.adaptation.AdaptConfig`) and the training modes share these settings.
    """

    ema: float = 0.95
    mask_ratio: float = 0.7
    mask_block: tuple[int, int, int] = (2, 16, 16)
    confidence: float = 0.8
    # spatial axes (0 slices, 1 rows, 2 columns) along which the teacher also labels the mirrored views: its
    # pseudo-labels are then the mean of the plain and mirrored predictions (an ablation: on the cardiac tasks
    # it made the student lose the right ventricle)
    teacher_flips: tuple[Literal[0, 1, 2], ...] = ()
    # in-plane axes (1: y, 2: x) along which each adaptation view is mirrored with probability 1/2; the adapted
    # network then segments with a flip ensemble along the same axes (the source model with its card's)
    view_flips: tuple[Literal[1, 2], ...] = ()
    pseudo_label_clean_up: LargestComponent | None = None  # None: as the label maps' clean-up
    student_sees_unmasked: bool = True
    global_weight: float = 0.5
    cosine_weight: float = 0.1
    dice_weight: float = 1.0

    def with_anatomy(self, largest_component: LargestComponent) -> Self:
        """These settings with an unset pseudo-label clean-up following the label maps' clean-up."""
        if self.pseudo_label_clean_up is not None:
            return self
        return self.model_copy(update={"pseudo_label_clean_up": largest_component})
