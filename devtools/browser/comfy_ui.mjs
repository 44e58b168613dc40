// Helpers that drive ComfyUI's real web UI (frontend 1.32.9) in Debian's chromium through playwright-core.
//
// Shared by build_workflows.mjs (builds the example workflows in the UI and saves what the frontend
// writes) and browser_test.mjs (loads one from the template browser and runs it). Everything happens
// through the frontend's own objects (`window.app`, `window.LiteGraph`) or through clicks, never by
// writing LiteGraph JSON by hand.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

export const CHROMIUM = process.env.LORA2_CHROMIUM || '/usr/bin/chromium';
export const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

/** Parses `--key value` / `--flag` arguments into an object. */
export function parseArgs(argv) {
  const out = {};
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (!arg.startsWith('--')) throw new Error(`unexpected argument ${arg}`);
    const key = arg.slice(2);
    if (i + 1 < argv.length && !argv[i + 1].startsWith('--')) out[key] = argv[++i];
    else out[key] = true;
  }
  return out;
}

export function log(...parts) {
  const t = (performance.now() / 1000).toFixed(1).padStart(6);
  console.log(`[${t}s]`, ...parts);
}

/** Starts chromium with a fresh profile; the caller closes it with `closeBrowser`. */
export async function launchBrowser() {
  if (!fs.existsSync(CHROMIUM)) throw new Error(`no chromium at ${CHROMIUM}`);
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'lora2-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    args: CHROMIUM_ARGS,
    headless: true,
    viewport: { width: 1280, height: 720 },
  });
  return { context, profile };
}

export async function closeBrowser({ context, profile }) {
  try {
    await context.close();
  } finally {
    fs.rmSync(profile, { recursive: true, force: true });
  }
}

/**
 * Opens the UI and waits until the app has its node definitions (our pack's nodes registered).
 * Console errors are collected on `page.consoleErrors` for the caller to report.
 */
export async function openComfy(context, url, { requireNodes = ['LoRA2Train'] } = {}) {
  const page = context.pages()[0] || (await context.newPage());
  page.consoleErrors = [];
  page.on('console', (m) => {
    if (m.type() === 'error') page.consoleErrors.push(m.text());
  });
  page.on('pageerror', (e) => page.consoleErrors.push(String(e)));
  await page.goto(url, { waitUntil: 'domcontentloaded' });
  await page.waitForFunction(
    (types) =>
      window.app?.graph &&
      window.LiteGraph?.registered_node_types &&
      types.every((t) => t in window.LiteGraph.registered_node_types),
    requireNodes,
    { timeout: 60_000, polling: 100 },
  );
  return page;
}

/**
 * Closes whatever dialog the frontend opened by itself (on a first start it opens the template
 * browser, which Escape does not close): Escape first, then the dialog's own close (x) button.
 */
export async function closeDialogs(page, { settle = 500 } = {}) {
  await page.waitForTimeout(settle); // dialogs opened at start-up appear just after the app is ready
  const dialogs = page.locator('.p-dialog');
  for (let i = 0; i < 6 && (await dialogs.count()); i++) {
    if (i % 2 === 0) {
      await page.keyboard.press('Escape');
    } else {
      const close = dialogs
        .first()
        .locator('button.p-dialog-close-button, button[aria-label="Close"], button:has(> i.pi-times)')
        .first();
      if (await close.count()) await close.click();
    }
    await page.waitForTimeout(250);
  }
  const left = await dialogs.count();
  if (left) {
    const text = await dialogs.first().innerText();
    throw new Error(`${left} dialog(s) would not close: ${text.slice(0, 200)}`);
  }
}

/**
 * A browser session on ComfyUI: launches chromium, opens the UI at `url`, closes the dialogs it opens
 * by itself, runs `body(page)` and returns what it returns; the browser is closed whatever happens.
 * `onError(page, error)` runs before it closes, with the page still live (`page` is undefined when the
 * UI never opened), e.g. to take a screenshot of the failure; the error is then thrown on.
 */
export async function withComfy(url, body, { onError } = {}) {
  const browser = await launchBrowser();
  let page;
  try {
    page = await openComfy(browser.context, url);
    await closeDialogs(page);
    return await body(page);
  } catch (error) {
    if (onError) await onError(page, error);
    throw error;
  } finally {
    await closeBrowser(browser);
  }
}

/**
 * Builds a graph in the live app from a spec (see workflow_specs.mjs). Runs inside the page: only
 * `window.app` / `window.LiteGraph` and the spec are available there. Returns the graph's bounds and,
 * per spec key, the node's id, type and title.
 */
