"""How a command reaches the authority: the address and deadline flags, the
channel, and how a refused call is told.

The admin commands take `--target` (default: $TALLY_TARGET, else
127.0.0.1:50051), the TLS flags `--tls-ca`, `--tls-cert`, `--tls-key`
(tally_client.tls), a bearer token (`--token`, $TALLY_TOKEN, `--token-file` or
$TALLY_TOKEN_FILE, in that order), `--timeout` (seconds) and `--json`. A refused call prints
`tally: <CODE>: <details>` on stderr and exits 1; a usage error exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Required, TypeAlias, TypedDict, Unpack

import grpc

from tally_client.tls import CA_ENV, CERT_ENV, KEY_ENV, ClientTls
from tally_client.v1 import account_pb2_grpc, catalog_pb2_grpc, quota_pb2_grpc, usage_pb2_grpc

TARGET_ENV = "TALLY_TARGET"
TOKEN_ENV = "TALLY_TOKEN"
TOKEN_FILE_ENV = "TALLY_TOKEN_FILE"
DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 10.0
# Calls whose outcome is unknown to the caller: a purchase may have happened.
AMBIGUOUS = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)


class Api:
    """Blocking stubs on one channel, with the per-call timeout."""

    def __init__(self, channel: grpc.Channel, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.accounts = account_pb2_grpc.AccountServiceStub(channel)
        self.quota = quota_pb2_grpc.QuotaServiceStub(channel)
        self.catalog = catalog_pb2_grpc.CatalogServiceStub(channel)
        self.usage = usage_pb2_grpc.UsageServiceStub(channel)


Handler = Callable[[argparse.Namespace, Api], int]
# argparse._SubParsersAction is generic in the stubs only.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def target_of(args: argparse.Namespace) -> str:
    """The address to call: --target, else $TALLY_TARGET, else the default."""
    target: str = args.target or os.environ.get(TARGET_ENV) or DEFAULT_TARGET
    return target


def token_of(args: argparse.Namespace) -> str:
    """The bearer token: --token, $TALLY_TOKEN, --token-file, $TALLY_TOKEN_FILE; "" for none."""
    token: str = args.token or os.environ.get(TOKEN_ENV, "")
    path = args.token_file or os.environ.get(TOKEN_FILE_ENV, "")
    if not token and path:
        with open(path, encoding="utf-8") as file:
            token = file.read().strip()
    return token


def add_target_flag(parser: argparse._ActionsContainer) -> None:
    """--target, the TLS and the token flags: everything needed to reach the authority."""
    parser.add_argument(
        "--target",
        default=None,
        help=f"host:port of the authority (default: ${TARGET_ENV}, else {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--tls-ca", default=None, metavar="PEM",
        help=f"speak TLS, trusting this CA for the server's certificate (default: ${CA_ENV})",
    )
    parser.add_argument(
        "--tls-cert", default=None, metavar="PEM",
        help=f"client certificate for mutual TLS (default: ${CERT_ENV})",
    )
    parser.add_argument(
        "--tls-key", default=None, metavar="PEM",
        help=f"key of --tls-cert (default: ${KEY_ENV})",
    )
    parser.add_argument(
        "--token", default=None, help=f"bearer token (default: ${TOKEN_ENV}); prefer a file"
    )
    parser.add_argument(
        "--token-file", default=None, metavar="PATH",
        help=f"file holding the bearer token (default: ${TOKEN_FILE_ENV})",
    )


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call."""

    def __init__(self, token: str) -> None:
        self.metadata = ("authorization", f"Bearer {token}")

    def _with_token(self, details: Any) -> Any:
        return details._replace(metadata=[*(details.metadata or ()), self.metadata])

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)


def open_channel(args: argparse.Namespace) -> grpc.Channel:
    """A channel to the target: TLS when a TLS flag or variable is set, else plaintext;
    carrying the bearer token, if one is given."""
    target = target_of(args)
    tls = ClientTls.from_sources(args.tls_ca, args.tls_cert, args.tls_key, os.environ)
    channel = (
        grpc.insecure_channel(target) if tls is None
        else grpc.secure_channel(target, tls.credentials())
    )
    token = token_of(args)
    return grpc.intercept_channel(channel, _Bearer(token)) if token else channel


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("the timeout must be more than 0 seconds")
    return value


def connection_flags() -> argparse.ArgumentParser:
    """The parent parser of every admin command: --target, --timeout, --json."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection and output")
    add_target_flag(group)
    group.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"deadline of each call (default: {DEFAULT_TIMEOUT_S:g})",
    )
    group.add_argument("--json", action="store_true", help="print one JSON object")
    return common


def one_line(text: str) -> str:
    return " ".join(text.split())


def report_rpc_error(error: grpc.RpcError) -> grpc.StatusCode:
    """Prints `tally: <CODE>: <details>` on stderr; returns the code."""
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    print(f"tally: {code.name}: {one_line(details or 'no details')}", file=sys.stderr)
    return code


@contextmanager
def _connect(args: argparse.Namespace) -> Iterator[Api]:
    channel = open_channel(args)
    try:
        yield Api(channel, args.timeout)
    finally:
        channel.close()


def run(handler: Handler) -> Callable[[argparse.Namespace], int]:
    """Wraps a handler: connects, and turns every gRPC error into one line
    (followed by `args.retry_hint`, when the handler set one and the outcome
    is unknown)."""

    def run_handler(args: argparse.Namespace) -> int:
        try:
            with _connect(args) as api:
                return handler(args, api)
        except grpc.RpcError as error:
            code = report_rpc_error(error)
            hint = getattr(args, "retry_hint", None)
            if hint and code in AMBIGUOUS:
                print(hint, file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("tally: interrupted", file=sys.stderr)
            return 130

    return run_handler


class HelpTexts(TypedDict, total=False):
    """What `--help` says of a command: `help` in its parent's list, `description` atop its own."""

    help: Required[str]
    description: str


def add_command(
    subparsers: Subparsers, name: str, handler: Handler, **texts: Unpack[HelpTexts]
) -> argparse.ArgumentParser:
    """An admin command: the connection flags, and `handler` run by `run`."""
    parser = subparsers.add_parser(name, parents=[connection_flags()], **texts)
    parser.set_defaults(handler=run(handler))
    return parser


def add_account_command(
    subparsers: Subparsers, name: str, handler: Handler, **texts: Unpack[HelpTexts]
) -> argparse.ArgumentParser:
    """An admin command on one account: ACCOUNT_ID is its first argument."""
    parser = add_command(subparsers, name, handler, **texts)
    parser.add_argument("account_id", metavar="ACCOUNT_ID")
    return parser


def add_noun(subparsers: Subparsers, name: str, **texts: Unpack[HelpTexts]) -> Subparsers:
    """A command whose actions are admin commands (`tally accounts create`)."""
    noun = subparsers.add_parser(name, **texts)
    return noun.add_subparsers(dest="action", metavar="ACTION", required=True)
