/** Finds the Python interpreter that runs the worker: the option, then LMPORT_PYTHON, then a project's .venv. */

import { accessSync, constants } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { LMPortError } from "./errors.js";

export interface PythonChoice {
  python: string;
  /** Project root holding the .venv, put on PYTHONPATH so `-m lmport.bridge.worker` imports from a source checkout. */
  projectRoot: string | undefined;
}

export function findPython(option?: string, env: NodeJS.ProcessEnv = process.env): PythonChoice {
  if (option) return { python: option, projectRoot: undefined };
  if (env.LMPORT_PYTHON) return { python: env.LMPORT_PYTHON, projectRoot: undefined };
  const starts = [process.cwd(), dirname(fileURLToPath(import.meta.url))];
  for (const start of starts) {
    const root = findVenvRoot(start);
    if (root !== undefined) return { python: join(root, ".venv", "bin", "python"), projectRoot: root };
  }
  throw new LMPortError("spawn_failed", "no Python found for the lmport worker: pass `python`, set LMPORT_PYTHON, "
    + `or create a .venv in the project (searched upwards from ${starts.join(" and ")})`);
}

function findVenvRoot(start: string): string | undefined {
  for (let dir = resolve(start); ; dir = dirname(dir)) {
    if (isExecutable(join(dir, ".venv", "bin", "python"))) return dir;
    if (dirname(dir) === dir) return undefined;
  }
}

function isExecutable(path: string): boolean {
  try {
    accessSync(path, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}