export function buildGraphInPage(spec) {
  const { app, LiteGraph } = window;
  const TITLE_H = LiteGraph.NODE_TITLE_HEIGHT;
  const COL_GAP = 60;
  const ROW_GAP = 36;
  const GROUP_GAP = 80;
  const BAND_GAP = 70;
  const PAD = 16;

  const measure = document.createElement('canvas').getContext('2d');
  measure.font = app.canvas.title_text_font || `${LiteGraph.NODE_TEXT_SIZE}px Arial`;

  app.graph.clear();
  const nodes = {};
  const fail = (msg) => {
    throw new Error(`${spec.name}: ${msg}`);
  };
  for (const [key, def] of Object.entries(spec.nodes)) {
    const node = LiteGraph.createNode(def.type);
    if (!node) fail(`node type ${def.type} is not registered`);
    if (def.title) node.title = def.title;
    app.graph.add(node);
    if (def.text !== undefined) {
      const text = node.widgets?.find((w) => w.name === 'text');
      if (!text) fail(`${def.type} has no text widget`);
      text.value = def.text;
    }
    for (const [name, value] of Object.entries(def.widgets || {})) {
      const widget = node.widgets?.find((w) => w.name === name);
      if (!widget) fail(`${key} (${def.type}) has no widget ${name}: ${(node.widgets || []).map((w) => w.name)}`);
      widget.value = value;
      widget.callback?.(value);
    }
    // Reproducible examples: every seed stays where the workflow puts it.
    for (const widget of node.widgets || []) {
      if (widget.name === 'control_after_generate') widget.value = 'fixed';
    }
    const auto = node.computeSize();
    const titleWidth = measure.measureText(node.title).width + 2 * TITLE_H + 12;
    const [w, h] = def.size || [0, 0];
    node.size = [Math.max(w, auto[0], titleWidth), Math.max(h, auto[1])];
    nodes[key] = node;
  }

  const slotIndex = (slots, ref, what) => {
    let i = slots.findIndex((s) => s.name === ref || s.label === ref || s.localized_name === ref);
    if (i < 0) {
      const byType = slots.map((s, j) => [s, j]).filter(([s]) => s.type === ref);
      if (byType.length === 1) i = byType[0][1];
    }
    if (i < 0) fail(`${what}: no slot ${ref} in [${slots.map((s) => `${s.name}:${s.type}`)}]`);
    return i;
  };
  for (const [fromKey, output, toKey, input] of spec.links) {
    const from = nodes[fromKey];
    const to = nodes[toKey];
    if (!from || !to) fail(`link ${fromKey} -> ${toKey}: unknown node`);
    const o = slotIndex(from.outputs, output, `${fromKey} output`);
    const i = slotIndex(to.inputs, input, `${toKey} input`);
    const link = from.connect(o, to, i);
    if (!link) fail(`could not connect ${fromKey}.${output} -> ${toKey}.${input}`);
  }

  // Layout: bands (rows) of groups, groups of columns, columns of nodes; nothing can overlap.
  let bandY = 0;
  const bounds = [Infinity, Infinity, -Infinity, -Infinity];
  const grow = (x, y, w, h) => {
    bounds[0] = Math.min(bounds[0], x);
    bounds[1] = Math.min(bounds[1], y);
    bounds[2] = Math.max(bounds[2], x + w);
    bounds[3] = Math.max(bounds[3], y + h);
  };
  for (const band of spec.layout) {
    let x = 0;
    let bandBottom = bandY;
    const groups = [];
    for (const block of band) {
      const group = block.group ? new LiteGraph.LGraphGroup(block.group) : null;
      const grouped = Boolean(group);
      const top = bandY + (grouped ? group.titleHeight : 0) + PAD + TITLE_H;
      let colX = x + (grouped ? PAD : 0);
      const members = [];
      for (const column of block.columns) {
        let y = top;
        let width = 0;
        for (const key of column) {
          const node = nodes[key];
          if (!node) fail(`layout names unknown node ${key}`);
          node.pos = [colX, y];
          y += node.size[1] + TITLE_H + ROW_GAP;
          width = Math.max(width, node.size[0]);
          members.push(node);
        }
        colX += width + COL_GAP;
      }
      colX -= COL_GAP;
      if (grouped) {
        app.graph.add(group);
        // Node bounding rects are refreshed only when drawn: measure from pos/size instead.
        let right = x;
        for (const n of members) right = Math.max(right, n.pos[0] + n.size[0]);
        let bottom = bandY;
        for (const n of members) bottom = Math.max(bottom, n.pos[1] + n.size[1]);
        group.pos = [x, bandY];
        group.size = [right + PAD - x, bottom + PAD - bandY];
        groups.push(group);
        x = group.pos[0] + group.size[0] + GROUP_GAP;
        bandBottom = Math.max(bandBottom, group.pos[1] + group.size[1]);
      } else {
        let bottom = bandY;
        for (const n of members) bottom = Math.max(bottom, n.pos[1] + n.size[1]);
        x = colX + GROUP_GAP;
        bandBottom = Math.max(bandBottom, bottom + PAD);
      }
    }
    for (const group of groups) {
      group.size = [group.size[0], bandBottom - bandY]; // groups in a band share top and bottom edges
      grow(group.pos[0], group.pos[1], group.size[0], group.size[1]);
    }
    for (const block of band) for (const col of block.columns) for (const key of col) {
      const n = nodes[key];
      grow(n.pos[0], n.pos[1] - TITLE_H, n.size[0], n.size[1] + TITLE_H);
    }
    bandY = bandBottom + BAND_GAP;
  }
  for (const group of app.graph._groups) group.recomputeInsideNodes();
  app.graph.setDirtyCanvas(true, true);
  const fit = [bounds[0], bounds[1], bounds[2] - bounds[0], bounds[3] - bounds[1]];
  return {
    bounds: fit,
    nodes: Object.fromEntries(Object.entries(nodes).map(([k, n]) => [k, { id: n.id, type: n.type, title: n.title }])),
  };
}

