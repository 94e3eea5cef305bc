"""`tally tokens create | list | revoke`: bearer tokens, managed directly on Redis
and the ledger like `tally verify` (same flags), so the first admin token needs no
running server. A token's text is printed once, by `create`; nothing keeps it.
The records say the operator made or revoked them (`operator:<user>@<host>`)."""

from __future__ import annotations

import argparse
import getpass
import json
import socket
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from tally import config
from tally.auth.book import TokenBook
from tally.auth.principal import Role
from tally.auth.tokens import TokenRecord
from tally.cli.ops import Ops, run_ops, say
from tally.cli.output import table
from tally.domain.errors import TallyError
from tally.store.token_store import TokenStore

Work = Callable[[TokenBook], Awaitable[int]]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    noun = subparsers.add_parser(
        "tokens", help="bearer tokens: create, list, revoke (on Redis and the ledger directly)"
    )
    actions = noun.add_subparsers(dest="action", metavar="ACTION", required=True)

    def action(name: str, help_text: str, handler: Callable[[argparse.Namespace], int]
               ) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, help=help_text, description=help_text)
        config.add_arguments(parser)
        parser.add_argument("--json", action="store_true", help="print JSON")
        parser.set_defaults(handler=handler)
        return parser

    create = action("create", "make a token and print it (once)", run_create)
    create.add_argument("--role", required=True, choices=[role.value for role in Role])
    create.add_argument("--account", action="append", default=[], metavar="ID",
                        help="an account the token is scoped to (repeat; none: every account)")
    create.add_argument("--expires-in", default=None, metavar="DURATION",
                        help="lifetime (e.g. 30d, 12h); unset: never expires")
    create.add_argument("--name", default="", help="what the token is for")
    action("list", "list tokens (never their secrets)", run_list)
    revoke = action("revoke", "revoke a token: refused by every server within "
                    "--token-cache-ttl", run_revoke)
    revoke.add_argument("token_id", metavar="TOKEN_ID")


def _with_book(args: argparse.Namespace, work: Work) -> int:
    async def on_ops(ops: Ops) -> int:
        book = TokenBook(ops.ledger, TokenStore(ops.store.redis), ops.store.clock)
        try:
            return await work(book)
        except TallyError as error:
            say(f"tally: {error.code}: {error.message}")
            return 1

    return run_ops(args, on_ops)


def operator() -> str:
    """Who runs the command, as a token's created_by / revoked_by records it."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # a uid without a passwd entry, no USER variable
        user = "unknown"
    return f"operator:{user}@{socket.gethostname()}"


def _time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds") if ms else "-"


def _public(record: TokenRecord) -> dict[str, object]:
    """A record as listed: everything but the secret's hash."""
    return {"token_id": record.token_id, "role": record.role.value,
            "accounts": list(record.accounts), "name": record.name,
            "created_at": record.created_at, "expires_at": record.expires_at,
            "revoked_at": record.revoked_at, "created_by": record.created_by,
            "revoked_by": record.revoked_by}


def run_create(args: argparse.Namespace) -> int:
    try:
        expires_in_ms = round(config.parse_duration_s(args.expires_in) * 1000) \
            if args.expires_in else 0
    except ValueError as exc:
        say(f"tally: --expires-in: {exc}")
        return 2

    async def work(book: TokenBook) -> int:
        token = await book.create(
            Role(args.role), tuple(args.account), args.name, expires_in_ms, by=operator()
        )
        if args.json:
            print(json.dumps({"token": token.text, "token_id": token.record.token_id}))
        else:
            print(token.text)
            say(f"token {token.record.token_id} ({args.role}): shown once, keep it safe")
        return 0

    return _with_book(args, work)


def run_list(args: argparse.Namespace) -> int:
    async def work(book: TokenBook) -> int:
        records = await book.list()
        if args.json:
            print(json.dumps({"tokens": [_public(r) for r in records]}))
            return 0
        rows = [[r.token_id, r.role.value, ",".join(r.accounts) or "*", r.name,
                 _time(r.created_at), r.created_by or "-", _time(r.expires_at),
                 _time(r.revoked_at), r.revoked_by or "-"]
                for r in records]
        print(table(["token_id", "role", "accounts", "name", "created", "created_by",
                     "expires", "revoked", "revoked_by"], rows))
        return 0

    return _with_book(args, work)


def run_revoke(args: argparse.Namespace) -> int:
    async def work(book: TokenBook) -> int:
        record = await book.revoke(args.token_id, by=operator())
        if args.json:
            print(json.dumps(_public(record)))
        else:
            print(f"revoked {record.token_id} at {_time(record.revoked_at)}")
        return 0

    return _with_book(args, work)
