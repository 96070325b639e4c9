// Open a flow run in the Prefect UI with headless Chromium; check its Subflow Runs tab lists the runs
// it started.
//
//   node check_subflow_runs.mjs <flow run URL> <output folder> <count> <text,text,...>
//
// <count>: how many subflow runs the tab must list; the texts (run names, deployments, "N Task runs")
// must show on it. Prints one JSON line: what the page showed. Exits 1 with the reason when something
// is missing. Chromium and playwright-core: browser.mjs.
import { openPage, shot } from './browser.mjs';

const [url, outDir, count, textsArg] = process.argv.slice(2);
const texts = textsArg.split(',');

const { context, page } = await openPage();
const report = { url, screenshots: [] };
try {
  await page.goto(url);
  await page.getByText('Subflow Runs', { exact: true }).last().click();
  await page.getByText(`${count} Flow run${count === '1' ? '' : 's'}`, { exact: true }).first().waitFor();
  // the count shows before the runs' cards: wait for each text
  report.missing = [];
  for (const text of texts) {
    await page.getByText(text).first().waitFor().catch(() => report.missing.push(text));
  }
  await shot(page, outDir, 'flow-run-subflow-runs.png', report);
  if (report.missing.length) throw new Error(`the Subflow Runs tab does not show: ${report.missing.join(', ')}`);
  console.log(JSON.stringify(report));
} catch (error) {
  await shot(page, outDir, 'failure-subflow-runs.png', report).catch(() => {});
  console.log(JSON.stringify({ ...report, error: String(error) }));
  process.exitCode = 1;
} finally {
  await context.close();
}
