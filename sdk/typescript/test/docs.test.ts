// Every `ts` example in docs/typescript.md type-checks against the SDK and runs against the
// server, so the documentation cannot rot.

import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { test } from "node:test";
import { fileURLToPath, pathToFileURL } from "node:url";

import ts from "typescript";

import { LIMIT, runtimes } from "./helpers.js";

const here = dirname(fileURLToPath(import.meta.url)); // build/test
const sdk = resolve(here, "..", "..");
const doc = readFileSync(join(sdk, "..", "..", "docs", "typescript.md"), "utf8");
const examples = [...doc.matchAll(/^```ts\n([\s\S]*?)^```$/gm)].map((match) => match[1]!);
const built = pathToFileURL(join(sdk, "build", "src", "index.js")).href;

test("the documentation has its examples", () => {
  assert.ok(examples.length >= 8, `${examples.length} examples`);
});

test("every example type-checks against the SDK", LIMIT, () => {
  const folder = mkdtempSync(join(tmpdir(), "corral-ts-docs-"));
  try {
    const files = examples.map((code, index) => {
      const file = join(folder, `example-${index}.mts`);
      writeFileSync(file, code);
      return file;
    });
    const program = ts.createProgram(files, {
      strict: true,
      noEmit: true,
      target: ts.ScriptTarget.ES2022,
      module: ts.ModuleKind.NodeNext,
      moduleResolution: ts.ModuleResolutionKind.NodeNext,
      lib: ["lib.es2022.d.ts", "lib.esnext.disposable.d.ts", "lib.dom.d.ts"],
      types: ["node"],
      typeRoots: [join(sdk, "node_modules", "@types")],
      baseUrl: folder,
      paths: { "@corral/sdk": [join(sdk, "src", "index.ts")] },
    });
    const problems = ts.getPreEmitDiagnostics(program).map((d) => {
      const where = d.file ? `${d.file.fileName}:${d.file.getLineAndCharacterOfPosition(d.start ?? 0).line + 1}` : "";
      return `${where} ${ts.flattenDiagnosticMessageText(d.messageText, "\n")}`;
    });
    assert.deepEqual(problems, []);
  } finally {
    rmSync(folder, { recursive: true, force: true });
  }
});

for (const [index, code] of examples.entries()) {
  const first = code.split("\n").find((line) => line && !line.startsWith("import")) ?? "";
  test(`example ${index + 1} runs: ${first.slice(0, 60)}`, LIMIT, (t) => {
    if (code.includes('runtime: "gvisor"') && !runtimes.includes("gvisor")) {
      t.skip("gvisor is not among CORRAL_TEST_RUNTIMES");
      return;
    }
    const js = ts.transpileModule(code.replaceAll('"@corral/sdk"', JSON.stringify(built)), {
      compilerOptions: { module: ts.ModuleKind.ES2022, target: ts.ScriptTarget.ES2022 },
    }).outputText;
    const folder = mkdtempSync(join(tmpdir(), "corral-ts-example-"));
    try {
      writeFileSync(join(folder, "example.mjs"), js);
      const done = spawnSync(process.execPath, [join(folder, "example.mjs")], {
        encoding: "utf8",
        timeout: 170_000,
      });
      assert.equal(done.status, 0, `${done.stdout}\n${done.stderr}`);
      assert.ok(done.stdout.trim().length > 0, "the example printed nothing");
    } finally {
      rmSync(folder, { recursive: true, force: true });
    }
  });
}
