"""What the server knows of GPTunnel's image models, and the option checks that follow from it.

Model ids are free strings: GPTunnel adds models often, so an id not listed here is passed to
GPTunnel unchecked. A listed one is known in any case and sent in the spelling listed; an option
it does not take is refused before anything is sent (and paid for).
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from ._exceptions import InputError
from ._request import ImageRequest

_STANDARD_RATIOS = ["1:1", "16:9", "9:16", "4:3", "3:4"]


class ModelInfo(BaseModel):
    id: str
    family: str
    description: str
    aspect_ratios: list[str] = Field(
        description="Values aspect_ratio may take; empty: the option is not taken."
    )
    reference_images: bool = Field(description="Whether the model takes reference image URLs (images).")


MODELS: tuple[ModelInfo, ...] = (
    *(
        ModelInfo(
            id=f"gpt-image-1-{quality}",
            family="gpt-image-1",
            description=f"OpenAI gpt-image-1, {quality} quality{note}; edits from reference images.",
            aspect_ratios=_STANDARD_RATIOS,
            reference_images=True,
        )
        for quality, note in (
            ("low", ", cheapest and fastest"),
            ("medium", ""),
            ("high", ", slowest and dearest"),
        )
    ),
    ModelInfo(
        id="google-imagen-3",
        family="imagen",
        description="Google Imagen 3: photorealism and legible text in images.",
        aspect_ratios=_STANDARD_RATIOS,
        reference_images=False,
    ),
    ModelInfo(
        id="flux-dev",
        family="flux",
        description="Black Forest Labs FLUX.1 [dev]; also ultra-wide and ultra-tall formats.",
        aspect_ratios=[*_STANDARD_RATIOS, "21:9", "9:21"],
        reference_images=False,
    ),
    ModelInfo(
        id="seedream-3",
        family="seedream",
        description="ByteDance Seedream 3: text-to-image, strong on posters and typography.",
        aspect_ratios=_STANDARD_RATIOS,
        reference_images=False,
    ),
    ModelInfo(
        id="yandex-art",
        family="yandex-art",
        description="YandexART: takes only a prompt (no aspect ratio, no reference images).",
        aspect_ratios=[],
        reference_images=False,
    ),
)
_BY_ID = {m.id.lower(): m for m in MODELS}


class Observed(BaseModel):
    """What this server has seen of a model lately, from its history (every user's tasks)."""

    average_cost: float | None = Field(
        description="Average of what GPTunnel reported the newest images cost, in roubles; null: "
        "no cost recorded yet."
    )
    cost_samples: int = Field(description="How many recorded costs the average is of.")
    average_seconds: float | None = Field(
        description="Average time from the request to the finished image, in seconds; null: none "
        "finished here yet."
    )
    duration_samples: int = Field(description="How many finished images the average is of.")


def find_model(model_id: str) -> ModelInfo | None:
    """The listed model `model_id` names, in any case."""
    return _BY_ID.get(model_id.lower())


def catalogue_spelling(request: ImageRequest) -> ImageRequest:
    """`request` with a listed model named as listed, the spelling GPTunnel is known to take: a
    person or an agent types "FLUX-DEV" as readily as "flux-dev"."""
    info = find_model(request.model)
    if info is None or info.id == request.model:
        return request
    return request.model_copy(update={"model": info.id})


def check_options(request: ImageRequest) -> None:
    """Refuse options a known model does not take; say what it does take."""
    info = find_model(request.model)
    if info is None:
        return
    if request.aspect_ratio is not None and request.aspect_ratio not in info.aspect_ratios:
        takes = f"takes {', '.join(info.aspect_ratios)}" if info.aspect_ratios else "takes no aspect_ratio"
        raise InputError(
            f"model {info.id} {takes}; got {request.aspect_ratio}. Choose one of those, leave it out, "
            "or pick another model. Nothing was sent to GPTunnel.",
            argument="aspect_ratio",
            model=info.id,
        )
    if request.images and not info.reference_images:
        with_images = ", ".join(m.id for m in MODELS if m.reference_images)
        raise InputError(
            f"model {info.id} takes no reference images; models that do: {with_images}. "
            "Nothing was sent to GPTunnel.",
            argument="images",
            model=info.id,
        )
