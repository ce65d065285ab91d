"""What a caller asks for: one image request, validated in full before anything is sent upstream."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal, get_args

from pydantic import BaseModel, Field, ValidationError, field_validator

from ._exceptions import InputError

AspectRatio = Literal["1:1", "16:9", "9:16", "4:3", "3:4", "21:9", "9:21"]
ASPECT_RATIOS: tuple[str, ...] = get_args(AspectRatio)


class ImageRequest(BaseModel):
    prompt: str = Field(min_length=1, max_length=32_000)
    model: str = Field(min_length=1, max_length=200)
    aspect_ratio: AspectRatio | None = None
    images: list[str] = Field(default_factory=list, max_length=16)

    @field_validator("prompt", "model")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value.strip()

    @field_validator("images")
    @classmethod
    def _public_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not re.match(r"^https?://[^\s/]+\S*$", url):
                raise ValueError(
                    f"{url[:80]!r} is not a public http(s) URL; GPTunnel takes reference images "
                    "by URL only, not as uploads or base64"
                )
        return urls

    def key(self) -> str:
        """Identity of what was asked for: equal requests are the same image to pay for."""
        canonical = json.dumps(
            [self.prompt, self.model.lower(), self.aspect_ratio, sorted(self.images)], ensure_ascii=False
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


def parse_image_request(
    default_model: str, prompt: Any, model: Any, aspect_ratio: Any, images: Any
) -> ImageRequest:
    """An `ImageRequest` from a front end's raw arguments; `InputError` names the one at fault."""
    try:
        return ImageRequest.model_validate(
            {
                "prompt": prompt,
                "model": model or default_model,
                "aspect_ratio": aspect_ratio,
                "images": images or [],
            }
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        argument = str(err["loc"][0]) if err["loc"] else None
        message = err["msg"].removeprefix("Value error, ")
        raise InputError(f"{message}. Nothing was sent to GPTunnel.", argument=argument) from None
