// Builds the pack's example workflows in ComfyUI's real web UI and saves what the frontend writes.
//
//   node devtools/browser/build_workflows.mjs --url http://127.0.0.1:8188 --root <repo> [--only a,b]
//
// For each spec in workflow_specs.mjs: a fresh graph is built with the frontend's own APIs
// (LiteGraph.createNode, app.graph.add, widgets by name, node.connect by slot), then
//   <root>/example_workflows/<name>.json        app.graph.serialize()            (UI format: the template)
//   <root>/example_workflows/api/<name>.json  app.graphToPrompt().output       (API format twin)
//   <root>/example_workflows/<name>.jpg         the whole graph fitted to 1280x720 (template thumbnail)
// Normally run by devtools/build_workflows.py, which prepares a server whose model lists hold the
// files the workflows name.

import { createHash } from 'node:crypto';
import path from 'node:path';
import { buildGraphInPage, fitGraph, log, parseArgs, prepareForScreenshot, withComfy, writeJson } from './comfy_ui.mjs';
import { SPECS } from './workflow_specs.mjs';

/** A version-4-shaped UUID derived from a name, so a rebuild does not change the file needlessly. */
function stableUuid(name) {
  const h = createHash('sha256').update(name).digest('hex');
  const variant = ((parseInt(h[16], 16) & 0x3) | 0x8).toString(16);
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-4${h.slice(13, 16)}-${variant}${h.slice(17, 20)}-${h.slice(20, 32)}`;
}

const args = parseArgs(process.argv.slice(2));
const url = args.url || 'http://127.0.0.1:8188';
const root = path.resolve(args.root || path.join(path.dirname(new URL(import.meta.url).pathname), '..', '..'));
const only = args.only ? new Set(String(args.only).split(',')) : null;
const specs = SPECS.filter((s) => !only || only.has(s.name));
if (only && specs.length !== only.size) throw new Error(`unknown workflow in --only ${args.only}`);

await withComfy(url, async (page) => {
  await prepareForScreenshot(page);
  for (const spec of specs) {
    const summary = await page.evaluate(buildGraphInPage, spec);
    await page.waitForTimeout(300);
    const { workflow, api } = await page.evaluate(async () => {
      const prompt = await window.app.graphToPrompt();
      return { workflow: window.app.graph.serialize(), api: prompt.output };
    });
    const types = new Set(workflow.nodes.map((n) => n.type));
    for (const key of Object.keys(spec.nodes)) {
      const want = spec.nodes[key];
      if (!workflow.nodes.some((n) => n.type === want.type && (n.title ?? want.title) === (want.title ?? n.title)))
        throw new Error(`${spec.name}: ${key} missing from the serialized graph`);
    }
    await fitGraph(page);
    const ds = await page.evaluate(() => ({ scale: app.canvas.ds.scale, offset: [...app.canvas.ds.offset] }));
    workflow.extra = { ...(workflow.extra || {}), ds };
    // A cleared graph serializes with the all-zero id; give each example its own, stable across rebuilds.
    workflow.id = stableUuid(`comfyui-lora2/${spec.name}`);
    writeJson(path.join(root, 'example_workflows', `${spec.name}.json`), workflow);
    writeJson(path.join(root, 'example_workflows', 'api', `${spec.name}.json`), api);
    const jpg = path.join(root, 'example_workflows', `${spec.name}.jpg`);
    await page.screenshot({ path: jpg, type: 'jpeg', quality: 80 });
    log(`${spec.name}: ${workflow.nodes.length} nodes (${types.size} types), ${workflow.links.length} links,`,
      `${workflow.groups.length} groups, bounds ${summary.bounds.map(Math.round)} -> ${jpg}`);
  }
  // Expected on this host: 404s for the core template index and the embedded docs (packages not installed).
  for (const text of new Set(page.consoleErrors.map((e) => e.split('\n')[0].slice(0, 160)))) log(`console: ${text}`);
});