/** Fits the whole graph (nodes and groups) into the canvas, immediately (no animation). */
export async function fitGraph(page, zoom = 0.96) {
  await page.evaluate((zoom) => {
    const { app, LiteGraph } = window;
    const items = [...app.graph._nodes, ...app.graph._groups];
    const b = [Infinity, Infinity, -Infinity, -Infinity];
    for (const item of items) {
      const title = item instanceof LiteGraph.LGraphGroup ? 0 : LiteGraph.NODE_TITLE_HEIGHT;
      const r = [item.pos[0], item.pos[1] - title, item.size[0], item.size[1] + title];
      b[0] = Math.min(b[0], r[0]);
      b[1] = Math.min(b[1], r[1]);
      b[2] = Math.max(b[2], r[0] + r[2]);
      b[3] = Math.max(b[3], r[1] + r[3]);
    }
    app.canvas.ds.fitToBounds([b[0], b[1], b[2] - b[0], b[3] - b[1]], { zoom });
    app.canvas.setDirty(true, true);
  }, zoom);
  await page.waitForTimeout(400);
}

/**
 * Prepares the page for a picture of the graph: full detail at any zoom (no level-of-detail boxes),
 * no canvas info or minimap, and the UI around the canvas (menus, side bar, tabs, toasts) hidden.
 */
export async function prepareForScreenshot(page) {
  await page.evaluate(async () => {
    const settings = window.app.extensionManager.setting;
    await settings.set('LiteGraph.Canvas.MinFontSizeForLOD', 0);
    await settings.set('Comfy.Graph.CanvasInfo', false);
    await settings.set('Comfy.Minimap.Visible', false);
  });
  const hidden = [
    '#comfyui-body-top',
    '#comfyui-body-left',
    '#comfyui-body-right',
    '#comfyui-body-bottom',
    '.splitter-overlay-root',
    '.comfy-menu',
    '.comfy-menu-hamburger',
    '.p-toast',
    '#graph-canvas-container > :not(#graph-canvas):not(:has(.dom-widget))',
  ];
  await page.addStyleTag({
    content: `${hidden.flatMap((s) => [s, `${s} *`]).join(',\n')} { visibility: hidden !important; }`,
  });
  await page.mouse.move(1, 1);
  await page.waitForTimeout(200);
}

/** Sets widgets on the node with this title, the way a user's edit lands (value + callback). */
export async function setWidgets(page, title, values) {
  return page.evaluate(
    ({ title, values }) => {
      const matches = window.app.graph._nodes.filter((n) => n.title === title);
      if (matches.length !== 1) throw new Error(`${matches.length} nodes titled ${title}`);
      const node = matches[0];
      for (const [name, value] of Object.entries(values)) {
        const widget = node.widgets?.find((w) => w.name === name);
        if (!widget) throw new Error(`${title} has no widget ${name}`);
        widget.value = value;
        widget.callback?.(value);
      }
      node.setDirtyCanvas(true, true);
      return Object.fromEntries(node.widgets.map((w) => [w.name, w.value]));
    },
    { title, values },
  );
}

export function writeJson(file, data) {
  fs.mkdirSync(path.dirname(file), { recursive: true });
  fs.writeFileSync(file, JSON.stringify(data, null, 2) + '\n');
}
