// Bundle src/ into one ES module (+ its CSS) inside the Python package:
//   node build.mjs [--outdir DIR]      (default ../hydra_nb/widgets/static)
// The output is deterministic: the test suite rebuilds into a temporary folder and compares.
import * as esbuild from "esbuild";
import { fileURLToPath } from "node:url";
import path from "node:path";

const here = path.dirname(fileURLToPath(import.meta.url));
const i = process.argv.indexOf("--outdir");
const outdir = i > 0 ? path.resolve(process.argv[i + 1]) : path.join(here, "..", "hydra_nb", "widgets", "static");

await esbuild.build({
  entryPoints: { explorer: path.join(here, "src", "index.js") },
  bundle: true,
  format: "esm",
  target: "es2020",
  outdir,
  minify: true,
  legalComments: "none",
  charset: "utf8",
  banner: { js: "// hydra_nb explorer: generated from js/src by `npm run build` in js/. Do not edit.",
    css: "/* hydra_nb explorer: generated from js/src by `npm run build` in js/. Do not edit. */" },
  logLevel: "warning",
});
console.log(`built ${path.relative(process.cwd(), outdir) || "."}/explorer.{js,css}`);
