"""Does `moeserve serve`'s event loop slow the engine thread down (GIL contention)? Measured on the CPU, no GPU.

The real server (moeserve/server, AsyncLLMEngine, LLMEngine, scheduler, runner's input preparation, sampler,
detokenizer) runs a tiny random Qwen3-MoE checkpoint (tests/tiny_checkpoints.py) with a stand-in for the GPU:

  * the device is a timeline: each launched step occupies it for --gpu-ms after max(launch, previous step done);
    the host waits for a step's tokens (PendingSample.result) by sleeping until then, GIL released, as a CUDA
    event wait does. With async scheduling (the GPU default) the host's share of a step overlaps the device's.
    A step's device time is --gpu-ms plus --prefill-us per prompt token (beyond one token per request).
  * --forward stub (default): the model forward is replaced by rows of a preallocated hidden state (a CUDA graph
    replay or an asynchronous launch costs the host ~nothing); the runner's input preparation, the LM head and
    sampling are real. --forward eager runs the tiny model on the CPU on every step as well (more host work, and
    many GIL-releasing torch calls).

Each engine step is timed from the engine thread: cycle (step start to next step start), the device wait inside
it, the engine thread's CPU and run-queue time (/proc/self/task/<tid>/schedstat), the event-loop thread's CPU;
what is left of the host time (host - cpu - runq) is time the engine thread was runnable but did not run Python:
waiting for the GIL. Modes (same engine, same patches, same closed-loop load of N requests of --output-len):

  offline   the engine stepped in a loop in one thread (the LLM API), N requests kept in flight
  thread    AsyncLLMEngine (engine thread) + N asyncio consumers that read the streams and do nothing else
  server    build_server + uvicorn in a child process; N streaming chat clients (moeserve.bench.client) in this one

    python benchmarks/serve_overhead.py --modes offline,thread,server --n 1,8,32,64 --switch-interval-ms 5
    python benchmarks/serve_overhead.py --modes server --n 8,32,64 --switch-interval-ms 1

Prints one JSON line per (mode, N) and a table; --json-out writes them all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORDS = ("the quick brown fox jumps over lazy dog paris capital france experts route tokens blocks cache batch "
         "requests join leave every step hello world unicode text survives").split()


# ---------------------------------------------------------------------------------------------------------------
# the stand-in device and the per-step recorder (run inside the process that holds the engine)

def _schedstat(tid: int) -> tuple[int, int]:
    try:
        with open(f"/proc/self/task/{tid}/schedstat") as f:
            cpu, runq, _ = f.read().split()
        return int(cpu), int(runq)
    except OSError:
        return 0, 0


class Instrument:
    """Patches one LLMEngine instance (never the classes): device timeline, fake decode forward, step records."""

    def __init__(self, engine, gpu_ms: float, forward: str, loop_tid: int | None = None, prefill_us: float = 20.0):
        import torch

        self.engine = engine
        self.gpu_s = gpu_ms / 1e3
        self.prefill_s = prefill_us / 1e6  # device time per prompt token beyond one token per request
        self.free_at = 0.0          # when the device finishes the last launched step
        self.last_done = 0.0
        self.wait_planned = 0.0     # cumulative: time the host slept for the device
        self.wait_overrun = 0.0     # cumulative: time past the planned wake-up (timer slack + GIL re-acquire)
        self.idle = 0.0             # cumulative: device idle before a launch (host late)
        self.loop_tid = loop_tid
        self.eng_tid: int | None = None
        self.records: list[tuple] = []
        self.recording = False
        self._launch = (0, 0)       # (B, T) of the last launch

        executor, sampler, runner = engine.executor, engine.sampler, engine.runner
        real_execute, real_sample, real_eager = executor.execute, sampler.sample, runner._run_eager

        def execute(step, prev_tokens):
            out = real_execute(step, prev_tokens)
            now = time.perf_counter()
            if self.free_at and now > self.free_at:
                self.idle += now - self.free_at
            B, T = len(step.num_tokens), sum(step.num_tokens)
            start = max(now, self.free_at)
            self.free_at = self.last_done = start + self.gpu_s + (T - B) * self.prefill_s
            self._launch = (B, T)
            return out

        def sample(logits, reqs, eos_ids):
            pending = real_sample(logits, reqs, eos_ids)
            done, real_result = self.last_done, pending.result

            def result():
                dt = done - time.perf_counter()
                if dt > 0:
                    t = time.perf_counter()
                    time.sleep(dt)
                    self.wait_planned += dt
                    self.wait_overrun += time.perf_counter() - t - dt
                return real_result()
            pending.result = result
            return pending

        hidden_size = engine.hf_config.hidden_size
        buf = torch.randn(engine.max_num_batched_tokens + engine.config.max_num_seqs + 128, hidden_size,
                          dtype=engine.dtype)
        counter = [0]

        def run_eager(B, T):
            if forward == "stub":  # what a CUDA graph replay (or an async launch) costs the host: ~nothing
                counter[0] = (counter[0] + 1) % 128
                return buf[counter[0]: counter[0] + T]
            return real_eager(B, T)

        executor.execute, sampler.sample, runner._run_eager = execute, sample, run_eager
        real_step = engine.step

        def step():
            self.eng_tid = threading.get_native_id()  # offline: this thread; thread/server: the engine thread
            if self.recording:
                self._mark()
            return real_step()
        engine.step = step

    def _mark(self) -> None:
        cpu, runq = _schedstat(self.eng_tid)
        lcpu, lrunq = _schedstat(self.loop_tid) if self.loop_tid else (0, 0)
        self.records.append((time.perf_counter(), self.wait_planned, self.wait_overrun, self.idle, cpu, runq,
                             lcpu, lrunq, *self._launch))

    def start(self) -> None:
        self.records = []
        self.recording = True

    def stop(self) -> list[tuple]:
        self.recording = False
        records, self.records = self.records, []
        return records


def summarize(records: list[tuple], n: int, gpu_ms: float) -> dict:
    """Per cycle (step start to the next step's start): the B/T launched in it, wall, device wait, host = wall -
    wait, engine-thread CPU and run-queue time, GIL wait = host - cpu - runq, event-loop CPU."""
    cycles = []
    for a, b in zip(records, records[1:]):
        wall = b[0] - a[0]
        wait = b[1] - a[1]
        overrun = b[2] - a[2]
        idle = b[3] - a[3]
        cpu, runq = (b[4] - a[4]) / 1e9, (b[5] - a[5]) / 1e9
        lcpu = (b[6] - a[6]) / 1e9
        host = wall - wait
        # the B/T stored at a step's start is the launch before it: this cycle's launch is the next record's
        cycles.append(dict(B=b[8], T=b[9], wall=wall, wait=wait,
                           overrun=overrun, idle=idle, host=host, cpu=cpu, runq=runq, gil=host - cpu - runq,
                           loop_cpu=lcpu))
    span = records[-1][0] - records[0][0] if len(records) > 1 else 0.0
    steady = [c for c in cycles if c["B"] == n and c["T"] == n]

    def med(key, rows=steady):
        return statistics.median(c[key] for c in rows) * 1e3 if rows else float("nan")

    def pct(key, q, rows=steady):
        if not rows:
            return float("nan")
        xs = sorted(c[key] for c in rows)
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3

    def mean(key, rows=steady):
        return statistics.fmean(c[key] for c in rows) * 1e3 if rows else float("nan")

    return dict(
        n=n, gpu_ms=gpu_ms, steps=len(cycles), span_s=round(span, 2),
        steps_per_s=round(len(cycles) / span, 1) if span else 0.0,
        device_busy=round(1 - sum(c["idle"] for c in cycles) / span, 3) if span else 0.0,
        decode_steps=len(steady),
        wall_p50=round(med("wall"), 2), wall_p90=round(pct("wall", 0.9), 2), wall_mean=round(mean("wall"), 2),
        host_p50=round(med("host"), 2), host_p90=round(pct("host", 0.9), 2), host_p99=round(pct("host", 0.99), 2),
        host_mean=round(mean("host"), 2), gil_p90=round(pct("gil", 0.9), 2), gil_p99=round(pct("gil", 0.99), 2),
        cpu_mean=round(mean("cpu"), 2), runq_mean=round(mean("runq"), 2), gil_mean=round(mean("gil"), 2),
        overrun_mean=round(mean("overrun"), 3), idle_mean=round(mean("idle"), 2),
        loop_cpu_mean=round(mean("loop_cpu"), 2),
    )


# ---------------------------------------------------------------------------------------------------------------
# the engine

def build_engine(ckpt: str, async_scheduling: bool, max_model_len: int):
    import torch

    from moeserve.engine.engine import LLMEngine

    torch.set_num_threads(1)
    return LLMEngine.from_engine_args(model=ckpt, device="cpu", max_model_len=max_model_len,
                                      async_scheduling=async_scheduling, max_num_seqs=128,
                                      num_gpu_blocks_override=4096)


def messages(i: int, words: int) -> list[dict]:
    import random

    rng = random.Random(i)
    return [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(words))}]


def prompt_ids(tokenizer, i: int, words: int) -> list[int]:
    text = tokenizer.apply_chat_template(messages(i, words), tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def run_offline(args, engine, inst: Instrument, n: int) -> dict:
    """The LLM API's loop: step in this thread, N requests kept in flight (a finished one is replaced at once)."""
    from moeserve.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    counter = iter(range(10**9))

    def add():
        i = next(counter)
        engine.add_request(f"off-{n}-{i}", prompt_ids(engine.tokenizer, i, args.prompt_words), params)

    for _ in range(n):
        add()
    t_end_warm = time.perf_counter() + args.warmup_s
    recording = False
    while True:
        now = time.perf_counter()
        if not recording and now >= t_end_warm:
            inst.start()
            recording = True
        if recording and now >= t_end_warm + args.measure_s:
            break
        for out in engine.step():
            if out.finished:
                add()
    records = inst.stop()
    engine.abort_request(list(engine.parents))
    while engine.has_unfinished_requests():
        engine.step()
    return summarize(records, n, args.gpu_ms)


def run_thread(args, engine, inst: Instrument, n: int) -> dict:
    """AsyncLLMEngine's engine thread with N asyncio consumers that only read their streams: the hand-off, without
    HTTP, SSE or JSON."""
    from moeserve.engine.async_engine import AsyncLLMEngine
    from moeserve.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    aeng = AsyncLLMEngine(engine).start()
    inst.loop_tid = threading.get_native_id()

    async def consumer(k: int, stop: asyncio.Event):
        i = 0
        while not stop.is_set():
            ids = prompt_ids(engine.tokenizer, k * 100000 + i, args.prompt_words)
            async for _ in aeng.generate(ids, params, f"thr-{n}-{k}-{i}"):
                pass
            i += 1

    async def main():
        stop = asyncio.Event()
        tasks = [asyncio.create_task(consumer(k, stop)) for k in range(n)]
        await asyncio.sleep(args.warmup_s)
        inst.start()
        await asyncio.sleep(args.measure_s)
        records = inst.stop()
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return records

    try:
        records = asyncio.run(main())
        deadline = time.time() + 10
        while engine.has_unfinished_requests() and time.time() < deadline:
            time.sleep(0.05)
    finally:
        aeng.shutdown()
        inst.loop_tid = None
    return summarize(records, n, args.gpu_ms)


# ---------------------------------------------------------------------------------------------------------------
# the server child

def server_child(args) -> None:
    import uvicorn

    from moeserve.server.launch import build_server

    sys.setswitchinterval(args.switch_interval_ms / 1e3)
    engine = build_engine(args.ckpt, not args.sync, args.max_model_len)
    inst = Instrument(engine, args.gpu_ms, args.forward, loop_tid=threading.get_native_id(),
                      prefill_us=args.prefill_us)
    app, async_engine = build_server(engine, served_model_names=["tiny"])

    profiler = None
    if args.profile_loop:  # cProfile of the event-loop thread only (a profiler is per thread)
        import cProfile

        profiler = cProfile.Profile()

    async def bench_start():
        inst.start()
        if profiler is not None:
            profiler.enable()
        return {"ok": True}

    async def bench_stop():
        records = inst.stop()
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile_loop)
        return {"records": records, "running": async_engine.stats.num_running,
                "switch_interval": sys.getswitchinterval()}

    async def bench_idle():
        return {"idle": not engine.has_unfinished_requests()}

    app.add_api_route("/bench/start", bench_start, methods=["POST"])
    app.add_api_route("/bench/stop", bench_stop, methods=["POST"])
    app.add_api_route("/bench/idle", bench_idle, methods=["GET"])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning"))
    try:
        server.run()
    finally:
        async_engine.shutdown()


