// CallWaiting TTS in the browser: one small ES module, no dependencies, no build step.
//
//   import { connect, PcmPlayer } from "/static/callwaiting_tts/client.js";
//   const tts = await connect("wss://tts.example.com/v1/stream", clientToken);
//   const player = new PcmPlayer(new AudioContext());
//   const utterance = tts.speak("Hello there.", { format: "pcm", sampleRate: 24000 });
//   utterance.onaudio = (bytes) => player.play(bytes, 24000);
//   const end = await utterance.done;      // the audio_end event: audio_seconds, cancelled, ...
//   utterance.cancel();                    // at any time: barge-in
//
// `clientToken` is a short-lived token from POST /v1/tokens, minted by your server with
// its API key: never put the API key itself in a page. The protocol is docs/streaming.md;
// this module is described in docs/browser.md.

/** A stream refused or closed by the server: `code` is the stable error code, `closeCode` the WebSocket's. */
export class TtsError extends Error {
  constructor(code, message, closeCode = null) {
    super(message);
    this.name = "TtsError";
    this.code = code;
    this.closeCode = closeCode;
  }
}

let contextCounter = 0;

/** One utterance (a context on the connection): text in, audio out. */
export class Utterance {
  constructor(stream, contextId) {
    this.stream = stream;
    this.contextId = contextId;
    this.started = null; // the audio_start event
    this.onaudio = null; // (Uint8Array) => void, for each audio frame
    this.onstart = null; // (audio_start event) => void
    this.onerror = null; // (error event) => void
    this.done = new Promise((resolve, reject) => {
      this._resolve = resolve;
      this._reject = reject;
    });
  }

  /** More text: each finished clause is spoken as soon as it is complete. */
  text(text) {
    this.stream._send({ type: "text", context_id: this.contextId, text });
    return this;
  }

  /** Speak what is buffered now. */
  flush() {
    this.stream._send({ type: "flush", context_id: this.contextId });
    return this;
  }

  /** No more text: speak the rest, then `done` resolves. */
  end() {
    this.stream._send({ type: "end", context_id: this.contextId });
    return this;
  }

  /** Stop at once; `done` resolves with `cancelled: true`, and no more audio arrives. */
  cancel() {
    this.stream._send({ type: "cancel", context_id: this.contextId });
  }
}

function startFields(options) {
  const fields = {};
  if (options.voiceId) fields.voice_id = options.voiceId;
  if (options.language) fields.language = options.language;
  if (options.format) fields.format = options.format;
  if (options.sampleRate) fields.sample_rate = Number(options.sampleRate);
  if (options.speed) fields.speed = Number(options.speed);
  return fields;
}

/** An open, authenticated WS /v1/stream connection. */
export class TtsStream {
  constructor(socket, connectionId) {
    this.socket = socket;
    this.connectionId = connectionId;
    this.utterances = new Map();
    this.onclose = null; // (TtsError | null) => void
    this.closed = false;
    this.lastError = null;
    socket.binaryType = "arraybuffer";
    socket.onmessage = (message) => this._receive(message);
    socket.onclose = (event) => this._closed(event);
  }

  /** Open an utterance whose text arrives in pieces (`text`, `flush`, `end`). */
  utterance(options = {}) {
    const utterance = this._open(options);
    this._send({ type: "start", context_id: utterance.contextId, ...startFields(options) });
    return utterance;
  }

  /** Speak a whole text (plain or SSML) in one message. */
  speak(text, options = {}) {
    const utterance = this._open(options);
    this._send({ type: "synthesize", context_id: utterance.contextId, text, ...startFields(options) });
    return utterance;
  }

  close() {
    this.socket.close(1000);
  }

  _open(options) {
    const contextId = options.contextId || `u${Date.now().toString(36)}${(contextCounter++).toString(36)}`;
    const utterance = new Utterance(this, contextId);
    this.utterances.set(contextId, utterance);
    return utterance;
  }

  _send(message) {
    if (this.closed) throw new TtsError("closed", "The stream is closed.");
    this.socket.send(JSON.stringify(message));
  }

