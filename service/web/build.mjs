// Bundle src/main.ts (with NiiVue) into dist/, next to index.html and style.css: no CDN at run time.
import { build } from "esbuild";
import { copyFileSync, mkdirSync, rmSync } from "node:fs";

rmSync("dist", { recursive: true, force: true });
mkdirSync("dist");
await build({
  entryPoints: ["src/main.ts"],
  bundle: true,
  minify: true,
  format: "esm",
  target: "es2022",
  splitting: true, // NiiVue loads only with the viewer
  outdir: "dist",
  chunkNames: "chunks/[name]-[hash]",
  logLevel: "warning",
});
for (const file of ["index.html", "style.css"]) copyFileSync(`src/${file}`, `dist/${file}`);
