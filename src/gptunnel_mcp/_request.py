"""What a caller asks for: one image request, validated in full before anything is sent upstream."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, ValidationError, field_validator

from . import _netguard
from ._exceptions import InputError
from ._records import IMAGES_URI, TASK_ID_HEX

AspectRatio = Literal["1:1", "16:9", "9:16", "4:3", "3:4", "21:9", "9:21"]
ASPECT_RATIOS: tuple[str, ...] = get_args(AspectRatio)
_REFERENCE = re.compile(
    rf"{re.escape(IMAGES_URI)}/(?P<uri>{TASK_ID_HEX})(?:/file)?|(?P<id>{TASK_ID_HEX})", re.IGNORECASE
)


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
    def _references_or_public_urls(cls, images: list[str]) -> list[str]:
        checked: list[str] = []
        for image in images:
            task_id = referenced_task(image)
            if task_id is not None:
                # One spelling per task, so that the request's identity (`key`) is the task's.
                checked.append(reference(task_id))
                continue
            if image[:9].lower() == "gptunnel:":
                raise ValueError(
                    f"{image[:80]!r} names none of your images: name one by its task id, or as "
                    f"{IMAGES_URI}/<task_id>"
                )
            if not re.match(r"^https?://[^\s/]+\S*$", image):
                raise ValueError(
                    f"{image[:80]!r} is neither a public http(s) URL nor one of your images (its task id, "
                    f"or {IMAGES_URI}/<task_id>); GPTunnel takes reference images by URL only, not as "
                    "uploads or base64"
                )
            _check_public_form(image)
            checked.append(image)
        return checked

    def key(self, n: int = 0) -> str:
        """Identity of what was asked for: equal requests are the same image to pay for. `n`:
        the n-th image of a call for several, the same image as the n-th of an identical one.
        One's own image counts by its task, not by the link it is sent as, which changes."""
        fields: list[object] = [self.prompt, self.model.lower(), self.aspect_ratio, sorted(self.images)]
        # The first image's key is the key of a call for one, as it always was.
        canonical = json.dumps([*fields, n] if n else fields, ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()


def referenced_task(image: str) -> str | None:
    """The task id (lower-case) when `image` names one of the caller's own images: its task id,
    or its resource `gptunnel://images/<task_id>` (or `.../file`); None for anything else."""
    match = _REFERENCE.fullmatch(image)
    if match is None:
        return None
    return (match["uri"] or match["id"]).lower()


def reference(task_id: str) -> str:
    """How a request names the caller's own image, whichever way the caller did."""
    return f"{IMAGES_URI}/{task_id}"


def _check_public_form(url: str) -> None:
    """What can be told without a lookup: no credentials, and no host that is this machine or an
    address that is not public. GPTunnel fetches reference images from the internet; a private
    one would be paid for in vain, and its address handed to a stranger."""
    try:
        parts = urlsplit(url)
        host, _ = parts.hostname, parts.port
    except ValueError:
        raise ValueError(f"{url[:80]!r} is not a valid URL") from None
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            "a reference image URL carries a user name or password; use a public URL without them"
        )
    if not host:
        raise ValueError(f"{url[:80]!r} names no host")
    address = _netguard.literal_address(host)
    if _netguard.is_local_name(host) or (address is not None and not _netguard.is_public(address)):
        what = _netguard.describe(address) if address is not None else "this machine"
        raise ValueError(
            f"{url[:80]!r} points at {what}; GPTunnel fetches reference images from the internet, "
            "so they must be at public http(s) URLs"
        )


async def check_public_hosts(request: ImageRequest) -> None:
    """Every reference image's host resolves, and only to public addresses: GPTunnel could fetch
    nothing else. Raises `InputError` (nothing is sent) naming the first that does not."""
    checked: set[tuple[str, int]] = set()
    # One's own images are sent as links to GPTunnel's storage or to this server, not the caller's.
    for url in (image for image in request.images if referenced_task(image) is None):
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
        if (host, port) in checked:
            continue
        try:
            addresses = await _netguard.resolve(host, port)
        except _netguard.UnresolvableError:
            raise InputError(
                f"the host of {url[:80]!r} cannot be resolved, so GPTunnel could not fetch it either; "
                "check the URL. Nothing was sent to GPTunnel.",
                argument="images",
            ) from None
        for address in addresses:
            if not _netguard.is_public(address):
                raise InputError(
                    f"{url[:80]!r} points at {_netguard.describe(address)}; GPTunnel fetches reference "
                    "images from the internet, so they must be at public http(s) URLs. Nothing was "
                    "sent to GPTunnel.",
                    argument="images",
                )
        checked.add((host, port))


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
