"""Data errors: one line naming the problem and the fix, however deep in Ray a read failed."""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator

import ray.exceptions


class DataError(ValueError):
    """A data problem the user can fix; the message is one line naming the problem and the fix."""



def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def exception_chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions Ray's wrappers hold inside it (task causes, Ray Train's failed
    workers), outermost first."""
    seen: list[BaseException] = []
    queue = [err]
    while queue:
        e = queue.pop(0)
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        queue += [getattr(e, "cause", None), e.__cause__, e.__context__,
                  *getattr(e, "worker_failures", {}).values()]
    return seen


def _original(chain: list[BaseException]) -> BaseException:
    """The first exception in the chain that is not one of Ray's wrappers."""
    for e in chain:
        wrapper = isinstance(e, (StopIteration, ray.exceptions.RayError)) or type(e).__module__.startswith("ray.")
        if not wrapper:
            return e
    return chain[0]


def _data_error_message(err: DataError) -> str:
    cause = getattr(err, "cause", None)  # a RayTaskError(DataError) carries the original
    if isinstance(cause, DataError):
        return _data_error_message(cause)
    return str(err.args[0]) if err.args else str(err)


@contextmanager
def reading(where: str, fmt: str | None) -> Iterator[None]:
    """Turn failures while a read executes (often inside Ray tasks) into one-line DataErrors."""
    try:
        yield
    except DataError as err:
        raise DataError(_data_error_message(err)) from None
    except Exception as err:  # noqa: BLE001 - Ray wraps reader errors in several types
        chain = exception_chain(err)
        for e in chain:
            if isinstance(e, DataError):
                raise DataError(_data_error_message(e)) from None
        match = re.search(r"DataError: (.+)", str(err))
        if match:  # the class did not survive pickling, its message did
            raise DataError(match.group(1).strip()) from None
        as_fmt = f" as {fmt}" if fmt and fmt != "auto" else ""
        if any(isinstance(e, UnicodeDecodeError) for e in chain):
            raise DataError(f"cannot read {where}{as_fmt}: it is not valid UTF-8; re-encode it as UTF-8") from None
        raise DataError(
            f"cannot read {where}{as_fmt}: {first_line(_original(chain))}; check the file or set data.format"
        ) from None

