"""save_image as agents use it, through the official client: into the client's roots or the
operator's export folders, in the format the name says, and never anywhere else, whatever
`..`, symbolic links or an existing file try."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.session import ClientRequestContext, ListRootsFnT
from mcp_types import INTERNAL_ERROR, ErrorData, ListRootsResult, Root
from PIL import Image

from gptunnel_mcp import _export
from gptunnel_mcp._exceptions import InputError
from gptunnel_mcp._export import check_destination, write_image
from gptunnel_mcp._records import StoredFile
from gptunnel_mcp.server import _roots

from .conftest import MULTI_USER, ServerLauncher, mcp_client, serve_http, structured, text_of
from .standin import Behaviour, StandIn

pytestmark = [pytest.mark.anyio, pytest.mark.standin(generation_seconds=0.05, image_size=(320, 200))]

MODES = ["auto", "legacy"]  # 2026-07-28 (roots asked in the call's InputRequiredResult) and 2025-11-25
NEVER = "0123456789abcdef01234567"


def roots_of(*folders: Path | str) -> ListRootsFnT:
    """A client whose roots are these folders (or URIs), as file URIs with percent-encoding."""
    uris = [f if isinstance(f, str) else f.as_uri() for f in folders]

    async def list_roots(context: ClientRequestContext) -> ListRootsResult:
        return ListRootsResult(roots=[Root(uri=uri) for uri in uris])  # type: ignore[arg-type]

    return list_roots


async def made(client: Client, prompt: str = "a lighthouse at dusk") -> str:
    result = await client.call_tool("generate_and_wait", {"prompt": prompt})
    assert not result.is_error, text_of(result)
    return str(structured(result)["task_id"])


async def save(client: Client, task_id: str, destination: str, **more: Any) -> Any:
    return await client.call_tool("save_image", {"task_id": task_id, "destination": destination, **more})


def refusal(result: Any) -> str:
    assert result.is_error and result.structured_content is None, result
    return text_of(result)


def decoded(path: Path) -> tuple[str | None, tuple[int, int]]:
    with Image.open(path) as image:
        image.load()
        return image.format, image.size


def stored_png(folder: Path) -> tuple[Path, StoredFile]:
    """A stored image, for the tests of the core's copy itself."""
    source = folder / "stored.png"
    Image.new("RGB", (8, 8), "red").save(source)
    data = source.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    stored = StoredFile(
        file_name="0" * 24 + ".png",
        mime_type="image/png",
        size_bytes=len(data),
        sha256=digest,
        width=8,
        height=8,
    )
    return source, stored


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The user's workspace, with a space in its name: its URI is percent-encoded."""
    folder = tmp_path / "my project"
    (folder / "assets").mkdir(parents=True)
    return folder


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    return folder


@pytest.mark.parametrize("mode", MODES)
async def test_saves_into_the_clients_root_as_stored_or_in_the_format_its_name_says(
    server: ServerLauncher, standin: StandIn, project: Path, mode: str
) -> None:
    async with server.connect(mode, list_roots=roots_of(project)) as client:
        task_id = await made(client)
        as_stored = await save(client, task_id, "assets")
        as_png = await save(client, task_id, "assets/hero.png")
        as_jpeg = await save(client, task_id, str(project / "hero.JPEG"))
    stored = project / "assets" / f"{task_id}.webp"
    assert stored.read_bytes() == standin.image_bytes(task_id)
    assert structured(as_stored) == {
        "task_id": task_id,
        "path": str(stored),
        "mime_type": "image/webp",
        "size_bytes": stored.stat().st_size,
        "converted": False,
        "message": f"Saved the image of task {task_id} as {stored}.",
    }
    assert decoded(project / "assets" / "hero.png") == ("PNG", (320, 200))
    assert structured(as_png)["mime_type"] == "image/png" and structured(as_png)["converted"] is True
    assert "converted to PNG" in text_of(as_png)
    assert decoded(project / "hero.JPEG") == ("JPEG", (320, 200))
    assert structured(as_jpeg)["path"] == str(project / "hero.JPEG")
    assert not [p for p in project.rglob(".*") if p.name.endswith(".part")]


async def test_destinations_leading_out_of_the_roots_are_refused(
    memory_server: ServerLauncher, project: Path, outside: Path
) -> None:
    async with memory_server.connect(list_roots=roots_of(project)) as client:
        task_id = await made(client)
        for destination in (
            str(outside / "x.png"),
            str(outside),
            "../elsewhere/x.png",
            "assets/../../elsewhere/",
            f"{project}/../elsewhere/x.webp",
            "/",
        ):
            text = refusal(await save(client, task_id, destination))
            assert text.startswith(f"Invalid destination: {destination} leads outside"), text
            assert str(project) in text and "symbolic link" not in text
    assert list(outside.iterdir()) == []


