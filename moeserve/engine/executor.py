"""How a step reaches the ranks. One interface, two implementations:

- InProcessExecutor: one rank, the runner in this process (one GPU, or the CPU). Nothing is added to its path.
- MultiprocExecutor: rank 0 in this process, the other ranks in processes of their own (one per GPU, spawned
  here or by torchrun, on this node or others). Each step message goes to them as plain data, posted without
  waiting for them (distributed/step_channel.py: shared memory on one node, gloo across nodes); after sampling, rank 0
  broadcasts the sampled tokens to its TP group (the next step's pending inputs under async scheduling). A rank that dies makes the engine fail loudly: its step raises, and if the engine is
  stuck in a collective the watchdog ends the process with exit code 1.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import torch

from moeserve.engine.step import StepInput
from moeserve.engine.worker import Worker

logger = logging.getLogger("moeserve")


class InProcessExecutor:
    def __init__(self, worker: Worker):
        self.worker = worker
        self.num_blocks = worker.available_kv_blocks()
        worker.initialize_cache(self.num_blocks)

    def execute(self, step: StepInput, prev_tokens: torch.Tensor | None) -> torch.Tensor:
        return self.worker.execute(step, prev_tokens)

    def share_sampled(self, tokens: torch.Tensor | None, num_rows: int) -> None:
        pass

    def shutdown(self) -> None:
        pass


class MultiprocExecutor:
    def __init__(self, config, info, device: torch.device, dtype: torch.dtype, source, spawn: bool = True):
        from moeserve.distributed import worker_main as wm
        from moeserve.distributed.launch import init_rank, spawn_workers
        from moeserve.distributed.parallel_state import get_tp_group
        from moeserve.distributed.step_channel import open_channel

        self.procs = spawn_workers(config, info, device.type) if spawn else []
        self.failed: str | None = None
        self._closed = False
        self._watchdog = threading.Thread(target=self._watch, name="moeserve-rank-watchdog", daemon=True)
        self._watchdog.start()
        control = init_rank(info, config.parallel_layout(), device)
        torch.manual_seed(config.seed)
        self.worker = Worker(config, device, dtype, source)
        self.num_blocks = wm.agree_num_blocks(self.worker.available_kv_blocks(), control)
        self.worker.initialize_cache(self.num_blocks)
        self.tp = get_tp_group()
        self.channel = open_channel(control, 0, info.nnodes == 1, False, wm.spin_seconds(device))
        self._wm = wm

    def execute(self, step: StepInput, prev_tokens: torch.Tensor | None) -> torch.Tensor:
        if self.failed:
            raise RuntimeError(self.failed)
        self.channel.publish(step)
        return self.worker.execute(step, prev_tokens)

    def execute_data_parallel(self, steps: list[StepInput], prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """DP: one message with every DP rank's step; returns DP rank 0's logits (its leader is this process;
        None under PP, where DP rank 0's last stage samples). prev_tokens: DP rank 0's last draws (async)."""
        if self.failed:
            raise RuntimeError(self.failed)
        self.channel.publish(steps)
        return self.worker.execute(steps[0], prev_tokens)

    def flush_samples(self) -> None:
        """DP under async scheduling, when no step follows the last: the empty message tells the leaders to send
        the draws they kept."""
        if self.failed:
            raise RuntimeError(self.failed)
        self.channel.publish([])

    def collect_samples(self, steps: list[StepInput]) -> list:
        """The sampled tokens of DP ranks 1.., from their leaders (None for a rank that sampled nothing)."""
        return [self.channel.reply_from(d * self.tp.size) if step.sample_rows else None
                for d, step in enumerate(steps[1:], start=1)]

    def collect_last_stage(self, dp_rank: int = 0) -> object:
        """Pipeline parallelism: the step's SampleResult, from the leader (TP rank 0) of DP rank dp_rank's last
        stage (global rank (dp * pp + pp - 1) * tp)."""
        pp = self.worker.config.pipeline_parallel_size
        return self.channel.reply_from((dp_rank * pp + pp - 1) * self.tp.size)

    def share_sampled(self, tokens: torch.Tensor | None, num_rows: int) -> None:
        """Give the step's sampled tokens (num_rows of them, padded when some requests failed) to the TP group."""
        if num_rows == 0 or self.tp.size == 1:
            return
        if tokens is None or tokens.numel() != num_rows:
            full = torch.zeros(num_rows, dtype=torch.int64, device=self.worker.device)
            if tokens is not None:
                full[: tokens.numel()] = tokens
            tokens = full
        self.tp.broadcast(tokens, src=0)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if not self.failed:
                self.channel.publish(None)
                self.channel.flush()
        except Exception:
            pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        self.channel.close()
        self._wm.release_process_groups()

    def _watch(self) -> None:
        """A rank that exits while the engine runs is fatal: say so, and if the engine does not fail on its own
        within a few seconds (blocked in a collective that will never complete), exit with code 1."""
        while not self._closed:
            for p in self.procs:
                if not p.is_alive() and not self._closed:
                    self.failed = f"rank process {p.name} died (exit code {p.exitcode})"
                    logger.error("moeserve: %s; the engine cannot go on", self.failed)
                    time.sleep(5.0)
                    if not self._closed:
                        logger.error("moeserve: exiting (code 1) after a rank died")
                        for q in self.procs:
                            if q.is_alive():
                                q.kill()
                        os._exit(1)
                    return
            time.sleep(0.5)
