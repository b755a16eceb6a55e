"""The device side of ``python -m bench latency``: a process of its own, so it can be CPU-limited.

    python -m bench.device_worker --url http://127.0.0.1:PROXY --model efficientnet_lite0 --crops 15
    python -m bench.device_worker --url ... --runtime torch        # the eager PyTorch device
    python -m bench.device_worker --url ... --precision int8 --bundle DIR

It runs the runtime the device CLI defaults to: ONNX Runtime fp32 on the service's bundle,
fetched from ``--bundle-url`` (default ``--url``) into the cache, or ``--bundle DIR``; with
``--runtime torch``, eager PyTorch (``device_client.runtimes.open_runtime`` either way).
It talks JSON lines: commands on stdin, events on stdout (anything else goes to stderr). It loads
the runtime, the images and every head at full speed, says ``loaded`` and waits: the
benchmark then moves it into the CPU-limited cgroup before asking for anything it times.
``loaded`` and ``profile`` carry ``runtime``, ``precision`` and ``threads``; their
``torch_threads`` key, kept for older readers, is the same thread count.

    -> {"cmd": "profile"}                       <- {"event": "profile", "costs": [...], ...}
    -> {"cmd": "run", "split": "auto", "images": [0, 1], "warmup": [4, 3], "fresh": true}
                                                <- {"event": "result", ...}   one per image
                                                <- {"event": "done", "plan": {...}}
    -> {"cmd": "quit"}                          <- {"event": "bye"}

Every candidate goes through the real device client: ``Device`` over a ``ServiceClient``, and for
``auto`` an ``AutoSplit`` fed with the profile measured here, under the limit. Fixed candidates
use a ``Device`` without ``auto``, so ``auto``'s link estimator learns from its own traffic only.
``WorkerHandle`` is the benchmark's end of the pipe.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from functools import partial
from typing import Any

from shared.errors import SplitServeError

__all__ = ["WorkerError", "WorkerHandle", "main"]


class WorkerError(SplitServeError):
    """The device worker failed or said something that isn't the protocol."""


