// Open a flow run in the Prefect UI with headless Chromium; check the stages and the evaluation artifact.
//
//   node check_flow_run.mjs <flow run URL> <output folder> <task name,task name,...> <artifact key> <text,text,...>
//                           [<page text,page text,...>]
//
// The page texts, if given, must show on the flow run's Artifacts tab: its header (deployment, work pool,
// parent run) and the list of its artifacts.
// Prints one JSON line: what the page showed. Exits 1 with the reason when something is missing.
// Chromium and playwright-core: browser.mjs.
import { openPage, shot as shotIn } from './browser.mjs';

const [url, outDir, tasksArg, artifactKey, textsArg] = process.argv.slice(2);
const tasks = tasksArg.split(',');
const texts = textsArg.split(',');
const pageTexts = (process.argv[7] || '').split(',').filter(Boolean);

const { context, page } = await openPage();
const report = { url, tasks: {}, artifact: null, screenshots: [] };
try {
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
  const key = page.getByText(artifactKey, { exact: true }).first();
  await key.waitFor();
  if (pageTexts.length) {
    report.page = { missing: [] };
    for (const text of pageTexts) {
      await page.getByText(text).first().waitFor().catch(() => report.page.missing.push(text));
    }
    await shot(page, 'flow-run-artifacts.png');
    if (report.page.missing.length) throw new Error(`the flow run page does not show: ${report.page.missing.join(', ')}`);
  }
  await key.click();
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
  await shotIn(page, outDir, name, report);
}
