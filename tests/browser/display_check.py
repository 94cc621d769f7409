"""Drives the live display page in headless Chromium against a real node.

Called by tests/tests/display.rs with the node's URL and keys. It opens the
display page with the display key in the URL fragment, sends purchases
through the public API, and checks that the page follows: the pool shown
equals the API's pool after every purchase, a hit appears with a "verify"
link whose check against the commitment passes, and the leaderboard lists
the buyer. It saves a screenshot. Exit status 0 means every check passed.
"""

import argparse
import json
import sys
import urllib.request

from playwright.sync_api import sync_playwright

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def call(method, url, key, body=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--tenant", required=True)
    parser.add_argument("--jackpot", required=True)
    parser.add_argument("--leaderboard", required=True)
    parser.add_argument("--display-key", required=True)
    parser.add_argument("--pos-key", required=True)
    parser.add_argument("--screenshot", required=True)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    api = f"{args.url}/v1/tenants/{args.tenant}"
    page_url = (
        f"{args.url}/display/{args.tenant}?jackpot={args.jackpot}&leaderboard={args.leaderboard}"
        f"#key={args.display_key}"
    )

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1600, "height": 900})
        console = []
        page.on("console", lambda message: console.append(message.text))
        page.goto(page_url)
        page.wait_for_selector('#status[data-state="live"]', timeout=20_000)
        page.wait_for_selector("#pool[data-pool-minor]", timeout=20_000)

        hit_cycle = None
        for n in range(60):
            answer = call(
                "POST",
                f"{api}/events",
                args.pos_key,
                {"event_id": f"display-{n}", "customer": f"c-{n % 3}", "store": "s-1",
                 "kind": "purchase", "amount_minor": 5000},
            )
            jackpot = call("GET", f"{api}/jackpots/{args.jackpot}", args.display_key)
            expected = str(jackpot["pool_minor"])
            page.wait_for_function(
                "expected => document.getElementById('pool').dataset.poolMinor === expected",
                arg=expected,
                timeout=15_000,
            )
            if answer["jackpots"][0]["won_minor"] > 0:
                hit_cycle = jackpot["cycle"] - 1
                break
        if hit_cycle is None:
            raise SystemExit("the jackpot never hit")

        hit = page.wait_for_selector(f'#hits li[data-cycle="{hit_cycle}"]', timeout=15_000)
        hit.query_selector("a.verify").click()
        verdict = page.wait_for_selector(f'#hits li[data-cycle="{hit_cycle}"] .verified', timeout=10_000)
        proof = hit.query_selector(".proof").inner_text()
        last_hit = call("GET", f"{api}/jackpots/{args.jackpot}", args.display_key)["last_hit"]
        if str(last_hit["trigger_minor"]) not in proof or last_hit["salt"] not in proof:
            raise SystemExit(f"the proof does not show the revealed trigger and salt: {proof}")
        if "verified" not in verdict.inner_text():
            raise SystemExit("the verify link did not confirm the commitment")
        page.wait_for_selector('#leaderboard li[data-customer="c-0"]', timeout=15_000)
        # Let the count-up settle before the picture.
        page.wait_for_function(
            "() => { const p = document.getElementById('pool'); return p.textContent.length > 0; }",
            timeout=5_000,
        )
        page.wait_for_timeout(500)
        page.screenshot(path=args.screenshot)
        errors = [line for line in console if "error" in line.lower()]
        browser.close()
    if errors:
        raise SystemExit(f"the page logged errors: {errors}")
    print(json.dumps({"hit_cycle": hit_cycle, "screenshot": args.screenshot}))


if __name__ == "__main__":
    sys.exit(main())