async def test_symbolic_links_that_lead_outside_are_refused(
    memory_server: ServerLauncher, project: Path, outside: Path
) -> None:
    (project / "shared").symlink_to(outside, target_is_directory=True)
    (project / "assets" / "deep").symlink_to(outside, target_is_directory=True)
    mine = outside / "mine.png"
    mine.write_bytes(b"the user's own file")
    (project / "hero.png").symlink_to(mine)
    (project / "new.png").symlink_to(outside / "new.png")  # dangling: writing it would create it
    (project / "art").symlink_to(project / "assets", target_is_directory=True)
    async with memory_server.connect(list_roots=roots_of(project)) as client:
        task_id = await made(client)
        for destination in (
            "shared",
            "shared/",
            "shared/x.png",
            "assets/deep/x.jpg",
            f"{project}/shared/x.png",
        ):
            text = refusal(await save(client, task_id, destination))
            assert text.startswith(f"Invalid destination: {destination} leads outside"), text
            assert "through a symbolic link" in text
        for destination, overwrite in (("hero.png", False), ("hero.png", True), ("new.png", True)):
            text = refusal(await save(client, task_id, destination, overwrite=overwrite))
            assert "exists and is not a plain file" in text and text.startswith("Invalid destination:"), text
        # A link that stays inside the root is no way out.
        inside = await save(client, task_id, "art/linked.png")
    assert sorted(p.name for p in outside.iterdir()) == ["mine.png"]
    assert mine.read_bytes() == b"the user's own file"
    assert (project / "hero.png").is_symlink() and (project / "new.png").is_symlink()
    assert structured(inside)["path"] == str(project / "assets" / "linked.png")
    assert decoded(project / "assets" / "linked.png")[0] == "PNG"


async def test_a_folder_swapped_for_a_link_after_the_check_is_not_written_through(
    project: Path, outside: Path, tmp_path: Path
) -> None:
    source, stored = stored_png(tmp_path)
    destination = check_destination("assets/x.png", [project])
    # Between the check and the write, the checked folder becomes a link to somewhere else.
    (project / "assets").rename(project / "was-assets")
    (project / "assets").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InputError, match="changed while saving") as info:
        await anyio.to_thread.run_sync(lambda: write_image(source, stored, destination, overwrite=True))
    assert info.value.argument == "destination"
    assert list(outside.iterdir()) == []


