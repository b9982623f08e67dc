// Images from code through the TypeScript SDK: steps, local files, the cache, and failures
// that say which step failed.

import assert from "node:assert/strict";
import { mkdir, mkdtemp, rm, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";

import { Client, Image, ImageBuildFailed, InvalidRequest, type BuildEvent } from "../src/index.js";
import { LIMIT, rejection, sandboxFor } from "./helpers.js";

test("an image from code: steps and local files, then cached", LIMIT, async (t) => {
  const local = await mkdtemp(join(tmpdir(), "corral-ts-image-"));
  t.after(() => rm(local, { recursive: true, force: true }));
  await mkdir(join(local, "app", "lib"), { recursive: true });
  await writeFile(join(local, "app", "main.py"), "print('from main')\n");
  await writeFile(join(local, "app", "lib", "skip.pyc"), "compiled");
  await writeFile(join(local, "app", "lib", "data.txt"), "data\n");
  await symlink("main.py", join(local, "app", "entry.py"));
  await writeFile(join(local, "notes.txt"), "one file\n");
  const marker = `${process.pid}-${Date.now()}`;
  const image = Image.debianSlim()
    .runCommands(`echo ${marker} > /built.txt`)
    .env({ MODE: "ts" })
    .copyLocalDir(join(local, "app"), "/app", { ignore: ["*.pyc"] })
    .copyLocalFile(join(local, "notes.txt"), "/docs/")
    .workdir("/app");
  const events: BuildEvent[] = [];
  const built = await image.build({ name: `ts-${marker}`, onProgress: (event) => events.push(event) });
  t.after(() => new Client().removeImage(built.id).catch(() => undefined));
  assert.equal(built.name, `ts-${marker}`);
  assert.ok(events.some((event) => event.kind === "step" && event.cached === false));

  const sandbox = await sandboxFor(t, { image: `ts-${marker}` });
  const seen = await sandbox.run("cat /built.txt; echo $MODE; pwd; python3 entry.py; cat lib/data.txt /docs/notes.txt; ls lib");
  assert.equal(seen.stdout, `${marker}\nts\n/app\nfrom main\ndata\none file\ndata.txt\n`);

  // The same recipe again: every step from the cache, the same image.
  const again: BuildEvent[] = [];
  const rebuilt = await image.build({ onProgress: (event) => again.push(event) });
  assert.equal(rebuilt.id, built.id);
  assert.ok(again.filter((event) => event.kind === "step").every((event) => event.cached === true));
});

test("a failing step says which, with its output", LIMIT, async () => {
  const image = Image.debianSlim().runCommands("echo fine").runCommands("echo about to fail; exit 3");
  const error = await rejection(image.build(), ImageBuildFailed, "image_build_failed");
  assert.equal(error.step, 2);
  assert.match(error.log, /about to fail/);
});

test("recipes that cannot be built are refused before anything runs", LIMIT, async (t) => {
  const cases: [Image, RegExp][] = [
    [Image.debianSlim().aptInstall(), /step 1: packages must be a non-empty list/],
    [Image.debianSlim().aptInstall("bad;name"), /'bad;name' is not a package name/],
    [Image.debianSlim().workdir("relative"), /give an absolute path/],
  ];
  for (const [image, says] of cases) {
    const error = await rejection(image.build(), InvalidRequest, "invalid_request");
    assert.match(error.message, says);
  }
  assert.throws(() => Image.debianSlim().copyLocalFile("/no/such/file", "/x"), InvalidRequest);
  assert.throws(() => Image.debianSlim().copyLocalDir("/no/such/dir", "/x"), InvalidRequest);
  const sandbox = await sandboxFor(t);
  assert.equal((await sandbox.run("echo still fine")).stdout, "still fine\n");
});