  _receive(message) {
    if (message.data instanceof ArrayBuffer) {
      // [1 byte: n][n bytes: context id][audio]
      const frame = new Uint8Array(message.data);
      const length = frame[0];
      const contextId = String.fromCharCode(...frame.subarray(1, 1 + length));
      const utterance = this.utterances.get(contextId);
      if (utterance && utterance.onaudio) utterance.onaudio(frame.subarray(1 + length));
      return;
    }
    const event = JSON.parse(message.data);
    const utterance = this.utterances.get(event.context_id);
    if (!utterance) {
      if (event.type === "error") this.lastError = event; // a connection-wide error comes before its close
      return;
    }
    if (event.type === "audio_start") {
      utterance.started = event;
      if (utterance.onstart) utterance.onstart(event);
    } else if (event.type === "error") {
      utterance.error = event;
      if (utterance.onerror) utterance.onerror(event);
      if (!utterance.started) {
        // Refused before it started: no audio_end follows.
        this.utterances.delete(event.context_id);
        utterance._reject(new TtsError(event.code, event.message));
      }
    } else if (event.type === "audio_end") {
      this.utterances.delete(event.context_id);
      utterance._resolve(event);
    }
  }

  _closed(event) {
    this.closed = true;
    const error =
      event.code === 1000
        ? null
        : new TtsError(this.lastError?.code || "closed", this.lastError?.message || "The stream closed.", event.code);
    for (const utterance of this.utterances.values()) {
      utterance._reject(error || new TtsError("closed", "The stream closed."));
    }
    this.utterances.clear();
    if (this.onclose) this.onclose(error);
  }
}

/**
 * Connect and authenticate with a client token (sent as the first message: browsers cannot
 * set headers on a WebSocket, and a token in the URL would be logged). Resolves once the
 * server says `ready`; rejects with a TtsError (`origin_not_allowed`, `token_expired`, ...).
 */
export function connect(url, token, { timeoutMs = 10000 } = {}) {
  return new Promise((resolve, reject) => {
    const socket = new WebSocket(url);
    let lastError = null;
    const timer = setTimeout(() => {
      socket.close();
      reject(new TtsError("timeout", `No answer from ${url} in ${timeoutMs} ms.`));
    }, timeoutMs);
    socket.onopen = () => socket.send(JSON.stringify({ type: "auth", api_key: token }));
    socket.onmessage = (message) => {
      if (typeof message.data !== "string") return;
      const event = JSON.parse(message.data);
      if (event.type === "ready") {
        clearTimeout(timer);
        resolve(new TtsStream(socket, event.connection_id));
      } else if (event.type === "error") {
        lastError = event;
      }
    };
    socket.onclose = (event) => {
      clearTimeout(timer);
      reject(new TtsError(lastError?.code || "closed", lastError?.message || "The connection closed.", event.code));
    };
  });
}

/**
 * Plays 16-bit little-endian mono PCM (format "pcm") with Web Audio as it arrives: each
 * piece is scheduled right after the one before, so playback is gapless once started.
 */
export class PcmPlayer {
  constructor(audioContext) {
    this.context = audioContext;
    this.playUntil = 0;
    this.sources = new Set();
    this.framesScheduled = 0; // samples handed to Web Audio, for meters and tests
    this._carry = null; // an odd byte left over from the previous piece
  }

  play(bytes, sampleRate) {
    let data = bytes;
    if (this._carry !== null) {
      data = new Uint8Array(bytes.length + 1);
      data[0] = this._carry;
      data.set(bytes, 1);
      this._carry = null;
    }
    if (data.length % 2 === 1) {
      this._carry = data[data.length - 1];
      data = data.subarray(0, data.length - 1);
    }
    const samples = data.length / 2;
    if (samples === 0) return;
    const view = new DataView(data.buffer, data.byteOffset, data.length);
    const buffer = this.context.createBuffer(1, samples, sampleRate);
    const channel = buffer.getChannelData(0);
    for (let i = 0; i < samples; i++) channel[i] = view.getInt16(2 * i, true) / 32768;
    const source = this.context.createBufferSource();
    source.buffer = buffer;
    source.connect(this.context.destination);
    const startAt = Math.max(this.context.currentTime + 0.02, this.playUntil);
    source.start(startAt);
    this.playUntil = startAt + buffer.duration;
    this.framesScheduled += samples;
    this.sources.add(source);
    source.onended = () => this.sources.delete(source);
  }

  /** Silence now (on cancel). */
  stop() {
    for (const source of this.sources) source.stop();
    this.sources.clear();
    this.playUntil = 0;
    this._carry = null;
  }
}

/** Plays a whole encoded file (wav, mp3, opus, ...) once all of it has arrived. */
export async function playEncoded(audioContext, chunks) {
  const whole = new Uint8Array(chunks.reduce((total, chunk) => total + chunk.length, 0));
  let offset = 0;
  for (const chunk of chunks) {
    whole.set(chunk, offset);
    offset += chunk.length;
  }
  const buffer = await audioContext.decodeAudioData(whole.buffer);
  const source = audioContext.createBufferSource();
  source.buffer = buffer;
  source.connect(audioContext.destination);
  source.start();
  return source;
}