async def test_a_file_that_appears_during_the_write_is_not_replaced(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, stored = stored_png(tmp_path)
    destination = check_destination("hero.webp", [project])
    convert = _export._convert

    def raced(*args: Any) -> None:
        # Another program saves its own hero.webp while this copy is being encoded.
        (project / "hero.webp").write_bytes(b"someone else's")
        convert(*args)

    monkeypatch.setattr(_export, "_convert", raced)
    with pytest.raises(InputError, match="already exists"):
        await anyio.to_thread.run_sync(lambda: write_image(source, stored, destination, overwrite=False))
    assert (project / "hero.webp").read_bytes() == b"someone else's"
    assert sorted(p.name for p in project.iterdir()) == ["assets", "hero.webp"]


async def test_export_folders_serve_clients_without_roots(
    server: ServerLauncher, tmp_path: Path, outside: Path
) -> None:
    first, second = tmp_path / "exports", tmp_path / "more exports"
    first.mkdir()
    second.mkdir()
    dirs = f"{first}, {second}"
    async with server.connect(GPTUNNEL_EXPORT_DIRS=dirs) as client:
        task_id = await made(client)
        relative = await save(client, task_id, "poster.webp")
        absolute = await save(client, task_id, str(second / "poster.jpg"))
        text = refusal(await save(client, task_id, str(outside / "poster.png")))
    assert structured(relative)["path"] == str(first / "poster.webp")
    assert structured(relative)["converted"] is False
    assert structured(absolute)["path"] == str(second / "poster.jpg")
    assert decoded(second / "poster.jpg") == ("JPEG", (320, 200))
    assert str(first) in text and str(second) in text and "leads outside" in text
    assert list(outside.iterdir()) == []


async def test_a_client_with_roots_is_held_to_its_roots(
    memory_server: ServerLauncher, project: Path, tmp_path: Path
) -> None:
    exports = tmp_path / "exports"
    exports.mkdir()
    async with memory_server.connect(
        list_roots=roots_of(project), GPTUNNEL_EXPORT_DIRS=str(exports)
    ) as client:
        task_id = await made(client)
        text = refusal(await save(client, task_id, str(exports / "x.png")))
    assert "leads outside" in text and str(project) in text
    assert list(exports.iterdir()) == []


@pytest.mark.parametrize(
    ("roots", "remote"),
    [
        (None, False),
        (["file://fileserver/share/project"], False),
        (["file:///"], False),
        # A server others reach over the network: their roots are on their machines.
        (["file:///srv/site"], True),
    ],
    ids=["no-roots", "remote-root", "whole-disk", "remote-client"],
)
async def test_with_nowhere_allowed_the_error_says_what_to_configure(
    memory_server: ServerLauncher, roots: list[str] | None, remote: bool
) -> None:
    listing = roots_of(*roots) if roots is not None else None
    async with memory_server.connect(
        list_roots=listing,
        GPTUNNEL_MCP_TRANSPORT="http" if remote else None,
        GPTUNNEL_MCP_HOST="0.0.0.0" if remote else None,
        GPTUNNEL_MCP_AUTH_TOKEN="t" * 24 if remote else None,
    ) as client:
        task_id = await made(client)
        text = refusal(await save(client, task_id, "hero.png"))
    assert text.startswith("There is no folder to save into")
    assert "GPTUNNEL_EXPORT_DIRS" in text and "roots" in text


async def test_an_existing_file_is_replaced_only_when_asked(
    memory_server: ServerLauncher, standin: StandIn, project: Path
) -> None:
    async with memory_server.connect(list_roots=roots_of(project)) as client:
        first, second = await made(client, "first"), await made(client, "second")
        assert not (await save(client, first, "hero.webp")).is_error
        kept = refusal(await save(client, second, "hero.webp"))
        assert (project / "hero.webp").read_bytes() == standin.image_bytes(first)
        replaced = await save(client, second, "hero.webp", overwrite=True)
        # Into a folder, under the stored name, which a folder has taken.
        (project / "assets" / f"{second}.webp").mkdir()
        folder = refusal(await save(client, second, "assets", overwrite=True))
    assert kept == (
        f"Invalid destination: {project / 'hero.webp'} already exists; pass overwrite=true to replace it, "
        "or choose another name"
    )
    assert not replaced.is_error and (project / "hero.webp").read_bytes() == standin.image_bytes(second)
    assert "is not a plain file" in folder and (project / "assets" / f"{second}.webp").is_dir()
    assert sorted(p.name for p in project.rglob("*")) == sorted(["assets", f"{second}.webp", "hero.webp"])


async def test_names_it_cannot_write_are_refused_with_what_it_accepts(
    memory_server: ServerLauncher, project: Path
) -> None:
    async with memory_server.connect(list_roots=roots_of(project)) as client:
        task_id = await made(client)
        for destination in ("hero.gif", "hero", "notes.txt"):
            text = refusal(await save(client, task_id, destination))
            assert text.startswith("Invalid destination:") and ".png, .jpg, .jpeg or .webp" in text, text
        missing = refusal(await save(client, task_id, "missing/hero.png"))
        empty = refusal(await save(client, task_id, " "))
    assert "there is no folder" in missing and "create it first" in missing
    assert empty.startswith("Invalid destination:")
    assert sorted(p.name for p in project.iterdir()) == ["assets"]


async def test_tasks_without_an_image_of_the_callers_say_why(
    memory_server: ServerLauncher, standin: StandIn, project: Path
) -> None:
    async with memory_server.connect(list_roots=roots_of(project)) as client:
        standin.behaviour.generation_seconds = 600
        pending = structured(await client.call_tool("create_image", {"prompt": "slow"}))["task_id"]
        standin.behaviour.generation_seconds = 0.05
        standin.behaviour.final_status = "failed"
        failed = await client.call_tool("generate_and_wait", {"prompt": "doomed"})
        failed_id = structured(failed)["task_id"]
        never = refusal(await save(client, NEVER, "x.png"))
        not_yet = refusal(await save(client, pending, "x.png"))
        no_image = refusal(await save(client, failed_id, "x.png"))
        malformed = refusal(await save(client, "../../etc/passwd", "x.png"))
    assert f"no task {NEVER} in the history" in never.lower()
    assert f"call get_result with task_id {pending} first" in not_yet
    assert f"task {failed_id} failed" in no_image.lower() and "Generate the image again" in no_image
    assert "is not a GPTunnel task id" in malformed
    assert sorted(p.name for p in project.iterdir()) == ["assets"]


async def test_the_servers_own_data_folder_is_never_written(
    memory_server: ServerLauncher, home: Path, tmp_path: Path
) -> None:
    async with memory_server.connect(list_roots=roots_of(tmp_path)) as client:
        task_id = await made(client)
        stored = next((home / "images").iterdir())
        before = stored.read_bytes()
        for destination in (str(stored.with_suffix(".png")), str(stored), "home/images/", "home"):
            text = refusal(await save(client, task_id, destination, overwrite=True))
            assert "this server's own data folder" in text, text
    assert stored.read_bytes() == before
    assert [p.name for p in (home / "images").iterdir()] == [stored.name]


@pytest.mark.parametrize("answer", ["error", "silence"])
async def test_a_client_that_does_not_list_its_roots_has_none(
    server: ServerLauncher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answer: str
) -> None:
    monkeypatch.setattr(_roots, "ROOTS_WAIT", 0.3)
    exports = tmp_path / "exports"
    exports.mkdir()

    async def list_roots(context: ClientRequestContext) -> ListRootsResult | ErrorData:
        if answer == "silence":
            await anyio.sleep_forever()
        return ErrorData(code=INTERNAL_ERROR, message="the workspace is not open")

    # 2025-11-25: the server asks on the connection, so it is the one that must give up.
    async with server.connect("legacy", list_roots=list_roots, GPTUNNEL_EXPORT_DIRS=str(exports)) as client:
        task_id = await made(client)
        with anyio.fail_after(5):
            result = await save(client, task_id, "hero.png")
    assert not result.is_error, text_of(result)
    assert structured(result)["path"] == str(exports / "hero.png")
    assert "did not list its roots" in server.logs()


def test_roots_are_local_file_uris_percent_decoded() -> None:
    roots = ListRootsResult(
        roots=[
            Root(uri="file:///home/me/my%20project"),  # type: ignore[arg-type]
            Root(uri="file://localhost/srv/%C3%A9t%C3%A9"),  # type: ignore[arg-type]
            Root(uri="file://fileserver/share"),  # type: ignore[arg-type]
        ]
    )
    assert _roots.root_folders(roots) == [Path("/home/me/my project"), Path("/srv/été")]
    assert _roots.root_folders(None) == []


@pytest.fixture
def open_standin() -> Iterator[StandIn]:
    """Accepts any key: the users of a multi-user server."""
    with StandIn(api_key=None, behaviour=Behaviour(generation_seconds=0.05, image_size=(320, 200))) as s:
        yield s


@pytest.mark.parametrize("mode", MODES)
async def test_a_multi_user_server_writes_only_into_export_folders_and_only_the_callers_images(
    open_standin: StandIn, home: Path, project: Path, tmp_path: Path, mode: str
) -> None:
    exports = tmp_path / "exports"
    exports.mkdir()
    launcher = ServerLauncher(open_standin, home, transport="http")
    alice_key, bob_key = "sk-user-A-5d2e9b7c41f0", "sk-user-B-8a3f6e0d27c9"
    async with (
        serve_http(launcher.settings(**MULTI_USER)) as url,
        mcp_client(url, alice_key, mode, list_roots=roots_of(project)) as alice,
    ):
        task_id = await made(alice)
        # Its clients' roots are folders on their machines, not on the server's disk.
        nowhere = refusal(await save(alice, task_id, str(project / "hero.png")))
    async with (
        serve_http(launcher.settings(**MULTI_USER, GPTUNNEL_EXPORT_DIRS=str(exports))) as url,
        mcp_client(url, alice_key, mode, list_roots=roots_of(project)) as alice,
        mcp_client(url, bob_key, mode) as bob,
    ):
        in_root = refusal(await save(alice, task_id, str(project / "hero.png")))
        theirs = refusal(await save(bob, task_id, "stolen.png"))
        never = refusal(await save(bob, NEVER, "stolen.png"))
        mine = await save(alice, task_id, "hero.png")
    assert "serves many users" in nowhere and "GPTUNNEL_EXPORT_DIRS" in nowhere
    assert "leads outside" in in_root and str(exports) in in_root
    assert theirs.replace(task_id, NEVER) == never
    assert structured(mine)["path"] == str(exports / "hero.png")
    assert [p.name for p in exports.iterdir()] == ["hero.png"]
    assert sorted(p.name for p in project.iterdir()) == ["assets"]


async def test_a_replica_saves_an_image_another_one_downloaded(
    standin: StandIn, postgres_url: str, tmp_path: Path, project: Path
) -> None:
    a, b = ServerLauncher(standin, tmp_path / "a"), ServerLauncher(standin, tmp_path / "b")
    async with a.connect(GPTUNNEL_MCP_DATABASE_URL=postgres_url) as client:
        task_id = await made(client)
    async with b.connect(GPTUNNEL_MCP_DATABASE_URL=postgres_url, list_roots=roots_of(project)) as client:
        result = await save(client, task_id, "hero.webp")
    assert not result.is_error, text_of(result)
    assert (project / "hero.webp").read_bytes() == standin.image_bytes(task_id)
    assert standin.stats.download_calls == 1
