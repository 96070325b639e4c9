// Headless Chromium for the check_*.mjs scripts: Debian's /usr/bin/chromium (or CHROMIUM), driven by
// playwright-core from PLAYWRIGHT_DIR (.cache/ui-test, installed by make ui-test-setup).
import { createRequire } from 'module';
import { mkdtempSync, rmSync } from 'fs';
import { tmpdir } from 'os';
import { join } from 'path';

const require = createRequire(join(process.env.PLAYWRIGHT_DIR, 'package.json'));
const { chromium } = require('playwright-core');

export const timeout = 30_000;

// A fresh profile, no background traffic: the page talks only to the Prefect server under test.
// The profile (4 MB) goes when the returned context is closed, once Chromium has let go of it.
export async function openPage() {
  const profile = mkdtempSync(join(tmpdir(), 'grpoflow-ui-profile-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
           '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    viewport: { width: 1400, height: 1000 },
  });
  const page = context.pages()[0] || await context.newPage();
  page.setDefaultTimeout(timeout);
  const close = async () => {
    await context.close();
    rmSync(profile, { recursive: true, force: true, maxRetries: 5, retryDelay: 200 });
  };
  return { context: { close }, page };
}

// A full-page screenshot in outDir, its path added to report.screenshots.
export async function shot(page, outDir, name, report) {
  const path = join(outDir, name);
  await page.screenshot({ path, fullPage: true });
  report.screenshots.push(path);
}
