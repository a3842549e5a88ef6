// The playground page (/playground): the browser client (client.js) and a form around it.
// It mints nothing: the token comes from the visitor (or from the staff form, server side).
import { connect, PcmPlayer, playEncoded } from "./client.js";

const form = document.getElementById("speak-form");
const cancelButton = document.getElementById("cancel");
const speakButton = document.getElementById("speak");
const show = (id, text) => { document.getElementById(id).textContent = text; };

// What happened, for people (the page) and for tests (window.playground).
const state = {
  audioFrames: 0, audioBytes: 0, firstAudioMs: null, framesScheduled: 0, end: null, error: null,
  contextState: null, contextTime: 0,
};
window.playground = state;

let stream = null;
let streamToken = null;
let audioContext = null;
let player = null;
let current = null;

function streamUrl() {
  return `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/stream`;
}

async function openStream(token) {
  if (stream && !stream.closed && streamToken === token) return stream;
  if (stream && !stream.closed) stream.close();
  stream = await connect(streamUrl(), token);
  streamToken = token;
  stream.onclose = (error) => { if (error) show("status", `Connection closed: ${error.code} (${error.closeCode}).`); };
  return stream;
}

function setBusy(busy) {
  cancelButton.disabled = !busy;
  speakButton.disabled = busy;
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  // Created on the click: browsers let audio start only from a user's gesture.
  audioContext = audioContext || new AudioContext();
  await audioContext.resume();
  player = player || new PcmPlayer(audioContext);
  player.stop();
  Object.assign(state, { audioFrames: 0, audioBytes: 0, firstAudioMs: null, end: null, error: null });
  ["first-audio", "received", "usage"].forEach((id) => show(id, "–"));

  const format = form.format.value;
  const options = { format, sampleRate: form.sample_rate.value, speed: form.speed.value, voiceId: form.voice.value.trim() };
  setBusy(true);
  show("status", "Connecting…");
  try {
    await openStream(form.token.value.trim());
  } catch (error) {
    state.error = error.code;
    show("status", `Refused: ${error.code}: ${error.message}`);
    setBusy(false);
    return;
  }
  const sentAt = performance.now();
  const chunks = [];
  const utterance = stream.speak(form.text.value, options);
  current = utterance;
  show("status", "Speaking…");
  utterance.onaudio = (bytes) => {
    if (state.firstAudioMs === null) {
      state.firstAudioMs = Math.round(performance.now() - sentAt);
      show("first-audio", `${state.firstAudioMs} ms`);
    }
    state.audioFrames += 1;
    state.audioBytes += bytes.length;
    show("received", `${state.audioFrames} frames, ${state.audioBytes} bytes`);
    if (format === "pcm") {
      player.play(bytes, utterance.started.sample_rate);
      state.framesScheduled = player.framesScheduled;
    } else {
      chunks.push(bytes.slice());
    }
    state.contextState = audioContext.state;
  };
  try {
    const end = await utterance.done;
    state.end = end;
    show("usage", `${end.audio_seconds.toFixed(2)} s of audio, ${end.audio_bytes} bytes (request ${end.request_id})`);
    if (end.cancelled) {
      show("status", "Cancelled.");
    } else {
      show("status", "Done.");
      if (format !== "pcm" && chunks.length) await playEncoded(audioContext, chunks);
    }
  } catch (error) {
    state.error = error.code;
    show("status", `Error: ${error.code}: ${error.message}`);
  } finally {
    state.contextState = audioContext.state;
    state.contextTime = audioContext.currentTime;
    current = null;
    setBusy(false);
  }
});

cancelButton.addEventListener("click", () => {
  if (current) current.cancel();
  if (player) player.stop();
  show("status", "Cancelling…");
});

document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && current) cancelButton.click();
});
