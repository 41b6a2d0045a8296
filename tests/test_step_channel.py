"""The shared-memory ring that carries step messages between ranks of one node (distributed/step_channel.py):
every reader gets every message, in order and byte for byte, through wrap-around and messages larger than a slot;
a reader whose writer is gone fails instead of hanging."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import time

import pytest

from moeserve.distributed.step_channel import ShmRing

SLOTS, SLOT_BYTES = 4, 64


def _messages(n: int) -> list[bytes]:
    rng = random.Random(7)
    # empty, under a slot, exactly a slot, several slots
    sizes = [0, 1, SLOT_BYTES, SLOT_BYTES + 1, 5 * SLOT_BYTES] + [rng.randrange(0, 4 * SLOT_BYTES) for _ in range(n)]
    return [bytes(rng.randrange(256) for _ in range(s)) for s in sizes]


def _read(name: str, readers: int, reader: int, count: int, out) -> None:
    ring = ShmRing.attach(name, SLOTS, SLOT_BYTES, readers, spin_s=0.0)
    ring.set_role(reader)
    got = []
    for i in range(count):
        if i % 7 == 0:
            time.sleep(0.01)  # a slow reader: the writer must wait for it, not overwrite
        got.append(ring.recv())
    out.put((reader, got))
    ring.close()


def test_every_reader_gets_every_message_in_order():
    msgs = _messages(40)
    readers = 2
    ring = ShmRing.create(SLOTS, SLOT_BYTES, readers, spin_s=0.0)
    ring.set_role(None)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_read, args=(ring.shm.name, readers, r, len(msgs), out)) for r in range(readers)]
    for p in procs:
        p.start()
    try:
        for m in msgs:
            ring.send(m)
        results = dict(out.get(timeout=30) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        ring.close()
        ring.unlink()
    assert ring.count > len(msgs)  # the large messages took several slots each
    for r in range(readers):
        assert results[r] == msgs


def _exit_at_once() -> None:
    os._exit(0)


def test_a_reader_whose_writer_died_raises():
    ring = ShmRing.create(SLOTS, SLOT_BYTES, 1, spin_s=0.0)
    ring.set_role(0)
    writer = mp.get_context("spawn").Process(target=_exit_at_once)
    writer.start()
    writer.join()
    ring.words[ring.pids_at] = writer.pid  # the writer was that process
    t = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="is gone"):
            ring.recv()
    finally:
        ring.close()
        ring.unlink()
    assert time.monotonic() - t < 10
