"""How step messages travel: from rank 0 to every other rank, and from a sampling leader (a DP rank's, or the last
pipeline stage's) back to rank 0.

On one node they go through rings in shared memory. Rank 0 pickles a message into the next slot of a ring in
/dev/shm and publishes it by storing the slot's sequence number; each reader polls that number, copies the bytes,
and stores its acknowledgement; the writer reuses a slot once every reader acknowledged it, so it runs ahead of
its readers by up to a ring's length without waiting (8 MB of unread messages; then it waits, where gloo's
posted sends had no bound). A message larger than a slot fills consecutive slots. Each leader has a small ring of
its own towards rank 0 (1 MB: a step's tokens and log-probs take kilobytes, and rank 0 reads them every step).

Why not the gloo control group, as before: a step message there was `broadcast_object_list` (pickle, then two TCP
collectives), and at TP=2 batch 1 rank 0's host spent longer per step than its GPU (qwen3-30b-a3b, 12 layers on
2xH200: TPOT 1.69 ms against 1.02 on one GPU, the GPU busy 41 % of the step; benchmarks/kernels/NOTES.md).
Ranks on several nodes still use the control group (isend/recv of the pickled bytes), as does any node where
/dev/shm cannot hold the rings.

A reader that waits polls without sleeping for `spin_s` (CUDA: a step's length; CPU: none, so that waiting
processes leave the cores to the ones computing), then sleeps 0.2-1 ms between polls; every second it checks that
the writer's process is still there, so a dead peer ends the wait with an error instead of a hang. Stores are
ordered by a lock round-trip (a full barrier on every CPU; x86 needs none).
"""

from __future__ import annotations

import os
import pickle
import threading
import time
from multiprocessing import resource_tracker, shared_memory

import torch
import torch.distributed as dist

STEP_RING = (8, 1 << 20)  # slots, bytes a slot: rank 0 -> every other rank
REPLY_RING = (4, 256 << 10)  # a leader -> rank 0
_MORE = -1  # nbytes of a full slot whose message goes on in the next one
_barrier_lock = threading.Lock()


def _fence() -> None:
    with _barrier_lock:
        pass


