"""Decisions every rank shares: a refusal some ranks meet stops all of them in one line, and what
rank 0 decides about shared files is every rank's answer."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from parallel.distributed import all_gather_objects, broadcast_object
from pretrain.config import ConfigError

T = TypeVar("T")


@contextlib.contextmanager
def agreed_config_errors() -> Iterator[None]:
    """Set-up that may refuse the layout on some ranks only (a pipeline stage whose blocks do not
    split over TP): every rank learns the first refusal and stops with it (exit 2, one line), instead
    of the others dying on a closed connection. A ValueError from the model's parts (a dimension the
    layout cannot split) names the field and the fix. Any other failure is re-raised where it
    happened, and the other ranks stop naming that rank, rather than wait for it. Works without a
    process group. Collective."""
    problem: tuple[str, str] | None = None  # (kind, message): "config" stops every rank in one line
    failure: BaseException | None = None
    try:
        yield
    except ConfigError as e:
        problem = ("config", str(e))
    except ValueError as e:
        problem = ("config", f"config: {e}")
    except Exception as e:  # noqa: BLE001 - told to every rank, then re-raised here
        failure, problem = e, ("crash", f"{type(e).__name__}: {e}")
    problems = all_gather_objects(problem)
    if failure is not None:
        raise failure
    for rank, found in enumerate(problems):
        if found is not None:
            kind, message = found
            if kind == "crash":
                raise RuntimeError(f"rank {rank} failed while setting up the layout ({message})")
            raise ConfigError(message)


def rank0_decides(decide: Callable[[], T], is_main: bool) -> T:
    """What `decide()` returns on rank 0, given to every rank; a ConfigError it raises is raised
    on every rank. Ranks must never decide about shared files on their own: on a shared
    filesystem they can see different states (a save being committed or pruned, client caches)."""
    answer: tuple[Any, str | None] = (None, None)  # (value, error)
    if is_main:
        try:
            answer = (decide(), None)
        except ConfigError as e:
            answer = (None, str(e))
    value, error = broadcast_object(answer)
    if error is not None:
        raise ConfigError(error)
    return value
