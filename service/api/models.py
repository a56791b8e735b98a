"""``/v1/models``: the bundles in the registry."""

from __future__ import annotations

from fastapi import APIRouter

from models.bundle import list_bundles
from service.deps import Caller, State
from service.schemas import ERRORS, ModelOut

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=list[ModelOut], summary="Bundles in the registry", responses=ERRORS)
def list_models(state: State, client: Caller) -> list[ModelOut]:
    """Every valid bundle under the configured root, with its model card."""
    return [
        ModelOut(name=b.card.name, version=b.card.version, ref=b.ref, card=b.card.model_dump(mode="json"))
        for b in list_bundles(state.settings.bundles)
    ]
