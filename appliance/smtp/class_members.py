"""aiosmtpd's per-connection look-ups, done once per class (issue 19).

aiosmtpd 1.4's `SMTP.__init__` builds its tables of AUTH mechanisms, handler hooks and commands
with `inspect.getmembers`, `dir` and `inspect.signature` on every new connection: about 1 ms of
CPU per connection (8 % of the MX's samples under smtp-source, which opens one connection per
message), for answers that depend only on the classes. `install()` gives the `aiosmtpd.smtp` module
(and no other) versions of these three that remember what they found per class and list only the
names it looks for (it keeps those with a few prefixes and drops the rest); the tables aiosmtpd
builds are the same, bound to the new instance as before.
"""

from __future__ import annotations

import inspect
import logging
import operator
from collections.abc import Callable
from typing import Any

import aiosmtpd.smtp

# The names aiosmtpd.smtp looks for in what dir() and getmembers() give it: its AUTH mechanisms
# (`auth_<MECHANISM>`, on the protocol object and the handler), the handler's hooks, its commands.
WANTED_PREFIXES = ("auth_", "handle_", "smtp_")

_class_names: dict[type, tuple[str, ...]] = {}
_wanted = operator.methodcaller("startswith", WANTED_PREFIXES)
_commands: dict[type, dict[str, Callable[..., Any]]] = {}
_signatures: dict[Any, inspect.Signature] = {}


def wanted_names(obj: object) -> list[str]:
    """dir(obj) as aiosmtpd.smtp uses it (it keeps only the names with the prefixes above): the
    class's names found once per class, the object's own attributes every time; sorted as dir()."""
    cls = type(obj)
    names = _class_names.get(cls)
    if names is None:
        # A class with LAZY_COMMANDS set binds its `smtp_` commands itself when one is asked for
        # (commands()): aiosmtpd's table of them, bound per connection, was 3 % of the MX's loop.
        skipped = ("smtp_",) if getattr(cls, LAZY_COMMANDS, False) else ()
        names = _class_names[cls] = tuple(n for n in dir(cls) if n.startswith(WANTED_PREFIXES)
                                          and not (skipped and n.startswith(skipped)))
    # filter() with a C predicate: the instance holds ~40 attributes when aiosmtpd asks (4 times
    # per connection), and a Python loop over them was most of this function's time.
    own = list(filter(_wanted, getattr(obj, "__dict__", ())))
    return sorted({*names, *own}) if own else list(names)


LAZY_COMMANDS = "lazy_commands"


def commands(cls: type) -> dict[str, Callable[..., Any]]:
    """The class's SMTP commands (`smtp_HELO` as "HELO"), unbound, found once per class."""
    found = _commands.get(cls)
    if found is None:
        found = _commands[cls] = {n[len("smtp_"):]: getattr(cls, n) for n in dir(cls) if n.startswith("smtp_")}
    return found


def auth_members(obj: object, predicate: Callable[[Any], bool] | None = None) -> list[tuple[str, Any]]:
    """inspect.getmembers as aiosmtpd.smtp uses it (for the `auth_` members only): only the wanted
    members are fetched (getmembers fetches every attribute, properties included)."""
    members = [(name, getattr(obj, name)) for name in wanted_names(obj) if name.startswith("auth_")]
    return [(n, v) for n, v in members if predicate is None or predicate(v)]


def signature(obj: Callable[..., Any]) -> inspect.Signature:
    """inspect.signature of a bound method, remembered per function (the same for every instance)."""
    key = getattr(obj, "__func__", None)
    if key is None:
        return inspect.signature(obj)
    found = _signatures.get(key)
    if found is None:
        found = _signatures[key] = inspect.signature(obj)
    return found


class _Inspect:
    """The `inspect` module as aiosmtpd.smtp sees it: its getmembers and signature remembered."""

    getmembers = staticmethod(auth_members)
    signature = staticmethod(signature)

    def __getattr__(self, name: str) -> Any:
        return getattr(inspect, name)


_sanitized_log = aiosmtpd.smtp.sanitized_log


def sanitized_log(func: Callable[..., None], msg: Any, *args: Any, **kwargs: Any) -> None:
    """aiosmtpd's, called for each command line (at DEBUG and at INFO, which the box's `mail.log`
    logger is above): skipped before it copies the arguments when INFO is off."""
    if aiosmtpd.smtp.log.isEnabledFor(logging.INFO):
        _sanitized_log(func, msg, *args, **kwargs)


def install() -> None:
    """Idempotent; only `aiosmtpd.smtp`'s own globals change (module-level names shadow builtins)."""
    module: Any = aiosmtpd.smtp
    module.inspect = _Inspect()
    module.dir = wanted_names
    module.sanitized_log = sanitized_log
