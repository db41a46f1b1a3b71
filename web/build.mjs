// Builds the pages into dist/ (committed; parley-service compiles it in):
//   node build.mjs          write dist/
//   node build.mjs --check  build elsewhere and fail if dist/ differs (stale)
// Asset names carry a content hash (served as immutable); index.html names them.

import { createHash } from "node:crypto";
import { mkdtempSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const dist = join(here, "dist");

async function build(out) {
  rmSync(out, { recursive: true, force: true });
  mkdirSync(join(out, "assets"), { recursive: true });
  const result = await esbuild.build({
    absWorkingDir: here,
    entryPoints: { app: "src/app/main.ts" },
    bundle: true,
    format: "esm",
    target: ["es2022", "chrome110", "firefox115", "safari16"],
    minify: true,
    legalComments: "none",
    charset: "utf8",
    outdir: join(out, "assets"),
    entryNames: "[name]-[hash]",
    assetNames: "[name]-[hash]",
    metafile: true,
    logLevel: "warning",
  });
  const outputs = Object.keys(result.metafile.outputs).map((file) => relative(out, join(here, file)));
  const script = outputs.find((file) => file.endsWith(".js"));
  const style = outputs.find((file) => file.endsWith(".css"));
  const favicon = copyHashed(join(here, "static", "favicon.svg"), out);
  const html = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Parley</title>
<link rel="icon" href="/${favicon}" type="image/svg+xml">
<link rel="stylesheet" href="/${style}">
<script type="module" src="/${script}"></script>
</head>
<body>
<div id="app"><noscript>Parley needs JavaScript.</noscript></div>
</body>
</html>
`;
  writeFileSync(join(out, "index.html"), html);
}

function copyHashed(source, out) {
  const bytes = readFileSync(source);
  const hash = createHash("sha256").update(bytes).digest("hex").slice(0, 8).toUpperCase();
  const name = source.split("/").pop().replace(/(\.[^.]+)$/, `-${hash}$1`);
  writeFileSync(join(out, "assets", name), bytes);
  return `assets/${name}`;
}

function files(root, dir = root) {
  return readdirSync(dir).flatMap((name) => {
    const path = join(dir, name);
    return statSync(path).isDirectory() ? files(root, path) : [relative(root, path)];
  });
}

if (process.argv.includes("--check")) {
  const fresh = mkdtempSync(join(tmpdir(), "parley-web-"));
  try {
    await build(fresh);
    const expected = files(fresh).sort();
    const committed = files(dist).sort();
    const problems = [];
    for (const file of new Set([...expected, ...committed])) {
      if (!expected.includes(file)) problems.push(`extra in dist/: ${file}`);
      else if (!committed.includes(file)) problems.push(`missing from dist/: ${file}`);
      else if (!readFileSync(join(fresh, file)).equals(readFileSync(join(dist, file)))) {
        problems.push(`differs: ${file}`);
      }
    }
    if (problems.length > 0) {
      console.error(`web/dist is stale:\n  ${problems.join("\n  ")}\nRebuild it: cd web && npm ci && npm run build`);
      process.exit(1);
    }
    console.log(`web/dist is up to date (${expected.length} files)`);
  } finally {
    rmSync(fresh, { recursive: true, force: true });
  }
} else {
  await build(dist);
  console.log(`built ${files(dist).length} files into dist/`);
}
