// Bundles the demo into dist/: index.html, style.css and app.js (one ES module, no runtime deps).
//   node build.mjs            build once
//   node build.mjs --watch    rebuild on change
import { existsSync } from "node:fs";
import { copyFile, mkdir, rm } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const dist = join(here, "dist");
const runtime = join(here, "node_modules", "@syncd", "client");

if (!existsSync(join(runtime, "dist", "index.js"))) {
  console.error(
    "web-demo: @syncd/client is not built; run `npm ci` (or `npm run build`) in clients/typescript first",
  );
  process.exit(1);
}

await rm(dist, { recursive: true, force: true });
await mkdir(dist, { recursive: true });
const options = {
  entryPoints: [join(here, "src", "main.ts")],
  outfile: join(dist, "app.js"),
  bundle: true,
  format: "esm",
  platform: "browser",
  target: "es2020",
  sourcemap: true,
  minify: false,
  logLevel: "warning",
  // The generated bindings live in clients/typescript/generated/ and import "@syncd/client";
  // resolve that from this package's node_modules (the file: dependency), not theirs.
  nodePaths: [join(here, "node_modules")],
};
for (const file of ["index.html", "style.css"]) {
  await copyFile(join(here, "src", file), join(dist, file));
}
if (process.argv.includes("--watch")) {
  const context = await esbuild.context(options);
  await context.watch();
  console.log("web-demo: watching src/ for changes");
} else {
  await esbuild.build(options);
  console.log(`web-demo: built ${dist}`);
}
