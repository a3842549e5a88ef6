"""Write a real, randomly initialised XTTS v2 checkpoint.

XTTS weights cannot be downloaded everywhere (and carry a non-commercial
licence), but the code path (load_checkpoint, conditioning, inference_stream)
can be exercised on a random model of the same architecture: tiny by default
for tests, full XTTS v2 size with --full for GPU benchmarks. The audio is noise.
"""

from __future__ import annotations

import shutil
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError

TINY_MODEL_ARGS = {
    "gpt_layers": 2,
    "gpt_n_model_channels": 128,
    "gpt_n_heads": 2,
    "decoder_input_dim": 128,
    "gpt_num_audio_tokens": 1026,
    "gpt_start_audio_token": 1024,
    "gpt_stop_audio_token": 1025,
}


def write_checkpoint(directory: Path, *, full: bool, speakers: list[str], seed: int) -> None:
    import numpy as np
    import torch
    import TTS
    from TTS.tts.configs.xtts_config import XttsConfig
    from TTS.tts.layers.xtts.tokenizer import VoiceBpeTokenizer
    from TTS.tts.models.xtts import Xtts, XttsArgs

    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.json"
    shutil.copy(Path(TTS.__file__).parent / "tts/utils/assets/tortoise/tokenizer.json", vocab)
    config = XttsConfig()
    config.model_args = XttsArgs() if full else XttsArgs(**TINY_MODEL_ARGS)
    model = Xtts.init_from_config(config)
    model.tokenizer = VoiceBpeTokenizer(vocab_file=str(vocab))
    model.init_models()
    model.eval()
    torch.save({"model": model.state_dict(), "config": config.to_dict()}, directory / "model.pth")
    config.save_json(str(directory / "config.json"))

    # Built-in speakers, as the real checkpoint ships them in speakers_xtts.pth.
    rng = np.random.default_rng(seed)
    table = {}
    with torch.no_grad():
        for index, _name in enumerate(speakers):
            seconds = 4.0
            t = np.arange(int(22050 * seconds)) / 22050
            pitch = 110 + 40 * index
            wave = 0.3 * np.sin(2 * np.pi * pitch * t) + 0.02 * rng.standard_normal(t.size)
            audio = torch.from_numpy(wave.astype(np.float32)).unsqueeze(0)
            table[_name] = {
                "gpt_cond_latent": model.get_gpt_cond_latents(audio, 22050),
                "speaker_embedding": model.get_speaker_embedding(audio, 22050),
            }
    torch.save(table, directory / "speakers_xtts.pth")


class Command(BaseCommand):
    help = "Write a randomly initialised XTTS v2 checkpoint (tiny by default, --full for real size)."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("directory")
        parser.add_argument(
            "--full", action="store_true", help="Full XTTS v2 dimensions (for GPU benchmarks)."
        )
        parser.add_argument(
            "--speaker", action="append", default=[], help="Built-in speaker name (repeatable)."
        )
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--force", action="store_true", help="Overwrite an existing checkpoint.")

    def handle(self, *args: Any, **options: Any) -> str:
        directory = Path(options["directory"])
        if (directory / "model.pth").exists() and not options["force"]:
            raise CommandError(f"{directory} already holds a checkpoint; pass --force to overwrite it.")
        speakers = options["speaker"] or ["Ana Florence", "Claribel Dervla"]
        write_checkpoint(directory, full=options["full"], speakers=speakers, seed=options["seed"])
        size = "full-size" if options["full"] else "tiny"
        return f"Wrote a {size} random XTTS checkpoint to {directory} with speakers: {', '.join(speakers)}."
