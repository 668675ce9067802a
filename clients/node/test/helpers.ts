import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { findPython } from "../src/python.js";

/** The nearest `relative` path above this file (tests run from dist/test, the vectors live in the repo root). */
export function findUp(relative: string): string {
  for (let dir = dirname(fileURLToPath(import.meta.url)); ; dir = dirname(dir)) {
    if (existsSync(join(dir, relative))) return join(dir, relative);
    if (dirname(dir) === dir) throw new Error(`${relative} not found above ${fileURLToPath(import.meta.url)}`);
  }
}

/**
 * Whether any live process is left in the group. Zombies do not count: an orphan whose new parent (PID 1 of a
 * container, say) never reaps it stays in the table, holding nothing. Linux /proc, like the CI machines.
 */
export function groupAlive(pgid: number): boolean {
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    let stat: string;
    try {
      stat = readFileSync(`/proc/${entry}/stat`, "utf8");
    } catch {
      continue; // exited while we looked
    }
    // pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses, so split after its last ')'
    const [state, , pgrp] = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    if (Number(pgrp) === pgid && state !== "Z") return true;
  }
  return false;
}

export async function waitFor(check: () => boolean | Promise<boolean>, ms: number): Promise<boolean> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (await check()) return true;
    await new Promise((r) => setTimeout(r, 50));
  }
  return check();
}

/**
 * Writes a scripted stand-in for the worker (an executable Python file, run by the project's interpreter) and
 * returns its path, for `spawn({ python: path })`: the protocol's edge cases on demand. `scenario` is Python run
 * after the helpers of the repo's tests/fake_worker.py (hello, recv, send, send_raw, respond), shared by every client.
 */
export function fakeWorker(scenario: string): string {
  const dir = mkdtempSync(join(tmpdir(), "lmport-fake-"));
  const path = join(dir, "worker.py");
  const shared = dirname(findUp("tests/fake_worker.py"));
  writeFileSync(path, `#!${findPython().python}
import sys
sys.path.insert(0, ${JSON.stringify(shared)})
from fake_worker import *
${scenario}
`, { mode: 0o755 });
  return path;
}

/** Runs `body` as an ES module in a separate Node process (with `Worker` imported); resolves with its stdout. */
export function runHost(body: string): Promise<{ code: number | null; stdout: string }> {
  const index = new URL("../src/index.js", import.meta.url).href;
  const host = spawn(process.execPath, ["--input-type=module", "-e",
    `import { Worker } from ${JSON.stringify(index)};\n${body}`], { stdio: ["ignore", "pipe", "inherit"] });
  let stdout = "";
  host.stdout!.setEncoding("utf8").on("data", (d: string) => { stdout += d; });
  return new Promise((resolve) => host.on("close", (code) => resolve({ code, stdout })));
}
