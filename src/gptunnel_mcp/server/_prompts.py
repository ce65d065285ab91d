"""The MCP prompt `image-brief`: from a short idea to the structured photo brief that GPTunnel's
own examples use, ready to pass to generate_and_wait."""

from __future__ import annotations

from typing import Annotated, Any

from mcp.server import MCPServer
from mcp.server.context import ServerRequestContext
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS, GetPromptRequestParams, GetPromptResult, InputRequiredResult
from pydantic import Field

from .._engine import Engine
from ._sdk import add_request_handler

#: (argument, what it covers), in the order the brief lists them.
BRIEF_PARTS: tuple[tuple[str, str], ...] = (
    ("subject", "who or what is shown, with defining details"),
    ("position", "pose, placement and framing of the subject"),
    ("photo_type", "kind of shot: portrait, editorial, product, street, aerial..."),
    ("wardrobe", "clothing, accessories, styling"),
    ("lens", "focal length, aperture, depth of field"),
    ("environment", "setting and background"),
    ("lighting", "light sources, direction, quality, colour"),
    ("time_of_day", "time of day and season"),
    ("textures", "materials and surface detail"),
    ("atmosphere", "mood, weather, air"),
    ("aesthetic", "style or reference look"),
    ("film_stock", "film stock or colour grade"),
)


def _part(what: str) -> object:
    return Field(default=None, description=f"Optional: {what}. Left out, the brief suggests one.")


def register_prompts(server: MCPServer[Engine]) -> None:
    @server.prompt(
        name="image-brief",
        title="Image brief",
        description="Turn a short idea into a structured photo brief (subject, position, photo type, "
        "wardrobe, lens, environment, lighting, time of day, textures, atmosphere, aesthetic, film "
        "stock), then generate it.",
    )
    def image_brief(
        idea: Annotated[str, Field(description="The idea in a few words, e.g. 'a red fox in snow'.")],
        subject: Annotated[str | None, _part(BRIEF_PARTS[0][1])] = None,
        position: Annotated[str | None, _part(BRIEF_PARTS[1][1])] = None,
        photo_type: Annotated[str | None, _part(BRIEF_PARTS[2][1])] = None,
        wardrobe: Annotated[str | None, _part(BRIEF_PARTS[3][1])] = None,
        lens: Annotated[str | None, _part(BRIEF_PARTS[4][1])] = None,
        environment: Annotated[str | None, _part(BRIEF_PARTS[5][1])] = None,
        lighting: Annotated[str | None, _part(BRIEF_PARTS[6][1])] = None,
        time_of_day: Annotated[str | None, _part(BRIEF_PARTS[7][1])] = None,
        textures: Annotated[str | None, _part(BRIEF_PARTS[8][1])] = None,
        atmosphere: Annotated[str | None, _part(BRIEF_PARTS[9][1])] = None,
        aesthetic: Annotated[str | None, _part(BRIEF_PARTS[10][1])] = None,
        film_stock: Annotated[str | None, _part(BRIEF_PARTS[11][1])] = None,
    ) -> str:
        parts = {
            "subject": subject,
            "position": position,
            "photo_type": photo_type,
            "wardrobe": wardrobe,
            "lens": lens,
            "environment": environment,
            "lighting": lighting,
            "time_of_day": time_of_day,
            "textures": textures,
            "atmosphere": atmosphere,
            "aesthetic": aesthetic,
            "film_stock": film_stock,
        }
        return compose_brief(idea, parts)

    async def get_prompt(
        ctx: ServerRequestContext[Engine, Any], params: GetPromptRequestParams
    ) -> GetPromptResult | InputRequiredResult:
        """MCPServer reports a bad prompt name or argument as a plain exception, which reaches
        2026-07-28 clients as "Internal server error"; checked here, it is an invalid-params
        error that says what to send."""
        prompts = {p.name: p for p in await server.list_prompts()}
        prompt = prompts.get(params.name)
        if prompt is None:
            raise MCPError(
                code=INVALID_PARAMS,
                message=f"Unknown prompt {params.name[:80]!r}; this server has: {', '.join(sorted(prompts))}",
            )
        declared = {a.name: a for a in prompt.arguments or []}
        given = params.arguments or {}
        unknown = sorted(set(given) - set(declared))
        missing = sorted(n for n, a in declared.items() if a.required and not given.get(n))
        if unknown or missing:
            problems = [f"missing {', '.join(missing)}"] if missing else []
            problems += [f"unknown {', '.join(a[:40] for a in unknown)}"] if unknown else []
            raise MCPError(
                code=INVALID_PARAMS,
                message=f"Invalid arguments for prompt {prompt.name}: {'; '.join(problems)}. "
                f"It takes: {', '.join(declared)}",
            )
        return await server.get_prompt(params.name, given)

    add_request_handler(server, "prompts/get", GetPromptRequestParams, get_prompt)


def compose_brief(idea: str, parts: dict[str, str | None]) -> str:
    lines = []
    for name, what in BRIEF_PARTS:
        label = name.replace("_", " ").capitalize()
        value = (parts.get(name) or "").strip()
        lines.append(f"- {label}: {value}" if value else f"- {label}: (choose: {what})")
    return (
        f"Write an image prompt for this idea: {idea.strip()}\n\n"
        "Fill in every line of this brief; keep the values given, choose the ones in brackets so they "
        "suit the idea and each other:\n"
        + "\n".join(lines)
        + "\n\nThen join the lines into one prompt of plain sentences, in this order, and call the "
        "generate_and_wait tool with it."
    )