class WorkerHandle:
    """The benchmark's side: spawn the worker, send commands, read its events."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def spawn(cls, args: Sequence[str], *, env: dict[str, str]) -> WorkerHandle:
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            limit=2**24,
        )
        return cls(proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def event(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await self.proc.stdout.readline()
        if not line:
            code = await self.proc.wait()
            raise WorkerError(f"the device worker exited with code {code} (its stderr is above)")
        msg: dict[str, Any] = json.loads(line)
        if msg.get("event") == "error":
            raise WorkerError(f"device worker: {msg.get('message')}")
        return msg

    async def send(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await self.proc.stdin.drain()

    async def call(self, cmd: dict[str, Any]) -> dict[str, Any]:
        await self.send(cmd)
        return await self.event()

    async def run(
        self,
        split: str,
        images: Sequence[int],
        *,
        warmup: Sequence[int] = (),
        fresh: bool = False,
        on_result: Callable[[dict[str, Any]], None] | None = None,
    ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """Run ``split`` on ``warmup`` untimed, then on ``images`` (indices into the worker's
        images); returns the results and, for ``auto``, the planner's last table. The worker
        keeps one ``Device`` per candidate; ``fresh`` starts ``auto`` over (a new estimator)."""
        cmd = {"cmd": "run", "split": split, "images": list(images), "warmup": list(warmup)}
        await self.send({**cmd, "fresh": fresh})
        results: list[dict[str, Any]] = []
        while True:
            msg = await self.event()
            if msg["event"] == "done":
                return results, msg.get("plan")
            if msg["event"] != "result":
                raise WorkerError(f"unexpected event from the device worker: {msg}")
            results.append(msg)
            if on_result is not None:
                on_result(msg)

    async def close(self, timeout_s: float = 10.0) -> int:
        if self.proc.returncode is None:
            try:
                await self.call({"cmd": "quit"})
            except (WorkerError, OSError, ValueError):
                pass
            try:
                await asyncio.wait_for(self.proc.wait(), timeout_s)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        return self.proc.returncode if self.proc.returncode is not None else -1


# --- the worker process ---------------------------------------------------------------------


def _emit(msg: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


class _Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        from bench.images import evaluation_images
        from device_client.options import EncodeOptions
        from shared.preprocess import center_crop, reference_photo

        self.args = args
        self.runtime: Any = asyncio.run(_open_runtime(args))
        # Every head built and run once now, at full speed, not in timings: graph surgery for
        # torch, an ONNX Runtime session per head file for onnx.
        x = self.runtime.prepare(center_crop(reference_photo(), self.runtime.preprocessing))
        for point in self.runtime.points:
            self.runtime.run_head(point, x)
        self.images = evaluation_images(args.crops)
        # Everything loaded so far lives as long as the process: out of the collector's sight.
        # A full collection walks every live object (for torch ~320k: the fx graphs of every
        # head and tail), 100 ms of CPU, ~0.5 s at 20 % of a core, on whichever request it
        # happens to land.
        gc.collect()
        gc.freeze()
        self.options = EncodeOptions()
        self.profile: Any = None
        self.devices: dict[str, Any] = {}  # one Device per candidate, kept across `run`s

    def describe(self) -> dict[str, Any]:
        """What runs: in ``loaded`` and ``profile`` (``torch_threads``: the pre-onnx key)."""
        rt = self.runtime
        return {"runtime": rt.kind, "precision": rt.precision, "threads": rt.threads,
                "torch_threads": rt.threads}

    def loaded(self) -> dict[str, Any]:
        return {
            "event": "loaded",
            "pid": os.getpid(),
            "points": [p.name for p in self.runtime.points],
            "images": [name for name, _ in self.images],
            **self.describe(),
        }

    def measure_profile(self) -> dict[str, Any]:
        from bench.cpulimit import cgroup_of
        from device_client.profile import load_or_measure

        started, cpu0 = time.perf_counter(), time.process_time()
        self.profile, path, _ = load_or_measure(
            self.runtime,
            options=self.options,
            jpeg_quality=self.args.jpeg_quality,
            repeats=self.args.repeats,
            force=True,  # once per run, under this run's limit: never a cached profile
        )
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu0
        return {
            "event": "profile",
            "costs": [asdict(c) for c in self.profile.costs],
            "path": str(path),
            "elapsed_s": round(wall, 2),
            "cpu_share": round(cpu / wall, 3),  # ~the quota if the limit holds
            "cgroup": cgroup_of(os.getpid()),
            "affinity": sorted(os.sched_getaffinity(0)),
            **self.describe(),
        }

    async def run(self, client: Any, cmd: dict[str, Any]) -> None:
        from device_client.auto import AutoSplit
        from device_client.pipeline import AUTO, Device
        from device_client.profile import measure_candidate

        split = cmd["split"]
        device = self.devices.get(split)
        if device is None or (split == AUTO and cmd.get("fresh", False)):
            # As the CLI builds it: a candidate its runs contradict is measured again.
            remeasure = partial(measure_candidate, self.runtime, options=self.options,
                                jpeg_quality=self.args.jpeg_quality)
            auto = (AutoSplit(client, self.profile, remeasure=remeasure) if split == AUTO
                    else None)
            device = Device(
                self.runtime,
                client,
                options=self.options,
                auto=auto,
                jpeg_quality=self.args.jpeg_quality,
            )
            self.devices[split] = device
        auto = device.auto
        indices, warm = list(cmd["images"]), list(cmd.get("warmup", ()))
        for n, i in enumerate([*warm, *indices]):
            name, image = self.images[i]
            wall0, cpu0 = time.perf_counter(), time.process_time()
            result = await device.infer(image, split=split, name=name)
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            # What auto planned with, read after the run: nothing extra on the CPU before it.
            link = auto.last_link if auto is not None else None
            if auto is not None:
                # A photo every few seconds leaves auto's background work (a metadata
                # refetch) the idle time between photos; back to back, it would share the CPU
                # with the next candidate's run instead.
                await auto.settle()
            if n < len(warm):
                continue
            doc = result.to_json()
            del doc["top5"]
            _emit(
                {
                    "event": "result",
                    **doc,
                    "top1": result.top5[0].index,
                    "wall_ms": round(wall * 1e3, 3),  # + planning and probing, for `auto`
                    "cpu_ms": round(cpu * 1e3, 3),
                    "link": None
                    if link is None
                    else {
                        "uplink_bps": link.uplink_bps,
                        "rtt_ms": link.rtt_ms,
                        "source": link.source,
                    },
                    "t": time.time(),
                }
            )
        plan = auto.last_plan.to_json() if auto is not None and auto.last_plan else None
        done: dict[str, Any] = {"event": "done", "plan": plan}
        if auto is not None:
            done["remeasured"] = list(auto.remeasured)
        _emit(done)


async def _open_runtime(args: argparse.Namespace) -> Any:
    from device_client.client import ServiceClient
    from device_client.runtimes import open_runtime

    # What the runtimes read for their thread count (device_client.runtimes.threads).
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.runtime == "torch":
        import torch

        torch.set_num_threads(args.threads)
    if args.runtime == "onnx" and args.bundle is None:
        async with ServiceClient(args.bundle_url or args.url, timeout_s=args.timeout) as client:
            return await open_runtime("onnx", args.model, precision=args.precision,
                                      client=client)
    return await open_runtime(args.runtime, args.model, precision=args.precision,
                              bundle=args.bundle)


async def _serve(worker: _Worker) -> None:
    from device_client.client import ServiceClient

    loop = asyncio.get_running_loop()
    async with ServiceClient(worker.args.url, timeout_s=worker.args.timeout) as client:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            cmd = json.loads(line)
            try:
                if cmd["cmd"] == "quit":
                    _emit({"event": "bye"})
                    return
                if cmd["cmd"] == "profile":
                    _emit(worker.measure_profile())
                elif cmd["cmd"] == "run":
                    await worker.run(client, cmd)
                else:
                    _emit({"event": "error", "message": f"unknown command {cmd['cmd']!r}"})
            except Exception as exc:  # reported to the benchmark, which stops with it
                _emit({"event": "error", "message": f"{type(exc).__name__}: {exc}"})


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.device_worker")
    p.add_argument("--url", required=True, help="the service (through the link emulation)")
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--crops", type=int, default=15, help="augmented crops besides the 5 photos")
    p.add_argument("--runtime", choices=["onnx", "torch"], default="onnx",
                   help="onnx (default, as the device CLI): the bundle on ONNX Runtime; torch: "
                        "eager PyTorch")
    p.add_argument("--precision", choices=["fp32", "int8"], default="fp32",
                   help="the heads' precision (int8: onnx, with a --bundle exported --int8)")
    p.add_argument("--bundle", default=None, metavar="DIR",
                   help="a local bundle for --runtime onnx (default: fetch the service's)")
    p.add_argument("--bundle-url", default=None, metavar="URL",
                   help="where to fetch the service's bundle (default --url; the benchmark "
                        "passes the service itself, so the download skips the emulated link)")
    p.add_argument("--threads", type=int, default=1, help="the runtime's intra-op threads")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per candidate, profiling")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--timeout", type=float, default=60.0, help="per-request deadline, seconds")
    args = p.parse_args(argv)
    try:
        worker = _Worker(args)
    except SplitServeError as exc:  # a bad runtime, bundle or service: one line, both ways
        _emit({"event": "error", "message": str(exc)})
        print(f"device_worker: error: {exc}", file=sys.stderr)
        return 1
    _emit(worker.loaded())
    asyncio.run(_serve(worker))
    return 0


if __name__ == "__main__":
    sys.exit(main())
