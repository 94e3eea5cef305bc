"""Tally's Python client: asyncio (`TallyClient`) and synchronous
(`SyncTallyClient`), with the generated stubs in `tally_client.v1`."""

from tally_client.aio import AsyncHold, TallyClient
from tally_client.errors import TallyRpcError
from tally_client.retry import RetryPolicy
from tally_client.sync import SyncHold, SyncTallyClient
from tally_client.tls import ClientTls

__all__ = [
    "AsyncHold",
    "ClientTls",
    "RetryPolicy",
    "SyncHold",
    "SyncTallyClient",
    "TallyClient",
    "TallyRpcError",
]
