"""The ML core's domain words, defined once: adaptation methods, training modes and the phases of a batch run.

No torch import here: the service and the CLI validate against these without loading the ML stack.

Methods:
- ``none``: the source network as it is.
- ``norm``: normalisation statistics re-estimated on the target batch.
- ``tent``: entropy minimisation on the normalisation layers' affine parameters (Wang et al., ICLR 2021).
- ``mpl``: masked pseudo-labelling with global-local views (MAPSeg, CVPR 2024).

``models.adaptation`` implements them.

Training modes (``ttaseg train --mode``; ``trainer`` implements them):
- ``source``: supervised training on labelled source scans.
- ``uda``: labelled source and unlabelled target scans trained together (MAPSeg's centralised setting).
- ``semi``: a few labelled scans of one domain and many unlabelled scans of several, mixed (UST-RUN, TMI 2025).
- ``federated``: sites that keep their scans and share only weights (MAPSeg's federated setting, FedAvg).
"""

from __future__ import annotations

from enum import StrEnum


class Method(StrEnum):
    """A test-time adaptation method."""

    NONE = "none"
    NORM = "norm"
    TENT = "tent"
    MPL = "mpl"

    @property
    def adapts(self) -> bool:
        """Whether the method changes the network's weights or statistics."""
        return self is not Method.NONE

    @property
    def takes_steps(self) -> bool:
        """Whether the method runs gradient steps (``tent``, ``mpl``)."""
        return self in (Method.TENT, Method.MPL)


class TrainMode(StrEnum):
    """How a bundle was trained: which scans it saw and whether they left their site."""

    SOURCE = "source"
    UDA = "uda"
    SEMI = "semi"
    FEDERATED = "federated"


class Phase(StrEnum):
    """What a batch run is doing; reported through the progress callback with a percentage."""

    FETCHING = "fetching"  # the caller retrieves the scans (e.g. from a PACS) before the run
    ADAPTING = "adapting"
    SEGMENTING = "segmenting"
