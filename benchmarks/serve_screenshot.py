"""Screenshot of the web page answering a VQA-RAD question (for the README).

    python benchmarks/serve_screenshot.py docs/serve.png

Starts `mmpeft serve` on two shipped adapters (127.0.0.1 only), asks one question about a
VQA-RAD test image in headless Chromium (Selenium), saves the page as a PNG, stops the server.
"""

import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_serve_browser import ask, browser, start_server  # noqa: E402

out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/serve.png")
image = ROOT.parent / "shared" / "vqa_rad" / "images" / "synpic100228.jpg"
server = start_server(ROOT / "adapters" / "vqa_rad_bitfit_hadamard_all40", 8765)
driver = browser()
try:
    answer, error = ask(driver, "http://127.0.0.1:8765/", image, "is there a fracture?")
    print("answer:", answer, error)
    driver.save_screenshot(str(out))
finally:
    driver.quit()
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=30)
