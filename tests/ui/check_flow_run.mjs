// Open a flow run in the Prefect UI with headless Chromium; check the stages and the evaluation artifact.
//
//   node check_flow_run.mjs <flow run URL> <output folder> <task name,task name,...> <artifact key> <text,text,...>
//
// Prints one JSON line: what the page showed. Exits 1 with the reason when something is missing.
// playwright-core comes from .cache/ui-test (make ui-test-setup); Chromium is Debian's (/usr/bin/chromium).
import { createRequire } from 'module';
import { mkdtempSync } from 'fs';
import { tmpdir } from 'os';
import { join } from 'path';

const require = createRequire(join(process.env.PLAYWRIGHT_DIR, 'package.json'));
const { chromium } = require('playwright-core');

const [url, outDir, tasksArg, artifactKey, textsArg] = process.argv.slice(2);
const tasks = tasksArg.split(',');
const texts = textsArg.split(',');
const timeout = 30_000;

const context = await chromium.launchPersistentContext(mkdtempSync(join(tmpdir(), 'grpoflow-ui-profile-')), {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  viewport: { width: 1400, height: 1000 },
});
const report = { url, tasks: {}, artifact: null, screenshots: [] };
const page = context.pages()[0] || await context.newPage();
try {
  page.setDefaultTimeout(timeout);
  await page.goto(url);

  // the stages: one task run each, named <task>-<3 hex>
  await page.getByText('Task Runs', { exact: true }).last().click();
  for (const name of tasks) {
    const run = page.getByText(new RegExp(`^${name}-[0-9a-f]{3}$`)).first();
    await run.waitFor();
    report.tasks[name] = await run.innerText();
  }
  report.title = await page.getByText(/ on .*, steps /).first().innerText();
  await shot(page, 'flow-run-task-runs.png');

  // the evaluation artifact, opened from the flow run's Artifacts tab
  await page.getByText('Artifacts', { exact: true }).last().click();
  await page.getByText(artifactKey, { exact: true }).first().click();
  await page.getByRole('table').first().waitFor();
  const body = await page.innerText('body');
  const missing = texts.filter((t) => !body.includes(t));
  report.artifact = { key: artifactKey, url: page.url(), missing,
                      rows: await page.getByRole('row').allInnerTexts() };
  await shot(page, 'flow-run-evaluation.png');
  if (missing.length) throw new Error(`the ${artifactKey} artifact does not show: ${missing.join(', ')}`);
  console.log(JSON.stringify(report));
} catch (error) {
  await shot(page, 'failure.png').catch(() => {});
  console.log(JSON.stringify({ ...report, error: String(error) }));
  process.exitCode = 1;
} finally {
  await context.close();
}

async function shot(page, name) {
  const path = join(outDir, name);
  await page.screenshot({ path, fullPage: true });
  report.screenshots.push(path);
}
