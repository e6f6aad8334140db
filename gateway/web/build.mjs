// Builds what the gateway binary embeds (dist/), type-checks, and checks dist/ is exactly
// what the sources build.
//
//   node build.mjs            type-check, then write dist/
//   node build.mjs --check    build into a temporary directory; fail if dist/ differs
//   node build.mjs --tests    bundle test/*.test.ts for `node --test .test-build/`
import { execFileSync } from "node:child_process";
import { cpSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { gzipSync } from "node:zlib";
import * as esbuild from "esbuild";

const root = dirname(fileURLToPath(import.meta.url));
const bin = (name) => join(root, "node_modules", ".bin", name);
const mode = process.argv[2] ?? "";

if (mode === "--tests") {
  const out = join(root, ".test-build");
  rmSync(out, { recursive: true, force: true });
  const tests = readdirSync(join(root, "test")).filter((f) => f.endsWith(".test.ts"));
  await esbuild.build({
    entryPoints: tests.map((f) => join(root, "test", f)),
    outdir: out,
    outExtension: { ".js": ".mjs" },
    bundle: true,
    platform: "node",
    format: "esm",
    target: "node20",
    logLevel: "warning",
  });
  process.exit(0);
}

if (mode === "--check") {
  // The generated protobuf code must be what buf generates from today's .proto files.
  const gen = mkdtempSync(join(tmpdir(), "gateway-gen-"));
  execFileSync(bin("buf"), ["generate", "--output", gen], {
    cwd: root,
    stdio: "inherit",
    env: { ...process.env, PATH: `${join(root, "node_modules", ".bin")}:${process.env.PATH}` },
  });
  const file = "src/gen/gateway/v1/gateway_pb.ts";
  const same = readFileSync(join(gen, file)).equals(readFileSync(join(root, file)));
  rmSync(gen, { recursive: true, force: true });
  if (!same) {
    console.error(`${file} is not what buf generates from broker-proto (run npm run gen)`);
    process.exit(1);
  }
}

execFileSync(bin("tsc"), ["-p", root], { stdio: "inherit" });

const out = mode === "--check" ? mkdtempSync(join(tmpdir(), "gateway-web-")) : join(root, "dist");
if (mode !== "--check") rmSync(out, { recursive: true, force: true });
mkdirSync(out, { recursive: true });

const common = {
  bundle: true,
  format: "esm",
  target: "es2022",
  minify: true,
  legalComments: "none",
  logLevel: "warning",
  // The apps import the client the gateway serves, so the browser loads it once.
  external: ["/client.js"],
};
await esbuild.build({ ...common, entryPoints: { client: join(root, "src/client.ts") }, outdir: out });
await esbuild.build({ ...common, entryPoints: { "client-json": join(root, "src/json.ts") }, outdir: out });
await esbuild.build({
  ...common,
  entryPoints: {
    chat: join(root, "apps/chat/chat.ts"),
    volume: join(root, "apps/volume/volume.ts"),
    admin: join(root, "apps/admin/admin.ts"),
  },
  outdir: out,
});
for (const page of ["apps/chat/index.html", "apps/volume/volume.html", "apps/admin/admin.html"]) {
  cpSync(join(root, page), join(out, page.split("/").pop()));
}
execFileSync(
  bin("dts-bundle-generator"),
  [
    "--silent",
    "--no-banner",
    "--export-referenced-types=false",
    "--external-inlines=@bufbuild/protobuf",
    "--project",
    join(root, "tsconfig.json"),
    "-o",
    join(out, "client.d.ts"),
    join(root, "src/client.ts"),
  ],
  { stdio: "inherit" },
);

const size = (f) => readFileSync(join(out, f));
const client = size("client.js");
console.log(`client.js: ${client.length} bytes, ${gzipSync(client, { level: 9 }).length} gzipped`);

if (mode === "--check") {
  const dist = join(root, "dist");
  const names = new Set([...readdirSync(out), ...readdirSync(dist)]);
  const differ = [...names].filter((f) => {
    try {
      return !readFileSync(join(out, f)).equals(readFileSync(join(dist, f)));
    } catch {
      return true;
    }
  });
  rmSync(out, { recursive: true, force: true });
  if (differ.length) {
    console.error(`dist/ is not what the sources build: ${differ.join(", ")} (run npm run build)`);
    process.exit(1);
  }
  console.log("dist/ matches the sources");
}
