"""One tree of exceptions, raised by the core. Each carries facts (which task, which cap, which
argument) and a message that states what happened in words any front end can show. What the
reader should do next differs by front end (an agent calls a tool, a person runs a command), so
the advice is added there, from the facts; a message never contains the API key.
"""

from __future__ import annotations

from datetime import datetime


class GPTunnelMCPError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(GPTunnelMCPError):
    """The server's configuration is unusable (a bad environment variable, no API key, ...)."""


class MissingKeyError(ConfigError):
    """A call needs a GPTunnel key and none is configured."""

    def __init__(self) -> None:
        super().__init__(
            "no GPTunnel API key is configured: set GPTUNNEL_API_KEY to the key from your GPTunnel account"
        )


class InputError(GPTunnelMCPError):
    """An argument is invalid. Raised before any request reaches GPTunnel.

    `argument` names the request field at fault (prompt, model, aspect_ratio, images, task_id),
    so a front end can name it the way its users typed it; `model` is set when the refusal
    comes from what a known model accepts.
    """

    def __init__(self, problem: str, *, argument: str | None = None, model: str | None = None) -> None:
        self.problem = problem
        self.argument = argument
        self.model = model
        super().__init__(problem)


class QuotaExceededError(GPTunnelMCPError):
    """A configured cap on images per hour or day is reached. Raised before any upstream call."""

    def __init__(
        self, *, cap: int, unit: str, setting: str, made: int, frees_at: datetime | None, asked: int = 1
    ) -> None:
        """`frees_at` is None when the call asks for more images than the cap allows at all
        (`asked` of them; with a cap of 0, any)."""
        self.cap, self.unit, self.setting, self.made, self.frees_at = cap, unit, setting, made, frees_at
        self.asked = asked
        if frees_at is not None:
            images = "The next can" if asked == 1 else f"{asked} more images can"
            when = f"{images} be made at {frees_at:%Y-%m-%d %H:%M:%S} UTC."
        elif cap == 0:
            when = f"With {setting}=0 no image can be made; raise or unset it."
        else:
            when = f"This call asks for {asked} images, more than the cap allows: ask for fewer."
        super().__init__(
            f"the cap of {cap} images per {unit} ({setting}) is reached: {made} made in the last {unit}. "
            f"{when} Nothing was sent to GPTunnel."
        )


class BudgetExceededError(GPTunnelMCPError):
    """The daily budget in roubles cannot take the images a call asks for, by what the history
    says was spent and estimates the rest. Raised before any upstream call.

    `spent`: recorded costs in the last `unit`; `estimated`: estimates for images still being
    made (or whose create was not answered), `unknown` of them of a model with no recorded cost
    yet (each counted as taking the rest of the budget); the call asks for `count` images of
    `model`, estimated at `each` roubles apiece (None: no recorded cost yet); `frees_at`: when
    enough has left the window for the call to fit (None: never, the call alone does not)."""

    def __init__(
        self,
        *,
        budget: float,
        unit: str,
        setting: str,
        spent: float,
        estimated: float,
        unknown: int,
        model: str,
        each: float | None,
        count: int,
        frees_at: datetime | None,
    ) -> None:
        self.budget, self.unit, self.setting = budget, unit, setting
        self.spent, self.estimated, self.unknown = spent, estimated, unknown
        self.model, self.each, self.count, self.frees_at = model, each, count, frees_at
        said = [
            f"the budget of {budget:.2f} RUB per {unit} ({setting}) cannot take this call: "
            f"{spent:.2f} RUB spent in the last {unit}"
        ]
        if estimated or unknown:
            said.append(f", {estimated:.2f} RUB estimated for images still being made")
        if unknown:
            said.append(
                f" and {unknown} more of a model whose cost is not known yet, counted as taking what "
                "is left of the budget until GPTunnel reports their cost"
            )
        if each is None:
            said.append(f"; what an image of {model} costs is not known yet. ")
        else:
            images = f"{count} images of {model} are" if count > 1 else f"an image of {model} is"
            said.append(f"; {images} estimated at {each * count:.2f} RUB. ")
        if frees_at is not None:
            sooner = ", or sooner once the images being made are finished" if unknown else ""
            said.append(f"Enough leaves the window at {frees_at:%Y-%m-%d %H:%M:%S} UTC{sooner}.")
        elif each is None and count > 1:
            said.append(
                f"Images of a model of unknown cost are made one at a time: ask for one image of {model}."
            )
        elif budget == 0:
            said.append(f"With {setting}=0 nothing that costs money can be made; raise or unset it.")
        else:
            said.append(
                "This call alone is estimated above the budget: ask for fewer images or a cheaper model."
            )
        said.append(" Nothing was sent to GPTunnel.")
        super().__init__("".join(said))


