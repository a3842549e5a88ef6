"""XTTS v2 on one GPU, through the service's own engine (engines/xtts.py).

    python bench/xtts_gpu.py [--device cuda:0] [--turns 5] [--max-tokens 200] [--json FILE]

Builds a randomly initialised checkpoint with the real XTTS v2 dimensions (same
compute as the released weights, which cannot be downloaded here; its audio is
noise), then measures: load time; time to first chunk at stream_chunk_size 20
and 10, fp32 and fp16; per-token decode time; real-time factor; and first-chunk
latency at 1, 4, 16 and 64 concurrent streams through the engine's scheduler.

Needs, on the GPU machine: Python 3.11 and the lock's runtime and `xtts` sets,
carried over as a wheel folder with their hashes:
`.tools/bin/uv export --frozen --no-dev --extra xtts --no-emit-project > wheels.txt`
and `pip download --require-hashes -d wheels -r wheels.txt` here, then
`pip install --no-index --find-links wheels --require-hashes -r wheels.txt` there.
Target (the seed plan): time to first chunk at most 200 ms for a single stream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TEXT = "Thanks for calling Acme Dental, this is Ava. How can I help you today?"
TOKENS_PER_SECOND = 21.5  # XTTS v2: one audio token is 46.4 ms of speech


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))]


async def one_stream(engine: Any, job: Any) -> tuple[float, float, float]:
    """(time to first chunk, total time, seconds of audio)."""
    started = time.perf_counter()
    first = None
    samples = 0
    async for chunk in engine.stream(job):
        first = first if first is not None else time.perf_counter() - started
        samples += len(chunk)
    return first or 0.0, time.perf_counter() - started, samples / engine.sample_rate


def measure(
    checkpoint: Path, device: str, *, half: bool, chunk: int, turns: int, max_tokens: int
) -> dict[str, Any]:
    import torch

    from engines import SpeechJob
    from engines.text import prepare_text
    from engines.xtts import XttsEngine

    started = time.perf_counter()
    engine = XttsEngine(
        checkpoint_dir=str(checkpoint),
        device=device,
        half=half,
        stream_chunk_size=chunk,
        max_audio_tokens=max_tokens,
        max_active_jobs=128,
    )
    engine.load()
    torch.cuda.synchronize()
    load_s = time.perf_counter() - started
    voice = engine.default_voice()
    job = SpeechJob(segments=prepare_text(TEXT, max_chars=5000), voice=voice, language=voice.language)

    async def run() -> dict[str, Any]:
        await one_stream(engine, job)  # warm-up: kernels, caches
        single = [await one_stream(engine, job) for _ in range(turns)]
        ttfc = [first for first, _, _ in single]
        rtf = [total / audio for _, total, audio in single if audio]
        # Tokens after the first chunk, decoded in (total - first): the steady per-token cost.
        per_token = [
            (total - first) / max(1.0, audio * TOKENS_PER_SECOND - chunk) for first, total, audio in single
        ]
        concurrent: dict[int, dict[str, float]] = {}
        for streams in (1, 4, 16, 64):
            results = await asyncio.gather(*(one_stream(engine, job) for _ in range(streams)))
            firsts = [first for first, _, _ in results]
            concurrent[streams] = {
                "ttfc_p50_ms": round(percentile(firsts, 0.5) * 1000, 1),
                "ttfc_p95_ms": round(percentile(firsts, 0.95) * 1000, 1),
            }
        return {
            "precision": "fp16" if half else "fp32",
            "stream_chunk_size": chunk,
            "load_s": round(load_s, 2),
            "ttfc_p50_ms": round(percentile(ttfc, 0.5) * 1000, 1),
            "ttfc_p95_ms": round(percentile(ttfc, 0.95) * 1000, 1),
            "per_token_ms": round(statistics.median(per_token) * 1000, 2),
            "rtf": round(statistics.median(rtf), 3),
            "gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "concurrent": concurrent,
        }

    try:
        return asyncio.run(run())
    finally:
        engine.close()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=200, help="a random model rarely stops by itself")
    parser.add_argument("--json", type=Path, default=Path(os.environ.get("OUT", ".")) / "xtts_gpu.json")
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "callwaiting_tts.settings")
    os.environ.setdefault("SECRET_KEY", "bench-" + "x" * 50)
    os.environ["CWT_ENV_FILE"] = ""
    os.environ.setdefault("DATABASE_URL", "sqlite:///:memory:")
    import django
    import torch

    django.setup()
    from synthesis.management.commands.make_xtts_checkpoint import write_checkpoint

    with tempfile.TemporaryDirectory() as directory:
        checkpoint = Path(directory)
        write_checkpoint(checkpoint, full=True, speakers=["Ana Florence"], seed=0)
        rows = [
            measure(
                checkpoint, args.device, half=half, chunk=chunk, turns=args.turns, max_tokens=args.max_tokens
            )
            for half in (False, True)
            for chunk in (20, 10)
        ]
    device_name = torch.cuda.get_device_name(args.device)
    print(f"\nXTTS v2 (random weights, full size) on {device_name}, {time.strftime('%Y-%m-%d')}\n")
    print(
        f"{'precision':>9} {'chunk':>5} {'load s':>6} {'ttfc p50':>9} {'ttfc p95':>9} {'ms/token':>8} "
        f"{'RTF':>6}  ttfc p95 at 1 / 4 / 16 / 64 streams (ms)"
    )
    for r in rows:
        at = " / ".join(f"{r['concurrent'][n]['ttfc_p95_ms']:.0f}" for n in (1, 4, 16, 64))
        print(
            f"{r['precision']:>9} {r['stream_chunk_size']:>5} {r['load_s']:>6.1f} {r['ttfc_p50_ms']:>9.1f} "
            f"{r['ttfc_p95_ms']:>9.1f} {r['per_token_ms']:>8.2f} {r['rtf']:>6.3f}  {at}"
        )
    print("\ntarget: time to first chunk at most 200 ms, single stream")
    args.json.write_text(json.dumps({"device": device_name, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