def run_server(args, ns: list[int]) -> list[dict]:
    import httpx

    from moeserve.bench.client import send_request
    from moeserve.server.process import free_port

    port = free_port()
    cmd = [sys.executable, __file__, "--child-server", "--ckpt", args.ckpt, "--port", str(port),
           "--gpu-ms", str(args.gpu_ms), "--prefill-us", str(args.prefill_us), "--forward", args.forward,
           "--max-model-len", str(args.max_model_len),
           "--switch-interval-ms", str(args.switch_interval_ms)] + (["--sync"] if args.sync else []) \
        + (["--profile-loop", args.profile_loop] if args.profile_loop else [])
    log = open(args.server_log, "a") if args.server_log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    base = f"http://127.0.0.1:{port}"
    if args.client_nice:  # the load generator yields its core to the server (a GPU host has cores to spare)
        os.nice(args.client_nice)
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.2)
        results = []
        for n in ns:
            results.append(asyncio.run(_drive(args, base, n, send_request)))
            t = time.time()
            while time.time() - t < 15 and not httpx.get(base + "/bench/idle", timeout=5).json()["idle"]:
                time.sleep(0.1)
        return results
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


async def _drive(args, base: str, n: int, send_request) -> dict:
    import httpx

    stop = asyncio.Event()
    itls: list[float] = []
    recording = [False]
    t_cpu0 = None

    async def client(k: int, http: httpx.AsyncClient):
        i = 0
        while not stop.is_set():
            body = {"model": "tiny", "messages": messages(k * 100000 + i, args.prompt_words),
                    "max_tokens": args.output_len, "temperature": 0, "stream": True, "ignore_eos": True,
                    "stream_options": {"include_usage": True}}
            r = await send_request(http, base + "/v1/chat/completions", body, {}, 0)
            if not r.success and not stop.is_set():
                raise RuntimeError(r.error)
            if recording[0]:
                itls.extend(r.itl)
            i += 1

    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        tasks = [asyncio.create_task(client(k, http)) for k in range(n)]
        await asyncio.sleep(args.warmup_s)
        await http.post(base + "/bench/start")
        recording[0] = True
        t_cpu0 = os.times()
        await asyncio.sleep(args.measure_s)
        reply = (await http.post(base + "/bench/stop")).json()
        t_cpu1 = os.times()
        recording[0] = False
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    out = summarize([tuple(r) for r in reply["records"]], n, args.gpu_ms)
    out["client_cpu"] = round((t_cpu1.user + t_cpu1.system - t_cpu0.user - t_cpu0.system) / args.measure_s, 2)
    out["client_itl_p50"] = round(statistics.median(itls) * 1e3, 2) if itls else float("nan")
    out["switch_interval_ms"] = reply["switch_interval"] * 1e3
    return out