class TaskNotFoundError(GPTunnelMCPError):
    """No such task for this caller: not in their history (`upstream` False), or unknown to
    GPTunnel itself (code 4, `upstream` True)."""

    def __init__(self, task_id: str | None, *, upstream: bool = False) -> None:
        self.task_id = task_id
        self.upstream = upstream
        if upstream:
            text = "GPTunnel has no task with this id (code 4)"
        else:
            text = f"no task {task_id} in the history"
        super().__init__(text)


class ImageNotReadyError(GPTunnelMCPError):
    """The task is known but has no stored image: not yet, or never, when it `failed` (why)."""

    def __init__(self, task_id: str, *, failed: str | None = None) -> None:
        self.task_id = task_id
        self.failed = failed
        if failed is None:
            super().__init__(f"task {task_id} has no stored image yet")
        else:
            super().__init__(f"task {task_id} failed ({failed}), so it has no image")


class UpstreamError(GPTunnelMCPError):
    """GPTunnel answered with an error, or could not be reached.

    `code` is GPTunnel's numeric `code` where there was one; `retryable` tells whether the same
    request may succeed later.
    """

    retryable = False

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class AuthenticationError(UpstreamError):
    """GPTunnel refused the API key (code 2, or HTTP 401)."""


class InvalidRequestError(UpstreamError):
    """GPTunnel found the request invalid (code 3)."""


class InsufficientBalanceError(UpstreamError):
    """The account has no money left for this model (code 5)."""


class ModelRestrictedError(UpstreamError):
    """The account's organization may not use this model (code 7)."""


class ContentRefusedError(UpstreamError):
    """GPTunnel's content filter refused the prompt or the reference images (1001, 1002)."""


class TransientUpstreamError(UpstreamError):
    """A failure that may pass: network errors, timeouts, HTTP 429/5xx, codes 1, 6 and 500."""

    retryable = True

    def __init__(self, message: str, *, code: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class FlakyLinkError(TransientUpstreamError):
    """A failure of the link itself that may pass (its body broke off, its name does not
    resolve): worth another try, but it counts towards the task's failed downloads, as a link
    that always fails this way is broken."""


class UnknownCreateOutcomeError(UpstreamError):
    """A create request may or may not have reached GPTunnel; retrying it could charge twice."""


class DownloadError(GPTunnelMCPError):
    """The finished image could not be downloaded or is not an image. `task_id`, once known, is
    the task whose image it is: the task stays in the history, and fetching it again retries."""

    def __init__(self, reason: str, *, task_id: str | None = None) -> None:
        self.reason = reason
        self.task_id = task_id
        super().__init__(reason)


class StorageError(GPTunnelMCPError):
    """The history or an image file could not be written or read.

    `task_id` is set when GPTunnel has the task and the history keeps it: nothing is lost, and
    fetching the task again once the disk is fixed finishes the job.
    """

    def __init__(self, reason: str, *, task_id: str | None = None) -> None:
        self.reason = reason
        self.task_id = task_id
        super().__init__(reason if task_id is None else f"task {task_id}: {reason}")
