// The browser half of tests/test_browser.py: a user opens the template browser, loads this pack's
// training workflow, shrinks it to a tiny run through the widgets, presses Run, watches the validation
// samples appear on the Train node while it trains, and waits for the heatmap.
//
//   node tests/browser/browser_test.mjs --url http://127.0.0.1:8188 --screenshot out.png
//
// Prints progress lines, then one line `RESULT {json}` that the Python test reads. Exits 1 on failure
// (after a screenshot of the moment it failed, next to --screenshot, with `-failed` in the name).

import fs from 'node:fs';
import path from 'node:path';
import {
  closeDialogs,
  fitGraph,
  log,
  parseArgs,
  prepareForScreenshot,
  setWidgets,
  withComfy,
} from '../../devtools/browser/comfy_ui.mjs';

const PACK = 'ComfyUI-LoRA2';
const WORKFLOW = 'lora2_train_and_inspect';
const HEATMAP = 'Rank heatmap';
const TRAIN = 'Train LoRA²';

const args = parseArgs(process.argv.slice(2));
const url = args.url || 'http://127.0.0.1:8188';
const screenshot = path.resolve(args.screenshot || 'test-artifacts/browser_train_and_inspect.png');
const runTimeout = Number(args['run-timeout'] || 120) * 1000;
const tiny = JSON.parse(fs.readFileSync(new URL('../../devtools/browser/tiny_run.json', import.meta.url), 'utf8'));
const timings = {};
const started = performance.now();
const mark = (name) => {
  timings[name] = Number(((performance.now() - started) / 1000).toFixed(1));
  log(name);
};

/** What the user does, from the UI opened (withComfy closes the template browser a first start opens by
 * itself; the user opens it from the side bar) to the result, printed as the `RESULT` line. */
