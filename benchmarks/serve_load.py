"""Load on a real `pvl-search serve` process: one client against 16 concurrent clients.

For each model size in `--configs` (random weights of the `tiny` and `base` presets: the cost
does not depend on the weights) the script makes short clips, indexes them with
`pvl-search index`, starts `pvl-search serve --port 0` on 127.0.0.1 and drives it over HTTP,
one keep-alive connection per client thread, with the standard library's `http.client`
(`--client stdlib`, the default: under 1 ms of CPU a request) or httpx (`--client httpx`, the
client of the issue's first numbers: 2-4 ms of CPU a request, taken from the same 2 cores the
server runs on):

- single client: one request at a time, back to back: p50 latency and throughput;
- 16 clients: each sends its next request when the previous one is answered (closed loop):
  throughput and p50/p95 latency.

Every request has its own query text (a counter in it), so the server's query cache never
answers one, and the default settings (k 10, mixed rerank of the top 50). The two phases
alternate `--rounds` times in the same server process (so load drifts hit both alike) after
an unmeasured warm-up of both kinds (the first batch of each size also checks that batching
is exact there: indexer/encoding.py). Latency is client-side wall time per request.

Goals (issue 15), per config: 16-client throughput >= 3x the single client's, and 16-client
p95 <= 3x the single-client p50. Bounded: every phase stops after `--requests` requests or
`--phase-seconds`, whichever comes first, and the whole run after `--max-seconds`.

    python benchmarks/serve_load.py [--configs tiny,base] [--requests 200] [--rounds 3]
        [--clients 16] [--videos 40] [--dtype auto] [--batch-window-ms 5] [--max-batch 16] [--workers 1]
        [--client stdlib|httpx] [--json out.json] [--smoke]

`--smoke`: a few requests and videos per phase, to check the script runs (numbers meaningless).
"""

from __future__ import annotations

import argparse
import functools
import http.client
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

COLOURS = ["red", "green", "blue", "yellow", "white", "purple"]
SHAPES = ["circle", "square", "triangle", "star"]
MOTIONS = ["moves left", "moves right", "grows", "shrinks", "spins", "stays still"]


def query_text(i: int) -> str:
    """A query no earlier request used (the server's query cache must not answer it)."""
    return (f"a {COLOURS[i % 6]} {SHAPES[i // 6 % 4]} {MOTIONS[i // 24 % 6]} then a "
            f"{COLOURS[(i + 3) % 6]} one, take {i}")


def pvl_search() -> str:
    found = shutil.which("pvl-search")
    if not found:
        sys.exit("pvl-search is not installed: pip install -e .")
    return found


def make_corpus(root: Path, config: str, videos: int, dtype: str) -> tuple[Path, Path]:
    """(model folder, index folder): a random-weight `config` model and an index of short clips."""
    import torch

    from pvl_search.media.sample_files import write_video
    from pvl_search.model.checkpoint import save_model
    from pvl_search.model.config import preset
    from pvl_search.model.perceiver import PerceiverVL

    torch.manual_seed(0)
    model_dir = save_model(PerceiverVL(preset(config)), root / f"model-{config}")
    clips = root / "clips"
    if not clips.exists():
        clips.mkdir()
        rng = np.random.default_rng(0)
        for i in range(videos):
            colour = rng.integers(0, 256, 3).astype(np.uint8)
            write_video(clips / f"clip{i:03d}.mp4", width=96, height=96, fps=8, seconds=2.0,
                        frame_fn=lambda j, w, h, c=colour: np.roll(np.broadcast_to(c, (h, w, 3)) *
                                                                   (np.arange(w)[None, :, None] % 16 < 8), j, 1))
    index = root / f"index-{config}"
    subprocess.run([pvl_search(), "index", str(clips), "--index", str(index), "--model", str(model_dir),
                    "--dtype", dtype, "--json", "--no-thumbnails"], check=True, stdout=subprocess.DEVNULL)
    return model_dir, index


