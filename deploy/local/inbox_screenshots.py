#!/usr/bin/env python3
"""Screenshots of the agent inbox: the list and the first open approval's detail (its history
loaded), in Debian's headless Chromium through Selenium. The demo runs it when
SWITCHYARD_SCREENSHOTS names a directory; the README's screenshots are made so.

    inbox_screenshots.py BASE_URL TOKEN DIR
"""
import atexit
import os
import shutil
import sys
import tempfile

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

os.environ.setdefault("SE_OFFLINE", "true")
base, token, out = sys.argv[1].rstrip("/"), sys.argv[2], sys.argv[3]
os.makedirs(out, exist_ok=True)
# Chromium's own temporary files go to a private directory removed at exit.
SCRATCH = tempfile.mkdtemp(prefix="switchyard-browser-")
os.environ["TMPDIR"] = SCRATCH
atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)
o = webdriver.ChromeOptions()
o.binary_location = "/usr/bin/chromium"
for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--disable-dev-shm-usage", "--window-size=1280,860", "--hide-scrollbars",
          f"--user-data-dir={os.path.join(SCRATCH, 'profile')}"]:
    o.add_argument(a)
d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=o)
try:
    wait = WebDriverWait(d, 20)
    d.get(base + "/inbox")
    wait.until(EC.presence_of_element_located((By.ID, "token"))).send_keys(token)
    d.find_element(By.ID, "sign-in").click()
    wait.until(EC.presence_of_element_located((By.ID, "approvals")))
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#live.on")))
    d.save_screenshot(os.path.join(out, "inbox-list.png"))
    d.find_element(By.CSS_SELECTOR, "tr.row a.open").click()
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#history.loaded")))
    height = d.execute_script("return document.documentElement.scrollHeight")
    d.set_window_size(1280, min(max(height, 860), 2400))
    d.save_screenshot(os.path.join(out, "inbox-detail.png"))
    print(f"screenshots in {out}: inbox-list.png, inbox-detail.png")
finally:
    d.quit()
