"""Drives Hangar's dashboard in Debian's headless Chromium (Playwright's sync API) and checks
what an operator would: sign-in (a wrong key is refused with the API's message, the admin key
works, a key in the fragment is taken and removed, a key that stops working returns to the
sign-in form), the fleet page lists the agent and its versions and draws the latency chart,
the traffic editor saves a new split, the session page tails the agent's log live and browses
its files and its traces, and the trace page draws a waterfall.

    dashboard.py --url http://127.0.0.1:PORT/ui/ --key hk_… --agent dash --session sess_… \
        --user alice --log-line "dash-agent v1 served" --out target/test-artifacts/ui

Prints one JSON object (what was checked) on success; exits 1 with the reason otherwise,
leaving failure.png beside the screenshots.
"""

import argparse
import json
import os
import re
import secrets
import sys

from playwright.sync_api import sync_playwright, expect

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


class Failed(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Failed(what)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True, help="the dashboard, e.g. http://127.0.0.1:7070/ui/")
    ap.add_argument("--key", required=True)
    ap.add_argument("--agent", required=True)
    ap.add_argument("--session", required=True)
    ap.add_argument("--user", required=True, help="the session's user (for a request during the tail)")
    ap.add_argument("--other-user", required=True, help="another user with a session of the agent")
    ap.add_argument("--log-line", required=True, help="text the agent printed before the page opened")
    ap.add_argument("--out", required=True, help="directory for screenshots")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    base = a.url.rstrip("/") + "/"
    origin = re.match(r"https?://[^/]+", base).group(0)
    done = {}

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
        ctx.set_default_timeout(30_000)
        page = ctx.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        shot = lambda name: (page.evaluate("window.scrollTo(0, 0)"),
                             page.screenshot(path=os.path.join(a.out, name), full_page=True))
        try:
            # A wrong key: the API's own message, on the form.
            page.goto(base)
            expect(page.locator("#signin")).to_be_visible()
            page.fill("#api-key", "not-a-key")
            page.click("#signin-submit")
            expect(page.locator("#signin-error")).to_contain_text("start with hk_")
            page.fill("#api-key", "hk_000000000000_" + "0" * 64)
            page.click("#signin-submit")
            expect(page.locator("#signin-error")).to_contain_text("not valid")
            check(page.evaluate("sessionStorage.getItem('hangar.key')") is None, "a refused key was kept")
            done["wrong_key_refused"] = page.locator("#signin-error").inner_text()

            # The admin key: the fleet.
            page.fill("#api-key", a.key)
            page.click("#signin-submit")
            agent_rows = page.locator(f"tbody[data-agent='{a.agent}']")
            expect(agent_rows).to_be_visible()
            versions = agent_rows.locator("tr.version-row").evaluate_all("rs => rs.map(r => r.dataset.version)")
            check("1" in versions and "2" in versions, f"the fleet lists versions {versions}, not 1 and 2")
            expect(agent_rows.locator("tr.version-row[data-version='1']")).to_contain_text("100 %")
            done["fleet_versions"] = versions
            # The latency chart has drawn its points (the test made requests before).
            page.wait_for_selector("svg.latency-chart circle")
            marks = page.locator("svg.latency-chart circle").count()
            lines = page.locator("svg.latency-chart path.line").count()
            check(marks >= 3, f"the latency chart has {marks} points")
            check("No requests" not in page.locator("svg.latency-chart").text_content(), "the latency chart is empty")
            page.wait_for_selector("svg.requests-chart rect")
            page.wait_for_selector("svg.sessions-chart rect.seg")
            done["latency_chart"] = {"points": marks, "lines": lines}
            expect(page.locator("#kpi-rate .sub")).not_to_have_text(re.compile(r"^0 in the last hour"))
            shot("fleet.png")

            # The agent: change the split in the traffic editor, 100/0 -> 30/70, and save.
            page.click(f"tbody[data-agent='{a.agent}'] a.agent-link")
            expect(page.locator("#traffic-editor")).to_be_visible()
            expect(page.locator("#weight-1")).to_have_value("100")
            expect(page.locator("#weight-2")).to_have_value("0")
            expect(page.locator("#traffic-save")).to_be_disabled()
            page.fill("#weight-1", "30")
            expect(page.locator("#weight-2")).to_have_value("70")
            page.fill("#weight-2", "70")
            expect(page.locator("#traffic-sum")).to_have_text("100 %")
            page.click("#traffic-save")
            expect(page.locator("#traffic-message")).to_contain_text("Traffic saved: v1 30 % · v2 70 %")
            expect(page.locator("#versions-table tr[data-version='2']")).to_contain_text("70 %")
            done["traffic_saved"] = page.locator("#traffic-message").inner_text()
            # With two versions, one weight follows the other; Reset puts back what is saved.
            page.fill("#weight-2", "20")
            expect(page.locator("#weight-1")).to_have_value("80")
            expect(page.locator("#traffic-save")).to_be_enabled()
            page.click("#traffic-reset")
            expect(page.locator("#weight-1")).to_have_value("30")
            expect(page.locator("#traffic-save")).to_be_disabled()
            # Sessions, filtered by user and by state.
            rows = page.locator("#sessions-table tbody tr")
            expect(rows).to_have_count(2)
            page.fill("#user-filter", a.other_user)
            expect(rows).to_have_count(1)
            expect(rows.first.locator("td.user")).to_have_text(a.other_user)
            page.fill("#user-filter", "")
            page.select_option("#state-filter", "suspended")
            expect(page.locator("#sessions-card .empty")).to_contain_text("No session matches")
            page.select_option("#state-filter", "")
            expect(rows).to_have_count(2)
            done["session_filters"] = True
            shot("agent.png")

            # The session: its log, live; its files; its timeline; its traces.
            page.click(f"a.session-link[href='#/sessions/{a.session}']")
            log = page.locator("#log")
            expect(log).to_contain_text(a.log_line)
            expect(page.locator("#log-status")).to_contain_text("following")
            marker = "live-" + secrets.token_hex(4)
            r = page.request.post(f"{origin}/agents/{a.agent}/responses", headers={
                "authorization": f"Bearer {a.key}", "x-agent-user-id": a.user,
                "x-agent-session-id": a.session, "content-type": "application/json",
            }, data=json.dumps({"input": marker}))
            check(r.status == 200, f"the request during the tail answered {r.status}: {r.text()}")
            expect(log).to_contain_text(f"input={marker}", timeout=20_000)
            done["live_log_line"] = marker
            page.wait_for_selector("svg.timeline rect.seg.running")
            expect(page.locator("#events-table tr[data-kind='creating']")).to_have_count(1)
            done["timeline_events"] = page.locator("#events-table tbody tr").count()
            # Files: /root/notes holds a note per request (the agent runs as root).
            page.click("#files-table tr[data-name='root'] button")
            page.click("#files-table tr[data-name='notes'] button")
            expect(page.locator("#files-path")).to_contain_text("notes")
            notes = page.locator("#files-table tbody tr")
            check(notes.count() >= 1, "no notes in the workspace")
            page.click("#files-table tr[data-name='note-1.txt'] button")
            expect(page.locator("#file-content")).not_to_be_empty()
            done["file_preview"] = page.locator("#file-content").inner_text().strip()
            expect(page.locator("#traces-card .body")).not_to_contain_text("Loading")
            check(page.locator("#traces-table").count() > 0, "the session page lists no traces")
            shot("session.png")

            # The trace page: the session's first request, drawn as a waterfall.
            page.locator("#traces-table a.trace-link").last.click()
            page.wait_for_selector("svg.waterfall rect.span")
            spans = page.locator("svg.waterfall rect.span").count()
            expect(page.locator("svg.waterfall")).to_contain_text("create_session")
            page.locator("svg.waterfall rect.span").first.click()
            expect(page.locator("#span-details")).to_contain_text("gen_ai.agent.name")
            done["trace_spans"] = spans
            shot("trace.png")

            # A key handed over in the fragment is taken, then removed from the address.
            fresh = browser.new_context(viewport={"width": 1400, "height": 1000})
            fp = fresh.new_page()
            fp.goto(base + "#key=" + a.key)
            expect(fp.locator(f"tbody[data-agent='{a.agent}']")).to_be_visible()
            check("key=" not in fp.url, f"the key stayed in the address: {fp.url}")
            check(fp.evaluate("history.length") >= 1, "no history")
            done["fragment_key_removed"] = fp.url
            fresh.close()

            # A key that stops working (revoked, say) brings the sign-in form back.
            page.evaluate("sessionStorage.setItem('hangar.key', 'hk_000000000000_' + '1'.repeat(64))")
            page.goto(base + "#/")
            expect(page.locator("#signin-error")).to_contain_text("Signed out")
            done["401_returns_to_signin"] = True

            check(not errors, f"script errors on the page: {errors}")
        except Exception as e:  # noqa: BLE001 - any failure is reported with a picture
            try:
                page.screenshot(path=os.path.join(a.out, "failure.png"), full_page=True)
            except Exception:  # noqa: BLE001
                pass
            print(f"dashboard check failed: {type(e).__name__}: {e}", file=sys.stderr)
            if errors:
                print(f"script errors on the page: {errors}", file=sys.stderr)
            print(json.dumps(done), file=sys.stderr)
            browser.close()
            sys.exit(1)
        browser.close()
    print(json.dumps(done))


if __name__ == "__main__":
    main()