class Server:
    """`pvl-search serve` on a free port of 127.0.0.1, stopped (SIGTERM) on exit."""

    def __init__(self, index: Path, model_dir: Path, args: argparse.Namespace, log: Path) -> None:
        self.command = [pvl_search(), "serve", "--index", str(index), "--model", str(model_dir), "--port", "0",
                        "--dtype", args.dtype, "--batch-window-ms", str(args.batch_window_ms),
                        "--max-batch", str(args.max_batch), "--workers", str(args.workers)]
        self.log_path = log
        self.url = ""

    def __enter__(self) -> Server:
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 600
        while not self.url:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                sys.exit(f"the server did not start:\n{self.log_path.read_text()}")
            found = re.search(r"serving on (http://\S+)", self.log_path.read_text())
            self.url = found.group(1) if found else ""
            time.sleep(0.1)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by process `pid` and every live descendant
    (the server and its workers), from /proc; 0 where /proc cannot tell."""
    stats: dict[int, tuple[int, float]] = {}  # pid -> (parent pid, cpu seconds)
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    tree, frontier = set(), {pid}
    while frontier:
        tree |= frontier
        frontier = {child for child, (parent, _) in stats.items() if parent in frontier} - tree
    return sum(stats[p][1] for p in tree if p in stats)


class StdlibClient:
    """One kept-alive connection through `http.client`: the lightest client the standard library
    has, so the load generator takes as little as it can of the cores the server runs on."""

    def __init__(self, base_url: str) -> None:
        parts = urllib.parse.urlsplit(base_url)
        self.connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)

    def get(self, path: str, params: dict[str, str]) -> tuple[int, bytes]:
        self.connection.request("GET", f"{path}?{urllib.parse.urlencode(params)}")
        response = self.connection.getresponse()
        return response.status, response.read()

    def close(self) -> None:
        self.connection.close()


class HttpxClient:
    def __init__(self, base_url: str) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=600)

    def get(self, path: str, params: dict[str, str]) -> tuple[int, bytes]:
        response = self.http.get(path, params=params)
        return response.status_code, response.content

    def close(self) -> None:
        self.http.close()


CLIENTS = {"stdlib": StdlibClient, "httpx": HttpxClient}


def run_phase(url: str, clients: int, requests: int, seconds: float, counter: itertools.count, *,
              server_pid: int, client_kind: str) -> dict:
    """`clients` closed-loop clients until `requests` are answered or `seconds` pass, and the CPU
    seconds the server's processes and this one (the clients) spent meanwhile."""
    lock = threading.Lock()
    latencies: list[float] = []
    bodies: list[bytes] = []  # parsed after the phase, outside the timed loop
    errors = [0]
    left = [requests]
    stop_at = time.monotonic() + seconds

    def client() -> None:
        http = CLIENTS[client_kind](url)
        try:
            while True:
                with lock:
                    if left[0] <= 0 or time.monotonic() > stop_at:
                        return
                    left[0] -= 1
                    i = next(counter)
                began = time.perf_counter()
                status, body = http.get("/search", {"q": query_text(i)})
                took = time.perf_counter() - began
                with lock:
                    if status != 200:
                        errors[0] += 1
                        continue
                    latencies.append(took)
                    bodies.append(body)
        finally:
            http.close()

    server_cpu = tree_cpu_seconds(server_pid)
    client_cpu = time.process_time()
    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    elapsed = time.perf_counter() - began
    return {"clients": clients, "done": len(latencies), "errors": errors[0], "seconds": elapsed,
            "latencies_s": latencies, "server_ms": [json.loads(body)["timings_ms"] for body in bodies],
            "server_cpu_s": tree_cpu_seconds(server_pid) - server_cpu,
            "client_cpu_s": time.process_time() - client_cpu}


def in_process_p50_ms(index: Path, model_dir: Path, dtype: str, n: int, counter: itertools.count) -> float:
    """The same search in this process (`Searcher.search`, the server idle meanwhile): the
    median wall time of `n` fresh queries after a few unmeasured ones."""
    from indexer.search.searcher import Searcher

    with Searcher(index, model_dir=model_dir, dtype=dtype) as searcher:
        times = []
        for _ in range(n + 5):
            began = time.perf_counter()
            searcher.search(query_text(next(counter)))
            times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times[5:])


STAGES = ("encode", "retrieve", "rerank", "lookup", "moments", "total")