# ---------------------------------------------------------------------------------------------------------------

def make_checkpoint(cache: Path, max_model_len: int) -> str:
    out = cache / f"qwen3moe-{max_model_len}"
    if not (out / "config.json").exists():
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_checkpoints import make_tiny_checkpoint

        make_tiny_checkpoint(out, "Qwen3MoeForCausalLM", max_position_embeddings=max_model_len)
    return str(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="offline,thread,server")
    p.add_argument("--n", default="1,8,32,64")
    p.add_argument("--gpu-ms", type=float, default=10.0, help="the stand-in device's time per step")
    p.add_argument("--forward", default="stub", choices=["stub", "eager"])
    p.add_argument("--prefill-us", type=float, default=20.0, help="device time per prompt token")
    p.add_argument("--sync", action="store_true", help="no async scheduling (the CPU default; GPUs default to on)")
    p.add_argument("--switch-interval-ms", type=float, default=5.0, help="sys.setswitchinterval in the server")
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--prompt-words", type=int, default=60)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--warmup-s", type=float, default=3.0)
    p.add_argument("--measure-s", type=float, default=6.0)
    p.add_argument("--client-nice", type=int, default=0,
                   help="nice the client process (this one) once the server child is started")
    p.add_argument("--profile-loop", help="server: write a cProfile of the event-loop thread (last N) here")
    p.add_argument("--json-out")
    p.add_argument("--server-log")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "moeserve-serve-overhead"))
    p.add_argument("--ckpt")
    p.add_argument("--port", type=int)
    p.add_argument("--child-server", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_server:
        server_child(args)
        return 0
    sys.path.insert(0, str(ROOT))
    args.ckpt = args.ckpt or make_checkpoint(Path(args.cache), args.max_model_len)
    ns = [int(x) for x in args.n.split(",")]
    print(f"# load average at start: {os.getloadavg()}  cores: {os.cpu_count()}  python {sys.version.split()[0]}",
          flush=True)
    rows = []
    modes = args.modes.split(",")
    if "offline" in modes or "thread" in modes:
        sys.setswitchinterval(args.switch_interval_ms / 1e3)
        engine = build_engine(args.ckpt, not args.sync, args.max_model_len)
        inst = Instrument(engine, args.gpu_ms, args.forward, prefill_us=args.prefill_us)
        for mode, fn in (("offline", run_offline), ("thread", run_thread)):
            if mode not in modes:
                continue
            for n in ns:
                row = {"mode": mode, "switch_interval_ms": args.switch_interval_ms, **fn(args, engine, inst, n)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    if "server" in modes:
        for row in run_server(args, ns):
            row = {"mode": "server", **row}
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"# load average at end: {os.getloadavg()}", flush=True)
    print(f"# gpu_ms={args.gpu_ms} forward={args.forward} sync={args.sync} client_nice={args.client_nice}")
    cols = ["mode", "switch_interval_ms", "n", "steps_per_s", "device_busy", "wall_p50", "wall_p90", "host_mean",
            "host_p90", "host_p99", "cpu_mean", "runq_mean", "gil_mean", "gil_p90", "idle_mean", "loop_cpu_mean",
            "client_cpu", "client_itl_p50"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "")) for c in cols))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