class ShmRing:
    """One writer, `readers` readers, `slots` slots of `slot_bytes` in one shared-memory segment. Header (int64
    words): seq[slots], nbytes[slots], acks[slots][readers], pids[1 + readers] (the writer's, then each reader's).
    Memoryviews, not numpy arrays, look into it: a released view raises where an array over an unmapped segment
    would crash the process."""

    def __init__(self, shm: shared_memory.SharedMemory, slots: int, slot_bytes: int, readers: int, spin_s: float):
        self.shm, self.slots, self.slot_bytes, self.readers, self.spin_s = shm, slots, slot_bytes, readers, spin_s
        header = self.header_bytes(slots, readers)
        self.words = shm.buf[:header].cast("q")
        self.payload = shm.buf[header:header + slots * slot_bytes]
        self.acks_at = 2 * slots
        self.pids_at = 2 * slots + slots * readers
        self.count = 0
        self.reader: int | None = None

    @staticmethod
    def header_bytes(slots: int, readers: int) -> int:
        return -(-8 * (2 * slots + slots * readers + 1 + readers) // 64) * 64

    @classmethod
    def create(cls, slots: int, slot_bytes: int, readers: int, spin_s: float) -> "ShmRing":
        size = cls.header_bytes(slots, readers) + slots * slot_bytes
        ring = cls(shared_memory.SharedMemory(create=True, size=size), slots, slot_bytes, readers, spin_s)
        for k in range(len(ring.words)):
            ring.words[k] = 0
        return ring

    @classmethod
    def attach(cls, name: str, slots: int, slot_bytes: int, readers: int, spin_s: float) -> "ShmRing":
        return cls(_untracked(name), slots, slot_bytes, readers, spin_s)

    def set_role(self, reader: int | None) -> None:
        """Say who this process is (None: the writer), so that its peers can see it is alive."""
        self.reader = reader
        self.words[self.pids_at + (0 if reader is None else 1 + reader)] = os.getpid()

    def pid(self, k: int) -> int:
        """The writer's pid (k = 0) or reader k - 1's; 0 before it said who it is."""
        return self.words[self.pids_at + k]

    def send(self, data: bytes) -> None:
        w, view, off = self.words, memoryview(data), 0
        while True:
            chunk = view[off:off + self.slot_bytes]
            off += len(chunk)
            i, seq = self.count % self.slots, self.count + 1
            if seq > self.slots:  # the slot's last message must have been read by every reader
                acks = range(self.acks_at + i * self.readers, self.acks_at + (i + 1) * self.readers)
                self._wait(lambda: min(w[k] for k in acks) >= seq - self.slots, range(1, 1 + self.readers))
                _fence()
            start = i * self.slot_bytes
            self.payload[start:start + len(chunk)] = chunk
            w[self.slots + i] = len(chunk) if off >= len(data) else _MORE
            _fence()
            w[i] = seq
            self.count += 1
            if off >= len(data):
                return

    def recv(self) -> bytes:
        w, parts = self.words, []
        while True:
            i, seq = self.count % self.slots, self.count + 1
            self._wait(lambda: w[i] == seq, (0,))
            _fence()
            n = w[self.slots + i]
            start = i * self.slot_bytes
            parts.append(bytes(self.payload[start:start + (self.slot_bytes if n == _MORE else n)]))
            _fence()
            w[self.acks_at + i * self.readers + self.reader] = seq
            self.count += 1
            if n != _MORE:
                return parts[0] if len(parts) == 1 else b"".join(parts)

    def _wait(self, ready, peers) -> None:
        """Until ready(); peers: the pid slots of the processes that make it so."""
        if ready():
            return
        start = time.monotonic()
        check = start + 1.0
        while not ready():
            now = time.monotonic()
            if now - start < self.spin_s:
                os.sched_yield()
            else:
                time.sleep(0.0002 if now - start < 0.1 else 0.001)
            if now >= check:
                check = now + 1.0
                for pid in (self.pid(k) for k in peers):
                    if pid > 0 and not _alive(pid):
                        raise RuntimeError(f"moeserve: the rank process {pid} is gone (step channel)")

    def unlink(self) -> None:
        self.shm.unlink()

    def close(self) -> None:
        try:
            self.words.release()
            self.payload.release()
            self.shm.close()
        except BufferError:  # a view of it is still held somewhere: the mapping goes with the process
            pass


def _untracked(name: str) -> shared_memory.SharedMemory:
    """Map an existing segment without registering it with this process's resource tracker: the creator unlinks
    it, and a tracker (shared with the creator by spawned processes) must not unlink or forget it at exit."""
    try:
        return shared_memory.SharedMemory(name=name, track=False)  # Python >= 3.13
    except TypeError:
        pass
    register = resource_tracker.register
    resource_tracker.register = lambda *args, **kwargs: None
    try:
        return shared_memory.SharedMemory(name=name)
    finally:
        resource_tracker.register = register


def _alive(pid: int) -> bool:
    """Whether the process runs (an exited child not yet reaped by its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc here: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


class StepChannel:
    """The control path of one engine's ranks (see the module's docstring). Rank 0 `publish`es, the others
    `receive`; a leader `reply`s, rank 0 takes it with `reply_from(rank)`. Over gloo when `rings` is None."""

    def __init__(self, control, rank: int, steps: ShmRing | None, replies: dict[int, ShmRing] | None):
        self.control, self.rank = control, rank
        self.steps, self.replies = steps, replies
        self.world = dist.get_world_size(control)
        self.sending = None
        if steps is None:
            from moeserve.distributed.parallel_state import PendingSends

            self.sending = PendingSends()

    def publish(self, message) -> None:
        """Rank 0: the next message to every other rank, without waiting for them (they may be busy with the
        micro-batches before it, under pipeline parallelism)."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        if self.steps is not None:
            self.steps.send(data)
            return
        for r in range(1, self.world):
            self._post(data, r)

    def receive(self):
        if self.steps is not None:
            return pickle.loads(self.steps.recv())
        return pickle.loads(self._take(0))

    def reply(self, message) -> None:
        """A leader: its sampled tokens (or any result) to rank 0."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        if self.replies is not None:
            self.replies[self.rank].send(data)
        else:
            self._post(data, 0)

    def reply_from(self, rank: int):
        if self.replies is not None:
            return pickle.loads(self.replies[rank].recv())
        return pickle.loads(self._take(rank))

    def flush(self) -> None:
        """Wait until the messages posted over gloo have left (before shutting down)."""
        if self.sending is not None:
            self.sending.wait()

    def close(self) -> None:
        for ring in [self.steps, *(self.replies or {}).values()]:
            if ring is not None:
                ring.close()

    def _post(self, data: bytes, dst: int) -> None:
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        size = torch.tensor([payload.numel()], dtype=torch.int64)
        for t in (size, payload):
            self.sending.add(dist.isend(t, dst=dst, group=self.control), t)

    def _take(self, src: int) -> bytes:
        size = torch.empty(1, dtype=torch.int64)
        dist.recv(size, src=src, group=self.control)
        payload = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.recv(payload, src=src, group=self.control)
        return payload.numpy().tobytes()


def open_channel(control, rank: int, one_node: bool, replies: bool, spin_s: float) -> StepChannel:
    """Collective over the control group: rank 0 makes the rings (when every rank is on its node and /dev/shm has
    room), the others attach to them. `replies`: this rank sends results to rank 0 (a sampling leader)."""
    world = dist.get_world_size(control)
    repliers = [None] * world
    dist.all_gather_object(repliers, bool(replies), group=control)
    leaders = [r for r, yes in enumerate(repliers) if yes and r != 0]
    box = [None]
    rings: list[ShmRing] = []
    if rank == 0 and one_node:
        try:
            rings.append(ShmRing.create(*STEP_RING, readers=world - 1, spin_s=spin_s))
            rings += [ShmRing.create(*REPLY_RING, readers=1, spin_s=spin_s) for _ in leaders]
            box[0] = [ring.shm.name for ring in rings]
        except OSError as e:
            import logging

            logging.getLogger("moeserve").warning("moeserve: no shared-memory step channel (%s); gloo carries "
                                                  "the step messages", e)
            for ring in rings:
                ring.close()
                ring.unlink()
            rings = []
    dist.broadcast_object_list(box, src=0, group=control)
    names = box[0]
    if names is None:
        return StepChannel(control, rank, None, None)
    if rank == 0:
        steps, reply_rings = rings[0], dict(zip(leaders, rings[1:]))
        steps.set_role(None)
        for ring in reply_rings.values():
            ring.set_role(0)
    else:  # the step ring, and a leader its own reply ring
        steps = ShmRing.attach(names[0], *STEP_RING, readers=world - 1, spin_s=spin_s)
        steps.set_role(rank - 1)
        reply_rings = {}
        if rank in leaders:
            reply_rings[rank] = ShmRing.attach(names[1 + leaders.index(rank)], *REPLY_RING, readers=1, spin_s=spin_s)
            reply_rings[rank].set_role(None)
    dist.barrier(group=control)  # every process mapped the rings: the names can go
    if rank == 0:
        for ring in rings:
            ring.unlink()
    return StepChannel(control, rank, steps, reply_rings)
