# syntax=docker/dockerfile:1
# The GPU image: Daphne serving the API with XTTS v2 on the pod's GPU (Piper as the fallback).
# Build:  docker build -t callwaiting-tts .
# Run:    docker run --gpus all -p 8000:8000 -v /workspace/xtts:/models/xtts:ro \
#           -e SECRET_KEY=... -e DATABASE_URL=... -e REDIS_URL=... callwaiting-tts
# See docs/deploy.md for RunPod.
FROM python:3.11-slim-bookworm

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# FFmpeg's shared libraries: torchaudio reads audio through torchcodec, which needs them.
# (Piper brings its own espeak-ng data.) Unpinned on purpose: bookworm's security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ffmpeg curl \
    && rm -rf /var/lib/apt/lists/*

# The locked environment lives outside the code folder, first on PATH.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_PYTHON_DOWNLOADS=never \
    UV_NO_CACHE=1 \
    PATH=/opt/venv/bin:$PATH

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin app
WORKDIR /app

# Dependencies first: a code change does not reinstall torch. uv with its hashes checked,
# then exactly uv.lock's runtime and XTTS sets (no dev tools): nothing from outside the lock.
COPY requirements-uv.txt pyproject.toml uv.lock ./
RUN pip install --no-deps --require-hashes -r requirements-uv.txt \
    && uv sync --locked --no-dev --extra xtts

COPY --chown=app:app . .

# The XTTS v2 checkpoint (config.json, model.pth, vocab.json, speakers_xtts.pth) is not in the
# image: mount it at /models/xtts, or pass XTTS_MODEL_URL to fetch an archive of it at build time.
# Its licence (Coqui Public Model License, non-commercial) is the operator's to honour.
ARG XTTS_MODEL_URL=""
RUN mkdir -p /models/xtts /data/media /data/usage-spool \
    && if [ -n "$XTTS_MODEL_URL" ]; then curl -fsSL "$XTTS_MODEL_URL" | tar -xz -C /models/xtts; fi \
    && chown -R app:app /models /data

# collectstatic needs settings, not secrets: a throwaway key for this step only.
RUN SECRET_KEY=collectstatic-only CWT_ENV_FILE="" python manage.py collectstatic --noinput --verbosity 0

USER 10001

# The seed plan's variables; every other setting is in the README's table.
ENV HOST=0.0.0.0 \
    PORT=8000 \
    CWT_ENV_FILE="" \
    TTS_ENGINE=auto \
    XTTS_MODEL_PATH=/models/xtts \
    XTTS_DEVICE=cuda:0 \
    MEDIA_ROOT=/data/media \
    USAGE_SPOOL_DIR=/data/usage-spool \
    LOG_FORMAT=json \
    SECURE_PROXY_SSL_HEADER=1

EXPOSE 8000
VOLUME ["/models/xtts", "/data"]

HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD ["sh", "-c", "curl -fsS http://127.0.0.1:${PORT}/v1/health || exit 1"]

# serve.py runs Daphne and drains on SIGTERM (SHUTDOWN_GRACE_SECONDS); migrations are a release
# step (docs/deploy.md), not something every replica races to do at start.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "callwaiting_tts.serve"]
