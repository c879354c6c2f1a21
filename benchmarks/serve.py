"""Serving speed: requests/s and latency of POST /predict with single images, under parallel clients.

    python benchmarks/serve.py                              # 1 and 8 clients, 20 s each, 2 torch threads
    python benchmarks/serve.py --clients 8 --seconds 20 --threads 1 2 --run runs/x

Starts `mnistlab serve` in its own process (one per --threads value) on a free loopback port, then
for each --clients value runs that many client threads for --seconds, each on its own keep-alive
connection, posting one image per request as the draw page does (a 400x400 canvas PNG, multipart).
Latency is measured per request at the client (send to last byte of the answer). The clients share
the machine's cores with the server, as a local user's browser would. Without --run the model is
an untrained seed003: weights do not change the speed, and no data set is needed.
"""
from __future__ import annotations

import argparse
import http.client
import io
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from mnistlab import models


def drawn_seven() -> bytes:
    """A "7" as the draw page sends it: white strokes on a black 400x400 canvas, PNG."""
    canvas = Image.new("RGBA", (400, 400), "black")
    ImageDraw.Draw(canvas).line([(100, 90), (300, 90), (180, 340)], fill="white", width=28, joint="curve")
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def multipart(image: bytes) -> tuple[bytes, str]:
    boundary = "mnistlab-bench"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="drawing.png"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def untrained_run(folder: Path) -> Path:
    torch.manual_seed(0)
    net = models.create_model("seed003").eval()
    models.save_model(net, models.Architecture("seed003", {}, 10, list("0123456789"), "mnist"), folder)
    return folder


def start_server(run: Path, threads: int) -> tuple[subprocess.Popen, int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mnistlab", "serve", str(run), "--port", str(port),
                               "--threads", str(threads), "--quiet"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server, port
        except OSError:
            if server.poll() is not None:
                break
            time.sleep(0.2)
    server.kill()
    sys.exit(f"the server did not start:\n{server.stderr.read().decode()}")


def load(port: int, clients: int, seconds: float, body: bytes, kind: str) -> dict:
    """`clients` threads posting `body` for `seconds`; every request's latency and every failure."""
    latencies, errors = [[] for _ in range(clients)], []
    start_line, stop = threading.Barrier(clients + 1), [0.0]

    def client(i: int):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        start_line.wait()
        while time.perf_counter() < stop[0]:
            sent = time.perf_counter()
            try:
                connection.request("POST", "/predict", body=body, headers={"Content-Type": kind})
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    errors.append(response.status)
            except (OSError, http.client.HTTPException) as err:
                errors.append(type(err).__name__)
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                continue
            latencies[i].append(time.perf_counter() - sent)
        connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    began = time.perf_counter()
    stop[0] = began + seconds
    start_line.wait()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    every = sorted(t for per_client in latencies for t in per_client)
    return {"requests": len(every), "rps": len(every) / elapsed, "errors": len(errors),
            "p50": 1000 * statistics.median(every), "p99": 1000 * every[min(len(every) - 1, int(0.99 * len(every)))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="run folder to serve (default: an untrained seed003)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="parallel clients (default: 1 8)")
    parser.add_argument("--seconds", type=float, default=20, help="seconds per measurement (default: 20)")
    parser.add_argument("--threads", type=int, nargs="+", default=[2],
                        help="server torch threads, one server each (default: 2, as `mnistlab serve`)")
    args = parser.parse_args()

    body, kind = multipart(drawn_seven())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or untrained_run(Path(tmp) / "seed003")
        for threads in args.threads:
            server, port = start_server(run, threads)
            try:
                load(port, 2, 2.0, body, kind)  # warm-up: first requests pay for oneDNN's kernel choice
                for clients in args.clients:
                    rows.append((threads, clients, load(port, clients, args.seconds, body, kind)))
            finally:
                server.terminate()
                server.wait(10)

    print(f"\nPOST /predict, one {len(body) / 1024:.1f} KB multipart PNG (400x400 canvas) per request; "
          f"{args.seconds:g} s per row; {os.cpu_count()} CPUs ({platform.machine()}), torch {torch.__version__}")
    print("| server threads | clients | requests | requests/s | p50 ms | p99 ms | errors |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for threads, clients, r in rows:
        print(f"| {threads} | {clients} | {r['requests']} | {r['rps']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['errors']} |")
    print("\nreproduce: " + " ".join(["OMP_NUM_THREADS=1", "python", "benchmarks/serve.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
