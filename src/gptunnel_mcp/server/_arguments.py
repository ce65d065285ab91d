"""The tools' arguments, one pydantic model per tool.

The model is the only declaration: the tool's signature (and so its input schema) is derived
from it, and the tasks extension, which receives raw arguments, validates them with the same
model, so a call means the same on both paths. Enums, patterns and lengths are declared in the
schema for clients but checked by the core's `ImageRequest`, whose messages say what to do; the
SDK's pydantic messages for them are long and technical.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal, TypeVar, cast, get_args

from pydantic import BaseModel, Field, ValidationError, WithJsonSchema

from .._engine import MAX_COUNT
from .._exceptions import InputError
from .._records import TASK_ID_PATTERN, TaskStatus
from .._request import ASPECT_RATIOS, ImageRequest, parse_image_request
from .._search import parse_since
from .._store import Search

_A = TypeVar("_A", bound=BaseModel)
_C = TypeVar("_C")
_R = TypeVar("_R")
#: Most tasks one search_images page lists: an agent's context pays for every row.
SEARCH_LIMIT = 50
_STATUSES: tuple[str, ...] = get_args(TaskStatus)


class ImageArguments(BaseModel):
    """create_image and generate_and_wait."""

    prompt: Annotated[
        str,
        Field(
            description="What the image should show. Be concrete: subject, setting, style, lighting, "
            "composition.",
            json_schema_extra={"minLength": 1},
        ),
    ]
    model: Annotated[
        str | None,
        Field(
            description="GPTunnel model id, e.g. gpt-image-1-low, gpt-image-1-medium, gpt-image-1-high, "
            "google-imagen-3, flux-dev, seedream-3, yandex-art (any case). Other ids GPTunnel offers are "
            "passed on as given. Omit for the server's default.",
        ),
    ] = None
    aspect_ratio: Annotated[
        Annotated[str, WithJsonSchema({"type": "string", "enum": list(ASPECT_RATIOS)})] | None,
        Field(description="Aspect ratio of the image. Omit for the model's default (usually 1:1)."),
    ] = None
    images: Annotated[
        list[str] | None,
        Field(
            description="Reference images to edit or draw from: public http(s) URLs, or your own earlier "
            "images by task_id (or their gptunnel://images/<task_id> URI), to edit a result further. "
            "GPTunnel fetches them itself: no uploads, no base64, no local paths.",
        ),
    ] = None
    new_image: Annotated[
        bool,
        Field(
            description="Pay for a fresh image even if an identical request is still running or finished "
            "in the last few minutes (by default that earlier task is returned instead).",
        ),
    ] = False
    count: Annotated[
        int,
        Field(
            description=f"How many images to make from this request, 1-{MAX_COUNT}, made in parallel and "
            "each billed. All are checked against the caps before anything is spent. With more than one, "
            "the result lists them under `images`.",
            json_schema_extra={"minimum": 1, "maximum": MAX_COUNT},
        ),
    ] = 1

    def request(self, default_model: str) -> ImageRequest:
        return parse_image_request(default_model, self.prompt, self.model, self.aspect_ratio, self.images)


class TaskArguments(BaseModel):
    """get_result."""

    task_id: Annotated[
        str,
        Field(
            description="The task_id returned by create_image or generate_and_wait (24 hex characters).",
            json_schema_extra={"pattern": TASK_ID_PATTERN},
        ),
    ]


class PictureArguments(TaskArguments):
    """gallery_image (the gallery view's own)."""

    size: Annotated[
        Literal["thumb", "large"],
        Field(description="thumb: a small tile for the grid; large: for looking at the image."),
    ] = "thumb"


class GalleryArguments(BaseModel):
    """show_gallery."""

    query: Annotated[
        str | None,
        Field(description="Show only images whose prompt has this text (any case). Omit for all."),
    ] = None


class SearchArguments(BaseModel):
    """search_images."""

    query: Annotated[
        str | None,
        Field(
            description='Text to find in the prompts, in any case and any script ("лиса" finds '
            '"Лиса в снегу"), taken literally. Omit to list every task.',
        ),
    ] = None
    model: Annotated[str | None, Field(description="Only tasks of this model id (any case).")] = None
    status: Annotated[
        Annotated[str, WithJsonSchema({"type": "string", "enum": list(_STATUSES)})] | None,
        Field(description="Only tasks in this state."),
    ] = None
    since: Annotated[
        str | None,
        Field(
            description="Only tasks made at or after this ISO date or date and time, e.g. 2026-03-01 or "
            "2026-03-01T09:30:00+03:00 (UTC when no offset is given).",
        ),
    ] = None
    limit: Annotated[
        int,
        Field(
            description=f"Tasks per page, 1 to {SEARCH_LIMIT}.",
            json_schema_extra={"minimum": 1, "maximum": SEARCH_LIMIT},
        ),
    ] = 10
    cursor: Annotated[
        str | None,
        Field(
            description="The next_cursor of the previous page, for the next (older) matches; pass the "
            "other arguments unchanged.",
        ),
    ] = None

    def search(self) -> tuple[Search, int]:
        """The search and how many tasks a page holds; `InputError` names the argument at fault."""
        status = (self.status or "").strip().lower() or None
        if status is not None and status not in _STATUSES:
            raise InputError(
                f"{self.status!r} is not a status; use one of {', '.join(_STATUSES)}, or leave it out",
                argument="status",
            )
        if not 1 <= self.limit <= SEARCH_LIMIT:
            raise InputError(
                f"{self.limit} tasks a page is not possible; ask for 1 to {SEARCH_LIMIT}, and for more "
                "pass the page's next_cursor",
                argument="limit",
            )
        since = (self.since or "").strip()
        search = Search(
            text=(self.query or "").strip(),
            model=(self.model or "").strip() or None,
            status=cast("TaskStatus | None", status),
            since=parse_since(since) if since else None,
        )
        return search, self.limit


class SaveArguments(BaseModel):
    """save_image."""

    task_id: Annotated[
        str,
        Field(
            description="The task_id of a finished image (24 hex characters).",
            json_schema_extra={"pattern": TASK_ID_PATTERN},
        ),
    ]
    destination: Annotated[
        str,
        Field(
            description="Where to put it: a folder (the file keeps its stored name) or a file path whose "
            "extension picks the format: .png, .jpg, .jpeg or .webp. A relative path starts in the "
            "client's first root (or the server's first export folder); an absolute one must lie in one.",
            json_schema_extra={"minLength": 1},
        ),
    ]
    overwrite: Annotated[
        bool, Field(description="Replace a file that is already there (by default it is left alone).")
    ] = False


class NoArguments(BaseModel):
    """get_balance."""


def parse(model: type[_A], raw: dict[str, Any]) -> _A:
    """`model` from raw arguments, for callers the SDK does not validate for (the tasks path)."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        argument = str(err["loc"][0]) if err["loc"] else None
        raise InputError(f"{err['msg']}. Nothing was sent to GPTunnel.", argument=argument) from None


def takes(
    model: type[_A], context: Any, **resolved: Any
) -> Callable[[Callable[[_C, _A], Awaitable[_R]]], Callable[..., Awaitable[_R]]]:
    """Turn `async def tool(ctx, args: model)` into the flat-argument function MCPServer expects:
    one keyword parameter per field of `model`, with its type, default and description.

    `resolved` names parameters the SDK fills itself (`Annotated[T, Resolve(fn)]`), passed on to
    the tool as keyword arguments of those names."""

    def wrap(fn: Callable[[_C, _A], Awaitable[_R]]) -> Callable[..., Awaitable[_R]]:
        async def tool(ctx: _C, **raw: Any) -> _R:
            filled = {name: raw.pop(name) for name in resolved}
            return await fn(ctx, model.model_validate(raw), **filled)

        fields = {name: Annotated[info.annotation, info] for name, info in model.model_fields.items()}
        returns = inspect.signature(fn, eval_str=True).return_annotation
        parameters = [inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=context)]
        parameters += [
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=annotation,
                default=inspect.Parameter.empty if info.is_required() else info.default,
            )
            for (name, annotation), info in zip(fields.items(), model.model_fields.values(), strict=True)
        ]
        parameters += [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation)
            for name, annotation in resolved.items()
        ]
        tool.__name__ = fn.__name__
        tool.__doc__ = fn.__doc__
        tool.__signature__ = inspect.Signature(parameters, return_annotation=returns)  # type: ignore[attr-defined]
        tool.__annotations__ = {"ctx": context, **fields, **resolved, "return": returns}
        return tool

    return wrap
