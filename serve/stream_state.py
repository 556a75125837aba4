"""A served stream's session in the state store: saved as the client confirms it, restored by
any node.

Each entry is the client's request number (8 bytes, big-endian) and then a session snapshot or
increment (runtime/snapshot.py). A request's effect is saved at the start of the stream's next
request, which the client sends only after it has the reply: the store never holds a state the
client did not see (a node that dies after tracking a frame but before its reply reached the
client has not saved it), and lags the client by at most one request, which the client keeps to
send again. Every `rebase_every` increments a full snapshot replaces the chain, so a restore
reads a bounded number of entries. The store key is the stream's id with its token: only the
client that opened a stream can have another node restore it.
"""

from __future__ import annotations

import hashlib
import struct

REBASE_EVERY = 32  # increments after a base; a restore applies at most this many


def stream_name(corrid, token: str) -> str:
    return hashlib.sha256(f"{corrid}:{token}".encode()).hexdigest()


class StreamState:
    def __init__(self, store, rebase_every: int = REBASE_EVERY):
        self.store = store
        self.rebase_every = max(1, int(rebase_every))
        self._chain = {}  # stream -> increments written after its base by this node

    def saved(self, stream: str, session, seq: int) -> int:
        """Writes what changed in `session` since its last save, as of request `seq`; returns
        the bytes written."""
        n = self._chain.get(stream)
        full = n is None or n >= self.rebase_every
        data = struct.pack(">q", int(seq)) + session.snapshot_delta(full=full)
        if full:
            self.store.put_base(stream, data)
            self._chain[stream] = 0
        else:
            self.store.append(stream, data)
            self._chain[stream] = n + 1
        return len(data)

    def restored(self, stream: str, open_session):
        """(session, seq of the last request it includes) rebuilt from the store, or None where
        the store holds nothing. `open_session(blobs)` opens a session from [base, *increments]."""
        entry = self.store.load(stream)
        if entry is None:
            return None
        base, chain = entry
        blobs = [base, *chain]
        if any(len(b) < 8 for b in blobs):
            return None
        seq = struct.unpack(">q", blobs[-1][:8])[0]
        session = open_session([b[8:] for b in blobs])
        self._chain[stream] = self.rebase_every  # this node's next save starts a new chain
        return session, seq

    def forget(self, stream: str, drop: bool) -> None:
        """The stream left this node: END drops its entries; idle or shutdown leaves them to
        the store's expiry (another node may take the stream over)."""
        self._chain.pop(stream, None)
        if drop:
            self.store.drop(stream)
