// Runs the TypeScript tests with node's own test runner (no test framework):
// each test/<kind>/*.test.ts is bundled by esbuild into .test-build/, then
//   node test/run.mjs unit      the client library and Markdown tests
//   node test/run.mjs browser   the browser tests (needs the service binary; see test/browser/harness.ts)
// A further argument runs only the files whose name contains it:
//   node test/run.mjs browser console

import { spawnSync } from "node:child_process";
import { readdirSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const [kind, only = ""] = process.argv.slice(2);
if (kind !== "unit" && kind !== "browser") {
  console.error("usage: node test/run.mjs unit|browser");
  process.exit(2);
}
const sources = readdirSync(join(here, kind))
  .filter((name) => name.endsWith(".test.ts") && name.includes(only))
  .map((name) => join(here, kind, name));
const out = join(here, "..", ".test-build", kind);
rmSync(out, { recursive: true, force: true });
await esbuild.build({
  entryPoints: sources,
  bundle: true,
  platform: "node",
  format: "esm",
  target: "node20",
  outdir: out,
  outExtension: { ".js": ".mjs" },
  packages: "external",
  sourcemap: "inline",
  logLevel: "warning",
  // CSS imports of the app are not needed by tests.
  loader: { ".css": "empty" },
});
const tests = readdirSync(out)
  .filter((name) => name.endsWith(".test.mjs"))
  .map((name) => join(out, name));
const result = spawnSync(
  process.execPath,
  ["--enable-source-maps", "--test", "--test-concurrency=1", "--test-reporter=spec", ...tests],
  { stdio: "inherit" },
);
process.exit(result.status ?? 1);