async function firstRun(page) {
  mark('app ready');

  // 1. The template browser: side bar "Templates" button, then this pack's entry under "Extensions".
  await page.locator('button.templates-tab-button').click();
  const dialog = page.locator('.p-dialog[aria-labelledby="global-workflow-template-selector"]');
  await dialog.waitFor({ state: 'visible', timeout: 15_000 });
  const category = dialog.locator('nav [role="button"]', { hasText: PACK });
  await category.waitFor({ state: 'visible', timeout: 15_000 });
  await category.click();
  const cards = dialog.locator('[data-testid^="template-workflow-"]');
  const card = dialog.locator(`[data-testid="template-workflow-${WORKFLOW}"]`);
  await card.waitFor({ state: 'visible', timeout: 15_000 });
  const listed = await cards.evaluateAll((els) => els.map((e) => e.dataset.testid.replace('template-workflow-', '')));
  const thumb = card.locator('img').first();
  await page.waitForFunction((img) => img.complete && img.naturalWidth > 0, await thumb.elementHandle(), {
    timeout: 10_000,
  });
  const thumbnail = await thumb.evaluate((img) => ({
    src: img.src,
    width: img.naturalWidth,
    height: img.naturalHeight,
  }));
  mark('template browser open');

  // 2. Load it by clicking the card; the dialog closes and the graph appears.
  await card.click();
  await dialog.waitFor({ state: 'hidden', timeout: 15_000 });
  await page.waitForFunction(
    (title) => window.app.graph._nodes.some((n) => n.title === title),
    'Train LoRA²',
    { timeout: 15_000 },
  );
  await page.waitForTimeout(500);
  const loaded = await page.evaluate(() => {
    const types = window.app.graph._nodes.map((n) => n.type);
    return {
      nodes: types.length,
      groups: window.app.graph._groups.map((g) => g.title),
      types: [...new Set(types)].sort(),
      unregistered: types.filter((t) => !(t in window.LiteGraph.registered_node_types)),
      missingNodesDialog: document.querySelectorAll('.comfy-missing-nodes, [aria-labelledby="global-missing-nodes"]')
        .length,
      dialogs: [...document.querySelectorAll('.p-dialog')].map(
        (d) => d.getAttribute('aria-labelledby') || d.innerText.slice(0, 80),
      ),
      titles: window.app.graph._nodes.map((n) => n.title),
    };
  });
  mark('workflow loaded');
  if (loaded.unregistered.length || loaded.missingNodesDialog) {
    throw new Error(`missing nodes: ${JSON.stringify(loaded)}`);
  }
  await closeDialogs(page, { settle: 0 }); // e.g. a missing-models notice for the real SD1.5 checkpoint name

  // 3. A tiny run, set through the widgets as a user would.
  const widgets = {};
  for (const [title, values] of Object.entries(tiny.overrides)) widgets[title] = await setWidgets(page, title, values);

  // 4. Run, and follow the server's events for that prompt; watch what the Train node shows meanwhile.
  await page.evaluate((trainTitle) => {
    const events = (window.__lora2Events = []);
    const types = ['execution_start', 'executed', 'execution_success', 'execution_error', 'execution_interrupted'];
    for (const type of types) {
      window.app.api.addEventListener(type, (e) => events.push({ type, detail: e.detail }));
    }
    const train = window.app.graph._nodes.find((n) => n.title === trainTitle);
    const previews = (window.__lora2Previews = []);
    window.app.api.addEventListener('b_preview_with_metadata', (e) =>
      previews.push({ node: String(e.detail.displayNodeId ?? e.detail.nodeId), bytes: e.detail.blob?.size ?? 0 }),
    );
    // What a user sees: an image drawn on the Train node before the node has finished (a progress preview).
    const seen = (window.__lora2TrainImages = []);
    window.__lora2Poll = setInterval(() => {
      const img = train.imgs?.[0];
      if (!img?.complete || !img.naturalWidth) return;
      const finished = events.some((e) => e.type === 'executed' && String(e.detail.node) === String(train.id));
      const last = seen[seen.length - 1];
      if (!last || last.src !== img.src) seen.push({ src: img.src, width: img.naturalWidth, finished });
    }, 50);
  }, TRAIN);
  await page.locator('button[aria-label="Run"]').first().click();
  mark('queued');
  const done = await page.waitForFunction(
    () =>
      window.__lora2Events.find((e) =>
        ['execution_success', 'execution_error', 'execution_interrupted'].includes(e.type),
      ),
    null,
    { timeout: runTimeout, polling: 250 },
  );
  const finish = await done.jsonValue();
  mark('run finished');
  await page.waitForTimeout(500); // the Train node loads its final grid after `executed`
  const train = await page.evaluate((trainTitle) => {
    clearInterval(window.__lora2Poll);
    const node = window.app.graph._nodes.find((n) => n.title === trainTitle);
    return {
      id: String(node.id),
      previews: window.__lora2Previews,
      images: window.__lora2TrainImages,
      final: (node.imgs || []).map((img) => ({ src: img.src, width: img.naturalWidth })),
    };
  }, TRAIN);
  if (finish.type !== 'execution_success') {
    throw new Error(`run ended with ${finish.type}: ${JSON.stringify(finish.detail).slice(0, 3000)}`);
  }
  const promptId = finish.detail.prompt_id;

  // 5. The heatmap preview on the "Rank heatmap" node (the frontend loads it after `executed`).
  const heatmapId = await page.evaluate((t) => window.app.graph._nodes.find((n) => n.title === t).id, HEATMAP);
  await page.waitForFunction(
    (id) => {
      const imgs = window.app.graph.getNodeById(id)?.imgs;
      return imgs?.length > 0 && imgs.every((img) => img.complete && img.naturalWidth > 0);
    },
    heatmapId,
    { timeout: 15_000 },
  );
  const preview = await page.evaluate((id) => {
    const node = window.app.graph.getNodeById(id);
    const executed = window.__lora2Events.filter((e) => e.type === 'executed' && String(e.detail.node) === String(id));
    return {
      images: node.imgs.map((img) => ({ src: img.src, width: img.naturalWidth, height: img.naturalHeight })),
      executed: executed.map((e) => e.detail.output),
    };
  }, heatmapId);
  mark('heatmap shown');

  // 6. A picture of the result.
  await prepareForScreenshot(page);
  await fitGraph(page);
  fs.mkdirSync(path.dirname(screenshot), { recursive: true });
  await page.screenshot({ path: screenshot });
  mark('screenshot');

  const result = {
    listed,
    thumbnail,
    loaded,
    widgets,
    promptId,
    heatmapId: String(heatmapId),
    train,
    preview,
    timings,
    consoleErrors: page.consoleErrors.slice(0, 20),
    screenshot,
  };
  console.log(`RESULT ${JSON.stringify(result)}`);
}

/** A screenshot of the moment it failed, next to --screenshot, and the page's last console errors. */
async function recordFailure(page) {
  if (!page) return;
  const failed = screenshot.replace(/(\.png)?$/, '-failed.png');
  fs.mkdirSync(path.dirname(failed), { recursive: true });
  await page.screenshot({ path: failed }).catch(() => {});
  console.error(`screenshot of the failure: ${failed}`);
  console.error(`console errors: ${JSON.stringify(page.consoleErrors.slice(-10))}`);
}

try {
  await withComfy(url, firstRun, { onError: recordFailure });
} catch (error) {
  console.error(error.stack || String(error));
  process.exitCode = 1;
}
