// The volume viewer at `/volume`: a Three.js plane shows slice i of a volume a backend
// renders; every slider move is an `rpc("volume.slice", i)` through the gateway, kept to
// one call in flight and one waiting (`latest`), so a fast slider never queues stale
// slices. Shows the slice index, the image's size and the round trip.
import { Client, type GatewayError, sha256Hex } from "/client.js";
import * as THREE from "three";
import { OrbitControls } from "three/addons/controls/OrbitControls.js";

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;
const slider = $<HTMLInputElement>("slice");
const status = $<HTMLSpanElement>("status");
const view = $<HTMLDivElement>("view");

const params = new URLSearchParams(location.search);
const wsUrl = params.get("ws") ?? `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
const client = new Client(wsUrl, { name: "volume viewer" });
client.on("state", (s) => {
  status.className = s === "connected" ? "on" : "";
  status.textContent = s === "connected" ? `online · ${client.session?.node ?? ""}` : s;
});

// The scene: one plane, a texture per slice, orbit controls to turn it. Drawn on demand
// (a new slice, a turn, a resize), not 60 times a second: an idle viewer costs nothing
// and a new slice never waits behind frames nobody asked for.
const renderer = new THREE.WebGLRenderer();
view.append(renderer.domElement);
const scene = new THREE.Scene();
scene.background = new THREE.Color(0x10131a);
const camera = new THREE.PerspectiveCamera(45, 1, 0.1, 100);
camera.position.set(0, 0, 2.6);
const controls = new OrbitControls(camera, renderer.domElement);
const texture = new THREE.Texture();
texture.colorSpace = THREE.SRGBColorSpace;
const plane = new THREE.Mesh(
  new THREE.PlaneGeometry(2, 2),
  new THREE.MeshBasicMaterial({ map: texture, side: THREE.DoubleSide }),
);
scene.add(plane);

/** Drawing-buffer pixels at most: the slice has 65,536, so more add no detail, while
 * every pixel costs fill and copy time where WebGL runs in software (a browser without a
 * GPU). CSS scales the canvas to the view. */
const MAX_PIXELS = 150_000;

function resize(): void {
  const { clientWidth: w, clientHeight: h } = view;
  const fit = Math.sqrt(MAX_PIXELS / Math.max(1, w * h));
  renderer.setPixelRatio(Math.min(2, window.devicePixelRatio, fit));
  renderer.setSize(w, h, false);
  camera.aspect = w / Math.max(1, h);
  camera.updateProjectionMatrix();
}
let drawQueued = false;
function draw(): void {
  if (drawQueued) return;
  drawQueued = true;
  requestAnimationFrame(() => {
    drawQueued = false;
    renderer.render(scene, camera);
  });
}
controls.addEventListener("change", draw);
window.addEventListener("resize", () => (resize(), draw()));
resize();

// Each move asks for its slice; at most one call in flight and one waiting.
const slice = client.latest("volume.slice", "text/plain");
/** Per slice shown: ms from the slider move that asked for it to the frame showing it. */
const timings: number[] = [];
/** Per slice shown: where that time went (round trip, decode, draw to frame). */
const phases: { rtt: number; decode: number; frame: number }[] = [];
const shown = { index: -1, sha256: "", bytes: 0 };

async function request(index: number, movedAt: number, attempt = 0): Promise<void> {
  const asked = performance.now();
  let answer;
  try {
    answer = await slice.run(String(index));
  } catch (e) {
    status.textContent = `error: ${(e as Error).message}`;
    // A dropped connection or a backend timeout: ask again if the slider still points here.
    if ((e as GatewayError).temporary && attempt < 3) {
      setTimeout(() => {
        if (Number(slider.value) === index) void request(index, movedAt, attempt + 1);
      }, 200 * (attempt + 1));
    }
    return;
  }
  if (!answer) return; // a newer move replaced this one
  const answered = performance.now();
  const rtt = answered - asked;
  // Textures from ImageBitmaps are not flipped by WebGL: flip when decoding.
  const bitmap = await createImageBitmap(new Blob([answer.data as Uint8Array<ArrayBuffer>], { type: answer.contentType }), {
    imageOrientation: "flipY",
  });
  const decoded = performance.now();
  (texture.image as ImageBitmap | undefined)?.close?.();
  texture.image = bitmap;
  texture.needsUpdate = true;
  plane.scale.set(1, bitmap.height / bitmap.width, 1);
  renderer.render(scene, camera);
  // The frame after the upload is the one on screen.
  requestAnimationFrame(() => {
    const now = performance.now();
    timings.push(now - movedAt);
    phases.push({ rtt, decode: decoded - answered, frame: now - decoded });
    shown.index = index;
    shown.sha256 = "";
    shown.bytes = answer.data.length;
    void sha256Hex(answer.data).then((h) => {
      if (shown.index === index) shown.sha256 = h;
    });
    $("index").textContent = String(index);
    $("bytes").textContent = `${(answer.data.length / 1024).toFixed(1)} KiB ${answer.contentType.replace("image/", "")}`;
    $("rtt").textContent = `${rtt.toFixed(1)} ms`;
  });
}

slider.addEventListener("input", () => void request(Number(slider.value), performance.now()));
client.on("connected", () => void request(Number(slider.value), performance.now()));

Object.assign(window, {
  volume: {
    client,
    timings,
    phases,
    /** Draws now and returns the canvas (read it in the same task: the drawing buffer is
     * not kept after the frame is composited). */
    draw(): HTMLCanvasElement {
      renderer.render(scene, camera);
      return renderer.domElement;
    },
    shown,
    get pending() {
      return slice.pending;
    },
  },
});
