"""XTTS v2 on one GPU, through the service's own batched engine (engines/xtts.py).

    python bench/xtts_gpu.py [--device cuda:0] [--precisions fp32 fp16 bf16]
                             [--streams 1 16 64 128] [--max-tokens 200] [--json FILE]
    python bench/xtts_gpu.py --tiny --device cpu     # a smoke run of the same code on the CPU

Builds a randomly initialised checkpoint with the real XTTS v2 dimensions (same
compute as the released weights, which cannot be downloaded here; its audio is
noise), then per precision: load time; time to first chunk of one stream
(`--turns` runs); and N streams started at once for each `--streams`, decoded
together (XTTS_MAX_BATCH = the largest N), each capped at `--max-tokens` audio
tokens. Per N: first chunk p50 / p95, aggregate audio tokens per second, and
real-time streams: those that, played from their first chunk, never ran dry.

Needs, on the GPU machine: Python 3.11 and the lock's runtime and `xtts` sets,
carried over as a wheel folder with their hashes:
`.tools/bin/uv export --frozen --no-dev --extra xtts --no-emit-project > wheels.txt`
and `pip download --require-hashes -d wheels -r wheels.txt` here, then
`pip install --no-index --find-links wheels --require-hashes -r wheels.txt` there.
Targets (#19): first chunk at most 150 ms for one stream; at least 100 concurrent
real-time streams with p95 first chunk at most 500 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import setup_django
from bench.xtts_batching import Round, job_for, load_engine, measure_round, one_stream, write_checkpoint

PRECISIONS = {"fp32": None, "fp16": "float16", "bf16": "bfloat16"}


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(checkpoint: Path, args: argparse.Namespace, precision: str) -> dict[str, Any]:
    import torch

    half_dtype = PRECISIONS[precision]
    started = time.perf_counter()
    engine = load_engine(
        checkpoint,
        device=args.device,
        half=half_dtype is not None,
        half_dtype=half_dtype or "float16",
        stream_chunk_size=args.chunk,
        max_audio_tokens=args.max_tokens,
        max_active_jobs=max(args.streams),
        max_batch=max(args.streams),
    )
    synchronize(args.device)
    load_s = time.perf_counter() - started

    async def run() -> tuple[list[float], list[Round]]:
        await one_stream(engine, job_for(engine, 0), time.perf_counter())  # warm-up: kernels, caches
        single = [
            (await one_stream(engine, job_for(engine, 0), time.perf_counter())).first_chunk_s
            for _ in range(args.turns)
        ]
        return single, [await measure_round(engine, streams) for streams in args.streams]

    try:
        single, rounds = asyncio.run(run())
    finally:
        engine.close()
    memory = 0.0
    if args.device.startswith("cuda"):
        memory = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return {
        "precision": precision,
        "load_s": round(load_s, 2),
        "ttfc_p50_ms": round(statistics.median(single) * 1000, 1),
        "gpu_memory_gib": round(memory, 2),
        "concurrent": {
            r.streams: {
                "ttfc_p50_ms": round(r.first_chunk(0.5) * 1000, 1),
                "ttfc_p95_ms": round(r.first_chunk(0.95) * 1000, 1),
                "tokens_per_s": round(r.tokens_per_s, 1),
                "rows_per_step": round(r.rows_per_step, 1),
                "real_time_streams": r.real_time_streams,
                "audio_s_per_stream": round(statistics.median(x.audio_s for x in r.results), 2),
            }
            for r in rounds
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument(
        "--tiny", action="store_true", help="the tiny test checkpoint (smoke run, e.g. on the CPU)"
    )
    parser.add_argument(
        "--precisions", nargs="+", choices=sorted(PRECISIONS), default=["fp32", "fp16", "bf16"]
    )
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16, 64, 128])
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=20, help="audio tokens per streamed chunk")
    parser.add_argument("--max-tokens", type=int, default=200, help="a random model rarely stops by itself")
    parser.add_argument("--json", type=Path, default=Path(os.environ.get("OUT", ".")) / "xtts_gpu.json")
    args = parser.parse_args()
    setup_django()
    import torch

    precisions = args.precisions
    if not args.device.startswith("cuda"):
        precisions = [p for p in precisions if p == "fp32"] or ["fp32"]  # half precision needs CUDA
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = write_checkpoint(Path(directory), tiny=args.tiny)
        rows = [measure(checkpoint, args, precision) for precision in precisions]
    device_name = (
        torch.cuda.get_device_name(args.device)
        if args.device.startswith("cuda")
        else platform.machine() + " CPU"
    )
    size = "tiny" if args.tiny else "full size"
    print(f"\nXTTS v2 (random weights, {size}) on {device_name}, {time.strftime('%Y-%m-%d')}")
    print(f"chunks of {args.chunk} tokens, {args.max_tokens} tokens per stream, all N started at once\n")
    print(
        f"{'precision':>9} {'load s':>6} {'ttfc 1':>7} {'GiB':>5}  "
        + "  ".join(f"{'N=' + str(n):>30}" for n in args.streams)
    )
    print(
        f"{'':>9} {'':>6} {'ms':>7} {'':>5}  "
        + "  ".join(f"{'RT streams/p95 ms/tok/s':>30}" for _ in args.streams)
    )
    for r in rows:
        cells = []
        for n in args.streams:
            c = r["concurrent"][n]
            cells.append(
                f"{c['real_time_streams']}/{n} {c['ttfc_p95_ms']:.0f} {c['tokens_per_s']:.0f}".rjust(30)
            )
        print(
            f"{r['precision']:>9} {r['load_s']:>6.1f} {r['ttfc_p50_ms']:>7.1f} {r['gpu_memory_gib']:>5.1f}  "
            + "  ".join(cells)
        )
    print(
        "\ntargets: first chunk <= 150 ms for one stream; "
        ">= 100 real-time streams with p95 first chunk <= 500 ms"
    )
    args.json.write_text(json.dumps({"device": device_name, "size": size, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
