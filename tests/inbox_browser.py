#!/usr/bin/env python3
"""Clicks through the agent inbox in a real browser: Debian's headless Chromium driven by Selenium
through /usr/bin/chromedriver (nothing is downloaded).

    inbox_browser.py '{"base": "http://127.0.0.1:PORT", "approver": TOKEN, "viewer": TOKEN,
                       "edit": APPROVAL_ID, "respond": APPROVAL_ID, "race": APPROVAL_ID,
                       "open": APPROVAL_ID (left open),
                       "filter_resource": RESOURCE, "screenshots": DIR}'

As the approver: sign in, filter the list, open an approval, check its history loads, refuse bad
JSON in the editor, edit the parameters and approve; send another back to its agent with a
comment; watch a third be decided elsewhere (the page says so by itself, through server-sent
events) and see the late click answered with who decided first. As the viewer: the list and the
detail show no decision controls, and the server refuses a decision with 403. Prints one JSON line
of what it saw; exits non-zero with the reason at the first thing that is not as it should be.
"""
import atexit
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager reach the network

args = json.loads(sys.argv[1])
base = args["base"].rstrip("/")
shots = args.get("screenshots")
seen = {}


def fail(why):
    try:
        seen["updates"] = d.execute_script("return [document.body.dataset.updates, document.body.dataset.open, document.body.dataset.id]")
    except Exception:
        pass
    print(json.dumps({"ok": False, "error": why, "seen": seen}))
    sys.exit(1)


# Chromium's own temporary files (its profile, and shared memory under --disable-dev-shm-usage) go
# to a private directory removed at exit: runs leave nothing in /tmp.
SCRATCH = tempfile.mkdtemp(prefix="switchyard-browser-")
os.environ["TMPDIR"] = SCRATCH
atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)


def browser():
    o = webdriver.ChromeOptions()
    o.binary_location = "/usr/bin/chromium"
    for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", "--window-size=1280,1500",
              f"--user-data-dir={os.path.join(SCRATCH, 'profile')}"]:
        o.add_argument(a)
    d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=o)
    d.set_page_load_timeout(30)
    return d


def wait(d, cond, what, timeout=20):
    try:
        return WebDriverWait(d, timeout).until(cond)
    except Exception:
        fail(f"timed out waiting for {what} on {d.current_url}: {d.find_element(By.TAG_NAME, 'body').text[:600]}")


def text(d, css):
    return d.find_element(By.CSS_SELECTOR, css).text


def sign_in(d, token, name):
    d.get(base + "/inbox")
    wait(d, EC.presence_of_element_located((By.ID, "token")), "the sign-in form")
    if "token=" in d.current_url:
        fail("a token in a URL")
    d.find_element(By.ID, "token").send_keys(token)
    d.find_element(By.ID, "sign-in").click()
    wait(d, EC.text_to_be_present_in_element((By.ID, "user"), name), f"{name} signed in")
    if token in d.current_url or token in d.page_source:
        fail("the token shows in the page or its URL")


def shot(d, name):
    if shots:
        os.makedirs(shots, exist_ok=True)
        d.save_screenshot(os.path.join(shots, name))