def summarise(phases: list[dict]) -> dict:
    latencies = [t for p in phases for t in p["latencies_s"]]
    done, seconds = sum(p["done"] for p in phases), sum(p["seconds"] for p in phases)
    encode = [m["encode"] for p in phases for m in p["server_ms"]]
    p50, p95 = (np.percentile(latencies, [50, 95]).tolist() if latencies else [float("nan")] * 2)
    cpu_ms = {side: 1000 * sum(p[f"{side}_cpu_s"] for p in phases) / done if done else float("nan")
              for side in ("server", "client")}
    return {"requests": done, "errors": sum(p["errors"] for p in phases), "seconds": seconds,
            "cpu_ms_per_request": cpu_ms,
            "throughput_rps": done / seconds if seconds else float("nan"), "p50_ms": p50 * 1000,
            "p95_ms": p95 * 1000, "server_encode_ms_p50": statistics.median(encode) if encode else float("nan"),
            "server_stage_ms_p50": {stage: statistics.median(m.get(stage, 0.0) for p in phases for m in p["server_ms"])
                                    for stage in STAGES} if encode else {}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,base", help="model presets, comma-separated")
    parser.add_argument("--requests", type=int, default=200, help="requests per phase, at most")
    parser.add_argument("--phase-seconds", type=float, default=120.0, help="seconds per phase, at most")
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="the whole run, at most")
    parser.add_argument("--rounds", type=int, default=3, help="single / 16-client phase pairs, alternated")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--videos", type=int, default=40)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--batch-window-ms", type=float, default=5.0)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1, help="server processes (pvl-search serve --workers)")
    parser.add_argument("--client", default="stdlib", choices=sorted(CLIENTS),
                        help="the load clients' HTTP library (stdlib: http.client, the lightest)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--smoke", action="store_true", help="a few requests: checks the script, not the speed")
    args = parser.parse_args()
    if args.smoke:
        args.requests, args.rounds, args.videos, args.phase_seconds = min(args.requests, 6), 1, min(args.videos, 4), 60
    started = time.monotonic()
    counter = itertools.count()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for config in [c.strip() for c in args.configs.split(",") if c.strip()]:
            if time.monotonic() - started > args.max_seconds:
                print(f"skipped {config}: --max-seconds reached", file=sys.stderr)
                continue
            model_dir, index = make_corpus(root, config, args.videos, args.dtype)
            def budget() -> float:
                return max(0.0, min(args.phase_seconds, args.max_seconds - (time.monotonic() - started)))

            with Server(index, model_dir, args, root / f"serve-{config}.log") as server:
                warm = max(args.clients, args.requests // 4)  # unmeasured: kernels, allocator, batch-size checks
                phase = functools.partial(run_phase, server.url, server_pid=server.proc.pid, client_kind=args.client)
                phase(1, min(warm, 8), budget(), counter)
                phase(args.clients, warm, budget(), counter)
                single, multi = [], []
                for _ in range(args.rounds):
                    single.append(phase(1, args.requests, budget(), counter))
                    multi.append(phase(args.clients, args.requests, budget(), counter))
            one, many = summarise(single), summarise(multi)
            in_process = in_process_p50_ms(index, model_dir, args.dtype, min(args.requests, 100), counter)
            results[config] = {"single": one, f"{args.clients}_clients": many, "in_process_p50_ms": in_process,
                               "throughput_ratio": many["throughput_rps"] / one["throughput_rps"],
                               "p95_over_single_p50": many["p95_ms"] / one["p50_ms"]}
    load = os.getloadavg()
    from pvl_search.precision import describe_cpu

    print(f"CPU: {describe_cpu()}")
    print(f"pvl-search serve on 127.0.0.1, dtype {args.dtype}, batch window {args.batch_window_ms:g} ms, "
          f"max batch {args.max_batch}, {args.workers} server process(es), {args.client} clients, {args.videos} videos, {args.rounds} rounds of at most {args.requests} "
          f"requests per phase; load average at the end {load[0]:.2f} on {os.cpu_count()} cores\n")
    print("| config | clients | requests | errors | req/s | p50 ms | p95 ms | server encode p50 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for config, r in results.items():
        for name, row in (("1", r["single"]), (str(args.clients), r[f"{args.clients}_clients"])):
            print(f"| {config} | {name} | {row['requests']} | {row['errors']} | {row['throughput_rps']:.2f} | "
                  f"{row['p50_ms']:.1f} | {row['p95_ms']:.1f} | {row['server_encode_ms_p50']:.1f} |")
    print("\n| config | throughput 16 / 1 (goal >= 3) | p95(16) / p50(1) (goal <= 3) |")
    print("|---|---:|---:|")
    for config, r in results.items():
        print(f"| {config} | {r['throughput_ratio']:.2f} | {r['p95_over_single_p50']:.2f} |")
    print("\nCPU per answered request (ms; the server's processes from /proc, the clients' from this process; "
          f"on {os.cpu_count()} cores a closed loop of {args.clients} meets p95 <= 3x p50(1) only if a request costs "
          f"at most about cores x 3 x p50(1) / {args.clients} of CPU, both sides together):\n")
    print("| config | clients | server | clients' own | both | bound for the p95 goal |")
    print("|---|---:|---:|---:|---:|---:|")
    for config, r in results.items():
        bound = (os.cpu_count() or 1) * 3 * r["single"]["p50_ms"] / args.clients
        for name, row in (("1", r["single"]), (str(args.clients), r[f"{args.clients}_clients"])):
            cpu = row["cpu_ms_per_request"]
            print(f"| {config} | {name} | {cpu['server']:.1f} | {cpu['client']:.1f} | "
                  f"{cpu['server'] + cpu['client']:.1f} | {bound:.1f} |")
    print("\nWhere a 1-client request's time goes (p50 of each, ms; the server's stages from its timings_ms; "
          "outside = client p50 - server total: HTTP, thread hand-offs, JSON):\n")
    print(f"| config | client p50 | {' | '.join(STAGES[:-1])} | server total | outside | in-process p50 | "
          "served - in-process (goal <= 5) |")
    print("|---|" + "---:|" * (len(STAGES) + 4))
    for config, r in results.items():
        stages = r["single"]["server_stage_ms_p50"]
        outside = r["single"]["p50_ms"] - stages.get("total", float("nan"))
        print(f"| {config} | {r['single']['p50_ms']:.1f} | " + " | ".join(f"{stages.get(s, 0):.1f}" for s in STAGES[:-1])
              + f" | {stages.get('total', float('nan')):.1f} | {outside:.1f} | {r['in_process_p50_ms']:.1f} | "
              f"{r['single']['p50_ms'] - r['in_process_p50_ms']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=2))


if __name__ == "__main__":
    main()
