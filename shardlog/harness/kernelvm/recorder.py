"""Records the kernel's requests as they go out, for test fixtures.

A second member of connector group 7 receives every request the kernel multicasts (the
kernel takes the first reply per seq; this socket never replies), and keeps each
datagram as the kernel sent it, with the time and a decoded summary, as JSON lines
(``raw_hex`` as in tests/fixtures/kernel-6.1's captures, but no replies: they are
``harness-*.jsonl`` there, beside the ``capture-*.jsonl`` of the answered sessions).

Only ever run it beside a live server: with no server but a recorder in the group, the
kernel's send succeeds and it waits 15 s for a reply, instead of finding no server
(-ESRCH) and reconnecting.
"""

from __future__ import annotations

import json
import select
import threading
import time
from pathlib import Path

from shardlog.server.nlsocket import open_connector_socket
from shardlog.wire import protocol


class Recorder:
    def __init__(self, limit: int = 400):
        self.limit = limit  # fixtures stay small: the first `limit` requests
        self.records: list[dict] = []
        self._socket = open_connector_socket(receive_buffer=4 << 20, join_group_7=True)
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not select.select([self._socket], [], [], 0.1)[0]:
                continue
            raw = self._socket.recv(65536)
            if len(self.records) >= self.limit:
                continue
            record = {"n": len(self.records), "t": round(time.monotonic() - self._started, 6),
                      "raw_hex": raw.hex()}
            try:
                request = protocol.decode_datagram(raw)
                record["request"] = {"type": request.name, "seq": request.seq,
                                     "uuid": request.uuid, "luid": request.luid,
                                     "data_size": len(request.data)}
            except protocol.ProtocolError as exc:
                record["malformed"] = exc.reason
            self.records.append(record)

    def stop(self) -> list[dict]:
        self._stop.set()
        self._thread.join(5)
        self._socket.close()
        return self.records

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(record) + "\n" for record in self.stop()))
