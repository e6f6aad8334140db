// The README's examples, run as written against a freshly started gateway: the quick
// start's first command (taken from the README, not copied here) on a free port, then
// every ```sh block that calls curl, as one bash script each, with curl failing on HTTP
// errors. Nothing in the examples is rewritten except the port.
//
//   node readme.test.mjs path/to/gateway
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, symlinkSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { runner, startGateway, stopAll } from "./cluster.mjs";

const [gatewayBin] = process.argv.slice(2);
if (!gatewayBin) throw new Error("usage: node readme.test.mjs path/to/gateway");
const root = new URL("../../", import.meta.url).pathname;
const readme = readFileSync(join(root, "README.md"), "utf8");
const blocks = [...readme.matchAll(/```sh\n([\s\S]*?)```/g)].map((m) => m[1]);

// The quick start: `cargo run --release -p gateway -- ARGS` in the first block.
const quick = blocks[0].match(/^cargo run --release -p gateway -- (.*?)\s*(#.*)?$/m);
if (!quick) throw new Error("no `cargo run … -p gateway -- …` in the README's first sh block");
const args = quick[1].split(/\s+/);

// A scratch directory with the repository's docs/ (examples read docs/phantom.png).
const cwd = mkdtempSync(join(tmpdir(), "gateway-readme-"));
symlinkSync(join(root, "docs"), join(cwd, "docs"));

const t = runner();
try {
  // No --config: the quick start runs on the built-in configuration.
  const node = await startGateway(gatewayBin, { config: null, args });
  const examples = blocks.filter((b) => /\bcurl /.test(b));
  if (examples.length < 2) throw new Error(`only ${examples.length} curl blocks found`);
  for (const [i, block] of examples.entries()) {
    const script = block.replaceAll("127.0.0.1:8080", node.addr);
    await t.check(`README example ${i + 1}: ${block.split("\n")[0].slice(0, 70)}…`, async () => {
      const out = execFileSync(
        "bash",
        ["-c", `set -euo pipefail\ncurl() { command curl -sS --fail-with-body "$@"; }\n${script}`],
        { cwd, encoding: "utf8", timeout: 30_000, stdio: ["ignore", "pipe", "pipe"] },
      );
      for (const line of out.split("\n").filter(Boolean)) console.log(`    ${line.slice(0, 160)}`);
    });
  }
  await t.check("the blob fetched through its signed URL is the file that was uploaded", async () => {
    const sent = readFileSync(join(root, "docs/phantom.png"));
    if (!readFileSync(join(cwd, "slice.png")).equals(sent)) throw new Error("slice.png differs from docs/phantom.png");
  });
} finally {
  stopAll();
}
process.exit(t.summary() ? 1 : 0);
