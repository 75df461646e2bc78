"""The IMAP dispatch tables and the one translation of store errors into tagged replies."""

from __future__ import annotations

import asyncio

import pytest

from appliance.imap.commands import Command
from appliance.imap.errors import ImapNo
from appliance.imap.fetch import NoSuchPart, UnknownCte
from appliance.imap.parser import LiteralPart, Segment, parse_command
from appliance.imap.session import DISPATCH, Route
from appliance.imap.store_errors import MissingFolderCode, store_errors
from appliance.store.model import FolderExists, NoSuchFolder, QuotaExceeded, StoreError

# One well-formed command line for every name a state table holds (framed: a literal is its own piece).
SAMPLES: dict[str, list[Segment]] = {name: [line] for name, line in {
    "CAPABILITY": b"t CAPABILITY", "NOOP": b"t NOOP", "LOGOUT": b"t LOGOUT", "ID": b"t ID NIL",
    "STARTTLS": b"t STARTTLS", "AUTHENTICATE": b"t AUTHENTICATE PLAIN", "LOGIN": b"t LOGIN a b",
    "SELECT": b"t SELECT INBOX", "EXAMINE": b"t EXAMINE INBOX", "CREATE": b"t CREATE a",
    "DELETE": b"t DELETE a", "RENAME": b"t RENAME a b", "SUBSCRIBE": b"t SUBSCRIBE a",
    "UNSUBSCRIBE": b"t UNSUBSCRIBE a", "LIST": b't LIST "" *', "LSUB": b't LSUB "" *',
    "NAMESPACE": b"t NAMESPACE", "STATUS": b"t STATUS INBOX (MESSAGES)",
    "ENABLE": b"t ENABLE CONDSTORE", "GETQUOTA": b't GETQUOTA ""',
    "GETQUOTAROOT": b"t GETQUOTAROOT INBOX", "SETQUOTA": b't SETQUOTA "" (STORAGE 1)', "IDLE": b"t IDLE",
    "COMPRESS": b"t COMPRESS DEFLATE", "CHECK": b"t CHECK", "CLOSE": b"t CLOSE", "UNSELECT": b"t UNSELECT",
    "EXPUNGE": b"t EXPUNGE", "SEARCH": b"t SEARCH ALL", "SORT": b"t SORT (DATE) UTF-8 ALL",
    "CANCELUPDATE": b"t CANCELUPDATE \"a\"", "NOTIFY": b"t NOTIFY NONE",
    "THREAD": b"t THREAD REFERENCES UTF-8 ALL", "FETCH": b"t FETCH 1 FLAGS", "STORE": b"t STORE 1 +FLAGS (x)",
    "COPY": b"t COPY 1 a", "MOVE": b"t MOVE 1 a",
}.items()}
SAMPLES["APPEND"] = [b"t APPEND INBOX ", LiteralPart(b"x"), b""]
ROUTES = sorted({(name, route) for table in DISPATCH.values() for name, route in table.items()},
                key=lambda pair: pair[0])


@pytest.mark.parametrize(("name", "route"), ROUTES, ids=[name for name, _ in ROUTES])
def test_every_route_takes_the_class_the_parser_makes(name: str, route: object) -> None:
    assert isinstance(route, Route)
    command = parse_command(SAMPLES[name])
    assert command.name == name
    assert type(command) is route.kind


def test_a_command_of_another_class_is_a_bug_not_a_reply() -> None:
    route = DISPATCH["selected"]["FETCH"]
    with pytest.raises(TypeError, match="FETCH parsed as Command"):
        asyncio.run(route.run(None, Command("t", "FETCH")))  # type: ignore[arg-type]  # no session needed: refused first


@pytest.mark.parametrize(("error", "missing", "code", "text"), [
    (NoSuchFolder("no folder named x"), "NONEXISTENT", "NONEXISTENT", "Mailbox does not exist"),
    (NoSuchFolder("no folder named x"), "TRYCREATE", "TRYCREATE", "Mailbox does not exist"),  # RFC 3501 6.3.11
    (FolderExists("x already exists"), "NONEXISTENT", "ALREADYEXISTS", "Mailbox already exists"),
    (QuotaExceeded("over"), "TRYCREATE", "OVERQUOTA", "Quota exceeded"),
    (StoreError("a folder cannot be moved below itself"), "NONEXISTENT", "CANNOT",
     "a folder cannot be moved below itself"),
    (StoreError(), "NONEXISTENT", "CANNOT", "RENAME failed"),
    (UnknownCte(), "NONEXISTENT", "UNKNOWN-CTE", "Unknown Content-Transfer-Encoding"),  # RFC 3516 4.3
    (NoSuchPart(), "NONEXISTENT", "CANNOT", "No such part"),
])
def test_store_errors_become_tagged_no_with_their_code(
    error: Exception, missing: MissingFolderCode, code: str, text: str,
) -> None:
    with pytest.raises(ImapNo) as caught, store_errors("RENAME", missing):
        raise error
    assert (caught.value.status, caught.value.code, caught.value.text) == ("NO", code, text)
    assert caught.value.__cause__ is None  # nothing of the store's traceback goes along


def test_other_exceptions_are_left_alone() -> None:
    with pytest.raises(KeyError), store_errors("FETCH"):
        raise KeyError("a bug stays a bug: logged, and the client gets BYE")