def api(method, path, token, body=None):
    req = urllib.request.Request(base + path, method=method, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


d = browser()
try:
    # --- the approver ---
    sign_in(d, args["approver"], "alice")
    wait(d, EC.presence_of_element_located((By.ID, "approvals")), "the list of approvals")
    rows = d.find_elements(By.CSS_SELECTOR, "tr.row")
    seen["rows"] = len(rows)
    seen["total"] = text(d, "#total")
    if len(rows) < 4:
        fail(f"expected at least 4 open approvals, the list has {len(rows)}")
    # The live-update channel connects.
    wait(d, EC.presence_of_element_located((By.CSS_SELECTOR, "#live.on")), "live updates (server-sent events)")
    shot(d, "inbox-list.png")
    # Filter by resource.
    f = d.find_element(By.NAME, "resource")
    f.clear()
    f.send_keys(args["filter_resource"])
    d.find_element(By.CSS_SELECTOR, "#filters button[type=submit]").click()
    wait(d, EC.text_to_be_present_in_element((By.ID, "shown"), "1"), "the filtered list")
    seen["filtered"] = [r.get_attribute("data-id") for r in d.find_elements(By.CSS_SELECTOR, "tr.row")]
    if seen["filtered"] != [args["edit"]]:
        fail(f"filtering by resource showed {seen['filtered']}")
    # The detail.
    d.find_element(By.CSS_SELECTOR, f"tr[data-id='{args['edit']}'] a.open").click()
    wait(d, EC.presence_of_element_located((By.ID, "edit-form")), "the detail page's decision forms")
    seen["detail_action"] = text(d, "#action")
    seen["detail_parameters"] = json.loads(text(d, "#parameters"))
    wait(d, EC.presence_of_element_located((By.CSS_SELECTOR, "#history.loaded")), "the resource's history")
    seen["history"] = len(d.find_elements(By.CSS_SELECTOR, "#history-lines li"))
    if seen["history"] < 1:
        fail("the history shows no audit record of the resource")
    shot(d, "inbox-detail.png")
    # Bad JSON is caught before it is sent.
    area = d.find_element(By.ID, "edit-parameters")
    area.clear()
    area.send_keys("{not json")
    d.find_element(By.ID, "edit-approve").click()
    wait(d, EC.visibility_of_element_located((By.ID, "edit-problem")), "the editor's JSON problem")
    # Edit and approve.
    edited = dict(seen["detail_parameters"], to="v0.9-edited")
    area.clear()
    area.send_keys(json.dumps(edited))
    d.find_element(By.ID, "edit-why").send_keys("roll back one version less")
    d.find_element(By.ID, "edit-approve").click()
    wait(d, EC.presence_of_element_located((By.ID, "notice")), "the recorded edit")
    seen["edit_status"] = text(d, "#status")
    if seen["edit_status"] != "superseded":
        fail(f"after edit and approve the approval is {seen['edit_status']}")
    seen["edited"] = edited
    # Respond.
    d.get(f"{base}/inbox/approvals/{args['respond']}")
    wait(d, EC.presence_of_element_located((By.ID, "respond-comment")), "the respond form")
    d.find_element(By.ID, "respond-comment").send_keys("check the error budget first, then propose again")
    d.find_element(By.ID, "respond").click()
    wait(d, EC.presence_of_element_located((By.ID, "notice")), "the recorded response")
    seen["respond_status"] = text(d, "#status")
    # Decided elsewhere while the page is open: the page says so (SSE), and a late click shows who
    # decided first.
    d.get(f"{base}/inbox/approvals/{args['race']}")
    wait(d, EC.presence_of_element_located((By.ID, "approve")), "the approve button")
    time.sleep(0.5)
    code, body = api("POST", f"/v1/approvals/{args['race']}/reject", args["approver"], {"why": "decided through the API"})
    if code != 200:
        fail(f"rejecting through the API answered {code} {body}")
    wait(d, EC.visibility_of_element_located((By.ID, "gone")), "the decided-elsewhere banner", timeout=15)
    d.find_element(By.ID, "approve").click()
    wait(d, EC.presence_of_element_located((By.ID, "problem")), "the already-decided message")
    seen["late"] = text(d, "#problem")
    if "already decided" not in seen["late"] or "alice" not in seen["late"]:
        fail(f"a late decision said: {seen['late']}")
    # Sign out ends the session.
    d.find_element(By.CSS_SELECTOR, "form[action='/inbox/logout'] button").click()
    wait(d, EC.presence_of_element_located((By.ID, "token")), "the sign-in page after signing out")

    # --- the viewer ---
    d.delete_all_cookies()
    sign_in(d, args["viewer"], "bob")
    d.get(f"{base}/inbox/approvals/{args['open']}")
    wait(d, EC.presence_of_element_located((By.ID, "read-only")), "the viewer's read-only detail page")
    if d.find_elements(By.ID, "decide"):
        fail("a viewer sees the decision forms")
    d.get(base + "/inbox")
    wait(d, EC.presence_of_element_located((By.ID, "total")), "the viewer's list")
    seen["viewer_total"] = text(d, "#total")
    if d.find_elements(By.ID, "decide"):
        fail("a viewer sees decision controls")
    code, _ = api("POST", f"/v1/approvals/{args['open']}/approve", args["viewer"], {"why": "x"})
    seen["viewer_api"] = code
    # A form post through the page as the viewer (with the right CSRF token) is refused too.
    status = d.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        const csrf = document.querySelector("input[name=csrf]").value;
        fetch(arguments[0], {method: "POST", credentials: "same-origin",
            headers: {"Content-Type": "application/x-www-form-urlencoded"},
            body: "csrf=" + encodeURIComponent(csrf) + "&why=x"})
          .then((r) => done(r.status)).catch((e) => done(String(e)));
        """,
        f"{base}/inbox/approvals/{args['open']}/approve",
    )
    seen["viewer_form"] = status
    if code != 403 or status != 403:
        fail(f"a viewer's decision answered {code} (API) and {status} (form)")
    print(json.dumps({"ok": True, "seen": seen}))
finally:
    d.quit()
